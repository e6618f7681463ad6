"""The precision policy: what "auto" dtype and attention resolve to on each platform.

TPU and GPU compute in bfloat16 with float32 parameters, optimizer state and
loss; CPU computes in float32. cuDNN attention is only chosen, or accepted, with
bfloat16.
"""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import pytest

from lsm2 import config_files
from lsm2 import sharding
from lsm2.model.config import for_platform, get_model_config
from lsm2.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def s_config(**model):
  config = config_files.load_config(REPO / "configs" / "pretrain.py", "S")
  with config.unlocked():
    for key, value in model.items():
      config.model[key] = value
  return config


@pytest.mark.parametrize("platform, dtype, attention", [
    ("cpu", "float32", "blocked"),
    ("gpu", "bfloat16", "cudnn"),
    ("tpu", "bfloat16", "splash"),
])
def test_auto_resolves_per_platform(platform, dtype, attention):
  model_cfg, _ = train.model_and_mask_configs(s_config(), num_channels=26, platform=platform)
  assert (model_cfg.dtype, model_cfg.attention) == (dtype, attention)
  assert model_cfg.param_dtype == "float32"


def test_the_default_config_follows_this_backend():
  model_cfg, _ = train.model_and_mask_configs(s_config(), num_channels=26)
  assert jax.default_backend() == "cpu"  # tests/conftest.py
  assert (model_cfg.dtype, model_cfg.attention) == ("float32", "blocked")


def test_gpu_in_float32_does_not_pick_cudnn_and_explicit_cudnn_fails_early():
  model_cfg, _ = train.model_and_mask_configs(s_config(dtype="float32"), 26, platform="gpu")
  assert model_cfg.attention == "xla"
  with pytest.raises(ValueError, match=r"attention='cudnn' needs dtype='bfloat16'"):
    train.model_and_mask_configs(s_config(dtype="float32", attention="cudnn"), 26, platform="gpu")


def test_bfloat16_compute_keeps_parameters_optimizer_state_and_loss_in_float32():
  """The state training creates and the loss it returns, traced (nothing is computed)."""
  config = s_config()
  with config.unlocked():
    config.batch_size = 2
    config.model.size = "tiny"
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26, platform="tpu")
  model_cfg = dataclasses.replace(model_cfg, attention="xla")  # Traced here on the CPU.
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  setup = train.make_setup(config, model_cfg, mask_cfg, mesh)
  state = train.abstract_state(setup)
  float_leaves = [x.dtype for x in jax.tree.leaves((state["params"], state["opt_state"]))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
  assert model_cfg.dtype == "bfloat16" and set(float_leaves) == {jnp.dtype("float32")}
  shape = (2, model_cfg.time_steps, model_cfg.num_channels)
  batch = {"signals": jax.ShapeDtypeStruct(shape, jnp.float32),
           "observed": jax.ShapeDtypeStruct(shape, jnp.bool_)}
  masks = jax.eval_shape(train.make_mask_fn(setup), state["rng"], state["step"], batch["observed"])
  new_state, outputs = jax.eval_shape(train.make_train_step(setup, mask_cfg.strategy_names),
                                      state, batch, masks)
  assert outputs["loss"].dtype == jnp.float32
  assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)


def test_a_model_trained_with_a_platform_only_kernel_loads_anywhere():
  """lsm2.load / evaluation re-pick splash (TPU) and cudnn (GPU) for the platform that loads;
  the portable kernels and everything else stay as trained."""
  tpu = get_model_config("S", attention="splash", dtype="bfloat16")
  assert for_platform(tpu, "tpu") == tpu
  assert for_platform(tpu, "cpu") == dataclasses.replace(tpu, attention="blocked")
  assert for_platform(tpu, "gpu").attention == "cudnn"
  gpu = get_model_config("S", attention="cudnn", dtype="bfloat16")
  assert for_platform(gpu, "tpu").attention == "splash"
  for portable in ("xla", "blocked"):
    cfg = get_model_config("S", attention=portable)
    assert for_platform(cfg, "tpu") == cfg == for_platform(cfg, "gpu")
