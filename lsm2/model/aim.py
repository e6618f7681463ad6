"""The AIM mask-token kernel: inherited + artificial masks with static shapes.

Given the minute-level `observed` mask of a batch, `aim_masks` returns, per
example, everything the model needs: which tokens are inherited-missing,
which are artificially masked (one strategy drawn per example), which
`n_drop` masked tokens are removed before the encoder, and the kept tokens
laid out VISIBLE FIRST. With that layout the encoder's attention mask is a
single valid key length per example (`visible_len`), which fused attention
kernels take natively; the kept masked tokens past `visible_len` are never
keys and their encoder outputs are discarded (the decoder puts the mask token
there), so dropping a masked token or attention-masking it gives the same
encoder outputs at visible tokens. That is what makes AIM exact.

Tokens are numbered row-major over the grid (n_time, n_signal):
token = time_index * n_signal + signal_index.
"""
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from lsm2.model.config import SCHEMES, STRATEGIES, MaskConfig, ModelConfig, effective_mask_config

NO_STRATEGY = -1  # AimMasks.strategy of inference / caller-built masks.


@flax.struct.dataclass
class AimMasks:
  """Token masks and the encoder layout of a batch (N = num_tokens).

  Attributes:
    inherited: tokens missing in the data (never have ground truth).
    artificial: tokens masked by the drawn strategy (and the top-up).
    total: inherited | artificial; the decoder puts the mask token here.
    dropped: masked tokens removed before the encoder.
    strategy: index into `config.STRATEGIES` of each example's strategy
      (`NO_STRATEGY` for inference masks).
    keep_idx: grid indices of the encoder's tokens, visible tokens first (in
      grid order), then kept masked tokens. Also the indices to scatter
      encoder outputs back onto the grid.
    keep_visible: whether each kept token is visible (= position < visible_len).
    visible_len: visible tokens per example (the encoder's key length).
    loss_weight: 1.0 at observed minutes of masked tokens, else 0.0.
    pack_idx: with a packed encoder (`pack_visible`), for each of g groups of
      b/g examples and each packed slot, the flat index (example in group * k
      + position) of the visible token it holds; None otherwise.
    unpack_idx: the packed slot of each kept token of each example (meaningful
      at visible positions only); None without packing.
  """

  inherited: Bool[Array, "b n"]
  artificial: Bool[Array, "b n"]
  total: Bool[Array, "b n"]
  dropped: Bool[Array, "b n"]
  strategy: Int[Array, "b"]
  keep_idx: Int[Array, "b k"]
  keep_visible: Bool[Array, "b k"]
  visible_len: Int[Array, "b"]
  loss_weight: Float[Array, "b t c"]
  pack_idx: Int[Array, "g p"] | None = None
  unpack_idx: Int[Array, "b k"] | None = None

  @property
  def n_keep(self) -> int:
    return self.keep_idx.shape[1]


def effective_observed(observed: Bool[Array, "b t c"], mask_cfg: MaskConfig) -> Bool[Array, "b t c"]:
  """The minute mask the model may trust: all True when gaps are treated as data (LSM-1)."""
  return observed if mask_cfg.uses_inherited_mask else jnp.ones_like(observed)


def token_counts(observed: Bool[Array, "*b t c"], model_cfg: ModelConfig) -> Int[Array, "*b n"]:
  """Observed minutes per token."""
  n_time, n_signal = model_cfg.grid
  x = observed.reshape(*observed.shape[:-2], n_time, model_cfg.patch_time,
                       n_signal, model_cfg.patch_channels)
  counts = x.sum(axis=(-3, -1), dtype=jnp.int32)
  return counts.reshape(*observed.shape[:-2], n_time * n_signal)


def loss_tokens(masks: AimMasks, model_cfg: ModelConfig) -> Bool[Array, "b n"]:
  """Tokens holding at least one minute of `masks.loss_weight` (the tokens the loss reads)."""
  return token_counts(masks.loss_weight > 0, model_cfg) > 0


def tokens_to_minutes(mask: Bool[Array, "*b n"], model_cfg: ModelConfig) -> Bool[Array, "*b t c"]:
  """Broadcasts a token mask to every minute and signal of its patch."""
  n_time, n_signal = model_cfg.grid
  x = mask.reshape(*mask.shape[:-1], n_time, 1, n_signal, 1)
  x = jnp.broadcast_to(x, (*mask.shape[:-1], n_time, model_cfg.patch_time,
                           n_signal, model_cfg.patch_channels))
  return x.reshape(*mask.shape[:-1], model_cfg.time_steps, model_cfg.num_channels)


