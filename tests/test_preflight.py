"""Pre-flight memory check: a train step that cannot fit stops before the first step."""
import pathlib

import jax
import pytest

from lsm2 import config_files
from lsm2 import errors
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
    config.batch_size, config.total_steps = 16, 2
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "NOTES.txt").write_text("the user's")
  monkeypatch.setattr(preflight, "host_memory_bytes", lambda: 2**20)
  with pytest.raises(preflight.DoesNotFit) as e:
    train.train_and_evaluate(config, workdir)
  assert isinstance(e.value, errors.Error)  # One lsm2: error: line, exit status 1.
  # Checked from abstract shapes before anything was written: the workdir is as it was.
  assert {p.name: p.read_bytes() for p in workdir.rglob("*")} == {"NOTES.txt": b"the user's"}
  message = str(e.value)
  assert "stopped before the first step" in message
  assert "GiB of host RAM available to 8 CPU device(s)" in message
  assert "--config.batch_size (now 16, 2 per device)" in message
  assert "--config.model.remat" in message
  need = float(message.split("needs ")[1].split(" GiB")[0])
  assert 0 < need < 1  # The tiny step's temporaries and outputs, in GiB.
  # The first knob it names works in the same workdir: no run.json claims the refused batch.
  monkeypatch.undo()
  with config.unlocked():
    config.batch_size = 8
  train.train_and_evaluate(config, workdir)
  assert pathlib.Path(pretrained.checkpoint_dir(workdir), "2").is_dir()


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
