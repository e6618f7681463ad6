"""Linear probes, chance-level baselines, subject-disjoint splits and few-shot sampling."""
import numpy as np
import pytest

from lsm2.eval import metrics, probe


def test_binary_probe_separates_separable_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 8)) * 3.0 + 10.0  # unstandardised features
  y = (x[:, 0] - x[:, 3] > 0).astype(int)
  fitted = probe.fit_linear_probe(x[:300], y[:300], kind="binary", seed=0)
  p = fitted.predict(x[300:])
  assert p.shape == (100,) and np.all((p >= 0) & (p <= 1))
  out = metrics.classification_metrics(y[300:], p, 2)
  assert out["auroc"] > 0.99
  assert out["balanced_accuracy"] > 0.9


def test_categorical_probe_separates_clusters():
  rng = np.random.default_rng(1)
  centers = np.array([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
  y = rng.integers(0, 3, size=300)
  x = centers[y] + rng.normal(size=(300, 3)) * 0.5
  fitted = probe.fit_linear_probe(x[:200], y[:200], kind="categorical", num_classes=3,
                                  batch_size=64, seed=0)
  p = fitted.predict(x[200:])
  np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
  out = metrics.classification_metrics(y[200:], p, 3)
  assert out["auroc"] > 0.99 and out["macro_f1"] > 0.95


def test_regression_probe_recovers_linear_weights():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(256, 4)) * np.array([1.0, 5.0, 0.1, 2.0]) + 3.0
  w, b = np.array([1.5, -0.4, 8.0, 0.0]), 2.0
  y = x @ w + b
  fitted = probe.fit_linear_probe(x, y, kind="regression", l2=0.0, seed=0)  # the default recipe
  np.testing.assert_allclose(fitted.predict(x), y, atol=0.01 * np.std(y))
  # Weights in original units: w_std / scale * target_scale.
  recovered = fitted.weights[:, 0] / fitted.feature_scale * fitted.target_scale
  np.testing.assert_allclose(recovered, w, atol=0.01)
  out = metrics.regression_metrics(y, fitted.predict(x))
  assert out["pearson_r"] > 0.999


def test_class_balancing_removes_the_prior_from_predictions():
  # Uninformative (constant) features: only the bias can learn, so the probe outputs its prior.
  x = np.ones((100, 3))
  y = (np.arange(100) < 90).astype(int)  # 90% positives
  fit = dict(steps=1500, lr=0.05, seed=0)
  plain = probe.fit_linear_probe(x, y, kind="binary", class_balanced=False, **fit)
  balanced = probe.fit_linear_probe(x, y, kind="binary", class_balanced=True, **fit)
  np.testing.assert_allclose(plain.predict(x[:1]), 0.9, atol=0.01)
  np.testing.assert_allclose(balanced.predict(x[:1]), 0.5, atol=0.01)
  yc = np.repeat([0, 1, 2], [60, 30, 10])
  bal_c = probe.fit_linear_probe(x, yc, kind="categorical", num_classes=3, **fit)
  np.testing.assert_allclose(bal_c.predict(x[:1])[0], [1 / 3] * 3, atol=0.01)
  np.testing.assert_array_equal(bal_c.train_class_counts, [60, 30, 10])


def test_probe_is_deterministic_per_seed():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(600, 5))
  y = (x[:, 0] + rng.normal(size=600) > 0).astype(int)
  a = probe.fit_linear_probe(x, y, kind="binary", seed=4, steps=50)
  b = probe.fit_linear_probe(x, y, kind="binary", seed=4, steps=50)
  c = probe.fit_linear_probe(x, y, kind="binary", seed=5, steps=50)
  np.testing.assert_array_equal(a.weights, b.weights)
  assert not np.array_equal(a.weights, c.weights)  # 600 > 512: different minibatches


def test_probe_rejects_bad_input():
  x = np.zeros((4, 2))
  with pytest.raises(ValueError, match="two classes"):
    probe.fit_linear_probe(x, np.zeros(4, int), kind="binary")
  with pytest.raises(ValueError, match="num_classes"):
    probe.fit_linear_probe(x, np.arange(4), kind="categorical")
  with pytest.raises(ValueError, match="NaN"):
    probe.fit_linear_probe(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]), kind="binary")
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    probe.fit_linear_probe(x, np.array([0, 1, 2, 1]), kind="binary")
  with pytest.raises(ValueError, match="unknown probe kind"):
    probe.fit_linear_probe(x, np.array([0, 1, 0, 1]), kind="ordinal")


