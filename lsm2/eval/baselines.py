"""Classical imputation baselines on minute-level days `[n, T, C]`.

Each baseline sees only the *visible* minutes, `observed & ~target_mask`; the
values at every other minute (masked targets, unobserved minutes, even NaN)
never influence the output. Each returns a full `[n, T, C]` float32 array;
errors are then measured by the caller on `target_mask & observed`.
Values are assumed z-scored, so 0 (the global mean) is the fallback for an
example/channel with no visible minute at all.

Each baseline is one jitted XLA program (scans and gathers over time, fused), run
on chunks of examples to bound the temporary memory: the numpy version this
replaced spent most of an evaluation's time here (benchmarks/MEASUREMENTS.md).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

_CHUNK = 256  # examples per chunk: 256 x 1440 x 26 x 4 bytes = 38 MB per temporary.

Baseline = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _visible(values: np.ndarray, observed: np.ndarray, target_mask: np.ndarray) -> np.ndarray:
  if values.ndim != 3:
    raise ValueError(f"values must be [n, T, C], got shape {values.shape}")
  if observed.shape != values.shape or target_mask.shape != values.shape:
    raise ValueError(
        f"values {values.shape}, observed {observed.shape} and target_mask {target_mask.shape} "
        "must match")
  if observed.dtype != bool or target_mask.dtype != bool:
    raise ValueError(
        f"observed ({observed.dtype}) and target_mask ({target_mask.dtype}) must be boolean")
  return observed & ~target_mask


def _apply(
    fill: Callable[[Array, Array], Array],
    values: np.ndarray,
    observed: np.ndarray,
    target_mask: np.ndarray,
) -> np.ndarray:
  """Validates inputs and applies `fill` chunk by chunk to the visible values."""
  values, observed, target_mask = np.asarray(values), np.asarray(observed), np.asarray(target_mask)
  visible = _visible(values, observed, target_mask)
  out = np.empty(values.shape, np.float32)
  for start in range(0, values.shape[0], _CHUNK):
    sl = slice(start, start + _CHUNK)
    filled, finite = _fill_visible(fill, values[sl].astype(np.float32, copy=False), visible[sl])
    if not finite:
      raise ValueError("values are NaN/inf at observed minutes that are not masked")
    out[sl] = filled
  return out


@functools.partial(jax.jit, static_argnums=0)
def _fill_visible(fill, values: Float[Array, "n t c"], visible: Bool[Array, "n t c"]):
  """`fill` of the values with every non-visible one zeroed (a select: NaN there never
  reaches the output), and whether every visible value is finite."""
  clean = jnp.where(visible, values, 0.0)
  return fill(clean, visible), jnp.all(jnp.isfinite(clean))


def _previous_index(visible: Bool[Array, "n t c"]) -> Array:
  """Index of the last visible minute at or before t along axis 1 (-1 if none)."""
  t = jnp.arange(visible.shape[1], dtype=jnp.int32)[None, :, None]
  return lax.cummax(jnp.where(visible, t, -1), axis=1)


def _next_index(visible: Bool[Array, "n t c"]) -> Array:
  """Index of the first visible minute at or after t along axis 1 (T if none)."""
  n_time = visible.shape[1]
  t = jnp.arange(n_time, dtype=jnp.int32)[None, :, None]
  return lax.cummin(jnp.where(visible, t, n_time), axis=1, reverse=True)


def _gather(values: Array, index: Array) -> Array:
  return jnp.take_along_axis(values, jnp.clip(index, 0, values.shape[1] - 1), axis=1)


def _channel_mean(values: Array, visible: Array) -> Array:
  """Per-example, per-channel mean of the visible minutes (0 when none)."""
  count = visible.sum(axis=1, keepdims=True)
  mean = values.sum(axis=1, keepdims=True) / jnp.maximum(count, 1)
  return jnp.broadcast_to(jnp.where(count > 0, mean, 0.0), values.shape)


def _locf(values: Array, visible: Array) -> Array:
  """Last visible observation carried forward; the first one backfills the start."""
  prev = _previous_index(visible)
  nxt = _next_index(visible)
  has_prev, has_next = prev >= 0, nxt < visible.shape[1]
  out = jnp.where(has_prev, _gather(values, prev), _gather(values, nxt))
  return jnp.where(has_prev | has_next, out, 0.0)


def _linear_interpolation(values: Array, visible: Array) -> Array:
  """Linear in time between the neighbouring visible minutes; constant beyond the ends."""
  n_time = visible.shape[1]
  prev = _previous_index(visible)
  nxt = _next_index(visible)
  has_prev, has_next = prev >= 0, nxt < n_time
  v_prev, v_next = _gather(values, prev), _gather(values, nxt)
  t = jnp.arange(n_time, dtype=jnp.float32)[None, :, None]
  span = (nxt - prev).astype(jnp.float32)
  frac = jnp.where(has_prev & has_next & (span > 0), (t - prev) / jnp.maximum(span, 1.0), 0.0)
  inner = v_prev + frac * (v_next - v_prev)
  out = jnp.where(has_prev & has_next, inner, jnp.where(has_prev, v_prev, v_next))
  return jnp.where(has_prev | has_next, out, 0.0)


def channel_mean_impute(
    values: Float[np.ndarray, "n t c"],
    observed: Bool[np.ndarray, "n t c"],
    target_mask: Bool[np.ndarray, "n t c"],
) -> Float[np.ndarray, "n t c"]:
  """Fills every minute with its example/channel's mean over visible minutes (0 if none)."""
  return _apply(_channel_mean, values, observed, target_mask)


def locf_impute(
    values: Float[np.ndarray, "n t c"],
    observed: Bool[np.ndarray, "n t c"],
    target_mask: Bool[np.ndarray, "n t c"],
) -> Float[np.ndarray, "n t c"]:
  """Last visible observation carried forward; backfilled before the first one; 0 if none."""
  return _apply(_locf, values, observed, target_mask)


def linear_interpolation_impute(
    values: Float[np.ndarray, "n t c"],
    observed: Bool[np.ndarray, "n t c"],
    target_mask: Bool[np.ndarray, "n t c"],
) -> Float[np.ndarray, "n t c"]:
  """Linear interpolation in time between visible minutes, constant at the ends; 0 if none."""
  return _apply(_linear_interpolation, values, observed, target_mask)


# Name -> baseline(values, observed, target_mask) -> [n, T, C] float32.
BASELINES: dict[str, Baseline] = {
    "channel_mean": channel_mean_impute,
    "locf": locf_impute,
    "linear_interpolation": linear_interpolation_impute,
}


def impute(
    name: str,
    values: Float[np.ndarray, "n t c"],
    observed: Bool[np.ndarray, "n t c"],
    target_mask: Bool[np.ndarray, "n t c"],
) -> Float[np.ndarray, "n t c"]:
  """Runs the baseline `name` (a key of `BASELINES`)."""
  if name not in BASELINES:
    raise ValueError(f"unknown imputation baseline {name!r}; choose from {sorted(BASELINES)}")
  return BASELINES[name](values, observed, target_mask)
