"""SIGTERM during start-up exits with the preemption status and releases the lock.

Fault soak: a tiny run SIGKILLed at random moments, during a checkpoint save and during
the export (twice: the first export, and a re-export over an existing one), with its latest
checkpoint corrupted once, resumes each time and ends bit-identical to an uninterrupted run,
with a loadable export throughout.

Each run is tests/fault_driver.py in a subprocess (1 CPU device; a shared persistent XLA
cache keeps the later starts short). Set LSM2_SOAK_SEED to replay a failing order of kills.
"""
import json
import os
import pathlib
import queue
import random
import signal
import subprocess
import sys
import threading
import time

from flax import nnx
import jax
import numpy as np
import pytest

from lsm2 import pretrained
from lsm2.data import synthesize
from lsm2.train import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "fault_driver.py"
STEPS = 12
OVERRIDES = {"model.patch_time": 60, "model.patch_channels": 2, "masking.time_bars": 10,
             "batch_size": 8, "total_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 3,
             "log_every": 2, "eval_every": 1000, "eval_batches": 1,
             "data.synthesize_subjects": 0}


class _Runner:
  """Runs the driver on a workdir and SIGKILLs it at a chosen or random moment."""

  def __init__(self, tmp_path: pathlib.Path, rng: random.Random, seed: int):
    self.data = tmp_path / "data"
    synthesize.write_synthetic_dataset(self.data, subjects=12, days=2, seed=0)
    self.rng, self.seed = rng, seed
    self.env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

  def __call__(self, workdir: pathlib.Path, point: str = "", random_kill: bool = False) -> str:
    """"killed" or "done". With `point`, kills when the driver holds there; with
    `random_kill`, at a random step of this run (not the last) plus up to 0.3 s."""
    overrides = {**OVERRIDES, "data.dir": str(self.data)}
    log = workdir.with_suffix(".log")
    with open(log, "ab") as err:
      proc = subprocess.Popen([sys.executable, str(DRIVER), str(workdir), json.dumps(overrides),
                               point], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                              stderr=err, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)],
                     daemon=True).start()
    where = f"(LSM2_SOAK_SEED={self.seed}; log {log})"
    kill_at = None
    try:
      while (line := lines.get(timeout=300)) is not None:
        line = line.strip()
        if line.startswith("STEP ") and random_kill:
          step = int(line.split()[1])
          kill_at = kill_at or self.rng.randint(step, max(step, STEPS - 2))
          if step == kill_at:  # Then into the save, the next step or the export ...
            time.sleep(self.rng.uniform(0.0, 0.3) if step <= STEPS - 2 else 0.0)
            break  # ... but never past the end of the run.
        if point and line == f"PAUSED {point}":
          break
      else:
        assert proc.wait(timeout=60) == 0, f"the run failed {where}"
        assert not point and not random_kill, f"the run ended before its kill {where}"
        return "done"
      assert proc.poll() is None, f"the run ended before its kill {where}"
      proc.kill()
      assert proc.wait(timeout=60) == -9, where
      return "killed"
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _params(path):
  model, _, _ = pretrained.load_pretrained(path)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _assert_same(a, b, what):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=what)


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _truncate_arrays(step_dir: pathlib.Path) -> None:
  files = [f for f in (step_dir / pretrained.STATE).rglob("*")
           if f.is_file() and f.parent.name == "d"]  # OCDBT data files.
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


@pytest.mark.slow
def test_sigkill_anywhere_and_a_corrupt_checkpoint_resume_bit_exact(tmp_path):
  seed = int(os.environ.get("LSM2_SOAK_SEED", random.randrange(1 << 30)))
  run = _Runner(tmp_path, random.Random(seed), seed)
  reference, faulty = tmp_path / "reference", tmp_path / "faulty"
  assert run(reference) == "done"
  want = _params(reference)

  # 1. Killed while checkpoint step 6 is being written (its files there, Orbax's rename not).
  assert run(faulty, "save:6") == "killed"
  assert _steps(faulty)[-2:] == [2, 4]
  # 2. Step 4, the newest complete checkpoint, is torn: the resume falls back to step 2 and
  #    moves step 4 aside. Then two kills at random moments.
  _truncate_arrays(faulty / "checkpoints" / "4")
  assert run(faulty, random_kill=True) == "killed"
  log = faulty.with_suffix(".log").read_text()
  assert "CHECKPOINT UNREADABLE: step 4" in log and "moved step 4 aside" in log
  assert "Resumed from" in log and "at step 2" in log
  [moved] = list((faulty / checkpoint.CORRUPT_DIR).iterdir())
  assert moved.name.startswith("4.") and (moved / "REASON.txt").exists()
  assert run(faulty, random_kill=True) == "killed"
  # 3. Killed during the first export: its arrays written, its description not.
  assert run(faulty, "export_write") == "killed"
  assert pretrained.find_export(faulty) is None  # Half an export is never taken for one.
  assert run(faulty) == "done"
  _assert_same(_params(faulty), want, f"after the kills (seed {seed})")
  exported = _params(faulty / pretrained.EXPORT_DIR)
  # 4. Killed between the renames of a re-export over that export: the previous one still
  #    loads from WORKDIR/export; the next start completes the swap.
  assert run(faulty, "export_swap") == "killed"
  assert (faulty / pretrained.EXPORT_OLD).exists() and not (faulty / pretrained.EXPORT_DIR).exists()
  _assert_same(_params(faulty / pretrained.EXPORT_DIR), exported, "the previous export")
  assert run(faulty) == "done"

  _assert_same(_params(faulty), want, f"the final export (seed {seed})")
  assert sorted(p.name for p in faulty.iterdir() if p.name.startswith("export")) == ["export"]
  assert _steps(faulty)[-1] == STEPS
  assert (json.loads((faulty / pretrained.DESCRIPTION_FILE).read_text())
          == json.loads((reference / pretrained.DESCRIPTION_FILE).read_text()))
  assert list((faulty / checkpoint.CORRUPT_DIR).iterdir()) == [moved]


@pytest.mark.parametrize("point,kept", [
    ("lease", "this start wrote no checkpoint"),
    ("preflight", "this start wrote no checkpoint"),
    ("record", "no checkpoint was written yet; rerun the same command to start"),
])
def test_sigterm_during_start_up_exits_with_the_preemption_status_and_releases_the_lock(
    tmp_path, point, kept):
  """Before the loop a SIGTERM killed the process with status 143 and left lock.json, so a
  requeue saw a failure and a live-looking lease; now: status 75, no lock, no checkpoint."""
  data, workdir = tmp_path / "data", tmp_path / "run"
  synthesize.write_synthetic_dataset(data, subjects=12, days=2, seed=0)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  overrides = {**OVERRIDES, "data.dir": str(data)}
  proc = subprocess.Popen([sys.executable, str(DRIVER), str(workdir), json.dumps(overrides),
                           point], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:
      if line.strip() == f"PAUSED {point}":
        break
    assert proc.poll() is None, proc.stderr.read()
    assert (workdir / "lock.json").exists()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 75, err
  assert "SIGTERM during start-up, before training: stopping with status 75" in err
  assert kept in err and "Traceback" not in err and "DONE" not in out
  assert not (workdir / "lock.json").exists()
  assert not (workdir / "checkpoints").exists() or _steps(workdir) == []
