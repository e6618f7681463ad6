"""Evaluation masks: generative tasks and robustness transforms, at minute level.

Generative task builders share one signature,
`builder(observed, patch_time, patch_channels, seed, example_ids=None)`, and
return a boolean target mask `[n, T, C]`: True = hidden from the model (and
from the baselines) and to be predicted. Masks are token-aligned (whole
`patch_time x patch_channels` patches). Errors count only where the target is
also observed. Randomness is seeded per example: the mask of an example
depends only on `(seed, example_id)`, never on batching or order.

Robustness transforms return a new `observed` mask (what is removed becomes
unobserved); the model and the baselines then treat it like natural
missingness. A day is assumed to start at 00:00 (index 0 = midnight).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
from jaxtyping import Bool, Int

TaskBuilder = Callable[..., np.ndarray]

SEGMENT_HOURS: dict[str, tuple[int, int]] = {
    "night": (0, 6),
    "morning": (6, 12),
    "afternoon": (12, 18),
    "evening": (18, 24),
}
MISSINGNESS_EDGES: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
GAP_MINUTES: tuple[int, ...] = (10, 30, 60, 180)
SIGNAL_COUNTS: tuple[int, ...] = (2, 6, 12, 20)
# Masked fraction (inherited + hidden tokens) of the random-imputation tasks.
RANDOM_RATIOS: tuple[float, ...] = (0.3, 0.5, 0.8)


def _check_observed(observed: np.ndarray) -> np.ndarray:
  observed = np.asarray(observed)
  if observed.ndim != 3 or observed.dtype != bool:
    raise ValueError(
        f"observed must be a boolean [n, T, C] array, got {observed.dtype} {observed.shape}")
  return observed


def _grid(observed: np.ndarray, patch_time: int, patch_channels: int) -> tuple[int, int, int]:
  """Validates the observed mask against the patch; returns (n, time tokens, channel tokens)."""
  n, n_time, n_chan = _check_observed(observed).shape
  if patch_time < 1 or n_time % patch_time:
    raise ValueError(f"patch_time={patch_time} must divide T={n_time}")
  if patch_channels < 1 or n_chan % patch_channels:
    raise ValueError(f"patch_channels={patch_channels} must divide C={n_chan}")
  return n, n_time // patch_time, n_chan // patch_channels


def _example_rngs(seed: int, n: int, example_ids: np.ndarray | None) -> list[np.random.Generator]:
  ids = np.arange(n) if example_ids is None else np.asarray(example_ids)
  if ids.shape != (n,):
    raise ValueError(f"example_ids must have shape ({n},), got {ids.shape}")
  return [np.random.default_rng([int(seed), int(i)]) for i in ids]


def _to_minutes(token_mask: np.ndarray, patch_time: int, patch_channels: int) -> np.ndarray:
  """[n, time tokens, channel tokens] -> [n, T, C] by repeating each patch."""
  return np.repeat(np.repeat(token_mask, patch_time, axis=1), patch_channels, axis=2)


def inherited_token_mask(
    observed: Bool[np.ndarray, "n t c"], patch_time: int, patch_channels: int
) -> Bool[np.ndarray, "n tt ct"]:
  """True for tokens with no observed minute (the inherited mask, threshold "all missing")."""
  n, nt, nc = _grid(observed, patch_time, patch_channels)
  blocks = observed.reshape(n, nt, patch_time, nc, patch_channels)
  return ~blocks.any(axis=(2, 4))


def random_imputation(
    observed: Bool[np.ndarray, "n t c"],
    patch_time: int,
    patch_channels: int,
    seed: int,
    example_ids: Int[np.ndarray, "n"] | None = None,
    *,
    ratio: float = 0.8,
) -> Bool[np.ndarray, "n t c"]:
  """Hides random tokens until, together with the inherited mask, `ratio` of all tokens are masked.

  This is AIM's random strategy: the artificially hidden tokens are drawn
  uniformly among tokens that have at least one observed minute; a day whose
  inherited mask already covers `ratio` gets no extra target. The returned
  mask holds only the hidden (artificial) tokens.
  """
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"ratio must be in (0, 1), got {ratio}")
  n, nt, nc = _grid(observed, patch_time, patch_channels)
  inherited = inherited_token_mask(observed, patch_time, patch_channels).reshape(n, -1)
  n_tokens = nt * nc
  extra = np.maximum(int(round(ratio * n_tokens)) - inherited.sum(axis=1), 0)
  rngs = _example_rngs(seed, n, example_ids)
  keys = np.array([rng.random(n_tokens) for rng in rngs]).reshape(n, n_tokens)
  keys = np.where(inherited, np.inf, keys)
  rank = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
  hidden = rank < extra[:, None]
  return _to_minutes(hidden.reshape(n, nt, nc), patch_time, patch_channels)


def _gap_tokens(gap_minutes: int, patch_time: int, n_time_tokens: int) -> int:
  if gap_minutes < 1 or gap_minutes % patch_time:
    raise ValueError(
        f"gap_minutes={gap_minutes} must be a positive multiple of patch_time={patch_time}")
  return gap_minutes // patch_time


def temporal_interpolation(
    observed: Bool[np.ndarray, "n t c"],
    patch_time: int,
    patch_channels: int,
    seed: int,
    example_ids: Int[np.ndarray, "n"] | None = None,
    *,
    gap_minutes: int,
) -> Bool[np.ndarray, "n t c"]:
  """Hides one contiguous all-channel gap at a random token-aligned position.

  The gap never touches the first or the last time token, so there is context
  on both sides (interpolation, not extrapolation).
  """
  n, nt, nc = _grid(observed, patch_time, patch_channels)
  gap = _gap_tokens(gap_minutes, patch_time, nt)
  if gap > nt - 2:
    raise ValueError(f"gap of {gap_minutes} min leaves no context on both sides of a "
                     f"{nt * patch_time}-min day")
  rngs = _example_rngs(seed, n, example_ids)
  starts = np.array([rng.integers(1, nt - gap) for rng in rngs], np.int64)
  t = np.arange(nt)[None, :]
  hidden_time = (t >= starts[:, None]) & (t < starts[:, None] + gap)
  hidden = np.broadcast_to(hidden_time[:, :, None], (n, nt, nc))
  return _to_minutes(hidden, patch_time, patch_channels)


def temporal_extrapolation(
    observed: Bool[np.ndarray, "n t c"],
    patch_time: int,
    patch_channels: int,
    seed: int,
    example_ids: Int[np.ndarray, "n"] | None = None,
    *,
    gap_minutes: int,
) -> Bool[np.ndarray, "n t c"]:
  """Hides the last `gap_minutes` of the day on every channel (forecasting); `seed` is unused."""
  del seed, example_ids  # Deterministic by construction.
  n, nt, nc = _grid(observed, patch_time, patch_channels)
  gap = _gap_tokens(gap_minutes, patch_time, nt)
  if gap >= nt:
    raise ValueError(f"gap of {gap_minutes} min leaves no context in a {nt * patch_time}-min day")
  hidden = np.zeros((n, nt, nc), bool)
  hidden[:, nt - gap:, :] = True
  return _to_minutes(hidden, patch_time, patch_channels)


def signal_imputation(
    observed: Bool[np.ndarray, "n t c"],
    patch_time: int,
    patch_channels: int,
    seed: int,
    example_ids: Int[np.ndarray, "n"] | None = None,
    *,
    k: int,
) -> Bool[np.ndarray, "n t c"]:
  """Hides `k` whole channels, chosen at random per example, for the whole day.

  `k` must be a multiple of `patch_channels` and leave at least one channel
  token visible (use `num_channels - patch_channels` for "all but one").
  """
  n, nt, nc = _grid(observed, patch_time, patch_channels)
  n_chan = nc * patch_channels
  if k < 1 or k % patch_channels or k >= n_chan:
    raise ValueError(
        f"k={k} channels must be a positive multiple of patch_channels={patch_channels} "
        f"below C={n_chan}")
  hidden_chan = np.zeros((n, nc), bool)
  for row, rng in zip(hidden_chan, _example_rngs(seed, n, example_ids)):
    row[rng.permutation(nc)[: k // patch_channels]] = True
  hidden = np.broadcast_to(hidden_chan[:, None, :], (n, nt, nc))
  return _to_minutes(hidden, patch_time, patch_channels)


def generative_task_suite(
    num_channels: int, patch_channels: int = 1, patch_time: int = 1
) -> list[tuple[str, TaskBuilder]]:
  """The generative evaluation tasks of issue 5 as (name, builder) pairs.

  Random imputation with 30%, 50% and 80% of tokens masked (the paper's
  error-versus-missingness axis; 80% is its headline task), temporal
  interpolation and extrapolation with 10/30/60/180-minute gaps (those that
  are multiples of `patch_time`: masks are token-aligned), and signal
  imputation with 2/6/12/20 channels (those below C that are multiples of
  `patch_channels`) plus all-but-one (`C - patch_channels` channels) when that
  is not already in the list.
  """
  partial = functools.partial
  suite: list[tuple[str, TaskBuilder]] = [
      (f"random_imputation_{round(100 * r)}", partial(random_imputation, ratio=r))
      for r in RANDOM_RATIOS]
  gaps = [gap for gap in GAP_MINUTES if gap % patch_time == 0]
  for gap in gaps:
    suite.append((f"temporal_interpolation_{gap}min",
                  partial(temporal_interpolation, gap_minutes=gap)))
  for gap in gaps:
    suite.append((f"temporal_extrapolation_{gap}min",
                  partial(temporal_extrapolation, gap_minutes=gap)))
  all_but_one = num_channels - patch_channels
  for k in SIGNAL_COUNTS:
    if k < all_but_one and k % patch_channels == 0:
      suite.append((f"signal_imputation_{k}ch", partial(signal_imputation, k=k)))
  if all_but_one >= 1:
    suite.append((f"signal_imputation_all_but_one_{all_but_one}ch",
                  partial(signal_imputation, k=all_but_one)))
  return suite


# ---------------------------------------------------------------------------
# Robustness.


def sensor_groups(channel_groups: Sequence[str]) -> list[str]:
  """The distinct group names in channel order (e.g. ["PPG", "EDA", "ACC", "TEMP"])."""
  return list(dict.fromkeys(channel_groups))


def remove_sensor_group(
    observed: Bool[np.ndarray, "n t c"], channel_groups: Sequence[str], group: str
) -> Bool[np.ndarray, "n t c"]:
  """Marks every channel of sensor `group` unobserved; `channel_groups[c]` is channel c's group."""
  observed = _check_observed(observed)
  if len(channel_groups) != observed.shape[2]:
    raise ValueError(
        f"channel_groups has {len(channel_groups)} entries for C={observed.shape[2]} channels")
  in_group = np.array([g == group for g in channel_groups])
  if not in_group.any():
    raise ValueError(f"unknown sensor group {group!r}; groups are {sensor_groups(channel_groups)}")
  return observed & ~in_group[None, None, :]


