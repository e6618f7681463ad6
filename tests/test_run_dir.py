"""The run directory is owned by one run: run.json refuses another config before any write,
the lease stops a second writer, init_from fine-tunes deliberately."""
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import time

from flax import nnx
import jax
import numpy as np
import pytest

import lsm2
from lsm2 import config_files
from lsm2 import pretrained
from lsm2.data import metadata as metadata_lib
from lsm2.data import synthesize
from lsm2.train import run_dir
from lsm2.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
# 60-minute x 2-signal tokens: a fast compile (as in test_train.py).
SMALL = {"model.patch_time": 60, "model.patch_channels": 2, "masking.time_bars": 10,
         "batch_size": 8, "total_steps": 4, "checkpoint_every": 2, "log_every": 2,
         "eval_every": 100, "eval_batches": 1, "data.synthesize_subjects": 0}


def _config(data_dir, **overrides):
  config = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny,aim,runlocal")
  with config.unlocked():
    config.data.dir = str(data_dir)
    config.update_from_flattened_dict({**SMALL, **overrides})
  return config


def _snapshot(root) -> dict[str, bytes]:
  root = pathlib.Path(root)
  return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def _export_params(path):
  model, _, _ = pretrained.load_pretrained(path)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """Two datasets with the same channels: the second has other subjects (other statistics)."""
  root = tmp_path_factory.mktemp("data")
  for seed in (0, 1):
    synthesize.write_synthetic_dataset(root / f"d{seed}", subjects=10, days=2, seed=seed,
                                       split_fractions=(0.8, 0.2, 0.0))
  return root / "d0", root / "d1"


@pytest.fixture(scope="module")
def finished(data_dirs, tmp_path_factory):
  """A finished 4-step run (checkpoints at 2 and 4, an export)."""
  workdir = tmp_path_factory.mktemp("owned") / "run"
  train.train_and_evaluate(_config(data_dirs[0]), str(workdir))
  return workdir


def _copy(workdir, tmp_path) -> pathlib.Path:
  out = tmp_path / "run"
  shutil.copytree(workdir, out)
  return out


# ---------------------------------------------------------------------------
# run.json: the config and dataset of the run that owns the workdir.
# ---------------------------------------------------------------------------
def test_the_workdir_records_its_run(finished, data_dirs):
  record = json.loads((finished / run_dir.RUN_FILE).read_text())
  assert record["config"]["model.patch_time"] == 60
  assert record["config"]["masking.random_ratio"] == 0.8
  assert record["config"]["seed"] == 0 and record["config"]["init_from"] == ""
  for allowed in ("total_steps", "data.dir", "data.worker_count", "model.attention"):
    assert allowed not in record["config"]
  assert record["dataset"]["record_counts"]["train"] > 0
  assert len(record["dataset"]["norm_mean"]) == len(record["dataset"]["channels"])
  assert not (finished / run_dir.LOCK_FILE).exists()  # Released at the end.
  assert pretrained.read_description(finished)["model"]["patch_time"] == 60


@pytest.mark.parametrize("dataset,overrides,fragment", [
    (0, {"model.patch_time": 30, "masking.time_bars": 19},
     "config.model.patch_time: 60 in the workdir, 30 now"),
    (0, {"masking.random_ratio": 0.5}, "config.masking.random_ratio: 0.8 in the workdir, 0.5 now"),
    (0, {"batch_size": 16}, "config.batch_size: 8 in the workdir, 16 now"),
    (1, {}, "dataset norm_mean: differs first at [0]"),  # Same channels, other statistics.
])
def test_restarting_with_another_run_is_refused_before_any_write(finished, data_dirs, dataset,
                                                                  overrides, fragment):
  before = _snapshot(finished)
  with pytest.raises(run_dir.WorkdirMismatchError) as e:
    train.train_and_evaluate(_config(data_dirs[dataset], **overrides), str(finished))
  message = str(e.value)
  assert f"{finished} belongs to another run" in message and fragment in message
  assert "Nothing was written" in message and "pass a new --workdir" in message
  assert f"--config.init_from={finished}" in message
  assert _snapshot(finished) == before


