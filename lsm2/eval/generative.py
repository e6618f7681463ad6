"""Generative evaluation: hide token-aligned targets, reconstruct, score only really observed minutes.

Every task's target mask (`lsm2.eval.tasks`) is hidden from the model (the
target tokens are masked whole; natural gaps stay inherited-masked, nothing is
dropped) and from the classical baselines, which see exactly the same visible
minutes. Errors are MSE / MAE on normalised values over `target & observed`.
For synthetic data the noise floor follows from the metadata's `noise_std`:
no predictor of the clean signal can beat the observation noise.
"""
from __future__ import annotations

import dataclasses
from typing import Collection, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float

from lsm2.api import PretrainedModel, token_any
from lsm2.eval import baselines as baselines_lib
from lsm2.eval import metrics as metrics_lib
from lsm2.eval import report
from lsm2.eval import tasks as tasks_lib
from lsm2.model.config import ModelConfig

_MAE_PER_STD = float(np.sqrt(2.0 / np.pi))  # E|e| / std of a Gaussian error.


@dataclasses.dataclass(frozen=True)
class TaskOutput:
  """What one generative task produced, for buckets and plots (normalised units)."""
  target: Bool[np.ndarray, "n t c"]
  predictions: dict[str, Float[np.ndarray, "n t c"]]  # method -> [n, T, C]


def select_tasks(model_cfg: ModelConfig, names: Sequence[str]):
  """(name, builder) pairs of the model's suite; `names` empty = all. Unknown names raise."""
  suite = tasks_lib.generative_task_suite(
      model_cfg.num_channels, model_cfg.patch_channels, model_cfg.patch_time)
  if not names:
    return suite
  known = dict(suite)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(
        f"generative task(s) {unknown} not in the suite for C={model_cfg.num_channels} and patch "
        f"{model_cfg.patch_time} min x {model_cfg.patch_channels} channel(s) (masks are "
        f"token-aligned); the suite is {list(known)}")
  return [(n, known[n]) for n in names]


def masked_errors(predictions: np.ndarray, targets: np.ndarray, score_mask: np.ndarray) -> dict:
  """MSE / MAE / count through the CLU accumulator (padding-free, host arrays)."""
  metric = metrics_lib.MaskedReconstruction.from_model_output(
      predictions=jnp.asarray(predictions), targets=jnp.asarray(targets),
      mask=jnp.asarray(score_mask))
  return metric.compute()


def noise_floor(score_mask: np.ndarray, noise_std: np.ndarray, norm_std: np.ndarray) -> dict:
  """Expected MSE / MAE of a perfect clean-signal predictor over the scored minutes.

  Per channel the noise in normalised units is noise_std / norm_std; the floor
  weighs channels by their scored minutes (Gaussian noise; clipping ignored).
  """
  count = score_mask.sum(axis=(0, 1)).astype(np.float64)
  total = count.sum()
  if total == 0:
    return {"mse": None, "mae": None, "count": 0}
  sigma = np.asarray(noise_std, np.float64) / np.asarray(norm_std, np.float64)
  return {"mse": float((count * sigma ** 2).sum() / total),
          "mae": float((count * sigma * _MAE_PER_STD).sum() / total), "count": int(total)}


def run_task(model: PretrainedModel, z: np.ndarray, observed: np.ndarray, builder, *, seed: int,
             baseline_names: Sequence[str]) -> TaskOutput:
  """Builds the target mask and every method's predictions for one task."""
  cfg = model.model_cfg
  target = builder(observed, cfg.patch_time, cfg.patch_channels, seed,
                   example_ids=np.arange(z.shape[0]))
  predictions = {"model": model.reconstruct_normalized(z, observed, token_any(target, cfg))}
  for name in baseline_names:
    predictions[name] = baselines_lib.impute(name, z, observed, target)
  return TaskOutput(target, predictions)


def record(results: report.Results, out: TaskOutput, z: np.ndarray, observed: np.ndarray, *,
           task: str, split: str, masking: str, noise: tuple[np.ndarray, np.ndarray] | None) -> None:
  score_mask = out.target & observed
  keys = dict(task=task, split=split, masking=masking, level="minute", family="generative")
  for method, pred in out.predictions.items():
    results.add_metrics(masked_errors(pred, z, score_mask), report.RECONSTRUCTION_METRICS,
                        method=method, **keys)
  if noise is not None:
    results.add_metrics(noise_floor(score_mask, *noise), report.RECONSTRUCTION_METRICS,
                        method="noise_floor", **keys)


def run(results: report.Results, model: PretrainedModel, z: np.ndarray, observed: np.ndarray,
        task_list, *, split: str, seed: int, baseline_names: Sequence[str],
        noise: tuple[np.ndarray, np.ndarray] | None, masking: str = report.NATURAL,
        keep: Collection[str] = ()) -> dict[str, TaskOutput]:
  """Records every task of `task_list` on the given days; returns the outputs of the tasks
  named in `keep`, by name (each holds a [n, T, C] prediction per method: keeping every
  task's would grow with the test split times the task count)."""
  outputs = {}
  for name, builder in task_list:
    out = run_task(model, z, observed, builder, seed=seed, baseline_names=baseline_names)
    if not (out.target & observed).any():
      results.skip(f"{name} ({masking})", "no observed minute under the target mask")
      continue
    record(results, out, z, observed, task=name, split=split, masking=masking, noise=noise)
    if name in keep:
      outputs[name] = out
  return outputs


def bucket_errors(results: report.Results, out: TaskOutput, z: np.ndarray, observed: np.ndarray,
                  *, task: str, split: str) -> dict[str, list[float | None]]:
  """Errors per bucket of the day's own missing fraction; returns method -> MSE per bucket."""
  buckets = tasks_lib.missingness_buckets(observed)
  names = tasks_lib.bucket_labels()
  score_mask = out.target & observed
  series: dict[str, list[float | None]] = {m: [] for m in out.predictions}
  for b, label in enumerate(names):
    days = buckets == b
    for method, pred in out.predictions.items():
      if not days.any():
        series[method].append(None)
        continue
      err = masked_errors(pred[days], z[days], score_mask[days])
      series[method].append(err["mse"])
      results.add_metrics(err, report.RECONSTRUCTION_METRICS, task=task, split=split,
                          masking=f"missing:{label}", level="minute", family="generative",
                          method=method, days=int(days.sum()))
  return series
