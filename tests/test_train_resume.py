"""Preemption, crash and exact resume, and runs across processes: real `lsm2.main` processes
(and `launch/local.sh 2` over loopback) on the small test geometry."""
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from flax import nnx
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

from lsm2 import pretrained
from train_runs import REPO, attempts, cli_overrides, write_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_data(tmp_path_factory.mktemp("data") / "synth")


def _launch(workdir, data_dir, **overrides):
  cmd = [sys.executable, "-m", "lsm2.main", "--config=configs/pretrain.py:tiny,aim,runlocal",
         f"--workdir={workdir}", *cli_overrides(data_dir, **overrides)]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  with open(pathlib.Path(workdir).with_suffix(".log"), "ab") as log:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_step(workdir, step, proc, timeout=300):
  path = pathlib.Path(workdir) / "checkpoints" / str(step)
  deadline = time.time() + timeout
  while not path.exists():
    assert proc.poll() is None, f"training exited early ({proc.returncode}); see {workdir}.log"
    assert time.time() < deadline, f"no checkpoint {path} after {timeout}s"
    time.sleep(0.02)


def _scalars(workdir, tag) -> dict[int, float]:
  """Scalar `tag` per step from the workdir's TensorBoard events (later files win)."""
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def _export_params(workdir):
  model, _, _ = pretrained.load_pretrained(workdir)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.mark.slow