def test_fields_added_later_read_as_their_old_value_when_a_record_lacks_them(data_dirs):
  """A run directory from before the width overrides existed (its run.json has none) still
  resumes with them at 0; a run with an override refuses a restart without it, naming 0."""
  meta = metadata_lib.load_metadata(str(data_dirs[0]))
  plain = run_dir.run_record(_config(data_dirs[0]), meta)
  assert set(run_dir.ADDED_LATER) <= set(plain["config"])
  old = {**plain, "config": {k: v for k, v in plain["config"].items()
                             if k not in run_dir.ADDED_LATER}}
  assert run_dir.differences(old, plain) == run_dir.differences(plain, old) == []
  wide = run_dir.run_record(_config(data_dirs[0], **{"model.dec_width": 64}), meta)
  assert wide["config"]["model.dec_width"] == 64
  assert run_dir.differences(wide, old) == ["config.model.dec_width: 64 in the workdir, 0 now"]
  assert run_dir.differences(old, wide) == ["config.model.dec_width: 0 in the workdir, 64 now"]
  # Any other field a record lacks still differs.
  fewer = {**plain, "config": {k: v for k, v in plain["config"].items() if k != "model.size"}}
  assert run_dir.differences(fewer, plain) == [
      f"config.model.size: '(absent)' in the workdir, {plain['config']['model.size']!r} now"]


def test_resume_may_change_steps_and_cadence_and_takes_over_a_dead_writers_lease(
    finished, data_dirs, tmp_path, caplog):
  workdir = _copy(finished, tmp_path)
  record = (workdir / run_dir.RUN_FILE).read_bytes()
  # A pid no process can have (pids stay below pid_max): no fork of this multithreaded process.
  dead_pid = int(pathlib.Path("/proc/sys/kernel/pid_max").read_text())
  (workdir / run_dir.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": dead_pid, "token": "x", "heartbeat": time.time()}))
  config = _config(data_dirs[0], total_steps=6, log_every=3, checkpoint_every=3,
                   keep_checkpoints=5, eval_every=6, profile_steps=0,
                   **{"data.worker_count": 0, "model.attention": "xla"})
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, str(workdir))
  assert "Taking over the lease" in caplog.text and "its process is gone" in caplog.text
  assert "Resumed from" in caplog.text and "at step 4" in caplog.text
  assert (workdir / run_dir.RUN_FILE).read_bytes() == record
  assert pretrained.read_description(workdir)["run_config"]["total_steps"] == 6
  assert not (workdir / run_dir.LOCK_FILE).exists()
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-2:] == [4, 6]  # Every checkpoint_every=3 steps from the resume at 4.


def test_a_total_steps_below_the_newest_checkpoint_is_refused_before_any_write(
    finished, data_dirs, tmp_path):
  """The finished run is at step 4: with total_steps=2 it would re-export step 4's
  parameters labelled step 2."""
  workdir = _copy(finished, tmp_path)
  before = _snapshot(workdir)
  with pytest.raises(train.errors.ConfigError) as e:
    train.train_and_evaluate(_config(data_dirs[0], total_steps=2), str(workdir))
  message = str(e.value)
  assert "config.total_steps=2 is below step 4, the newest checkpoint" in message
  assert "--config.total_steps=4 or more" in message and "a new --workdir" in message
  assert _snapshot(workdir) == before
  assert lsm2.load(workdir).step == 4


def test_a_truncated_run_json_is_refused_naming_it_before_any_write(finished, data_dirs,
                                                                    tmp_path):
  workdir = _copy(finished, tmp_path)
  record = workdir / run_dir.RUN_FILE
  record.write_text(record.read_text()[:40])
  before = _snapshot(workdir)
  with pytest.raises(run_dir.WorkdirMismatchError,
                     match=rf"{record} is not valid JSON .*Nothing was written. If the workdir "
                           rf"is this run's, delete {record}"):
    train.train_and_evaluate(_config(data_dirs[0]), str(workdir))
  assert _snapshot(workdir) == before


