"""The precision policy: what "auto" dtype and attention resolve to on each platform.

TPU and GPU compute in bfloat16 with float32 parameters, optimizer state and
loss; CPU computes in float32. cuDNN attention is only chosen, or accepted, with
bfloat16, and always receives bfloat16 q/k/v (traced for the GPU on this CPU).
"""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import pytest

from lsm2 import config_files
from lsm2 import errors
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


# Every (dtype, matmul_dtype, attention) a GPU run may name.
GPU_COMBOS = [(d, m, a) for d in ("auto", "float32", "bfloat16") for m in ("float32", "bfloat16")
              for a in ("auto", "xla", "blocked", "cudnn", "splash")]


def tiny_config(**model):
  config = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny,runlocal")
  with config.unlocked():
    config.batch_size = 2
    config.model.update(model)
  return config


def test_every_gpu_combination_resolves_to_a_kernel_or_is_refused_naming_the_fix():
  """cudnn needs bfloat16 compute ("auto" is bfloat16 on a GPU): with float32 validation
  refuses it, naming both fixes. "auto" picks cudnn exactly when computing in bfloat16;
  named kernels stay as named (splash is refused when the step is traced, below). An
  explicit bfloat16 + cudnn is the same model as the defaults, whatever matmul_dtype."""
  for dtype, matmul_dtype, attention in GPU_COMBOS:
    config = tiny_config(dtype=dtype, matmul_dtype=matmul_dtype, attention=attention)
    compute = train.resolve_dtype(dtype, "gpu")
    if attention == "cudnn" and compute == "float32":
      with pytest.raises(errors.ConfigError, match=r"attention='cudnn' needs dtype='bfloat16'.*"
                         r"config.model.dtype to 'bfloat16' \(or 'auto'\), or "
                         r"config.model.attention to 'xla'"):
        train.model_and_mask_configs(config, 26, platform="gpu")
      continue
    model_cfg, _ = train.model_and_mask_configs(config, 26, platform="gpu")
    expected = ("cudnn" if compute == "bfloat16" else "xla") if attention == "auto" else attention
    assert (model_cfg.dtype, model_cfg.matmul_dtype, model_cfg.attention) == (
        compute, matmul_dtype, expected)
    if compute == "bfloat16" and attention == "cudnn":
      assert model_cfg == train.model_and_mask_configs(
          tiny_config(matmul_dtype=matmul_dtype), 26, platform="gpu")[0]


def test_on_gpu_auto_picks_xla_for_head_dimensions_cudnn_refuses():
  """XXS's decoder heads are 48 / 4 = 12 wide, which cuDNN's flash attention refuses (it
  takes multiples of 8 up to 128): "auto" picks XLA's attention for it on a GPU, and an
  explicit "cudnn" is refused at validation, naming the head dimensions and the fix."""
  def resolved(size, attention="auto"):
    config = tiny_config(attention=attention)
    with config.unlocked():
      config.model.size = size
    return train.model_and_mask_configs(config, 26, platform="gpu")[0]

  assert resolved("XXS").head_dims == (16, 12) and resolved("XXS").attention == "xla"
  assert resolved("XS").head_dims == (24, 16) and resolved("XS").attention == "cudnn"
  with pytest.raises(errors.ConfigError, match=r"attention='cudnn' needs head dimensions .* "
                     r"multiples of 8 and at most 128; .* 64/4 and 48/4 .* = \(16, 12\): set "
                     r"config.model.attention to 'xla'"):
    resolved("XXS", "cudnn")
  # A head 256 wide (on Hopper cuDNN takes it, not on every GPU): "auto" stays with XLA.
  config = tiny_config()
  with config.unlocked():
    config.model.size, config.model.enc_width, config.model.enc_heads = "tiny", 512, 2
  assert train.model_and_mask_configs(config, 26, platform="gpu")[0].attention == "xla"


@pytest.fixture
def cudnn_calls(monkeypatch):
  """Traces for the GPU on this CPU: the program's platform reads "gpu", and cuDNN's fused
  attention, which jax.nn.dot_product_attention calls for implementation="cudnn", is
  replaced by JAX's own checks of its inputs (those that raised "Q must be fp16/bf16/fp8";
  the head-dimension rule) and a zero result of the right shape. Records the (q, k, v,
  output) dtypes of each call."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  from jax._src.nn import functions as nn_functions  # pylint: disable=g-import-not-at-top
  from lsm2.model import attention  # pylint: disable=g-import-not-at-top
  calls = []

  def kernel(query, key, value, bias, mask, q_seqlen, kv_seqlen, **kwargs):
    del mask, kwargs
    layout = cudnn.AttentionLayout.BTNH
    cudnn.check_layout(query, key, value, bias, q_seqlen, kv_seqlen, None, None, None, None,
                       layout)
    cudnn.check_is_flash_attention(query, key, value, layout.value, cudnn_version=90000,
                                   has_bias=False, is_training=True)
    out = jnp.zeros_like(query) + 0 * query  # Differentiable, so the backward traces too.
    calls.append((query.dtype, key.dtype, value.dtype, out.dtype))
    return out

  monkeypatch.setattr(nn_functions, "cudnn_dot_product_attention", kernel)
  monkeypatch.setattr(attention, "_platform", lambda: "gpu")
  return calls


def _trace_gpu_train_step(config):
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26, platform="gpu")
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  setup = train.make_setup(config, model_cfg, mask_cfg, mesh)
  state = train.abstract_state(setup)
  shape = (2, model_cfg.time_steps, model_cfg.num_channels)
  batch = {"signals": jax.ShapeDtypeStruct(shape, jnp.float32),
           "observed": jax.ShapeDtypeStruct(shape, jnp.bool_)}
  masks = jax.eval_shape(train.make_mask_fn(setup), state["rng"], state["step"], batch["observed"])
  with sharding.mesh_context(mesh, config.logical_axis_rules):
    _, outputs = jax.eval_shape(train.make_train_step(setup, mask_cfg.strategy_names),
                                state, batch, masks)
  return model_cfg, outputs


@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_on_gpu_cudnn_always_gets_bfloat16(cudnn_calls, matmul_dtype):
  """Issue #30: the README's matmul_dtype=bfloat16 made the dense layers hand float32 q/k/v
  to cuDNN, which JAX refused at trace time on a GPU. The whole train step now traces for
  the GPU with both matmul dtypes, and every cuDNN call (one per block, encoder and
  decoder) takes bfloat16 q/k/v. These are the only accepted combinations that reach cuDNN
  (the test above); xla and blocked have no platform-specific path."""
  model_cfg, outputs = _trace_gpu_train_step(tiny_config(matmul_dtype=matmul_dtype))
  assert (model_cfg.dtype, model_cfg.attention) == ("bfloat16", "cudnn")
  assert outputs["loss"].dtype == jnp.float32
  assert len(cudnn_calls) >= model_cfg.enc_depth + model_cfg.dec_depth
  assert set(cudnn_calls) == {(jnp.dtype(jnp.bfloat16),) * 4}


def test_on_gpu_splash_is_refused_naming_the_gpu_kernels(cudnn_calls):
  with pytest.raises(errors.ConfigError, match="'splash' is a TPU kernel.*on a GPU use 'cudnn' "
                     "or 'xla'"):
    _trace_gpu_train_step(tiny_config(attention="splash"))
  assert not cudnn_calls