def test_majority_and_mean_predictors_give_chance_metrics():
  y_train = np.array([0] * 7 + [1] * 3)
  base = probe.fit_majority_baseline(y_train, kind="binary")
  y_test = np.array([0, 0, 0, 1])
  out = metrics.classification_metrics(y_test, base.predict(np.zeros((4, 9))), 2)
  # Constant score 0.3 -> always class 0: class-0 F1 = 2*3/(3+4) = 6/7, class-1 F1 = 0.
  assert out["auroc"] == pytest.approx(0.5)
  assert out["macro_f1"] == pytest.approx(3 / 7)
  assert out["balanced_accuracy"] == pytest.approx(0.5)
  assert out["map"] == pytest.approx(0.25)  # prevalence

  cat = probe.fit_majority_baseline(np.array([2, 2, 1, 0, 2]), kind="categorical", num_classes=3)
  scores = cat.predict(np.zeros((3, 1)))
  np.testing.assert_allclose(scores, [[0.2, 0.2, 0.6]] * 3)
  out = metrics.classification_metrics(np.array([0, 1, 2]), scores, 3)
  assert out["balanced_accuracy"] == pytest.approx(1 / 3)
  assert out["macro_f1"] == pytest.approx((0 + 0 + 2 * 1 / (1 + 3)) / 3)

  mean = probe.fit_majority_baseline(np.array([1.0, 2.0, 6.0]), kind="regression")
  reg = metrics.regression_metrics(np.array([0.0, 3.0, 5.0]), mean.predict(np.zeros((3, 2))))
  assert reg["mae"] == pytest.approx((3 + 0 + 2) / 3)
  assert reg["pearson_r"] is None  # a constant prediction has no correlation, reported as such


def test_few_shot_indices_are_disjoint_seeded_and_spread_over_subjects():
  subjects = np.repeat(np.arange(10), 6)
  labels = np.tile([0, 1, 2], 20)
  test_subjects = [0, 1, 2]
  idx = probe.few_shot_indices(labels, subjects, k=4, seed=0, exclude_subjects=test_subjects)
  assert len(idx) == 12
  np.testing.assert_array_equal(np.bincount(labels[idx]), [4, 4, 4])
  assert not set(subjects[idx]) & set(test_subjects)
  for c in range(3):
    assert len(np.unique(subjects[idx][labels[idx] == c])) == 4  # 4 different subjects per class
  np.testing.assert_array_equal(idx, probe.few_shot_indices(labels, subjects, 4, 0, test_subjects))
  assert not np.array_equal(idx, probe.few_shot_indices(labels, subjects, 4, 1, test_subjects))
  # More shots than subjects: subjects repeat only after everyone has given one.
  many = probe.few_shot_indices(labels, subjects, k=9, seed=0, exclude_subjects=test_subjects)
  counts = np.bincount(subjects[many][labels[many] == 0], minlength=10)[3:]
  assert counts.min() >= 1 and counts.max() == 2
  with pytest.raises(ValueError, match="fewer than k"):
    probe.few_shot_indices(labels, subjects, k=15, seed=0, exclude_subjects=test_subjects)


def test_aggregate_by_subject():
  values = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [0.0, 0.0], [2.0, 2.0]])
  subjects = np.array(["b", "b", "a", "c", "c"])
  names, means = probe.aggregate_by_subject(values, subjects)
  np.testing.assert_array_equal(names, ["a", "b", "c"])
  np.testing.assert_allclose(means, [[10.0, 0.0], [2.0, 3.0], [1.0, 1.0]])
  names, labels = probe.subject_labels(np.array([1, 1, 0, 0, 0]), subjects)
  np.testing.assert_array_equal(labels, [0, 1, 0])
  with pytest.raises(ValueError, match="more than one label"):
    probe.subject_labels(np.array([1, 0, 0, 0, 0]), subjects)
