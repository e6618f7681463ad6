"""The README demo's and the CPU recipe's configs learn: validation MSE falls well below its
start in a few steps.

A fast guard on optimisation itself (initialisation, learning rate, warm-up, loss): the
end-to-end runs that show the model beating the classical baselines take minutes to half
an hour, this takes seconds (demo) to two minutes (XS). Fixed seeds, one CPU device, each
config's model, grid, masking and optimizer, its schedule compressed to a few hundred steps.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from lsm2.data import synthesize

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_RATIO = 0.9  # Validation MSE after `steps` steps / at step 0.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("learning") / "synth"
  synthesize.write_synthetic_dataset(out, subjects=16, days=2, seed=0,
                                     split_fractions=(0.75, 0.25, 0.0))
  return out


def learn(data_dir, config_file: str, arg: str | None, steps: int) -> dict[str, float]:
  """Trains `steps` steps of the config's recipe; validation MSE before and after."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from lsm2 import config_files  # pylint: disable=g-import-not-at-top
  from lsm2.data import dataset  # pylint: disable=g-import-not-at-top
  from lsm2.model import aim, mae  # pylint: disable=g-import-not-at-top
  from lsm2.model import loss as loss_lib  # pylint: disable=g-import-not-at-top
  from lsm2.train import train  # pylint: disable=g-import-not-at-top

  train_days = dataset.read_split(data_dir, "train", normalize=True)
  val_days = dataset.read_split(data_dir, "validation", normalize=True)
  config = config_files.load_config(REPO / "configs" / config_file, arg)
  with config.unlocked():
    config.total_steps = steps  # The schedule (warm-up, cosine decay), compressed.
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26, platform="cpu")
  tx, _ = train.make_optimizer(config)
  graphdef, params = nnx.split(mae.LSM2MAE(model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)
  names = mask_cfg.strategy_names

  def loss_fn(p, z, observed, masks):
    pred = nnx.merge(graphdef, p)(z, observed, masks, loss_tokens_only=True)
    return loss_lib.reconstruction_loss(pred, z, masks, names)[0]

  @jax.jit
  def step(p, opt, z, observed, key):
    masks = aim.aim_masks(observed, key, mask_cfg, model_cfg)
    grads = jax.grad(loss_fn)(p, z, observed, masks)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt

  z_val, obs_val = val_days["signals"][:8], val_days["observed"][:8]
  val_masks = aim.aim_masks(obs_val, jax.random.key(123), mask_cfg, model_cfg)
  val_loss = jax.jit(lambda p: loss_fn(p, z_val, obs_val, val_masks))
  start = float(val_loss(params))
  mean_predictor = float(loss_lib.reconstruction_loss(
      np.zeros_like(z_val), z_val, val_masks, names)[0])
  opt = tx.init(params)
  rng = np.random.default_rng(0)
  n_train = train_days["signals"].shape[0]
  for i in range(steps):
    idx = rng.choice(n_train, config.batch_size, replace=False)
    params, opt = step(params, opt, train_days["signals"][idx], train_days["observed"][idx],
                       jax.random.key(i))
  return {"start": start, "end": float(val_loss(params)), "mean_predictor": mean_predictor}


@pytest.mark.parametrize("config_file,arg,steps", [
    ("demo.py", None, 200),  # Measured: 0.82 after 200.
    pytest.param("pretrain.py", "XS,aim,cpu", 400, marks=pytest.mark.slow),  # 0.91 after 200.
])
def test_recipe_learns_in_a_few_steps(data_dir, config_file, arg, steps):
  # In a child process: these are compute-bound, and the test process runs XLA's CPU
  # backend unoptimised (tests/conftest.py); the child gets the default flags, one device.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run(
      [sys.executable, __file__, str(data_dir), config_file, arg or "", str(steps)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"validation MSE: step 0 {r['start']:.3f}, step {steps} {r['end']:.3f}, "
        f"mean predictor {r['mean_predictor']:.3f}")
  assert r["start"] < 1.1 * r["mean_predictor"]  # No noisy head to unlearn first.
  assert r["end"] < MAX_RATIO * r["start"]


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print(json.dumps(learn(pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3] or None,
                         int(sys.argv[4]))))
