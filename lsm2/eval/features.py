"""Hand-crafted per-day activity features: the clinician's baseline beside the embedding probes.

What a clinician would compute from a wearable day without any model: per channel
the day's mean and variability (standard deviation) over observed minutes, the
night-minus-day difference of the mean, and the fraction of missing minutes; for
the activity-count channel (steps) the fraction of zero minutes, the night/day
ratio of counts, the intra-daily variability (IV) of the day and the inter-daily
stability (IS) of the subject's days (van Someren et al., Chronobiol. Int. 1999).
The features are probed with the same linear probe, folds and metrics as the
embeddings (`lsm2.eval.discriminative`), recorded as method `features_probe`: an
embedding that does not beat them has not learned more than these statistics.

Inputs are the normalised days of the evaluation pool (0 at unobserved minutes);
statistics are on normalised values (z-scores are affine in the original units),
except zero fractions and the night/day count ratio, which need original units.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from jaxtyping import Bool, Float

from lsm2.eval import discriminative
from lsm2.eval import report

METHOD = "features_probe"
NIGHT_HOURS = (0, 6)  # A day is assumed to start at 00:00 (as in lsm2.eval.tasks).
ACTIVITY_CHANNEL = "steps"


def hourly_means(x: Float[np.ndarray, "n t"], observed: Bool[np.ndarray, "n t"]
                 ) -> Float[np.ndarray, "n h"]:
  """Mean of each hour's observed minutes (NaN for an hour without any); T must be whole hours."""
  n, t = x.shape
  if t % 60:
    raise ValueError(f"days must be whole hours of minutes, got T={t}")
  x = np.where(observed, x, 0.0).reshape(n, t // 60, 60)
  count = observed.reshape(n, t // 60, 60).sum(axis=2)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, x.sum(axis=2) / np.maximum(count, 1), np.nan)


def interdaily_stability(hourly: Float[np.ndarray, "d h"]) -> float:
  """IS of one subject's days [d, 24] (NaN = missing hour): the variance of the 24-hour
  profile over the total variance, N * sum_h (m_h - m)^2 / (p * sum_i (x_i - m)^2).

  With missing hours each hour of the profile weighs by its observed days (the
  between-hour share of the variance, which is the formula above without gaps), so a
  rhythm that repeats exactly every day scores 1 whatever is missing; noise scores near 0.
  NaN when there is no variance or no observed hour.
  """
  hourly = np.asarray(hourly, np.float64)
  present = np.isfinite(hourly)
  values = hourly[present]
  if values.size == 0:
    return float("nan")
  mean = values.mean()
  total = np.square(values - mean).sum()
  if total <= 0:
    return float("nan")
  per_hour = present.sum(axis=0)
  hours = per_hour > 0
  profile = np.where(present, hourly, 0.0).sum(axis=0)[hours] / per_hour[hours]
  return float((per_hour[hours] * np.square(profile - mean)).sum() / total)


def intradaily_variability(hourly: Float[np.ndarray, "h"]) -> float:
  """IV of a series of hourly means (NaN = missing): N * sum (x_i - x_{i-1})^2 / ((N - 1) *
  sum (x_i - m)^2), over consecutive observed hours.

  Near 0 for a smooth rhythm, about 2 for white noise. NaN with fewer than 2 consecutive
  observed hours or no variance.
  """
  hourly = np.asarray(hourly, np.float64)
  present = np.isfinite(hourly)
  values = hourly[present]
  pairs = present[1:] & present[:-1]
  if values.size < 2 or not pairs.any():
    return float("nan")
  total = np.square(values - values.mean()).sum()
  if total <= 0:
    return float("nan")
  diffs = np.diff(np.where(present, hourly, 0.0))[pairs]
  # Mean squared successive difference over the variance: the formula above without gaps.
  return float(np.square(diffs).mean() / (total / values.size))


def day_features(z: Float[np.ndarray, "n t c"], observed: Bool[np.ndarray, "n t c"],
                 subject_id: np.ndarray, channel_names: Sequence[str],
                 norm_mean: Float[np.ndarray, "c"], norm_std: Float[np.ndarray, "c"],
                 ) -> tuple[Float[np.ndarray, "n f"], list[str]]:
  """Per-day features [n, F] and their names. Undefined values (a channel never observed,
  a constant day) are replaced by the feature's mean over the days where it is defined
  (0 when it is nowhere defined), so every day gets a finite feature vector."""
  z = np.asarray(z, np.float64)
  observed = np.asarray(observed, bool)
  n, t, c = z.shape
  if len(channel_names) != c:
    raise ValueError(f"{len(channel_names)} channel names for {c} channels")
  count = observed.sum(axis=1)
  zero_z = np.where(observed, z, 0.0)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = zero_z.sum(axis=1) / count
    std = np.sqrt(np.maximum(np.square(zero_z).sum(axis=1) / count - np.square(mean), 0.0))
    night = np.zeros(t, bool)
    night[NIGHT_HOURS[0] * 60:NIGHT_HOURS[1] * 60] = True
    night_obs = observed & night[None, :, None]
    day_obs = observed & ~night[None, :, None]
    night_mean = np.where(night_obs, z, 0.0).sum(axis=1) / night_obs.sum(axis=1)
    day_mean = np.where(day_obs, z, 0.0).sum(axis=1) / day_obs.sum(axis=1)
  columns = [mean, std, night_mean - day_mean, 1.0 - count / t]
  names = [f"{kind}/{ch}" for kind in ("mean", "std", "night_minus_day", "missing_fraction")
           for ch in channel_names]
  if ACTIVITY_CHANNEL in channel_names:
    j = list(channel_names).index(ACTIVITY_CHANNEL)
    counts = z[:, :, j] * float(norm_std[j]) + float(norm_mean[j])  # Original units.
    obs = observed[:, :, j]
    with np.errstate(invalid="ignore", divide="ignore"):
      zero = (obs & (np.abs(counts) < 0.5)).sum(axis=1) / obs.sum(axis=1)
      n_sum = np.where(obs & night, counts, 0.0).sum(axis=1) / (obs & night).sum(axis=1)
      d_sum = np.where(obs & ~night, counts, 0.0).sum(axis=1) / (obs & ~night).sum(axis=1)
      ratio = n_sum / np.where(np.abs(d_sum) > 1e-9, d_sum, np.nan)
    hourly = hourly_means(counts, obs)
    iv = np.array([intradaily_variability(h) for h in hourly])
    is_ = np.full(n, np.nan)
    subject_id = np.asarray(subject_id)
    for s in np.unique(subject_id):
      rows = subject_id == s
      is_[rows] = interdaily_stability(hourly[rows])
    columns += [zero[:, None], ratio[:, None], iv[:, None], is_[:, None]]
    names += [f"{k}/{ACTIVITY_CHANNEL}" for k in
              ("zero_fraction", "night_day_ratio", "intradaily_variability", "interdaily_stability")]
  x = np.concatenate(columns, axis=1)
  defined = np.isfinite(x)
  fill = np.where(defined, x, 0.0).sum(axis=0) / np.maximum(defined.sum(axis=0), 1)
  x = np.where(defined, x, fill[None, :])
  return x.astype(np.float32), names


def run(results: report.Results, pool: discriminative.Pool, tasks: Sequence[discriminative.Task],
        config, channel_names: Sequence[str], norm_mean: np.ndarray, norm_std: np.ndarray) -> None:
  """The linear probe on hand-crafted features for every task, recorded as `features_probe`."""
  x, _ = day_features(pool.z, pool.observed, pool.subject_id, channel_names, norm_mean, norm_std)
  for task in tasks:
    what = f"{task.name} ({task.level} level, features)"
    ex = discriminative.build_examples(pool, x, task, config.probe.protocol, config.seed)
    if isinstance(ex, str):
      results.skip(what, ex)
      continue
    discriminative.probe_examples(results, ex, task, config, what=what, baselines=False,
                                  method=METHOD)
