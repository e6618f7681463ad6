"""The analytic FLOP count agrees with XLA's own count of the compiled step."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lsm2.model import aim, config as config_lib, flops, loss, mae


def test_step_flops_match_xla_cost_analysis():
  cfg = config_lib.get_model_config("tiny", patch_time=60, patch_channels=2)
  mask_cfg = config_lib.MaskConfig(time_bars=10, n_drop=130)
  observed = jnp.asarray(np.random.default_rng(0).random((2, 1440, 26)) > 0.3)
  masks = aim.aim_masks(observed, jax.random.PRNGKey(0), mask_cfg, cfg)
  graphdef, params = nnx.split(mae.LSM2MAE(cfg, rngs=nnx.Rngs(0)))

  def loss_fn(p, signals):
    pred = nnx.merge(graphdef, p)(signals, observed, masks)
    return loss.reconstruction_loss(pred, signals, masks, mask_cfg.strategy_names)[0]

  compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params, jnp.zeros((2, 1440, 26))).compile()
  analysis = compiled.cost_analysis()
  xla_flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
  predicted = flops.step_flops(cfg, n_keep=cfg.num_tokens - 130, batch=2)
  # Norms, softmax, gathers and the optimizer-free loss are the small remainder.
  assert 0.85 < predicted / xla_flops < 1.1, (predicted, xla_flops)
