"""Downstream metrics: classification, regression and masked reconstruction.

Functions compute each metric from a whole evaluation set (float64, on the host)
with scikit-learn and scipy, imported when a metric is first computed (a second
or two) rather than by every module that imports this one. CLU `Metric` classes
accumulate model outputs over batches and call the same functions in
`compute()`, so a training/eval loop can merge them like any other CLU metric.

Undefined metrics are reported as `None`, never as 0 or NaN: an AUROC with a
single class in the labels, a Pearson r against a constant, or a reconstruction
error over zero observed target minutes would otherwise look like a real
(perhaps perfect) number. Every result dict carries the number of examples
(or minutes) it was computed from.
"""
from __future__ import annotations

from typing import Any
import warnings

import flax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from jaxtyping import Array, Bool, Float, Int

# ---------------------------------------------------------------------------
# Classification.


def _check_labels(y_true: np.ndarray, num_classes: int) -> np.ndarray:
  y_true = np.asarray(y_true)
  if y_true.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {y_true.shape}")
  if y_true.size and not np.issubdtype(y_true.dtype, np.integer):
    if not np.all(np.equal(np.mod(y_true, 1), 0)):
      raise ValueError(f"labels must be integer class ids, got values like {y_true[:5]}")
  y_true = y_true.astype(np.int64)
  bad = (y_true < 0) | (y_true >= num_classes)
  if np.any(bad):
    raise ValueError(
        f"labels must lie in [0, {num_classes}), got {np.unique(y_true[bad])[:10]}")
  return y_true


def binary_auroc(y_true: Int[np.ndarray, "n"], scores: Float[np.ndarray, "n"]) -> float | None:
  """Area under the ROC curve (tied scores count half a pair: the Mann-Whitney U).

  Returns None when only one class is present (AUROC is undefined; scikit-learn
  would raise).
  """
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  y_true = np.asarray(y_true).astype(bool)
  n_pos = int(y_true.sum())
  if n_pos == 0 or n_pos == len(y_true):
    return None
  return float(skm.roc_auc_score(y_true, np.asarray(scores, np.float64)))


def average_precision(y_true: Int[np.ndarray, "n"], scores: Float[np.ndarray, "n"]) -> float | None:
  """Average precision: sum over distinct thresholds of (R_k - R_{k-1}) * P_k.

  Tied scores form one threshold (all of them are predicted positive together).
  Returns None when there is no positive example (scikit-learn would warn and
  return 0).
  """
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  y_true = np.asarray(y_true).astype(bool)
  if not y_true.any():
    return None
  return float(skm.average_precision_score(y_true, np.asarray(scores, np.float64)))


def macro_f1(
    y_true: Int[np.ndarray, "n"], y_pred: Int[np.ndarray, "n"], num_classes: int
) -> float | None:
  """Unweighted mean F1 over the classes present in `y_true` or `y_pred`."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  y_true = _check_labels(y_true, num_classes)
  y_pred = _check_labels(y_pred, num_classes)
  if y_true.size == 0:
    return None
  # scikit-learn's default labels are exactly those present in y_true or y_pred.
  return float(skm.f1_score(y_true, y_pred, average="macro"))


def balanced_accuracy(
    y_true: Int[np.ndarray, "n"], y_pred: Int[np.ndarray, "n"], num_classes: int
) -> float | None:
  """Mean per-class recall over the classes present in `y_true`."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  y_true = _check_labels(y_true, num_classes)
  y_pred = _check_labels(y_pred, num_classes)
  if y_true.size == 0:
    return None
  with warnings.catch_warnings():
    # A class predicted but absent from y_true has no recall: scikit-learn leaves it
    # out, as this metric means to, and warns about it.
    warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
    return float(skm.balanced_accuracy_score(y_true, y_pred))


def _mean_or_none(values: list[float | None]) -> float | None:
  defined = [v for v in values if v is not None]
  return float(np.mean(defined)) if defined else None


