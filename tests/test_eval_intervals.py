"""Bootstrap intervals and paired verdicts: known answers."""
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