def _check_observed(observed, model_cfg: ModelConfig):
  want = (model_cfg.time_steps, model_cfg.num_channels)
  if observed.ndim != 3 or tuple(observed.shape[1:]) != want:
    raise ValueError(f"observed must have shape [b, {want[0]}, {want[1]}], got {observed.shape}")
  if observed.dtype != jnp.bool_:
    raise ValueError(f"observed must be a bool array, got dtype {observed.dtype}")


def _inherited(observed, mask_cfg: MaskConfig, model_cfg: ModelConfig):
  """Token is inherited-missing when >= threshold of its minutes are missing."""
  size = model_cfg.patch_size
  need = max(1, int(np.ceil(mask_cfg.inherited_threshold * size - 1e-9)))
  missing = size - token_counts(observed, model_cfg)
  return missing >= need


def _top_up(mask: Bool[Array, "n"], count: int, key: PRNGKeyArray) -> Bool[Array, "n"]:
  """Adds random unmasked tokens until at least `count` tokens are masked."""
  if count == 0:
    return mask
  order = jnp.argsort(jnp.where(mask, -1.0, jax.random.uniform(key, mask.shape)))
  rank = jnp.zeros(mask.shape, jnp.int32).at[order].set(jnp.arange(mask.size, dtype=jnp.int32))
  return mask | (rank < count)


def _choose(n: int, k: int, key: PRNGKeyArray) -> Bool[Array, "n"]:
  """Exactly k of n positions, uniformly at random."""
  return _top_up(jnp.zeros((n,), bool), k, key)


