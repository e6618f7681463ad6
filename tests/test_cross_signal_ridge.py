"""benchmarks/cross_signal_ridge.py: window means and the ridge ceiling on known answers."""
import importlib.util
import pathlib

import numpy as np

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cross_signal_ridge.py"
_SPEC = importlib.util.spec_from_file_location("cross_signal_ridge", _PATH)
ridge = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ridge)


def test_window_mean_uses_observed_minutes_only_and_is_centred():
  values = np.array([[1.0, 0.0, 3.0, 5.0, 7.0]])
  weights = np.array([[1.0, 0.0, 1.0, 1.0, 1.0]])  # Minute 1 is missing (its 0 is a fill).
  mean, seen = ridge._window_mean(values, weights, 3)
  np.testing.assert_allclose(mean, [[1.0, 2.0, 4.0, 5.0, 6.0]])
  np.testing.assert_array_equal(seen, [[1, 1, 1, 1, 1]])
  _, none_seen = ridge._window_mean(np.zeros((1, 5)), np.zeros((1, 5)), 3)
  assert not none_seen.any()


def test_features_never_see_the_hidden_signals():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 1440, 6)).astype(np.float32)
  observed = rng.random(z.shape) < 0.8
  x = ridge.features(ridge.channel_features(z, observed), (0, 1))
  assert x.shape == (2 * 1440, 4 * (2 + 2 * len(ridge.WINDOWS)) + 5)
  z2, observed2 = z.copy(), observed.copy()
  z2[:, :, :2] = 100.0
  observed2[:, :, :2] = ~observed2[:, :, :2]
  np.testing.assert_array_equal(ridge.features(ridge.channel_features(z2, observed2), (0, 1)), x)


def _days(rng, n, noise):
  z = rng.normal(size=(n, 1440, 6)).astype(np.float32)
  z[:, :, 0] = 2 * z[:, :, 2] - z[:, :, 3]  # Exactly explained by two visible signals.
  z[:, :, 1] = noise * rng.normal(size=(n, 1440))  # Explained by nothing.
  observed = np.ones(z.shape, bool)
  return {"signals": z, "observed": observed, "per_channel": ridge.channel_features(z, observed)}


def test_ridge_recovers_an_exact_relation_and_not_noise():
  rng = np.random.default_rng(1)
  scores = {c: err / base for c, err, base, _ in
            ridge.score_pair(_days(rng, 4, 1.0), _days(rng, 2, 1.0), (0, 1), l2=1e-3)}
  assert scores[0] < 1e-4
  assert 0.98 < scores[1] < 1.05
