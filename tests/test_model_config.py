"""Model and mask configs: named sizes, parameter counts, validation errors, schemes."""
import dataclasses

import jax
import pytest
from flax import nnx

from lsm2.model.config import MaskConfig, ModelConfig, effective_mask_config, get_model_config
from lsm2.model.mae import LSM2MAE


def param_count(cfg: ModelConfig) -> int:
  abstract = nnx.eval_shape(lambda: LSM2MAE(cfg, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("size, millions", [("S", 25), ("B", 110)])
def test_named_sizes_have_the_paper_parameter_counts(size, millions):
  assert param_count(get_model_config(size)) == pytest.approx(millions * 1e6, rel=0.05)


def test_paper_defaults():
  cfg = get_model_config("S")
  assert cfg == ModelConfig()
  assert cfg.grid == (144, 26) and cfg.num_tokens == 3744 and cfg.patch_size == 10
  mask = MaskConfig()
  assert mask.random_count(cfg) == 2995
  assert cfg.num_tokens - mask.n_drop == 2262
  assert get_model_config("tiny", patch_time=20, patch_channels=2).grid == (72, 13)


@pytest.mark.parametrize("change, match", [
    (dict(patch_time=7), "patch_time=7"),
    (dict(patch_channels=4), "patch_channels=4"),
    (dict(enc_heads=5), "enc_heads=5"),
    (dict(dec_width=250, dec_heads=2), "dec_width=250"),
    (dict(dtype="float16"), "dtype"),
    (dict(attention="flash"), "attention"),
    (dict(remat="some"), "remat"),
    (dict(enc_depth=0), "enc_depth"),
])
def test_model_config_errors_name_the_field(change, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(ModelConfig(), **change).validate()


def test_cudnn_attention_needs_bfloat16_at_validation():
  """JAX's cuDNN attention rejects float32 inputs: caught when the config is built."""
  with pytest.raises(ValueError, match=r"attention='cudnn' needs dtype='bfloat16'.*float32"):
    get_model_config("S", attention="cudnn", dtype="float32")
  assert get_model_config("S", attention="cudnn", dtype="bfloat16").attention == "cudnn"
  assert get_model_config("S", attention="splash").attention == "splash"


def test_get_model_config_rejects_unknowns():
  with pytest.raises(ValueError, match="unknown model size"):
    get_model_config("XL")
  with pytest.raises(ValueError, match="enc_widht"):
    get_model_config("S", enc_widht=3)


def test_schemes_map_to_effective_settings():
  cfg = ModelConfig()
  assert effective_mask_config(MaskConfig(), cfg) == MaskConfig()
  lsm1 = effective_mask_config(MaskConfig(scheme="lsm1"), cfg)
  assert lsm1.n_drop == 2995 and lsm1.strategy_names == ("random",) and not lsm1.uses_inherited_mask
  assert effective_mask_config(MaskConfig(scheme="dropout_only"), cfg).n_drop == 2995
  assert effective_mask_config(MaskConfig(scheme="attention_only"), cfg).n_drop == 0
