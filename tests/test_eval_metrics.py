"""Metrics against hand-computed values on fixed inputs, and the CLU accumulators."""
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics

from lsm2.eval import metrics

# Six examples; positives score 0.35, 0.8, 0.9 and negatives 0.1, 0.4, 0.8 (one tie at 0.8).
Y6 = np.array([0, 0, 1, 1, 0, 1])
S6 = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.9])


def test_auroc_by_hand_with_tie():
  # Pairs won by each positive: 0.35 -> 1 (beats 0.1); 0.8 -> 2 + 0.5 (tie); 0.9 -> 3.
  # Total 6.5 of 9 pairs.
  assert metrics.binary_auroc(Y6, S6) == pytest.approx(6.5 / 9)
  # Ranking is all that matters.
  assert metrics.binary_auroc(Y6, np.log(S6)) == pytest.approx(6.5 / 9)
  assert metrics.binary_auroc(Y6, np.full(6, 0.3)) == pytest.approx(0.5)
  assert metrics.binary_auroc(np.zeros(4), np.arange(4.0)) is None


def test_average_precision_by_hand_with_tie():
  # Thresholds 0.9: P=1, R=1/3; 0.8 (tie, 2 examples): P=2/3, R=2/3; 0.35: P=3/5, R=1.
  expected = (1 + 2 / 3 + 3 / 5) / 3
  assert metrics.average_precision(Y6, S6) == pytest.approx(expected)
  assert metrics.average_precision(np.array([1, 0, 1, 0]), np.full(4, 0.7)) == pytest.approx(0.5)
  assert metrics.average_precision(np.zeros(3), np.arange(3.0)) is None