def remove_time_segment(
    observed: Bool[np.ndarray, "n t c"], segment: str
) -> Bool[np.ndarray, "n t c"]:
  """Marks a quarter of the day unobserved (night 00-06, morning, afternoon, evening 18-24)."""
  observed = _check_observed(observed)
  if segment not in SEGMENT_HOURS:
    raise ValueError(f"unknown time segment {segment!r}; choose from {list(SEGMENT_HOURS)}")
  n_time = observed.shape[1]
  if n_time % 24:
    raise ValueError(f"T={n_time} must be a whole number of steps per hour (a multiple of 24)")
  start, end = (h * n_time // 24 for h in SEGMENT_HOURS[segment])
  out = observed.copy()
  out[:, start:end, :] = False
  return out


def missing_fraction(observed: Bool[np.ndarray, "n t c"]) -> np.ndarray:
  """Fraction of unobserved minutes x channels per day, [n]."""
  observed = _check_observed(observed)
  # count / size (not 1 - mean) so that e.g. 288 of 1440 is exactly 0.2 and lands in its bucket.
  return (~observed).sum(axis=(1, 2)) / (observed.shape[1] * observed.shape[2])


def missingness_buckets(
    observed: Bool[np.ndarray, "n t c"], edges: Sequence[float] = MISSINGNESS_EDGES
) -> Int[np.ndarray, "n"]:
  """Bucket index per day: i where edges[i] <= missing fraction < edges[i+1], else -1.

  The last bucket is closed on the right (a day exactly at edges[-1] counts).
  """
  edges = np.asarray(edges, np.float64)
  if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
    raise ValueError(f"edges must be an increasing sequence of >= 2 fractions, got {edges}")
  frac = missing_fraction(observed)
  idx = np.searchsorted(edges, frac, side="right") - 1
  idx = np.where(frac == edges[-1], len(edges) - 2, idx)
  return np.where((idx >= 0) & (idx < len(edges) - 1), idx, -1)


def bucket_labels(edges: Sequence[float] = MISSINGNESS_EDGES) -> list[str]:
  """Readable labels of the buckets, e.g. "20-30%"."""
  return [f"{round(100 * a)}-{round(100 * b)}%" for a, b in zip(edges[:-1], edges[1:])]