def _strategy_mask(name: str, inherited, key, mask_cfg: MaskConfig, model_cfg: ModelConfig):
  """Artificial token mask [N] of one strategy for one example."""
  n_time, n_signal = model_cfg.grid
  times = jnp.arange(n_time)
  if name == "random":
    return _top_up(inherited, mask_cfg.random_count(model_cfg), key) & ~inherited
  if name == "time_bars":
    bars = _choose(n_time, mask_cfg.time_bars, key)
  elif name == "temporal_interpolation":
    gap = mask_cfg.interp_gap_minutes // model_cfg.patch_time
    start = jax.random.randint(key, (), 0, n_time - gap + 1)
    bars = (times >= start) & (times < start + gap)
  elif name == "temporal_extrapolation":
    gap = mask_cfg.extrap_gap_minutes // model_cfg.patch_time
    bars = times >= n_time - gap
  elif name == "signal_imputation":
    signals = _choose(n_signal, mask_cfg.signal_imputation_k // model_cfg.patch_channels, key)
    return jnp.broadcast_to(signals[None, :], (n_time, n_signal)).reshape(-1)
  else:
    raise ValueError(f"unknown strategy {name!r}")
  return jnp.broadcast_to(bars[:, None], (n_time, n_signal)).reshape(-1)


def _draw_artificial(inherited, key, mask_cfg: MaskConfig, model_cfg: ModelConfig):
  """One strategy per example (global id into STRATEGIES) and its artificial mask."""
  names = mask_cfg.strategy_names
  global_ids = jnp.array([STRATEGIES.index(n) for n in names], jnp.int32)
  log_weights = jnp.log(jnp.array([w for _, w in mask_cfg.strategy_weights], jnp.float32))

  def draw(inh, k):
    k_pick, *k_strategies = jax.random.split(k, len(names) + 1)
    pick = jax.random.categorical(k_pick, log_weights)
    candidates = jnp.stack([
        _strategy_mask(n, inh, ks, mask_cfg, model_cfg) for n, ks in zip(names, k_strategies)])
    return candidates[pick], global_ids[pick]

  return jax.vmap(draw)(inherited, jax.random.split(key, inherited.shape[0]))


def _visible_first(total: Bool[Array, "n"]) -> Int[Array, "n"]:
  """Token indices, unmasked first, each part in grid order: a stable argsort of `total`."""
  visible = ~total
  slot = jnp.where(visible, jnp.cumsum(visible) - 1,
                   jnp.sum(visible) + jnp.cumsum(total) - 1).astype(jnp.int32)
  return jnp.zeros(total.shape, jnp.int32).at[slot].set(jnp.arange(total.size, dtype=jnp.int32))


def _layout(inherited, artificial, key, n_drop: int, n_keep: int):
  """Top-up, drop split and visible-first layout for one example."""
  k_top, k_drop = jax.random.split(key)
  total = _top_up(inherited | artificial, n_drop, k_top)
  artificial = artificial | (total & ~inherited & ~artificial)
  n = total.shape[0]
  if n_drop == 0:  # Inference: no sort, which serving exports (lsm2.export) cannot express.
    dropped = jnp.zeros((n,), bool)
    keep_idx = _visible_first(total)[:n_keep]
  else:
    drop_order = jnp.argsort(jnp.where(total, jax.random.uniform(k_drop, (n,)), 2.0))
    dropped = jnp.zeros((n,), bool).at[drop_order[:n_drop]].set(True)
    # Visible (0) first, then kept masked (1); dropped (2) last and cut off.
    group = jnp.where(total, jnp.where(dropped, 2, 1), 0)
    keep_idx = jnp.argsort(group, stable=True)[:n_keep].astype(jnp.int32)
  return dict(
      artificial=artificial,
      total=total,
      dropped=dropped,
      keep_idx=keep_idx,
      keep_visible=~total[keep_idx],
      visible_len=jnp.sum(~total, dtype=jnp.int32),
  )


def _from_artificial(observed, artificial, strategy, key, n_drop, mask_cfg, model_cfg):
  """Inherited mask, (drawn or given) artificial mask, top-up, split and loss weights."""
  observed = effective_observed(observed, mask_cfg)
  inherited = _inherited(observed, mask_cfg, model_cfg)
  if not mask_cfg.uses_inherited_mask:
    inherited = jnp.zeros_like(inherited)
  if artificial is None:
    artificial, strategy = _draw_artificial(inherited, key, mask_cfg, model_cfg)
  b = observed.shape[0]
  keys = jax.random.split(jax.random.fold_in(key, 1), b)
  n_keep = model_cfg.num_tokens - n_drop
  parts = jax.vmap(lambda i, a, k: _layout(i, a, k, n_drop, n_keep))(inherited, artificial, keys)
  loss_weight = (tokens_to_minutes(parts["total"], model_cfg) & observed).astype(jnp.float32)
  return AimMasks(inherited=inherited, strategy=strategy, loss_weight=loss_weight, **parts)


@functools.partial(jax.jit, static_argnames=("mask_cfg", "model_cfg"))
def aim_masks(
    observed: Bool[Array, "b t c"],
    key: PRNGKeyArray,
    mask_cfg: MaskConfig,
    model_cfg: ModelConfig,
) -> AimMasks:
  """Draws the AIM masks of a batch (static shapes; one strategy per example).

  The scheme's effective settings (`effective_mask_config`) are applied here.
  Guarantees: exactly `n_drop` dropped tokens, all masked; at least `n_drop`
  masked tokens (strategies that mask fewer are topped up with random tokens);
  inherited tokens always masked; visible tokens first in `keep_idx`.
  """
  _check_observed(observed, model_cfg)
  mask_cfg = effective_mask_config(mask_cfg, model_cfg)
  return _from_artificial(observed, None, None, key, mask_cfg.n_drop, mask_cfg, model_cfg)


@functools.partial(jax.jit, static_argnames=("mask_cfg", "model_cfg"))
def masks_from_artificial(
    observed: Bool[Array, "b t c"],
    artificial: Bool[Array, "b n"],
    key: PRNGKeyArray,
    mask_cfg: MaskConfig,
    model_cfg: ModelConfig,
) -> AimMasks:
  """AIM masks for a caller-chosen artificial token mask (e.g. evaluation gaps).

  Uses the inherited threshold, scheme and `n_drop` of `mask_cfg`
  (`effective_mask_config`); the mask is topped up to `n_drop` tokens like in
  `aim_masks` (use `n_drop=0` to keep it as given). `strategy` is `NO_STRATEGY`.
  """
  _check_observed(observed, model_cfg)
  if artificial.shape != (observed.shape[0], model_cfg.num_tokens) or artificial.dtype != jnp.bool_:
    raise ValueError(
        f"artificial must be bool [b, {model_cfg.num_tokens}], got {artificial.dtype} {artificial.shape}")
  mask_cfg = effective_mask_config(mask_cfg, model_cfg)
  strategy = jnp.full((observed.shape[0],), NO_STRATEGY, jnp.int32)
  return _from_artificial(observed, artificial, strategy, key, mask_cfg.n_drop, mask_cfg, model_cfg)


@functools.partial(jax.jit, static_argnames=("model_cfg", "mask_cfg"))
def inference_masks(
    observed: Bool[Array, "b t c"],
    model_cfg: ModelConfig,
    mask_cfg: MaskConfig | None = None,
) -> AimMasks:
  """Inference / probing masks: no artificial mask, nothing dropped, inherited attention-masked.

  Only the scheme's inherited rule (threshold; none for "lsm1") of `mask_cfg`
  matters here.
  """
  _check_observed(observed, model_cfg)
  mask_cfg = mask_cfg or MaskConfig()
  if mask_cfg.scheme not in SCHEMES or not 0.0 < mask_cfg.inherited_threshold <= 1.0:
    raise ValueError(
        f"inference_masks: bad MaskConfig.scheme={mask_cfg.scheme!r} or "
        f"inherited_threshold={mask_cfg.inherited_threshold!r}")
  b = observed.shape[0]
  artificial = jnp.zeros((b, model_cfg.num_tokens), bool)
  strategy = jnp.full((b,), NO_STRATEGY, jnp.int32)
  return _from_artificial(observed, artificial, strategy, jax.random.key(0), 0, mask_cfg, model_cfg)


def encoder_buckets(num_buckets: int, n_keep: int) -> tuple[int, ...]:
  """Encoder lengths to compile: evenly spaced up to n_keep (multiples of 16).

  n_keep is the most tokens a layout can hold: per example for `truncate_kept`, per
  group for `pack_visible` (training's encoder layouts and packed inference share it).
  """
  if num_buckets <= 1:
    return (n_keep,)
  sizes = {min(n_keep, 16 * math.ceil(n_keep * (i + 1) / num_buckets / 16))
           for i in range(num_buckets)}
  return tuple(sorted(sizes))


def truncate_kept(masks: AimMasks, length: int) -> AimMasks:
  """Keeps only the first `length` encoder tokens (visible tokens come first).

  Exact when `length >= max(visible_len)`: the cut tokens are masked, never
  keys, and their encoder outputs are discarded; they count as dropped.
  Checked when `visible_len` is concrete; under tracing it is the caller's
  contract (see the visible-token buckets of the training loop).
  """
  if not 0 < length <= masks.n_keep:
    raise ValueError(f"truncate_kept: length={length} must be in [1, n_keep={masks.n_keep}]")
  if masks.pack_idx is not None:
    raise ValueError("truncate_kept: these masks are packed (pack_visible); truncate first")
  if not isinstance(masks.visible_len, jax.core.Tracer):
    longest = int(jnp.max(masks.visible_len))
    if length < longest:
      raise ValueError(
          f"truncate_kept: length={length} would cut visible tokens (max visible_len={longest})")
  cut = masks.keep_idx[:, length:]
  dropped = jax.vmap(lambda d, c: d.at[c].set(True))(masks.dropped, cut)
  return masks.replace(
      dropped=dropped,
      keep_idx=masks.keep_idx[:, :length],
      keep_visible=masks.keep_visible[:, :length],
  )


@functools.partial(jax.jit, static_argnames=("n_keep", "length", "groups"))
def _pack_indices(visible_len, n_keep: int, length: int, groups: int):
  n = visible_len.reshape(groups, -1)
  ends = jnp.cumsum(n, axis=1)
  starts = ends - n
  slots = jnp.arange(length, dtype=jnp.int32)
  example = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right"))(ends)
  example = jnp.minimum(example, n.shape[1] - 1)
  position = slots - jnp.take_along_axis(starts, example, axis=1)
  pack_idx = jnp.where(slots < ends[:, -1:], example * n_keep + position, 0)
  kept = jnp.arange(n_keep, dtype=jnp.int32)
  unpack_idx = jnp.where(kept < visible_len[:, None], starts.reshape(-1, 1) + kept, 0)
  return pack_idx.astype(jnp.int32), unpack_idx.astype(jnp.int32)


def pack_visible(masks: AimMasks, length: int, groups: int = 1) -> AimMasks:
  """Lays the visible tokens of each group of b/groups examples end to end in `length` slots.

  With it the encoder's per-token work (projections, MLPs, norms) runs on
  `groups * length` rows instead of b * n_keep, whatever the spread of visible
  counts across the batch; attention still runs per example on the [b, n_keep]
  layout, where its kernel skips the keys past `visible_len`. Exact: the
  encoder outputs at visible tokens do not change. Groups keep the packing
  local to each data-parallel shard (one group per shard). Needs `length` >=
  the largest visible count of a group: checked when `visible_len` is
  concrete; under tracing it is the caller's contract.
  """
  b = masks.visible_len.shape[0]
  if groups < 1 or b % groups:
    raise ValueError(f"pack_visible: groups={groups} must divide the batch size {b}")
  if not isinstance(masks.visible_len, jax.core.Tracer):
    longest = int(jnp.max(masks.visible_len.reshape(groups, -1).sum(axis=1)))
    if length < longest:
      raise ValueError(
          f"pack_visible: length={length} cannot hold the {longest} visible tokens of a group")
  pack_idx, unpack_idx = _pack_indices(masks.visible_len, masks.n_keep, length, groups)
  return masks.replace(pack_idx=pack_idx, unpack_idx=unpack_idx)
