"""Imputation baselines: exact answers on known signals, loop references, and no leakage."""
import numpy as np
import pytest

from lsm2.eval import baselines

T = 40


def _random_case(seed=0, n=5, c=3):
  rng = np.random.default_rng(seed)
  values = rng.normal(size=(n, T, c)).astype(np.float32)
  observed = rng.random((n, T, c)) < 0.7
  target = rng.random((n, T, c)) < 0.3
  observed[0, :, 0] = False  # a channel with nothing visible at all
  return values, observed, target


def test_linear_interpolation_is_exact_on_a_ramp():
  t = np.arange(T, dtype=np.float32)
  values = np.stack([2.0 * t - 5.0, -0.5 * t], axis=-1)[None]
  observed = np.ones_like(values, bool)
  target = np.zeros_like(observed)
  target[0, 5:17, :] = True
  target[0, 25:31, 1] = True
  out = baselines.linear_interpolation_impute(values, observed, target)
  np.testing.assert_allclose(out, values, atol=1e-5)


def test_linear_interpolation_is_constant_beyond_the_ends():
  values = np.zeros((1, T, 1), np.float32)
  values[0, 10, 0], values[0, 20, 0] = 1.0, 3.0
  observed = np.zeros_like(values, bool)
  observed[0, [10, 20], 0] = True
  out = baselines.linear_interpolation_impute(values, observed, np.zeros_like(observed))
  np.testing.assert_allclose(out[0, :11, 0], 1.0)
  np.testing.assert_allclose(out[0, 20:, 0], 3.0)
  np.testing.assert_allclose(out[0, 15, 0], 2.0)


def test_locf_is_exact_on_a_step_signal():
  values = np.where(np.arange(T) < 20, 1.0, 4.0).astype(np.float32)[None, :, None]
  observed = np.ones_like(values, bool)
  target = np.zeros_like(observed)
  target[0, 21:35, 0] = True  # after the step: LOCF carries 4.0, which is right
  target[0, 3:19, 0] = True
  target[0, 0:2, 0] = True  # start: backfilled from minute 2
  out = baselines.locf_impute(values, observed, target)
  np.testing.assert_array_equal(out, values)


def test_channel_mean_of_constant_and_zero_fallback():
  values = np.full((2, T, 2), 3.5, np.float32)
  observed = np.ones_like(values, bool)
  observed[1, :, 1] = False
  target = np.zeros_like(observed)
  target[:, ::2] = True
  out = baselines.channel_mean_impute(values, observed, target)
  np.testing.assert_allclose(out[0], 3.5)
  np.testing.assert_allclose(out[1, :, 0], 3.5)
  np.testing.assert_allclose(out[1, :, 1], 0.0)  # nothing visible: global (normalised) mean


def _loop_reference(name, values, visible):
  """Straightforward per-series reference implementations."""
  out = np.zeros(values.shape, np.float64)
  t = np.arange(values.shape[1])
  for i in range(values.shape[0]):
    for c in range(values.shape[2]):
      idx = np.flatnonzero(visible[i, :, c])
      if not len(idx):
        continue
      v = values[i, idx, c].astype(np.float64)
      if name == "channel_mean":
        out[i, :, c] = v.mean()
      elif name == "linear_interpolation":
        out[i, :, c] = np.interp(t, idx, v)
      else:
        pos = np.searchsorted(idx, t, side="right") - 1
        out[i, :, c] = v[np.maximum(pos, 0)]
  return out


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_baselines_match_loop_reference(name):
  values, observed, target = _random_case()
  out = baselines.impute(name, values, observed, target)
  assert out.shape == values.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, _loop_reference(name, values, observed & ~target), atol=1e-5)


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_hidden_minutes_never_leak(name):
  values, observed, target = _random_case(seed=1)
  out = baselines.impute(name, values, observed, target)
  hidden = ~(observed & ~target)
  changed = np.where(hidden, np.random.default_rng(7).normal(size=values.shape) * 100, values)
  nan_at = hidden & (np.random.default_rng(8).random(values.shape) < 0.3)
  changed = np.where(nan_at, np.nan, changed)
  np.testing.assert_array_equal(baselines.impute(name, changed, observed, target), out)
  # Target minutes really are hidden: revealing them changes the answer.
  assert not np.array_equal(baselines.impute(name, values, observed, np.zeros_like(target)), out)


def test_bad_inputs_raise():
  values, observed, target = _random_case()
  with pytest.raises(ValueError, match="unknown imputation baseline"):
    baselines.impute("spline", values, observed, target)
  with pytest.raises(ValueError, match="boolean"):
    baselines.locf_impute(values, observed.astype(np.float32), target)
  with pytest.raises(ValueError, match="must match"):
    baselines.locf_impute(values, observed[:, :-1], target)
  nan_visible = values.copy()
  nan_visible[observed & ~target] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    baselines.linear_interpolation_impute(nan_visible, observed, target)