def classification_metrics(
    y_true: Int[np.ndarray, "n"],
    scores: Float[np.ndarray, "n"] | Float[np.ndarray, "n k"],
    num_classes: int,
) -> dict[str, Any]:
  """AUROC, macro-F1, balanced accuracy, mAP and accuracy of class scores.

  Args:
    y_true: integer labels in [0, num_classes).
    scores: class probabilities (or any monotone scores for the ranking
      metrics). Binary tasks accept the positive-class probability `[n]`
      (thresholded at 0.5) or `[n, 2]`; multi-class tasks need `[n, K]`
      (prediction = argmax).
    num_classes: K >= 2.

  Returns:
    dict with `auroc` (binary; macro one-vs-rest over classes that have both
    positives and negatives for K > 2), `macro_f1`, `balanced_accuracy`, `map`
    (AP of the positive class for binary, macro AP over classes present for
    K > 2), `accuracy` and `n`. Undefined metrics are None.
  """
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  y_true = _check_labels(y_true, num_classes)
  scores = np.asarray(scores, np.float64)
  if scores.ndim == 1:
    if num_classes != 2:
      raise ValueError(f"1-D scores need num_classes=2, got num_classes={num_classes}")
    scores = np.stack([1.0 - scores, scores], axis=1)
    y_pred = (scores[:, 1] >= 0.5).astype(np.int64)
  elif scores.ndim == 2 and scores.shape[1] == num_classes:
    y_pred = np.argmax(scores, axis=1)
  else:
    raise ValueError(f"scores must be [n] or [n, {num_classes}], got shape {scores.shape}")
  if scores.shape[0] != y_true.shape[0]:
    raise ValueError(f"labels ({y_true.shape[0]}) and scores ({scores.shape[0]}) differ in length")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf")

  if num_classes == 2:
    auroc = binary_auroc(y_true == 1, scores[:, 1])
    ap = average_precision(y_true == 1, scores[:, 1])
  else:
    # One-vs-rest class by class, not roc_auc_score(multi_class="ovr"): that raises when a
    # class lacks positives, where this macro mean leaves the undefined class out.
    auroc = _mean_or_none([binary_auroc(y_true == k, scores[:, k]) for k in range(num_classes)])
    ap = _mean_or_none([average_precision(y_true == k, scores[:, k]) for k in range(num_classes)])
  n = int(y_true.size)
  return {
      "auroc": auroc,
      "macro_f1": macro_f1(y_true, y_pred, num_classes),
      "balanced_accuracy": balanced_accuracy(y_true, y_pred, num_classes),
      "map": ap,
      "accuracy": float(skm.accuracy_score(y_true, y_pred)) if n else None,
      "n": n,
  }


# ---------------------------------------------------------------------------
# Regression.


