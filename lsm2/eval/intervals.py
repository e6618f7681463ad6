"""Bootstrap confidence intervals and paired verdicts for comparing two methods over seeds.

A metric measured once per seed (or per test subject) for methods A and B: the mean
with a percentile-bootstrap interval, and a paired verdict that says "tie" when the
interval of the mean difference (A - B, resampling the pairs together) covers 0.
Used to compare AIM with LSM-1 over several pretraining seeds, where a single run's
difference says little.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Float

DEFAULT_RESAMPLES = 10_000


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean of the values and its two-sided percentile-bootstrap interval."""
  mean: float
  low: float
  high: float
  n: int

  def covers(self, value: float) -> bool:
    return self.low <= value <= self.high


def _values(values, name: str) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array, got shape {values.shape}")
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name} holds non-finite values: {values}")
  return values


def bootstrap_interval(values: Float[np.ndarray, "n"], *, confidence: float = 0.95,
                       resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
  """Mean and percentile-bootstrap interval of the mean (resampling with replacement).

  `scipy.stats.bootstrap(method="percentile")`; the same `seed` gives the same interval.
  """
  values = _values(values, "values")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if resamples < 1:
    raise ValueError(f"resamples must be >= 1, got {resamples}")
  mean = float(values.mean())
  if values.size == 1:
    # Every resample of one value is that value (scipy refuses fewer than two).
    return Interval(mean, mean, mean, 1)
  from scipy import stats  # pylint: disable=g-import-not-at-top
  low, high = stats.bootstrap(
      (values,), np.mean, n_resamples=resamples, confidence_level=confidence,
      method="percentile", rng=np.random.default_rng(seed)).confidence_interval
  return Interval(mean, float(low), float(high), int(values.size))


def paired_verdict(a: Float[np.ndarray, "n"], b: Float[np.ndarray, "n"], *, lower_is_better: bool,
                   names: tuple[str, str] = ("A", "B"), confidence: float = 0.95,
                   resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[str, Interval]:
  """Which of two paired methods is better, or "tie", and the interval of mean(a - b).

  Pair i is the same seed (or subject) for both methods. The verdict names the better
  method only when the interval of the mean difference excludes 0. Resampling the
  differences a_i - b_i is resampling the pairs together (scipy's `paired=True`).
  """
  a, b = _values(a, "a"), _values(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"paired values must have the same length, got {a.size} and {b.size}")
  diff = bootstrap_interval(a - b, confidence=confidence, resamples=resamples, seed=seed)
  if diff.covers(0.0):
    return "tie", diff
  a_better = (diff.mean < 0) == lower_is_better
  return (names[0] if a_better else names[1]), diff
