"""A tiny LSM-2 MAE overfits one synthetic batch of smooth sine waves."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lsm2.model.aim import aim_masks
from lsm2.model.config import MaskConfig, get_model_config
from lsm2.model.loss import reconstruction_loss
from lsm2.model.mae import LSM2MAE


def test_tiny_model_overfits_one_batch():
  cfg = get_model_config("tiny", time_steps=120, num_channels=4)
  mask_cfg = MaskConfig(time_bars=5, n_drop=20)
  rng = np.random.default_rng(0)
  minutes = np.arange(cfg.time_steps)[None, :, None]
  freq, phase = rng.uniform(1, 3, (8, 1, 4)), rng.uniform(0, 2 * np.pi, (8, 1, 4))
  signals = jnp.asarray(np.sin(2 * np.pi * freq * minutes / cfg.time_steps + phase), jnp.float32)
  observed = jnp.asarray(rng.random(signals.shape) > 0.2)
  masks = aim_masks(observed, jax.random.key(0), mask_cfg, cfg)
  model = LSM2MAE(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      pred = model(signals, observed, masks)
      return reconstruction_loss(pred, signals, masks, mask_cfg.strategy_names)[0]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(300)]
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
