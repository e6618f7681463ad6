"""configs/pretrain.py: its defaults are the dataclasses' own, every masking field and
strategy is reachable from the command line, and each strategy alone trains."""
import dataclasses
import math
import os
import pathlib
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest
from tensorboard.backend.event_processing import event_accumulator

from lsm2 import config_files
from lsm2 import errors
from lsm2.data import synthesize
from lsm2.model import config as model_config_lib
from lsm2.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain.py"
STRATEGIES = model_config_lib.STRATEGIES
# config.model / config.masking keys that are run-level choices, not dataclass fields.
MODEL_EXTRAS = {"size"}
AUTO = {"dtype", "attention"}  # "auto" in the config, resolved per platform by train.
MASKING_EXTRAS = {"weights", "encoder_buckets", "pack_encoder"}


def parse_config(arg: str, *overrides: str):
  """The config lsm2.main builds from --config=configs/pretrain.py:ARG and `overrides`."""
  argv = ["lsm2.main", f"--config={PRETRAIN}:{arg}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


# ---------------------------------------------------------------------------
# One source of truth: configs/pretrain.py's defaults are the dataclasses'.
# ---------------------------------------------------------------------------
def test_model_defaults_are_the_model_config_defaults():
  config = config_files.load_config(PRETRAIN, "S")
  defaults = model_config_lib.field_defaults(model_config_lib.ModelConfig)
  exposed = set(config.model.keys()) - MODEL_EXTRAS - set(model_config_lib.SIZE_FIELDS)
  assert exposed <= set(defaults), exposed - set(defaults)
  assert all(config.model[name] == 0 for name in model_config_lib.SIZE_FIELDS)  # The size's.
  assert exposed >= {"patch_time", "patch_channels", "dtype", "matmul_dtype", "attention", "remat",
                     "observed_in_embedding"}
  for name in exposed - AUTO:
    assert config.model[name] == defaults[name], name
  for name in AUTO:
    assert config.model[name] == "auto", name


def test_every_mask_config_field_is_in_config_masking_with_its_default():
  config = config_files.load_config(PRETRAIN, "S")
  defaults = model_config_lib.field_defaults(model_config_lib.MaskConfig)
  fields = set(defaults) - {"strategy_weights"}  # As config.masking.weights.
  assert set(config.masking.keys()) == fields | MASKING_EXTRAS
  for name in fields - {"n_drop"}:  # n_drop: -1, the paper's ratio on any grid.
    assert config.masking[name] == defaults[name], name
  assert config.masking.n_drop == -1
  assert list(config.masking.weights.keys()) == sorted(STRATEGIES)
  assert {k: v for k, v in config.masking.weights.items() if v} == dict(defaults["strategy_weights"])
  assert model_config_lib.field_defaults(model_config_lib.MaskConfig)["scheme"] == (
      config_files.load_module(PRETRAIN).parse_arg("")["scheme"])


def test_default_config_gives_the_default_dataclasses_on_the_paper_grid():
  """-1 resolves to the paper's n_drop; zero weights stay out of the mix."""
  config = config_files.load_config(PRETRAIN, "S")
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  assert mask_cfg == model_config_lib.MaskConfig()
  dtype = train.resolve_dtype("auto")
  assert model_cfg == dataclasses.replace(model_config_lib.get_model_config("S"), dtype=dtype,
                                          attention=train.resolve_attention("auto", dtype))


def test_size_fields_override_only_what_they_name():
  """Every named size sets exactly SIZE_FIELDS; a nonzero override replaces one field of
  it, and an inconsistent one stops the run naming the field."""
  for size in model_config_lib.SIZES:
    assert set(model_config_lib._SIZES[size]) == set(model_config_lib.SIZE_FIELDS), size
  xs = model_config_lib.get_model_config("XS")
  config = parse_config("XS,aim,cpu", "--config.model.dec_width=128", "--config.model.dec_mlp=256")
  model_cfg, _ = train.model_and_mask_configs(config, num_channels=26, platform="cpu")
  assert (model_cfg.dec_width, model_cfg.dec_mlp) == (128, 256)
  assert all(getattr(model_cfg, n) == getattr(xs, n)
             for n in model_config_lib.SIZE_FIELDS if n not in ("dec_width", "dec_mlp"))
  bad = parse_config("XS,aim,cpu", "--config.model.dec_heads=3")
  with pytest.raises(errors.ConfigError, match="dec_heads=3 does not divide dec_width=64"):
    train.model_and_mask_configs(bad, num_channels=26, platform="cpu")


def test_default_mix_keeps_its_strategy_ids_and_metric_names():
  _, mask_cfg = train.model_and_mask_configs(parse_config("tiny,aim,runlocal"), num_channels=26)
  assert mask_cfg.strategy_names == ("random", "time_bars")


def test_every_masking_field_reaches_the_mask_config():
  overrides = {
      "inherited_threshold": 0.5, "random_ratio": 0.6, "time_bars": 10, "interp_gap_minutes": 120,
      "extrap_gap_minutes": 90, "signal_imputation_k": 4, "n_drop": 100,
  }
  weights = {"random": 0.0, "time_bars": 2.0, "temporal_interpolation": 1.0,
             "temporal_extrapolation": 0.5, "signal_imputation": 0.25}
  config = parse_config("tiny,aim,runlocal", *(f"--config.masking.{k}={v}" for k, v in overrides.items()),
                        *(f"--config.masking.weights.{k}={v}" for k, v in weights.items()))
  _, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  for name, value in overrides.items():
    assert getattr(mask_cfg, name) == value, name
  # STRATEGIES order, "random" (weight 0) left out.
  assert mask_cfg.strategy_weights == (("time_bars", 2.0), ("temporal_interpolation", 1.0),
                                       ("temporal_extrapolation", 0.5), ("signal_imputation", 0.25))


@pytest.mark.parametrize("overrides, message", [
    (("--config.masking.weights.random=0", "--config.masking.weights.time_bars=0"),
     "config.masking.weights are all 0"),
    (("--config.masking.weights.random=-1",), "weight of 'random' must be >= 0, got -1.0"),
    (("--config.masking.n_drop=-2",), "MaskConfig.n_drop=-2 must be in"),
])
def test_bad_masking_overrides_are_refused_by_name(overrides, message):
  config = parse_config("tiny,aim,runlocal", *overrides)
  with pytest.raises(ValueError, match=message):
    train.model_and_mask_configs(config, num_channels=26)


def test_unknown_strategy_weights_are_refused():
  config = parse_config("tiny,aim,runlocal")
  with config.unlocked():
    config.masking.weights.blocks = 1.0
  with pytest.raises(ValueError, match=r"config.masking.weights: unknown strategies \['blocks'\]"):
    train.model_and_mask_configs(config, num_channels=26)


# ---------------------------------------------------------------------------
# Each strategy alone trains, set from the command line.
# ---------------------------------------------------------------------------
# A small geometry (60-minute x 2-signal tokens), XLA attention (compiles faster than
# the blocked kernel) and 2 steps keep each run short.
RUN_FLAGS = ("--config.model.patch_time=60", "--config.model.patch_channels=2",
             "--config.model.attention=xla",
             "--config.masking.time_bars=10", "--config.total_steps=2", "--config.log_every=1",
             "--config.eval_every=2", "--config.checkpoint_every=2", "--config.eval_batches=1",
             "--config.data.synthesize_subjects=0")


def only(strategy: str) -> list[str]:
  """Command-line overrides that make `strategy` the whole mix."""
  return [f"--config.masking.weights.{s}={1 if s == strategy else 0}" for s in STRATEGIES]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("strategies") / "data"
  # 16 train and 16 validation days: one batch of 8 each.
  synthesize.write_synthetic_dataset(out, subjects=16, days=2, seed=0,
                                     split_fractions=(0.5, 0.5, 0.0))
  return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_alone_trains_and_logs_its_loss(data_dir, tmp_path, strategy):
  config = parse_config("tiny,aim,runlocal", f"--config.data.dir={data_dir}", *RUN_FLAGS,
                        *only(strategy))
  _, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  assert mask_cfg.strategy_weights == ((strategy, 1.0),)
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
  # Every example drew `strategy`: its loss is the (last step's) loss, and no other
  # strategy is logged.
  assert metrics[f"train/loss_{strategy}"] == pytest.approx(metrics["train/loss"], rel=1e-5)
  assert math.isfinite(metrics[f"val/mse_{strategy}"])
  logged = {k.split("_", 1)[1] for k in metrics if k.startswith(("train/loss_", "val/mse_"))}
  assert logged == {strategy}


@pytest.mark.slow
def test_command_line_trains_temporal_interpolation_alone(data_dir, tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "lsm2.main", "--config=configs/pretrain.py:tiny,aim,runlocal",
       f"--workdir={workdir}", f"--config.data.dir={data_dir}", *RUN_FLAGS,
       "--config.masking.weights.temporal_interpolation=1", "--config.masking.weights.random=0",
       "--config.masking.weights.time_bars=0"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert result.returncode == 0, result.stderr[-3000:]
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  events.Reload()
  tags = set(events.Tags()["tensors"])
  assert {"train/loss_temporal_interpolation", "val/mse_temporal_interpolation"} <= tags
  assert not {t for t in tags if t.startswith(("train/loss_", "val/mse_"))
              and not t.endswith("_temporal_interpolation")}


def test_cpu_recipe_switch_and_xs_size():
  """configs/pretrain.py:XS,aim,cpu: the CPU-scale size between tiny and S, the runlocal grid,
  every masking strategy in the mix, and configs the trainer accepts."""
  config = parse_config("XS,aim,cpu")
  assert config.model.size == "XS" and config.lr == 3e-3 and config.batch_size == 8
  assert (config.model.patch_time, config.model.patch_channels) == (30, 2)
  assert all(config.masking.weights[name] > 0 for name in STRATEGIES)
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26, platform="cpu")
  assert set(mask_cfg.strategy_names) == set(STRATEGIES)
  width = lambda size: model_config_lib.get_model_config(size).enc_width
  assert width("tiny") < model_cfg.enc_width < width("S")
  with pytest.raises(ValueError, match="unknown switch 'fast'.*'runlocal' or 'cpu'"):
    config_files.load_config(PRETRAIN, "XS,fast")
