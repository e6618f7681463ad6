"""Pre-flight memory check: a train step that cannot fit stops before the first step."""
import pathlib

import jax
import pytest

from lsm2 import config_files
from lsm2 import pretrained
from lsm2 import sharding
from lsm2.data import synthesize
from lsm2.train import preflight
from lsm2.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("data") / "synth"
  synthesize.write_synthetic_dataset(out, subjects=12, days=2, seed=0,
                                     split_fractions=(0.75, 0.25, 0.0))
  return out


def test_a_step_that_cannot_fit_stops_before_the_first_step(data_dir, tmp_path, monkeypatch):
  """On CPU the budget is host RAM; here it is made 1 MiB, far below the step's need."""
  config = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny,runlocal")
  with config.unlocked():
    config.data.dir = str(data_dir)
    config.data.synthesize_subjects = 0
    # 60-minute x 2-signal tokens (312): a fast compile.
    config.model.patch_time, config.model.patch_channels, config.masking.time_bars = 60, 2, 10
    config.batch_size, config.total_steps = 8, 2
  monkeypatch.setattr(preflight, "host_memory_bytes", lambda: 2**20)
  with pytest.raises(preflight.DoesNotFit) as e:
    train.train_and_evaluate(config, tmp_path / "run")
  message = str(e.value)
  assert "stopped before the first step" in message
  assert "GiB of host RAM available to 8 CPU device(s)" in message
  assert "--config.batch_size (now 8, 1 per device)" in message
  assert "--config.model.remat" in message
  need = float(message.split("needs ")[1].split(" GiB")[0])
  assert 0 < need < 1  # The tiny step's temporaries and outputs, in GiB.
  # Nothing ran: no metrics were written, no checkpoint was saved.
  assert not list((tmp_path / "run").rglob("events.out.tfevents*"))
  checkpoints = pathlib.Path(pretrained.checkpoint_dir(tmp_path / "run"))
  assert not checkpoints.exists() or not [p for p in checkpoints.iterdir() if p.name.isdigit()]


def test_a_compiler_that_refuses_the_step_stops_it_with_the_knobs():
  """TPU compilers refuse programs larger than HBM: that refusal becomes DoesNotFit."""
  config = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny,runlocal")
  with config.unlocked():
    config.model.patch_time, config.model.patch_channels, config.masking.time_bars = 60, 2, 10
    config.batch_size = 8
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  mesh = sharding.make_mesh(config.mesh)
  setup = train.make_setup(config, model_cfg, mask_cfg, mesh)
  refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (41.85G) exceeds available HBM (15.75G).")

  class RefusedStep:
    def lower(self, *args):
      del args
      return self

    def compile(self):
      raise jax.errors.JaxRuntimeError(refusal)

  with pytest.raises(preflight.DoesNotFit, match=r"\(41.85G\) exceeds available HBM") as e:
    preflight.check_train_step(config, setup, RefusedStep(), train.make_mask_fn(setup),
                               train.abstract_state(setup))
  assert "stopped before the first step" in str(e.value) and "--config.model.remat" in str(e.value)


def test_knobs_name_what_applies():
  dp = preflight.knobs(1024, {"data": 256, "fsdp": 1, "tensor": 1}, "xla")
  assert "now 1024, 4 per device" in dp and "--config.mesh.fsdp=-1" in dp and "splash on TPU" in dp
  fsdp = preflight.knobs(1024, {"data": 1, "fsdp": 256, "tensor": 1}, "splash")
  assert "--config.mesh.fsdp" not in fsdp and "splash on TPU" not in fsdp and "remat" in fsdp
