"""LSM-2 masked autoencoder (Flax NNX): a ViT over (time x signal) patches.

Encoder: patch embedding of the observed minutes (unobserved minutes are
zeroed, so fill values never reach the model), fixed 2-D sine-cosine
positions, the kept tokens of `AimMasks` (visible first), pre-norm blocks whose
attention only uses the first `visible_len` keys. Decoder: projection to the
decoder width, scatter onto the full grid with one learnable (zero-init) mask
token at every masked position, positions again, full attention, and a linear
head that predicts every minute of every patch.

`observed` is the minute mask the model may trust; for the LSM-1 baseline
(filled values treated as data) pass `aim.effective_observed(observed, mask_cfg)`
(all True). `cfg.remat`: "attention" recomputes each attention core in the
backward pass, "full" each block.

Logical axis names (nnx metadata `out_sharding` of each `nnx.Param`):
  "embed"    model width (encoder or decoder) of kernels, biases, norms,
             the mask token; the encoder->decoder projection is ("embed", None)
  "mlp"      MLP hidden width
  "heads"    attention heads
  "kv"       per-head feature size
  "patch"    patch-embedding input (minute values [+ observed flags] per token)
  "head_out" decoder head output (minute values per token)
The fused qkv kernel is ("embed", None, "heads", "kv"). No mesh is named here:
without a mesh the names are metadata only; under `jax.set_mesh(mesh)` and
`nnx.logical_axis_rules(rules)` parameters are created sharded (eager
sharding). Otherwise resolve them later with
`with nnx.logical_axis_rules(rules): specs = nnx.get_partition_spec(nnx.state(model))`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsm2.model.aim import (AimMasks, effective_observed, inference_masks, loss_tokens,
                            pack_visible)
from lsm2.model import matmul
from lsm2.model.attention import dot_product_attention
from lsm2.model.config import MaskConfig, ModelConfig


def _axes(*names: str | None) -> dict:
  """Param metadata: logical axis names; sharded at creation only under a mesh."""
  return {"out_sharding": names, "eager_sharding": not jax.sharding.get_abstract_mesh().empty}


HEAD_INIT_STD = 0.02  # Decoder head kernel init (see LSM2MAE.__init__).


def _dense_init():
  # LinearGeneral initializes a flattened (in, out) kernel, so this also fits qkv / out.
  return nnx.initializers.xavier_uniform()


def _linear(cfg, din, dout, names, rngs):
  return nnx.Linear(
      din, dout, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      dot_general=matmul.dot_general_for(cfg.matmul_dtype),
      kernel_init=_dense_init(), kernel_metadata=_axes(*names), bias_metadata=_axes(names[1]),
      rngs=rngs)


def _norm(cfg, width, rngs):
  # Statistics in float32 whatever the compute dtype.
  return nnx.LayerNorm(
      width, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
      scale_metadata=_axes("embed"), bias_metadata=_axes("embed"), rngs=rngs)


@functools.lru_cache(maxsize=16)
def sincos_2d(n_time: int, n_signal: int, width: int) -> np.ndarray:
  """Fixed positions [n_time * n_signal, width]: half time index, half signal index."""
  quarter = width // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)

  def one_axis(pos):
    angles = pos[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  t, s = np.meshgrid(np.arange(n_time), np.arange(n_signal), indexing="ij")
  emb = np.concatenate([one_axis(t.reshape(-1)), one_axis(s.reshape(-1))], axis=1)
  return emb.astype(np.float32)


def patchify(x: Float[Array, "b t c"], cfg: ModelConfig) -> Float[Array, "b n p"]:
  """[b, T, C] -> [b, N, patch_time * patch_channels], tokens row-major over (time, signal)."""
  n_time, n_signal = cfg.grid
  x = x.reshape(x.shape[0], n_time, cfg.patch_time, n_signal, cfg.patch_channels)
  return x.transpose(0, 1, 3, 2, 4).reshape(x.shape[0], n_time * n_signal, cfg.patch_size)


def unpatchify(x: Float[Array, "b n p"], cfg: ModelConfig) -> Float[Array, "b t c"]:
  """Inverse of `patchify`."""
  n_time, n_signal = cfg.grid
  x = x.reshape(x.shape[0], n_time, n_signal, cfg.patch_time, cfg.patch_channels)
  return x.transpose(0, 1, 3, 2, 4).reshape(x.shape[0], cfg.time_steps, cfg.num_channels)


def _pack(x: Float[Array, "b k *f"], pack_idx: Int[Array, "g p"]) -> Float[Array, "g p *f"]:
  """Visible tokens of each example group end to end (`aim.pack_visible`)."""
  g = pack_idx.shape[0]
  x = x.reshape(g, -1, *x.shape[2:])
  return jnp.take_along_axis(x, pack_idx.reshape(*pack_idx.shape, *(1,) * (x.ndim - 2)), axis=1)


def _unpack(x: Float[Array, "g p *f"], unpack_idx: Int[Array, "b k"]) -> Float[Array, "b k *f"]:
  """Back to [b, k] (only visible positions are meaningful)."""
  g = x.shape[0]
  idx = unpack_idx.reshape(g, -1)
  out = jnp.take_along_axis(x, idx.reshape(*idx.shape, *(1,) * (x.ndim - 2)), axis=1)
  return out.reshape(*unpack_idx.shape, *x.shape[2:])


def _scatter_to_grid(values: Float[Array, "b k d"], idx, num_tokens: int) -> Float[Array, "b n d"]:
  return jax.vmap(lambda i, v: jnp.zeros((num_tokens, v.shape[-1]), v.dtype).at[i].set(v))(idx, values)


class Mlp(nnx.Module):
  """Two-layer GELU MLP."""

  def __init__(self, cfg: ModelConfig, width: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = _linear(cfg, width, hidden, ("embed", "mlp"), rngs)
    self.fc2 = _linear(cfg, hidden, width, ("mlp", "embed"), rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))


class SelfAttention(nnx.Module):
  """Multi-head self-attention with per-example valid lengths (None = full)."""

  def __init__(self, cfg: ModelConfig, width: int, heads: int, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    dot_general = matmul.dot_general_for(cfg.matmul_dtype)
    self.qkv = nnx.LinearGeneral(
        width, (3, heads, width // heads), dtype=dtype, param_dtype=param_dtype,
        dot_general=dot_general, kernel_init=_dense_init(),
        kernel_metadata=_axes("embed", None, "heads", "kv"),
        bias_metadata=_axes(None, "heads", "kv"), rngs=rngs)
    self.out = nnx.LinearGeneral(
        (heads, width // heads), width, axis=(-2, -1), dtype=dtype, param_dtype=param_dtype,
        dot_general=dot_general, kernel_init=_dense_init(),
        kernel_metadata=_axes("heads", "kv", "embed"), bias_metadata=_axes("embed"), rngs=rngs)
    self.implementation = cfg.attention
    self.matmul_dtype = cfg.matmul_dtype
    self.remat = cfg.remat == "attention"

  def __call__(self, x, lengths, q_lengths=None, packing=None):
    """`packing`: (pack_idx, unpack_idx) when x holds packed tokens [g, p, d]; attention
    then runs per example on the unpacked [b, k] layout."""
    qkv = self.qkv(x)
    if packing is not None:
      qkv = _unpack(qkv, packing[1])
    core = functools.partial(_attention_core, implementation=self.implementation,
                             matmul_dtype=self.matmul_dtype)
    if self.remat:
      core = jax.checkpoint(core)  # Logits and probabilities are recomputed in the backward pass.
    q_lengths = lengths if q_lengths is None else q_lengths
    y = core(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lengths, q_lengths)
    return self.out(y if packing is None else _pack(y, packing[0]))


def _attention_core(q, k, v, kv_lengths, q_lengths, *, implementation, matmul_dtype):
  # Encoder: valid queries = valid keys = the visible tokens (AIM layout). Decoder: every
  # key, and every query but in the last block of a loss-only pass.
  return dot_product_attention(
      q, k, v, kv_lengths=kv_lengths, q_lengths=q_lengths, implementation=implementation,
      matmul_dtype=matmul_dtype)


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: ModelConfig, width: int, heads: int, hidden: int, *, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, width, rngs)
    self.attn = SelfAttention(cfg, width, heads, rngs=rngs)
    self.norm2 = _norm(cfg, width, rngs)
    self.mlp = Mlp(cfg, width, hidden, rngs=rngs)

  def __call__(self, x, lengths, q_lengths=None, packing=None):
    x = x + self.attn(self.norm1(x), lengths, q_lengths, packing).astype(x.dtype)
    return x + self.mlp(self.norm2(x)).astype(x.dtype)


def _apply_block(block: Block, x, lengths, q_lengths, packing):
  return block(x, lengths, q_lengths, packing)


class Transformer(nnx.Module):
  """A stack of blocks followed by a final norm; `cfg.remat == "full"` remats each block."""

  def __init__(self, cfg: ModelConfig, width, depth, heads, hidden, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, width, heads, hidden, rngs=rngs) for _ in range(depth)])
    self.norm = _norm(cfg, width, rngs)
    self.remat = cfg.remat == "full"

  def __call__(self, x, lengths=None, last_q_lengths=None, packing=None):
    """`lengths`: valid keys (and queries) per example; `last_q_lengths`: the last block
    only computes that many leading query rows (the others are not valid outputs);
    `packing`: see `SelfAttention`."""
    apply = nnx.remat(_apply_block) if self.remat else _apply_block
    for i, block in enumerate(self.blocks):
      x = apply(block, x, lengths, last_q_lengths if i == len(self.blocks) - 1 else None, packing)
    return self.norm(x)


class LSM2MAE(nnx.Module):
  """The LSM-2 masked autoencoder; see the module docstring."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg.validate()
    dtype = jnp.dtype(cfg.dtype)
    patch_in = cfg.patch_size * (2 if cfg.observed_in_embedding else 1)
    self.patch_embed = nnx.Linear(
        patch_in, cfg.enc_width, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=_dense_init(), kernel_metadata=_axes("patch", "embed"),
        bias_metadata=_axes("embed"), rngs=rngs)
    self.encoder = Transformer(
        cfg, cfg.enc_width, cfg.enc_depth, cfg.enc_heads, cfg.enc_mlp, rngs=rngs)
    self.enc_to_dec = _linear(cfg, cfg.enc_width, cfg.dec_width, ("embed", None), rngs)
    self.mask_token = nnx.Param(
        jnp.zeros((cfg.dec_width,), jnp.dtype(cfg.param_dtype)), **_axes("embed"))
    self.decoder = Transformer(
        cfg, cfg.dec_width, cfg.dec_depth, cfg.dec_heads, cfg.dec_mlp, rngs=rngs)
    # Small head: the first predictions are ~0, the normalised channel mean. Xavier here
    # predicts noise of variance ~dec_width * 2 / (dec_width + patch_size) (0.7 tiny, 1.9 S)
    # and AdamW, moving each weight ~lr per step, needs ~|w| / lr steps (hundreds at small
    # LR) just to undo it: the plateau above the channel mean of short runs.
    self.head = nnx.Linear(
        cfg.dec_width, cfg.patch_size, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nnx.initializers.normal(HEAD_INIT_STD),
        kernel_metadata=_axes("embed", "head_out"),
        bias_metadata=_axes("head_out"), rngs=rngs)

  def _check(self, signals, observed, masks: AimMasks):
    cfg = self.cfg
    want = (cfg.time_steps, cfg.num_channels)
    if signals.ndim != 3 or tuple(signals.shape[1:]) != want:
      raise ValueError(f"signals must be [b, {want[0]}, {want[1]}], got {signals.shape}")
    if observed.shape != signals.shape or observed.dtype != jnp.bool_:
      raise ValueError(
          f"observed must be bool {signals.shape}, got {observed.dtype} {observed.shape}")
    if masks.total.shape != (signals.shape[0], cfg.num_tokens):
      raise ValueError(
          f"masks are for {masks.total.shape} tokens, the model expects "
          f"[{signals.shape[0]}, {cfg.num_tokens}]")

  def encode(
      self, signals: Float[Array, "b t c"], observed: Bool[Array, "b t c"], masks: AimMasks,
  ) -> Float[Array, "b k d"]:
    """Encoder outputs at the kept tokens `masks.keep_idx` (valid where `keep_visible`)."""
    self._check(signals, observed, masks)
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    patches = patchify(jnp.where(observed, signals, 0).astype(dtype), cfg)
    if cfg.observed_in_embedding:
      patches = jnp.concatenate([patches, patchify(observed, cfg).astype(dtype)], axis=-1)
    x = self.patch_embed(patches) + jnp.asarray(sincos_2d(*cfg.grid, cfg.enc_width), dtype)
    x = jnp.take_along_axis(x, masks.keep_idx[:, :, None], axis=1)
    if masks.pack_idx is None:
      return self.encoder(x, masks.visible_len)
    # Packed: per-token layers run on the visible tokens only (aim.pack_visible).
    packing = (masks.pack_idx, masks.unpack_idx)
    return _unpack(self.encoder(_pack(x, masks.pack_idx), masks.visible_len, packing=packing),
                   masks.unpack_idx)

  def __call__(
      self, signals: Float[Array, "b t c"], observed: Bool[Array, "b t c"], masks: AimMasks,
      *, loss_tokens_only: bool = False,
  ) -> Float[Array, "b t c"]:
    """Reconstruction of every minute (float32).

    With `loss_tokens_only` only the tokens holding a minute of `masks.loss_weight` are
    reconstructed (the rest are 0): exact for the loss and its gradient, and the decoder's
    last block computes only those query rows (see `_decode_loss_tokens`).
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    y = self.enc_to_dec(self.encode(signals, observed, masks))
    grid = _scatter_to_grid(y, masks.keep_idx, cfg.num_tokens)
    grid = jnp.where(masks.total[:, :, None], self.mask_token[...].astype(dtype), grid)
    grid = grid + jnp.asarray(sincos_2d(*cfg.grid, cfg.dec_width), dtype)
    if loss_tokens_only:
      out = self._decode_loss_tokens(grid, masks)
    else:
      out = self.head(self.decoder(grid))
    return unpatchify(out.astype(jnp.float32), cfg)

  def _decode_loss_tokens(self, grid: Float[Array, "b n d"], masks: AimMasks) -> Float[Array, "b n p"]:
    """Decoder and head where the loss looks only; 0 elsewhere.

    Positions are already added, so the decoder's full attention does not depend on the
    token order: putting each example's loss tokens first lets the last block stop its
    query rows at their count (the blocked kernel skips the rest; at ~35% loss tokens
    that is ~65% of the last block's attention), while every token stays a key.
    """
    has_loss = loss_tokens(masks, self.cfg)
    order = jnp.argsort(~has_loss, axis=1, stable=True)
    x = jnp.take_along_axis(grid, order[:, :, None], axis=1)
    x = self.decoder(x, last_q_lengths=has_loss.sum(axis=1, dtype=jnp.int32))
    out = _scatter_to_grid(self.head(x), order, self.cfg.num_tokens)
    return jnp.where(has_loss[:, :, None], out, 0)

  def embed(
      self,
      signals: Float[Array, "b t c"],
      observed: Bool[Array, "b t c"],
      *,
      mask_cfg: MaskConfig | None = None,
      per_token: bool = False,
      pack: tuple[int, int] | None = None,
  ) -> Float[Array, "b d"] | tuple[Float[Array, "b n d"], Bool[Array, "b n"]]:
    """Inference embedding: nothing dropped, inherited tokens attention-masked.

    Returns the mean of the encoder outputs over visible tokens [b, d] (zeros
    for a day without any), or with `per_token` the outputs on the full grid
    [b, N, d] (zeros at masked tokens) and the visibility mask [b, N].
    `pack` = (length, groups) packs the visible tokens (`aim.pack_visible`): the
    same outputs, per-token work on `groups * length` rows.
    """
    mask_cfg = mask_cfg or MaskConfig()
    observed = effective_observed(observed, mask_cfg)
    masks = inference_masks(observed, self.cfg, mask_cfg)
    if pack is not None:
      masks = pack_visible(masks, *pack)
    enc = self.encode(signals, observed, masks).astype(jnp.float32)
    enc = jnp.where(masks.keep_visible[:, :, None], enc, 0.0)
    if per_token:
      return _scatter_to_grid(enc, masks.keep_idx, self.cfg.num_tokens), ~masks.total
    count = jnp.maximum(masks.visible_len, 1).astype(jnp.float32)
    return enc.sum(axis=1) / count[:, None]