def test_preempt_crash_and_resume_equals_uninterrupted(data_dir, tmp_path):
  steps = 60
  straight = tmp_path / "straight"
  proc = _launch(straight, data_dir, total_steps=steps)
  assert proc.wait(timeout=600) == 0

  resumed = tmp_path / "resumed"
  # 1. Preemption: SIGTERM saves a checkpoint and exits with the requeue status (75).
  proc = _launch(resumed, data_dir, total_steps=steps)
  _wait_for_step(resumed, 5, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 75
  log = pathlib.Path(f"{resumed}.log").read_text()
  assert "Preempted at step" in log and "exiting with status 75" in log
  assert not (resumed / "export").exists()
  preempted_at = max(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
  assert 5 <= preempted_at < steps
  (attempt,) = attempts(resumed)  # The preemption wrote its goodput record.
  assert (attempt["status"], attempt["last_step"], attempt["last_saved"]) == (
      "preempted", preempted_at, preempted_at)

  # 2. Crash: kill -9 after a later checkpoint, once a log step past it is recorded (checkpoints
  #    every 10 steps, records every 5): the resume repeats the steps after the checkpoint.
  proc = _launch(resumed, data_dir, total_steps=steps, checkpoint_every=10)
  target = (preempted_at // 10 + 2) * 10
  _wait_for_step(resumed, target, proc)
  while len(attempts(resumed)) < 2 or attempts(resumed)[1]["last_step"] < target + 5:
    assert proc.poll() is None, f"training exited early ({proc.returncode})"
    time.sleep(0.02)
  proc.kill()
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert not (resumed / "export").exists()

  # 3. Resume to the end.
  proc = _launch(resumed, data_dir, total_steps=steps)
  assert proc.wait(timeout=600) == 0
  assert "Resumed from" in pathlib.Path(f"{resumed}.log").read_text()
  preempted, killed, finished = attempts(resumed)  # goodput.json: the repeated steps.
  assert [a["status"] for a in (preempted, killed, finished)] == ["preempted", "killed", "finished"]
  assert killed["start_step"] == preempted_at and preempted["repeated_steps"] == 0
  assert finished["start_step"] == target and killed["repeated_steps"] == killed["last_step"] - target >= 5
  assert killed["restart_lost_s"] == pytest.approx(
      killed["repeated_steps"] * killed["step_s"] / killed["measured_steps"])

  for a, b in zip(_export_params(straight), _export_params(resumed)):
    np.testing.assert_array_equal(a, b)
  # Validation metrics depend on the parameters only: equal at every evaluation.
  # Training averages cover log_every steps; the preempted run resumed mid-window,
  # so compare them once the crash resume (on a checkpoint step) has taken over.
  for tag, first in (("val/mse", 0), ("train/loss", target + 1)):
    want, got = _scalars(straight, tag), _scalars(resumed, tag)
    assert steps in want
    for step in (s for s in want if s >= first):
      assert got[step] == pytest.approx(want[step], rel=1e-6), (tag, step)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_as_one(data_dir, tmp_path):
  """launch/local.sh 2 over loopback gives the single-process losses; 1 process resumes it.

  Both run the packed encoder (one packing group per process's shard)."""
  packed = {"mesh.data": 2, "masking.encoder_buckets": 4, "masking.pack_encoder": True}
  overrides = cli_overrides(data_dir, total_steps=10, eval_every=100, **packed)
  env = {**os.environ, "PYTHON": sys.executable}
  two = tmp_path / "two"
  subprocess.run(["bash", "launch/local.sh", "2", "--config", "configs/pretrain.py:tiny,aim,runlocal",
                  "--workdir", str(two), *overrides], cwd=REPO, env=env, check=True, timeout=600)
  one = tmp_path / "one"  # One process with two devices: the same mesh, the same global batches.
  subprocess.run([sys.executable, "-m", "lsm2.main", "--config=configs/pretrain.py:tiny,aim,runlocal",
                  f"--workdir={one}", *overrides], cwd=REPO, check=True, timeout=600,
                 env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  want, got = _scalars(one, "train/loss"), _scalars(two, "train/loss")
  assert sorted(want) == sorted(got) == [5, 10]
  # Downstream restore of the 2-process export in this 1-process, 8-device job.
  for a, b in zip(_export_params(two), _export_params(one)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for step in want:  # CPU collectives across processes vs within one: round-off only.
    assert got[step] == pytest.approx(want[step], rel=1e-5)

  # The 2-process checkpoint resumes in a 1-process job (with 2 devices).
  overrides = cli_overrides(data_dir, total_steps=15, eval_every=100, **packed)
  log = subprocess.run([sys.executable, "-m", "lsm2.main", "--config=configs/pretrain.py:tiny,aim,runlocal",
                        f"--workdir={two}", *overrides], cwd=REPO, check=True, timeout=600,
                       capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}).stderr
  assert "Resumed from" in log and "at step 10" in log
  assert "Encoder layout: packed encoder, 2 group(s)" in log
  assert "written by 2 processes, this job has 1" in log
  assert 15 in _scalars(two, "train/loss")


def _child_pid(parent: int, marker: str) -> int:
  """The pid of `parent`'s child process whose command line contains `marker`."""
  for proc in pathlib.Path("/proc").iterdir():
    try:
      ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
      cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
      continue
    if ppid == parent and marker in cmdline:
      return int(proc.name)
  raise AssertionError(f"no child of {parent} with {marker!r}")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(data_dir, tmp_path):
  """Orbax's preemption sync point (JAX's distributed runtime catches the SIGTERM): a SIGTERM
  to process 1 alone makes both processes save the same step and exit 75, and launch/local.sh
  exits 75 too, for a requeue."""
  workdir = tmp_path / "two"
  overrides = cli_overrides(data_dir, total_steps=100000, checkpoint_every=100000, log_every=1,
                            eval_every=100000, **{"mesh.data": 2})
  launcher = subprocess.Popen(
      ["bash", "launch/local.sh", "2", "--config", "configs/pretrain.py:tiny,aim,runlocal",
       "--workdir", str(workdir), *overrides], cwd=REPO, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "PYTHON": sys.executable})
  logs = [workdir / "logs" / f"process_{i}.log" for i in range(2)]
  deadline = time.time() + 300
  while not (logs[1].exists() and "step 3/" in logs[1].read_text()):
    assert launcher.poll() is None and time.time() < deadline, "training did not reach step 3"
    time.sleep(0.2)
  os.kill(_child_pid(launcher.pid, "--process_id=1"), signal.SIGTERM)
  _, err = launcher.communicate(timeout=300)
  assert launcher.returncode == 75, err
  assert "preempted; run the same command again to resume" in err
  texts = [log.read_text() for log in logs]
  assert "SIGTERM caught" in texts[1] and "SIGTERM caught" not in texts[0]
  steps = {int(s) for text in texts for s in re.findall(r"Preempted at step (\d+)", text)}
  assert len(steps) == 1
  assert (workdir / "checkpoints" / str(steps.pop())).exists()
  assert not (workdir / "export").exists()
