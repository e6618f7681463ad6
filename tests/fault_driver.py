"""One pretraining run for tests/test_faults.py, in this process, optionally held at a named
point so that the test can SIGKILL it exactly there.

  python tests/fault_driver.py WORKDIR OVERRIDES_JSON [POINT]

Prints "STEP n" as each step reaches its checkpoint decision (the test times its random
kills from these), "PAUSED POINT" when it holds at POINT, "DONE" at the end. POINT:
  save:N         checkpoint step N is written, Orbax's rename of it is pending
  export_write   the new export's arrays are written, its description not
  export_swap    between the two renames that swap the new export in
  lease          the lease is taken, nothing compiled or restored yet (start-up)
  preflight      the pre-flight compile is due, nothing restored yet (start-up)
  record         the state is restored or initialised, run.json is due (start-up)
"""
import json
import logging
import pathlib
import sys
import time

from etils import epath
from orbax.checkpoint._src.path import atomicity

from lsm2 import config_files
from lsm2 import pretrained
from lsm2.train import checkpoint
from lsm2.train import preflight
from lsm2.train import run_dir
from lsm2.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _hold(point: str) -> None:
  print(f"PAUSED {point}", flush=True)
  time.sleep(3600)


def _hold_at(point: str) -> None:
  """Patches the code under test to hold at `point` (test scaffolding only)."""
  if point.startswith("save:"):
    step = point.split(":")[1]
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self, *args, **kwargs):
      if epath.Path(self._final_path).name == step:  # pylint: disable=protected-access
        _hold(point)
      return await finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = held_finalize
  elif point == "export_write":
    write_description = pretrained.write_description

    def held_write(directory, description):
      if epath.Path(directory).name == pretrained.EXPORT_TMP:
        _hold(point)
      return write_description(directory, description)
    pretrained.write_description = held_write
  elif point == "export_swap":
    path_type = type(epath.Path("/"))
    rename = path_type.rename

    def held_rename(self, target):
      if self.name == pretrained.EXPORT_TMP:
        _hold(point)
      return rename(self, target)
    path_type.rename = held_rename
  elif point == "lease":
    acquire = run_dir.Lease.acquire

    def held_acquire(self):
      acquire(self)
      _hold(point)
    run_dir.Lease.acquire = held_acquire
  elif point == "preflight":
    preflight.check_train_step = lambda *args, **kwargs: _hold(point)
  elif point == "record":
    run_dir.write_record = lambda *args, **kwargs: _hold(point)
  elif point:
    raise ValueError(f"unknown point {point!r}")


def main() -> None:
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  logging.basicConfig(level=logging.INFO, force=True)  # The run's own log lines ...
  logging.getLogger("absl").setLevel(logging.WARNING)  # ... without Orbax's per-save chatter.
  _hold_at(sys.argv[3] if len(sys.argv) > 3 else "")
  maybe_save = checkpoint.Checkpointer.maybe_save

  def marked_save(self, step, *args, **kwargs):
    print(f"STEP {step}", flush=True)
    return maybe_save(self, step, *args, **kwargs)
  checkpoint.Checkpointer.maybe_save = marked_save

  config = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny,aim,runlocal")
  with config.unlocked():
    config.update_from_flattened_dict(overrides)
  train.train_and_evaluate(config, workdir)
  print("DONE", flush=True)


if __name__ == "__main__":
  main()