def pearson_r(x: Float[np.ndarray, "n"], y: Float[np.ndarray, "n"]) -> float | None:
  """Pearson correlation; None when either side is constant or n < 2."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  # Exact test for constants (scipy would warn and give NaN, or raise for n < 2): a
  # constant array's deviations from its float mean need not be exactly 0.
  if x.size < 2 or np.ptp(x) == 0.0 or np.ptp(y) == 0.0:
    return None
  return float(stats.pearsonr(x, y).statistic)


def regression_metrics(
    y_true: Float[np.ndarray, "n"], y_pred: Float[np.ndarray, "n"]
) -> dict[str, Any]:
  """MAE, RMSE and Pearson r of predictions (None when undefined) and `n`."""
  y_true = np.asarray(y_true, np.float64)
  y_pred = np.asarray(y_pred, np.float64)
  if y_true.ndim != 1 or y_true.shape != y_pred.shape:
    raise ValueError(
        f"targets {y_true.shape} and predictions {y_pred.shape} must be equal 1-D shapes")
  if not (np.all(np.isfinite(y_true)) and np.all(np.isfinite(y_pred))):
    raise ValueError("regression targets or predictions contain NaN or inf")
  n = int(y_true.size)
  if n == 0:
    return {"mae": None, "rmse": None, "pearson_r": None, "n": 0}
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  return {
      "mae": float(skm.mean_absolute_error(y_true, y_pred)),
      "rmse": float(skm.root_mean_squared_error(y_true, y_pred)),
      "pearson_r": pearson_r(y_true, y_pred),
      "n": n,
  }


# ---------------------------------------------------------------------------
# CLU metrics.


@flax.struct.dataclass
class MaskedReconstruction(clu_metrics.Metric):
  """Squared and absolute error sums over masked observed minutes, batch by batch.

  `from_model_output(predictions=, targets=, mask=)` works inside `jax.jit`;
  `mask` must be True exactly on the minutes that count (artificially masked
  AND really observed). Values where the mask is False, even NaN, never enter
  the sums. `compute()` returns {"mse", "mae", "count"} with None for a count
  of 0 (nothing was measured, which is not a perfect score).
  """

  sq_sum: jnp.ndarray
  abs_sum: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def empty(cls) -> MaskedReconstruction:
    return cls(sq_sum=jnp.array(0, jnp.float32), abs_sum=jnp.array(0, jnp.float32),
               count=jnp.array(0, jnp.int32))

  @classmethod
  def from_model_output(
      cls,
      *,
      predictions: Float[Array, "*s"],
      targets: Float[Array, "*s"],
      mask: Bool[Array, "*s"],
      **_,
  ) -> MaskedReconstruction:
    if not (predictions.shape == targets.shape == mask.shape):
      raise ValueError(
          f"predictions {predictions.shape}, targets {targets.shape} and mask {mask.shape} "
          "must match")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (masked and observed minutes), got {mask.dtype}")
    err = (jnp.where(mask, predictions, 0).astype(jnp.float32)
           - jnp.where(mask, targets, 0).astype(jnp.float32))
    return cls(sq_sum=jnp.sum(err * err), abs_sum=jnp.sum(jnp.abs(err)),
               count=jnp.sum(mask, dtype=jnp.int32))

  def merge(self, other: MaskedReconstruction) -> MaskedReconstruction:
    return type(self)(sq_sum=self.sq_sum + other.sq_sum, abs_sum=self.abs_sum + other.abs_sum,
                      count=self.count + other.count)

  def compute(self) -> dict[str, Any]:
    count = int(self.count)
    if count == 0:
      return {"mse": None, "mae": None, "count": 0}
    if not (np.isfinite(float(self.sq_sum)) and np.isfinite(float(self.abs_sum))):
      raise ValueError("reconstruction error sums are NaN/inf: predictions or targets are "
                       "not finite at masked observed minutes")
    return {"mse": float(self.sq_sum) / count, "mae": float(self.abs_sum) / count, "count": count}


def _collected(values: dict[str, np.ndarray], key: str) -> np.ndarray:
  keep = values["mask"].astype(bool)
  return values[key][keep]


@flax.struct.dataclass
class ClassificationMetrics(clu_metrics.CollectingMetric):
  """Collects `labels` [n] and class `scores` ([n] or [n, K]) on the host.

  `from_model_output(labels=, scores=, mask=None)`; `mask` marks real (not
  padding) examples. `compute()` returns `classification_metrics(...)` with K
  taken from the scores' width (2 for 1-D positive-class probabilities).
  Not jit-able (CLU's CollectingMetric): merge in the Python eval loop.
  """

  @classmethod
  def from_model_output(cls, *, labels: Int[Array, "n"], scores: Float[Array, "n ..."],
                        mask: Bool[Array, "n"] | None = None, **_) -> ClassificationMetrics:
    labels, scores = np.asarray(labels), np.asarray(scores)
    mask = np.ones(labels.shape[0], bool) if mask is None else np.asarray(mask)
    return cls(values={"labels": (labels,), "scores": (scores,), "mask": (mask,)})

  def compute(self) -> dict[str, Any]:
    values = super().compute()
    scores = _collected(values, "scores")
    num_classes = 2 if scores.ndim == 1 else scores.shape[1]
    return classification_metrics(_collected(values, "labels"), scores, num_classes)


@flax.struct.dataclass
class RegressionMetrics(clu_metrics.CollectingMetric):
  """Collects regression `labels` and `predictions` [n]; `compute()` -> MAE, RMSE, r."""

  @classmethod
  def from_model_output(cls, *, labels: Float[Array, "n"], predictions: Float[Array, "n"],
                        mask: Bool[Array, "n"] | None = None, **_) -> RegressionMetrics:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    mask = np.ones(labels.shape[0], bool) if mask is None else np.asarray(mask)
    return cls(values={"labels": (labels,), "predictions": (predictions,), "mask": (mask,)})

  def compute(self) -> dict[str, Any]:
    values = super().compute()
    return regression_metrics(_collected(values, "labels"), _collected(values, "predictions"))