def test_a_second_writer_is_refused_before_any_write(finished, data_dirs, tmp_path):
  workdir = _copy(finished, tmp_path)
  alive = subprocess.Popen(["sleep", "60"])
  try:
    (workdir / run_dir.LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": alive.pid, "token": "x", "heartbeat": time.time()}))
    before = _snapshot(workdir)
    with pytest.raises(run_dir.WorkdirLockedError,
                       match=rf"{workdir} is being written by another process: host "
                             rf"{socket.gethostname()}, pid {alive.pid}, last heartbeat"):
      train.train_and_evaluate(_config(data_dirs[0]), str(workdir))
    assert _snapshot(workdir) == before
  finally:
    alive.kill()
    alive.wait()


# ---------------------------------------------------------------------------
# init_from: a deliberate fine-tune in a new workdir.
# ---------------------------------------------------------------------------
def test_init_from_starts_from_another_runs_parameters_and_is_recorded(finished, data_dirs,
                                                                       tmp_path):
  workdir = tmp_path / "finetune"
  # lr 1e-30 (0 is refused): two steps move no parameter by more than ~1e-29, so the
  # export shows where training started (a fresh model differs by ~1e-2 and more).
  config = _config(data_dirs[1], init_from=str(finished), lr=1e-30, total_steps=2)
  train.train_and_evaluate(config, str(workdir))
  for a, b in zip(_export_params(finished), _export_params(workdir)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-20)
  record = json.loads((workdir / run_dir.RUN_FILE).read_text())
  assert record["config"]["init_from"] == str(finished) and record["init_from_step"] == "export"
  assert pretrained.read_description(workdir)["run_config"]["init_from"] == str(finished)


def test_init_from_another_model_is_refused(finished, data_dirs, tmp_path):
  config = _config(data_dirs[0], init_from=str(finished),
                   **{"model.patch_time": 30, "masking.time_bars": 19})
  with pytest.raises(pretrained.CheckpointMismatchError,
                     match=rf"config.init_from={finished}: export .* does not fit this model: "
                           r".* is float32\[.*\] in the checkpoint, float32\[.*\] in this model"):
    train.train_and_evaluate(config, str(tmp_path / "finetune"))
  assert not (tmp_path / "finetune" / run_dir.RUN_FILE).exists()
  assert not (tmp_path / "finetune" / pretrained.DESCRIPTION_FILE).exists()


# ---------------------------------------------------------------------------
# The lease (lock.json): host, pid, heartbeat.
# ---------------------------------------------------------------------------
def _lock(workdir) -> dict:
  return json.loads((workdir / run_dir.LOCK_FILE).read_text())


def test_lease_is_written_renewed_and_released(tmp_path):
  lease = run_dir.Lease(tmp_path, timeout_s=0.4)
  lease.acquire()
  first = _lock(tmp_path)
  assert (first["host"], first["pid"]) == (socket.gethostname(), lease.me["pid"])
  time.sleep(0.35)
  assert _lock(tmp_path)["heartbeat"] > first["heartbeat"]
  lease.check()
  lease.release()
  assert not (tmp_path / run_dir.LOCK_FILE).exists()


def test_a_live_holder_on_another_host_is_seen_renewing_and_refused(tmp_path):
  holder = run_dir.Lease(tmp_path, timeout_s=2.0)
  holder.me["host"] = "elsewhere"
  holder.acquire()
  try:
    start = time.time()
    with pytest.raises(run_dir.WorkdirLockedError,
                       match=rf"{tmp_path} is being written by another process: host elsewhere"):
      run_dir.Lease(tmp_path, timeout_s=2.0, poll_s=0.1).acquire()
    assert time.time() - start < 2.0  # Refused on seeing a renewal, before the timeout.
    assert _lock(tmp_path)["token"] == holder.me["token"]
  finally:
    holder.release()


def test_a_taker_with_a_shorter_timeout_waits_for_the_holders_own(tmp_path):
  """The holder renews every quarter of its own timeout (0.5 s here): a taker started with
  a shorter config.lease_timeout_s (0.2 s) must judge it by the holder's recorded 2 s, see
  a renewal and refuse, not take a live lease between two renewals."""
  holder = run_dir.Lease(tmp_path, timeout_s=2.0)
  holder.me["host"] = "elsewhere"
  holder.acquire()
  try:
    assert _lock(tmp_path)["timeout_s"] == 2.0
    with pytest.raises(run_dir.WorkdirLockedError,
                       match=r"host elsewhere.*taken over after 2 s without a heartbeat"):
      run_dir.Lease(tmp_path, timeout_s=0.2, poll_s=0.05).acquire()
    assert _lock(tmp_path)["token"] == holder.me["token"]
    holder.check()  # Still the only writer.
  finally:
    holder.release()


def test_a_lease_is_stale_after_its_holders_timeout(tmp_path, caplog):
  """A holder that stopped renewing is taken over once its own timeout (1 s) has passed,
  not before, whatever the taker's (0.1 s)."""
  (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "token": "x", "timeout_s": 1.0,
       "heartbeat": time.time()}))
  lease = run_dir.Lease(tmp_path, timeout_s=0.1, poll_s=0.05)
  start = time.time()
  with caplog.at_level(logging.WARNING):
    lease.acquire()
  assert time.time() - start >= 1.0
  assert "no heartbeat for more than 1 s" in caplog.text
  assert _lock(tmp_path)["token"] == lease.me["token"]
  lease.release()


