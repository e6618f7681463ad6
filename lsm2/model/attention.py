"""Length-masked multi-head dot-product attention behind one interface.

AIM lays the encoder's tokens out visible first, so its attention mask is one
valid key length per example. Every implementation here takes such lengths:
"xla" (`jax.nn.dot_product_attention`, any backend), "cudnn" (its fused GPU
kernel), "splash" (Pallas splash attention, the fused TPU kernel: logits never
reach HBM; on CPU it runs in Pallas interpret mode, for tests) and "blocked"
(lsm2.model.blocked_attention, which skips the blocks past the lengths). "xla"
also takes a general boolean mask, the reference the length path is tested
against.

Conventions, identical for every implementation: query rows at or past
`q_lengths`, and rows with no valid key, return zeros (finite, no NaN).

Under a mesh (`jax.set_mesh`) with logical axis rules in context
(`nnx.logical_axis_rules`), "blocked" and "splash" run inside `jax.shard_map`:
each device computes its own examples and heads, split as the rules map the
logical names "batch" and "heads". Without it GSPMD would replicate the
kernel's per-example loop (or the opaque Pallas call) on every device.
"""
import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from lsm2 import errors

IMPLEMENTATIONS = ("xla", "blocked", "cudnn", "splash")
# Splash pads both lengths to a multiple of this (its smallest TPU tile) and
# uses the largest of _SPLASH_BLOCKS that divides the padded length.
_SPLASH_TILE = 128
_SPLASH_BLOCKS = (512, 256, 128)


def dot_product_attention(
    q: Float[Array, "b lq h d"],
    k: Float[Array, "b lk h d"],
    v: Float[Array, "b lk h d"],
    *,
    kv_lengths: Int[Array, "b"] | None = None,
    q_lengths: Int[Array, "b"] | None = None,
    mask: Bool[Array, "b lq lk"] | None = None,
    implementation: str = "xla",
    matmul_dtype: str = "float32",
) -> Float[Array, "b lq h d"]:
  """Softmax(q k^T / sqrt(d)) v per head, keys limited to the first `kv_lengths`.

  Args:
    q, k, v: [batch, length, heads, head_dim].
    kv_lengths: valid keys per example (keys [0, kv_length) take part).
    q_lengths: valid queries per example; later rows are zero.
    mask: general mask (True = query may attend to key); "xla" only.
    implementation: "xla", "blocked", "cudnn" (GPU only) or "splash" (TPU; CPU
      in interpret mode).
    matmul_dtype: operand dtype of the "blocked" kernel's products (accumulated in
      float32); "xla" and "splash" compute in the inputs' dtype. "cudnn" takes
      bfloat16/float16 only: other inputs (float32 from the mixed-precision dense
      layers, matmul_dtype="bfloat16") are rounded to bfloat16 for the kernel, which
      accumulates and takes the softmax in float32 itself.

  Returns:
    [batch, lq, heads, head_dim] in q's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  b, lq, _, _ = q.shape
  lk = k.shape[1]
  for name, lengths in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
    if lengths is not None and (lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer)):
      raise ValueError(f"{name} must be an int array of shape ({b},), got {lengths.dtype} {lengths.shape}")
  if mask is not None and (mask.shape != (b, lq, lk) or mask.dtype != jnp.bool_):
    raise ValueError(f"mask must be bool [{b}, {lq}, {lk}], got {mask.dtype} {mask.shape}")
  if mask is not None and implementation != "xla":
    raise ValueError(f"a general boolean mask needs implementation='xla', got {implementation!r}")
  q_lengths = None if q_lengths is None else q_lengths.astype(jnp.int32)
  kv_lengths = None if kv_lengths is None else kv_lengths.astype(jnp.int32)

  if implementation in ("blocked", "splash"):
    full_q = jnp.full((b,), lq, jnp.int32)
    full_k = jnp.full((b,), lk, jnp.int32)
    if implementation == "blocked":
      # Imported here: the kernel is optional for every other implementation.
      from lsm2.model.blocked_attention import blocked_attention  # pylint: disable=g-import-not-at-top
      kernel = lambda q, k, v, ql, kl: blocked_attention(
          q, k, v, q_lengths=ql, kv_lengths=kl, matmul_dtype=matmul_dtype)
    else:
      kernel = functools.partial(_splash, interpret=_splash_interpret())
    specs = _mesh_specs(b, q.shape[2])
    mesh = jax.sharding.get_abstract_mesh()
    if specs is None and implementation == "splash" and not mesh.empty:
      specs = P(), P(), set()  # Unsplit: every device computes all of it.
    if specs is not None:
      qkv, lengths, manual = specs
      # Manual over the split axes only (the kernel's loops carry per-device values);
      # a Pallas call cannot be partitioned automatically, so splash is manual over all.
      manual = set(mesh.axis_names) if implementation == "splash" else manual
      kernel = jax.shard_map(kernel, in_specs=(qkv, qkv, qkv, lengths, lengths), out_specs=qkv,
                             axis_names=manual, check_vma=False)
    return kernel(q, k, v, full_q if q_lengths is None else q_lengths,
                  full_k if kv_lengths is None else kv_lengths)

  out_dtype = q.dtype
  if implementation == "cudnn":
    if _platform() != "gpu":
      raise errors.ConfigError(
          f"attention implementation 'cudnn' needs a GPU, the program is for {_platform()!r}; "
          "use 'xla' or 'blocked'")
    if q.dtype not in _CUDNN_DTYPES:
      q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = jax.nn.dot_product_attention(
      q, k, v,
      mask=None if mask is None else mask[:, None],
      query_seq_lengths=q_lengths,
      key_value_seq_lengths=kv_lengths,
      implementation=implementation)
  # Rows without any valid key would average all values: zero them instead.
  if mask is not None:
    out = jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0)
  if kv_lengths is not None:
    out = jnp.where((kv_lengths > 0)[:, None, None, None], out, 0)
  return out.astype(out_dtype)


# What cuDNN's fused attention takes (besides fp8, which lsm2 does not use).
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _platform() -> str:
  """The platform the program is for: the context mesh's (an ahead-of-time compile for a
  TPU topology runs on a CPU host), else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def _splash_interpret() -> bool:
  """Pallas interpret mode when the program is for CPUs (tests); the TPU kernel on TPUs."""
  platform = _platform()
  if platform == "gpu":
    raise errors.ConfigError(
        "attention implementation 'splash' is a TPU kernel (CPU runs it in interpret mode, for "
        "tests); on a GPU use 'cudnn' or 'xla'")
  return platform == "cpu"


