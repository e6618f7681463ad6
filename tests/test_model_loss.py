"""Masked reconstruction loss: normalization, empty batches, per-strategy auxiliaries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm2.model.aim import AimMasks
from lsm2.model.config import STRATEGIES
from lsm2.model.loss import reconstruction_loss

B, T, C, N = 3, 4, 2, 4
NAMES = ("random", "time_bars", "signal_imputation")


def masks_with(loss_weight, strategies):
  zeros = jnp.zeros((B, N), bool)
  return AimMasks(
      inherited=zeros, artificial=zeros, total=zeros, dropped=zeros,
      strategy=jnp.asarray([STRATEGIES.index(s) for s in strategies], jnp.int32),
      keep_idx=jnp.zeros((B, 1), jnp.int32), keep_visible=jnp.zeros((B, 1), bool),
      visible_len=jnp.zeros((B,), jnp.int32), loss_weight=jnp.asarray(loss_weight, jnp.float32))


def test_mse_over_selected_minutes_and_per_strategy():
  rng = np.random.default_rng(0)
  pred, signals = rng.normal(size=(2, B, T, C)).astype(np.float32)
  weight = (rng.random((B, T, C)) < 0.5).astype(np.float32)
  weight[2] = 0.0  # a strategy example without any selected minute
  loss, aux = reconstruction_loss(jnp.asarray(pred), jnp.asarray(signals),
                                  masks_with(weight, ("random", "time_bars", "time_bars")), NAMES)
  sq = (pred - signals) ** 2
  np.testing.assert_allclose(loss, (sq * weight).sum() / weight.sum(), rtol=1e-6)
  np.testing.assert_allclose(aux["loss/random"], (sq * weight)[0].sum() / weight[0].sum(), rtol=1e-6)
  np.testing.assert_allclose(aux["loss/time_bars"], (sq * weight)[1].sum() / weight[1].sum(), rtol=1e-6)
  assert aux["loss/signal_imputation"] == 0.0 and aux["examples/signal_imputation"] == 0
  assert aux["examples/time_bars"] == 2 and aux["minutes/time_bars"] == weight[1].sum()
  assert aux["minutes/total"] == weight.sum()


def test_no_selected_minutes_gives_zero_not_nan():
  pred = jnp.ones((B, T, C))
  grad = jax.grad(lambda p: reconstruction_loss(
      p, jnp.zeros((B, T, C)), masks_with(np.zeros((B, T, C)), ("random",) * B), NAMES)[0])(pred)
  loss, aux = reconstruction_loss(pred, jnp.zeros((B, T, C)),
                                  masks_with(np.zeros((B, T, C)), ("random",) * B), NAMES)
  assert loss == 0.0 and all(np.isfinite(v) for v in aux.values())
  assert (np.asarray(grad) == 0).all()


def test_non_finite_fill_never_reaches_loss_or_gradient():
  weight = np.zeros((B, T, C), np.float32)
  weight[:, 0] = 1.0
  signals = np.zeros((B, T, C), np.float32)
  signals[:, 1:] = np.nan  # unselected minutes: whatever the pipeline filled
  masks = masks_with(weight, ("random",) * B)
  fn = lambda p, s: reconstruction_loss(p, s, masks, NAMES)[0]
  pred = jnp.full((B, T, C), 2.0)
  loss = fn(pred, jnp.asarray(signals))
  g_pred, g_signals = jax.grad(fn, argnums=(0, 1))(pred, jnp.asarray(signals))
  assert loss == pytest.approx(4.0)
  assert np.isfinite(g_pred).all() and np.isfinite(g_signals).all()
  assert (np.asarray(g_signals)[:, 1:] == 0).all() and (np.asarray(g_pred)[:, 1:] == 0).all()


def test_bad_inputs():
  masks = masks_with(np.ones((B, T, C)), ("random",) * B)
  with pytest.raises(ValueError, match="same shape"):
    reconstruction_loss(jnp.ones((B, T, C + 1)), jnp.ones((B, T, C + 1)), masks, NAMES)
  with pytest.raises(ValueError, match="unknown strategy"):
    reconstruction_loss(jnp.ones((B, T, C)), jnp.ones((B, T, C)), masks, ("bars",))