def test_binary_classification_metrics_by_hand():
  out = metrics.classification_metrics(Y6, S6, 2)
  # Predictions at 0.5: [0, 0, 0, 1, 1, 1].
  # Class 1: TP 2, FP 1, FN 1 -> F1 2/3; class 0 likewise 2/3.
  assert out["auroc"] == pytest.approx(6.5 / 9)
  assert out["map"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
  assert out["macro_f1"] == pytest.approx(2 / 3)
  assert out["balanced_accuracy"] == pytest.approx(2 / 3)
  assert out["accuracy"] == pytest.approx(4 / 6)
  assert out["n"] == 6
  two_col = metrics.classification_metrics(Y6, np.stack([1 - S6, S6], 1), 2)
  assert two_col == out


def test_multiclass_metrics_by_hand():
  y_true = np.array([0, 0, 1, 1, 2, 2])
  y_pred = np.array([0, 1, 1, 1, 2, 0])
  # F1: class 0: 2*1/(2+2)=0.5; class 1: 2*2/(2+3)=0.8; class 2: 2*1/(2+1)=2/3.
  assert metrics.macro_f1(y_true, y_pred, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
  # Recalls 1/2, 2/2, 1/2.
  assert metrics.balanced_accuracy(y_true, y_pred, 3) == pytest.approx(2 / 3)
  scores = np.eye(3)[y_pred] * 0.8 + 0.1
  out = metrics.classification_metrics(y_true, scores, 3)
  assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
  per_class = [metrics.binary_auroc(y_true == k, scores[:, k]) for k in range(3)]
  assert out["auroc"] == pytest.approx(np.mean(per_class))
  # Class 0 one-vs-rest: positives score [0.9, 0.1], negatives [0.1, 0.1, 0.1, 0.9].
  # 0.9 beats three and ties one (3.5); 0.1 ties three (1.5): 5 of 8 pairs.
  assert per_class[0] == pytest.approx(5 / 8)


def test_multiclass_skips_undefined_classes_and_f1_ignores_unseen_classes():
  y_true = np.array([0, 0, 1, 1])
  scores = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
  out = metrics.classification_metrics(y_true, scores, 3)
  # Class 2 has no positive: left out, not counted as 0.5 or 0.
  assert out["auroc"] == pytest.approx(1.0)
  assert out["map"] == pytest.approx(1.0)
  assert out["macro_f1"] == pytest.approx(1.0)


def test_classification_rejects_bad_input():
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    metrics.classification_metrics(np.array([0, 2]), np.array([0.1, 0.9]), 2)
  with pytest.raises(ValueError, match="NaN"):
    metrics.classification_metrics(np.array([0, 1]), np.array([0.1, np.nan]), 2)
  with pytest.raises(ValueError, match="shape"):
    metrics.classification_metrics(np.array([0, 1]), np.zeros((2, 4)), 3)


def test_regression_metrics_by_hand():
  y = np.array([1.0, 2.0, 3.0, 4.0])
  p = np.array([2.0, 4.0, 5.0, 9.0])
  out = metrics.regression_metrics(y, p)
  assert out["mae"] == pytest.approx((1 + 2 + 2 + 5) / 4)
  assert out["rmse"] == pytest.approx(np.sqrt((1 + 4 + 4 + 25) / 4))
  # dx = [-1.5, -.5, .5, 1.5], dy = [-3, -1, 0, 4]: r = 11 / sqrt(5 * 26).
  assert out["pearson_r"] == pytest.approx(11 / np.sqrt(130))
  assert out["n"] == 4
  assert metrics.regression_metrics(y, np.full(4, 2.5))["pearson_r"] is None
  empty = metrics.regression_metrics(np.zeros(0), np.zeros(0))
  assert empty == {"mae": None, "rmse": None, "pearson_r": None, "n": 0}
  with pytest.raises(ValueError, match="NaN"):
    metrics.regression_metrics(y, np.array([1.0, np.nan, 1.0, 1.0]))


@flax.struct.dataclass
class _EvalCollection(clu_metrics.Collection):
  recon: metrics.MaskedReconstruction


def test_masked_reconstruction_accumulates_under_jit():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(4, 6, 3)).astype(np.float32)
  target = rng.normal(size=(4, 6, 3)).astype(np.float32)
  mask = rng.random((4, 6, 3)) < 0.4
  target_nan = np.where(mask, target, np.nan)  # values outside the mask must never count.

  @jax.jit
  def step(p, t, m):
    return _EvalCollection.single_from_model_output(predictions=p, targets=t, mask=m)

  acc = _EvalCollection.empty()
  for sl in (slice(0, 1), slice(1, 4)):
    acc = acc.merge(step(jnp.asarray(pred[sl]), jnp.asarray(target_nan[sl]), jnp.asarray(mask[sl])))
  got = acc.compute()["recon"]
  err = (pred - target)[mask].astype(np.float64)
  assert got["count"] == err.size == int(mask.sum())
  assert got["mse"] == pytest.approx(np.mean(err * err), rel=1e-5)
  assert got["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-5)


def test_masked_reconstruction_with_nothing_to_measure_is_none_not_zero():
  m = metrics.MaskedReconstruction.from_model_output(
      predictions=jnp.ones((2, 3)), targets=jnp.zeros((2, 3)), mask=jnp.zeros((2, 3), bool))
  assert m.compute() == {"mse": None, "mae": None, "count": 0}
  assert metrics.MaskedReconstruction.empty().compute()["mse"] is None
  bad = metrics.MaskedReconstruction.from_model_output(
      predictions=jnp.array([jnp.nan]), targets=jnp.zeros(1), mask=jnp.ones(1, bool))
  with pytest.raises(ValueError, match="NaN"):
    bad.compute()


def test_collecting_metrics_merge_batches_and_drop_padding():
  full = metrics.classification_metrics(Y6, S6, 2)
  acc = metrics.ClassificationMetrics.empty()
  acc = acc.merge(metrics.ClassificationMetrics.from_model_output(labels=Y6[:4], scores=S6[:4]))
  # Second batch padded with two junk examples that the mask removes.
  acc = acc.merge(metrics.ClassificationMetrics.from_model_output(
      labels=np.r_[Y6[4:], 1, 1], scores=np.r_[S6[4:], 0.0, 0.0],
      mask=np.array([1, 1, 0, 0], bool)))
  assert acc.compute() == full

  y = np.array([1.0, 2.0, 3.0, 4.0])
  p = np.array([2.0, 4.0, 5.0, 9.0])
  reg = metrics.RegressionMetrics.empty()
  for sl in (slice(0, 3), slice(3, 4)):
    reg = reg.merge(metrics.RegressionMetrics.from_model_output(labels=y[sl], predictions=p[sl]))
  assert reg.compute() == metrics.regression_metrics(y, p)


def _pairwise_auroc(y, s):
  """The O(n^2) definition: the share of (positive, negative) pairs won, ties counting half."""
  pos, neg = s[y == 1], s[y == 0]
  diff = pos[:, None] - neg[None, :]
  return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def _step_sum_ap(y, s):
  """Sum over distinct thresholds t, highest first, of (R(t) - R(previous t)) * P(t)."""
  ap, prev_recall = 0.0, 0.0
  for t in np.unique(s)[::-1]:
    chosen = s >= t
    recall = (y[chosen] == 1).sum() / (y == 1).sum()
    ap += (recall - prev_recall) * (y[chosen] == 1).mean()
    prev_recall = recall
  return ap


def test_metrics_agree_with_their_definitions_on_random_data_with_ties():
  # Scores rounded to one decimal: many ties, which is where implementations differ.
  rng = np.random.default_rng(7)
  for n in (5, 23, 80):
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]  # both classes, so every metric is defined.
    s = np.round(rng.random(n) * 0.6 + 0.3 * y, 1)
    assert metrics.binary_auroc(y, s) == pytest.approx(_pairwise_auroc(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(_step_sum_ap(y, s), abs=1e-12)

    # Four classes: class 3 is predicted but never true, class 2 true but never predicted.
    t = rng.integers(0, 3, n)
    p = np.where(rng.random(n) < 0.5, t, rng.choice([0, 1, 3], n))
    f1s, recalls = [], []
    for k in range(4):
      tp, n_true, n_pred = ((t == k) & (p == k)).sum(), (t == k).sum(), (p == k).sum()
      if n_true + n_pred:
        f1s.append(2 * tp / (n_true + n_pred))
      if n_true:
        recalls.append(tp / n_true)
    assert metrics.macro_f1(t, p, 4) == pytest.approx(np.mean(f1s), abs=1e-12)
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # the predicted-only class is left out, silently.
      assert metrics.balanced_accuracy(t, p, 4) == pytest.approx(np.mean(recalls), abs=1e-12)

    x, z = rng.normal(size=n), rng.normal(size=n)
    out = metrics.regression_metrics(x, z)
    assert out["pearson_r"] == pytest.approx(np.corrcoef(x, z)[0, 1], abs=1e-12)
    assert out["mae"] == pytest.approx(np.abs(z - x).mean(), abs=1e-12)
    assert out["rmse"] == pytest.approx(np.sqrt(((z - x) ** 2).mean()), abs=1e-12)


def test_undefined_metrics_are_none_at_the_edges():
  assert metrics.binary_auroc(np.ones(3), np.arange(3.0)) is None
  assert metrics.binary_auroc(np.zeros(0), np.zeros(0)) is None
  assert metrics.average_precision(np.zeros(0), np.zeros(0)) is None
  assert metrics.macro_f1(np.zeros(0, int), np.zeros(0, int), 3) is None
  assert metrics.balanced_accuracy(np.zeros(0, int), np.zeros(0, int), 3) is None
  assert metrics.pearson_r([1.0], [2.0]) is None
  assert metrics.pearson_r([1.0, 2.0, 3.0], [0.1 + 0.2] * 3) is None
  empty = metrics.classification_metrics(np.zeros(0, int), np.zeros(0), 2)
  assert empty == {"auroc": None, "macro_f1": None, "balanced_accuracy": None, "map": None,
                   "accuracy": None, "n": 0}