def _splash(q: Float[Array, "b lq h d"], k: Float[Array, "b lk h d"], v: Float[Array, "b lk h d"],
            q_lengths: Int[Array, "b"], kv_lengths: Int[Array, "b"], *, interpret: bool
            ) -> Float[Array, "b lq h d"]:
  """Pallas splash attention with one valid key length per example.

  Keys at or past `kv_lengths` get segment id 1, every query segment id 0, so no query
  sees them; both lengths are padded to whole tiles the same way. Rows the kernel cannot
  make meaningful (past `q_lengths`, or with no valid key: it would average the masked
  values) are zeroed, which also zeroes their gradients.
  """
  # Imported here: Pallas is only needed when this kernel is chosen.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  b, lq, h, d = q.shape
  lk = k.shape[1]
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, -n % _SPLASH_TILE), (0, 0), (0, 0)))
  # Splash takes [heads, length, head_dim] per example and does not scale the logits.
  to_kernel = lambda x, n: pad(x, n).transpose(0, 2, 1, 3)
  q_p = to_kernel(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), lq)
  k_p, v_p = to_kernel(k, lk), to_kernel(v, lk)
  lq_p, lk_p = q_p.shape[2], k_p.shape[2]
  block_q = next(s for s in _SPLASH_BLOCKS if lq_p % s == 0)
  block_k = next(s for s in _SPLASH_BLOCKS if lk_p % s == 0)
  blocks = splash.BlockSizes(
      block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
      block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
      block_q_dq=block_q, block_kv_dq=block_k)
  mask = splash.MultiHeadMask([splash.FullMask((lq_p, lk_p))] * h)
  kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  segments = splash.SegmentIds(
      q=jnp.zeros((b, lq_p), jnp.int32),
      kv=(jnp.arange(lk_p)[None, :] >= kv_lengths[:, None]).astype(jnp.int32))
  out = jax.vmap(kernel)(q_p, k_p, v_p, segment_ids=segments)
  out = out.transpose(0, 2, 1, 3)[:, :lq]
  valid = (jnp.arange(lq)[None, :] < q_lengths[:, None]) & (kv_lengths > 0)[:, None]
  return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)


def _mesh_specs(batch: int, heads: int) -> tuple[P, P, set[str]] | None:
  """Specs splitting [b, l, h, d] over the context mesh by the "batch"/"heads" rules.

  None when there is no mesh, no rule maps either name onto a mesh axis larger
  than 1, or the sizes do not divide (then the kernel runs unsplit, as GSPMD
  lays it out).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  rules = dict(spmd.get_logical_axis_rules())

  def axes(name: str, size: int) -> tuple[str, ...] | None:
    names = rules.get(name)
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    names = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    if not names or size % math.prod(mesh.shape[a] for a in names):
      return None
    return names

  batch_axes, head_axes = axes("batch", batch), axes("heads", heads)
  if batch_axes is None and head_axes is None:
    return None
  manual = set(batch_axes or ()) | set(head_axes or ())
  return P(batch_axes, None, head_axes, None), P(batch_axes), manual
