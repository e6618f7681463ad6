"""Windowed recognition of a minute-level label (activity type per bout window) by linear probe.

Each day is cut into fixed windows of `window_minutes`, aligned to the
model's token grid in time (a multiple of the patch length that divides the
day). A window is labelled with class k when at least `min_fraction` of its
minutes carry label k (ties, possible for fractions <= 0.5, go to the lowest
class index); windows where no class reaches that are not examples. A
window's feature is the mean of the frozen encoder's per-token outputs over
the visible tokens (every channel patch) in its time span; a labelled window
without a visible token (the watch was off) is skipped and counted. The
windows are then probed like days (`discriminative.probe_examples`): the
configured subject-disjoint protocol, the linear probe, the majority baseline,
few-shot, and the classification metrics (macro-F1, balanced accuracy, AUROC,
mAP).
"""
from __future__ import annotations

import logging

import ml_collections
import numpy as np
from jaxtyping import Bool, Float, Int

from lsm2.api import PretrainedModel
from lsm2.data.metadata import LabelSpec
from lsm2.eval import discriminative
from lsm2.eval import report

LEVEL = "window"


def tokens_per_window(window_minutes: int, patch_time: int, time_steps: int) -> int:
  """Time tokens per window; raises naming config.windows.minutes if it is off the patch grid."""
  if window_minutes < 1 or window_minutes % patch_time or time_steps % window_minutes:
    raise ValueError(
        f"config.windows.minutes={window_minutes} must be a multiple of the model's patch of "
        f"{patch_time} min that divides the {time_steps}-min day (windows align to the token grid)")
  return window_minutes // patch_time


def window_labels(minute_labels: Int[np.ndarray, "n t"], window_minutes: int, min_fraction: float,
                  num_classes: int) -> Int[np.ndarray, "n w"]:
  """Class per window: the one holding >= min_fraction of its minutes (lowest on ties), else -1."""
  minute_labels = np.asarray(minute_labels)
  n, t = minute_labels.shape
  if t % window_minutes:
    raise ValueError(f"window of {window_minutes} min does not divide the {t}-min day")
  if not 0.0 < min_fraction <= 1.0:
    raise ValueError(f"config.windows.min_fraction={min_fraction} must be in (0, 1]")
  windows = minute_labels.reshape(n, t // window_minutes, window_minutes)
  counts = np.stack([(windows == k).sum(axis=2) for k in range(num_classes)], axis=-1)
  best = counts.argmax(axis=-1)  # First maximum: the lowest class index on ties.
  enough = counts.max(axis=-1) >= min_fraction * window_minutes
  return np.where(enough, best, -1)


def pool_windows(outputs: Float[np.ndarray, "n k d"], visible: Bool[np.ndarray, "n k"],
                 grid: tuple[int, int], time_tokens: int
                 ) -> tuple[Float[np.ndarray, "n w d"], Int[np.ndarray, "n w"]]:
  """(mean output over each window's visible tokens, visible tokens per window).

  Tokens are numbered row-major over the grid (n_time, n_signal), token =
  time_index * n_signal + signal_index, so a window of `time_tokens` time
  steps is a contiguous run of time_tokens * n_signal tokens. Features of a
  window without visible tokens are 0.
  """
  n_time, n_signal = grid
  n, k, d = outputs.shape
  if k != n_time * n_signal or visible.shape != (n, k) or n_time % time_tokens:
    raise ValueError(f"outputs {outputs.shape} / visible {visible.shape} do not fit the grid "
                     f"{grid} with {time_tokens} time tokens per window")
  w = n_time // time_tokens
  vis = visible.reshape(n, w, time_tokens * n_signal)
  sums = np.where(vis[..., None], outputs.reshape(n, w, time_tokens * n_signal, d), 0.0).sum(
      axis=2, dtype=np.float64)
  counts = vis.sum(axis=2)
  return (sums / np.maximum(counts, 1)[..., None]).astype(np.float32), counts


def window_features(model: PretrainedModel, z: Float[np.ndarray, "n t c"],
                    observed: Bool[np.ndarray, "n t c"], time_tokens: int
                    ) -> tuple[Float[np.ndarray, "n w d"], Int[np.ndarray, "n w"]]:
  """`pool_windows` of the frozen encoder's per-token outputs, a batch of days at a time.

  Only [batch, tokens, d] outputs exist at once (a day's full grid is
  num_tokens x width floats).
  """
  feats, counts = [], []
  for start in range(0, z.shape[0], model.batch_size):
    sl = slice(start, start + model.batch_size)
    outputs, visible = model.embed_normalized(z[sl], observed[sl], per_token=True)
    f, c = pool_windows(outputs, visible, model.model_cfg.grid, time_tokens)
    feats.append(f)
    counts.append(c)
  return np.concatenate(feats), np.concatenate(counts)


def run(results: report.Results, model: PretrainedModel, pool: discriminative.Pool,
        spec: LabelSpec, config: ml_collections.ConfigDict) -> None:
  """Window examples of the minute label `spec` from the pool days, probed and scored."""
  cfg = config.windows
  cfg_model = model.model_cfg
  time_tokens = tokens_per_window(cfg.minutes, cfg_model.patch_time, cfg_model.time_steps)
  task = discriminative.Task(spec.name, spec.kind, LEVEL, len(spec.classes), label_level="minute")
  what = f"{spec.name} ({cfg.minutes}-min windows)"
  y = window_labels(pool.labels[spec.name], cfg.minutes, cfg.min_fraction, len(spec.classes))
  days = np.flatnonzero((y >= 0).any(axis=1))
  if days.size == 0:
    results.skip(what, f"no window has >= {cfg.min_fraction:.0%} of its minutes in one class")
    return
  logging.info("Windows: %s on %d days.", what, days.size)
  feats, counts = window_features(model, pool.z[days], pool.observed[days], time_tokens)
  labelled = y[days] >= 0
  day_of, window_of = np.nonzero(labelled & (counts > 0))
  unseen = int(np.count_nonzero(labelled & (counts == 0)))
  if unseen:
    results.skip(f"{what}: {unseen} of {int(labelled.sum())} labelled windows",
                 "no visible token in the window (nothing observed)")
  rows = days[day_of]
  ex = discriminative.examples_with_folds(
      task, feats[day_of, window_of], y[days][day_of, window_of], pool.subject_id[rows],
      pool.split[rows], [np.array([r]) for r in rows], config.probe.protocol, config.seed)
  if isinstance(ex, str):
    results.skip(what, ex)
    return
  discriminative.probe_examples(results, ex, task, config, what=what,
                                window_minutes=cfg.minutes, min_fraction=cfg.min_fraction,
                                windows_without_tokens=unseen)
