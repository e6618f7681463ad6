"""Bootstrap intervals and paired verdicts: known answers."""
import itertools

import numpy as np
import pytest

from lsm2.eval import intervals


def test_constant_values_give_a_point_interval():
  got = intervals.bootstrap_interval([0.3, 0.3, 0.3])
  assert (got.mean, got.low, got.high, got.n) == pytest.approx((0.3, 0.3, 0.3, 3))


def test_interval_matches_the_normal_approximation_for_many_values():
  x = np.random.default_rng(0).normal(2.0, 1.0, size=400)
  got = intervals.bootstrap_interval(x, resamples=4000)
  half = 1.96 * x.std() / np.sqrt(x.size)  # ~0.098
  assert got.mean == pytest.approx(x.mean())
  assert got.low == pytest.approx(x.mean() - half, abs=0.015)
  assert got.high == pytest.approx(x.mean() + half, abs=0.015)


def test_two_values_interval_is_their_range_of_resampled_means():
  # Resampled means of [0, 1] are 0, 0.5 or 1 with odds 1/4, 1/2, 1/4: the central 95%
  # holds 0 and 1.
  got = intervals.bootstrap_interval([0.0, 1.0])
  assert (got.low, got.high) == (0.0, 1.0)


def test_paired_verdicts():
  a = np.array([0.50, 0.52, 0.49])
  verdict, diff = intervals.paired_verdict(a, a + 0.1, lower_is_better=True, names=("aim", "lsm1"))
  assert verdict == "aim" and diff.mean == pytest.approx(-0.1) and diff.high < 0
  verdict, _ = intervals.paired_verdict(a, a + 0.1, lower_is_better=False, names=("aim", "lsm1"))
  assert verdict == "lsm1"
  # Differences of both signs: the interval covers 0.
  verdict, diff = intervals.paired_verdict(a, a + np.array([0.1, -0.1, 0.05]), lower_is_better=True)
  assert verdict == "tie" and diff.covers(0.0)


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="same length"):
    intervals.paired_verdict([1.0, 2.0], [1.0], lower_is_better=True)
  with pytest.raises(ValueError, match="non-finite"):
    intervals.bootstrap_interval([1.0, np.nan])
  with pytest.raises(ValueError, match="non-empty"):
    intervals.bootstrap_interval([])
  with pytest.raises(ValueError, match="confidence"):
    intervals.bootstrap_interval([1.0], confidence=1.5)


def test_interval_bounds_are_the_exact_bootstrap_quantiles_of_a_small_sample():
  # Four values: all 4**4 equally likely resamples enumerated. Their means' CDF passes
  # 2.5% at 0.5 (0.020 -> 0.043) and 97.5% at 7.75 (0.965 -> 0.980), far enough from the
  # steps that 10,000 resamples land on those atoms for any seed.
  v = np.array([0.0, 1.0, 3.0, 10.0])
  means = np.array([np.mean(c) for c in itertools.product(v, repeat=4)])
  exact_low, exact_high = np.quantile(means, [0.025, 0.975], method="inverted_cdf")
  assert (exact_low, exact_high) == (0.5, 7.75)
  for seed in range(3):
    got = intervals.bootstrap_interval(v, seed=seed)
    assert (got.mean, got.low, got.high, got.n) == (3.5, exact_low, exact_high, 4)


def test_interval_is_deterministic_in_its_seed():
  x = np.random.default_rng(3).normal(size=12)
  assert intervals.bootstrap_interval(x, seed=5) == intervals.bootstrap_interval(x, seed=5)
  assert intervals.bootstrap_interval(x, seed=5) != intervals.bootstrap_interval(x, seed=6)


def test_one_value_is_a_point_interval():
  assert intervals.bootstrap_interval([0.7]) == intervals.Interval(0.7, 0.7, 0.7, 1)
  verdict, diff = intervals.paired_verdict([0.4], [0.5], lower_is_better=True)
  assert verdict == "A" and diff.n == 1 and diff.low == diff.high == pytest.approx(-0.1)
