"""Hand-crafted feature baselines: known answers on constructed series."""
import numpy as np
import pytest

from lsm2.eval import features


def test_interdaily_stability_of_an_exactly_repeating_rhythm_is_one():
  day = np.sin(np.arange(24) / 24 * 2 * np.pi)
  assert features.interdaily_stability(np.tile(day, (5, 1))) == pytest.approx(1.0)


def test_interdaily_stability_of_a_shifted_day_has_the_known_value():
  # Day 2 is day 1 plus a constant c: the profile keeps the rhythm's variance v and loses
  # the between-day variance c^2 / 4, so IS = v / (v + c^2 / 4).
  day = np.array([1.0, -1.0] * 12)  # variance 1
  c = 2.0
  assert features.interdaily_stability(np.stack([day, day + c])) == pytest.approx(1 / (1 + c**2 / 4))


def test_interdaily_stability_ignores_missing_hours():
  day = np.cos(np.arange(24) / 24 * 2 * np.pi)
  days = np.tile(day, (3, 1))
  days[1, 5:9] = np.nan
  assert features.interdaily_stability(days) == pytest.approx(1.0)


def test_intradaily_variability_known_values():
  sine = np.sin(np.arange(24) / 24 * 2 * np.pi)
  got = features.intradaily_variability(sine)
  # Mean squared successive difference over the variance; for a smooth 24-hour sine about
  # 2 (1 - cos(2 pi / 24)) = 0.068.
  assert got == pytest.approx(np.mean(np.diff(sine) ** 2) / np.var(sine))
  assert got == pytest.approx(2 * (1 - np.cos(2 * np.pi / 24)), rel=0.05)
  alternating = np.array([1.0, -1.0] * 12)
  assert features.intradaily_variability(alternating) == pytest.approx(4.0)
  noise = np.random.default_rng(0).normal(size=20000)
  assert features.intradaily_variability(noise) == pytest.approx(2.0, abs=0.05)


def test_intradaily_variability_skips_pairs_across_missing_hours():
  x = np.array([0.0, 1.0, np.nan, 5.0, 6.0])
  # Pairs (0,1) and (5,6): mean squared difference 1; variance of [0,1,5,6] is 6.5.
  assert features.intradaily_variability(x) == pytest.approx(1.0 / 6.5)
  assert np.isnan(features.intradaily_variability(np.array([1.0, np.nan, 2.0])))


def test_hourly_means_over_observed_minutes():
  x = np.arange(120, dtype=float)[None]
  obs = np.ones_like(x, bool)
  obs[0, 60:] = False
  got = features.hourly_means(x, obs)
  assert got[0, 0] == pytest.approx(29.5) and np.isnan(got[0, 1])
  with pytest.raises(ValueError, match="whole hours"):
    features.hourly_means(np.zeros((1, 90)), np.ones((1, 90), bool))


def test_day_features_known_answers():
  t = 1440
  names = ("hr", "steps")
  mean, std = np.array([60.0, 10.0]), np.array([10.0, 20.0])
  raw = np.zeros((2, t, 2))
  raw[:, :, 0] = 70.0  # hr: z = 1 everywhere
  raw[0, :360, 1] = 0.0  # steps: nothing at night, 30 / min by day
  raw[0, 360:, 1] = 30.0
  raw[1, :, 1] = 10.0
  observed = np.ones_like(raw, bool)
  observed[1, :720, 0] = False  # day 1 misses half of its hr
  z = np.where(observed, (raw - mean) / std, 0.0)
  x, fnames = features.day_features(z, observed, np.array([7, 8]), names, mean, std)
  col = {n: x[:, i] for i, n in enumerate(fnames)}
  np.testing.assert_allclose(col["mean/hr"], [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(col["std/hr"], [0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(col["missing_fraction/hr"], [0.0, 0.5])
  np.testing.assert_allclose(col["zero_fraction/steps"], [0.25, 0.0])
  np.testing.assert_allclose(col["night_day_ratio/steps"], [0.0, 1.0], atol=1e-6)
  # Day 0's steps z: -0.5 at night, 1.0 by day; mean 0.625, night minus day -1.5.
  np.testing.assert_allclose(col["mean/steps"][0], 0.625, rtol=1e-6)
  np.testing.assert_allclose(col["night_minus_day/steps"][0], -1.5, rtol=1e-6)
  assert np.all(np.isfinite(x))  # Day 1's constant steps: IV undefined, filled by day 0's.