def test_a_lease_whose_pid_now_runs_another_process_is_taken_over(tmp_path, caplog):
  """After a crash the holder's pid may be reused: the start time recorded beside the pid
  tells the new process from the holder (a pid alone would block the workdir for good)."""
  other = subprocess.Popen(["sleep", "60"])  # Alive, on this host, with a fresh heartbeat.
  try:
    start_of = run_dir._process_start  # pylint: disable=protected-access
    start = start_of(other.pid)
    assert start and start.split(":")[0]  # "BOOT_ID:TICKS"
    holder = {"host": socket.gethostname(), "pid": other.pid, "token": "x",
              "heartbeat": time.time()}
    (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps({**holder, "pid_start": start}))
    with pytest.raises(run_dir.WorkdirLockedError, match=rf"pid {other.pid}, last heartbeat"):
      run_dir.Lease(tmp_path, timeout_s=30.0).acquire()  # The holder itself: refused.
    reused = {**holder, "pid_start": start.replace(":", ":1")}  # Another start, same pid.
    (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps(reused))
    lease = run_dir.Lease(tmp_path, timeout_s=30.0)
    with caplog.at_level(logging.WARNING):
      lease.acquire()
    assert "Taking over the lease" in caplog.text
    assert f"pid {other.pid} now belongs to a process started later" in caplog.text
    mine = _lock(tmp_path)
    assert mine["token"] == lease.me["token"]
    assert mine["pid_start"] == start_of(os.getpid())
    lease.release()
  finally:
    other.kill()
    other.wait()


def test_a_lease_without_heartbeat_is_taken_over_with_a_warning(tmp_path, caplog):
  (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "token": "x", "heartbeat": time.time() - 10}))
  lease = run_dir.Lease(tmp_path, timeout_s=5.0)
  with caplog.at_level(logging.WARNING):
    lease.acquire()
  assert "Taking over the lease" in caplog.text and "no heartbeat for more than 5 s" in caplog.text
  assert _lock(tmp_path)["token"] == lease.me["token"]
  lease.release()


def test_a_holder_whose_lease_was_taken_over_stops(tmp_path):
  lease = run_dir.Lease(tmp_path, timeout_s=0.4)
  lease.acquire()
  (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "token": "other", "heartbeat": time.time()}))
  time.sleep(0.3)
  with pytest.raises(run_dir.WorkdirLockedError, match="was taken over by host elsewhere, pid 1"):
    lease.check()
  lease.release()
  assert _lock(tmp_path)["token"] == "other"  # Not ours: left alone.


def test_lsm2_load_falls_back_from_an_unreadable_newest_step_like_training(finished, tmp_path,
                                                                           caplog):
  """lsm2.load (and evaluation's init_from, which restores through it) skip an unreadable
  newest checkpoint with the same warning as training, but leave every file as it was."""
  workdir = _copy(finished, tmp_path)
  shutil.rmtree(workdir / pretrained.EXPORT_DIR)
  for f in (workdir / "checkpoints" / "4" / pretrained.STATE).rglob("*"):
    if f.is_file() and f.parent.name == "d":  # OCDBT array data: torn in half.
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  before = _snapshot(workdir)
  with caplog.at_level(logging.WARNING):
    model = lsm2.load(workdir)
  assert model.step == 2
  assert "CHECKPOINT UNREADABLE: step 4" in caplog.text
  want = lsm2.load(finished, step=2)
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(want.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _snapshot(workdir) == before
  assert lsm2.load(finished).step == 4  # The export: its run's total_steps.
