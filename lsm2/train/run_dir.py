"""A run directory is owned by one run: its record (run.json) and its writer's lease (lock.json).

  WORKDIR/run.json    the config fields that decide what is trained and the
                      dataset's fingerprint, written when the run starts afresh;
                      a restart with other values is refused before anything is written
  WORKDIR/lock.json   host, pid (and its start time), lease timeout and heartbeat of the process
                      that writes the workdir (process 0 of a job): a second writer is
                      refused while the heartbeat is fresh by the holder's timeout, a
                      stale lease is taken over
  WORKDIR/goodput.json  the history of the run's attempts (each start of it): the step
                      each started from, the last it reached and saved, and where its
                      time went (lsm2.train.throughput.goodput_summary), rewritten by
                      process 0 every log interval and when an attempt ends

All are small JSON files written through etils.epath, to a temporary name and
then renamed, so they work the same on a local disk and on a gs:// bucket.
"""
import json
import logging
import os
import pathlib
import socket
import threading
import time
from typing import Any
import uuid

from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from lsm2 import errors
from lsm2 import storage
from lsm2.model import config as model_config_lib

RUN_FILE = "run.json"
LOCK_FILE = "lock.json"
GOODPUT_FILE = "goodput.json"

# Every field of these config sections decides what is trained (a new field too) ...
RECORDED_SECTIONS = ("model", "masking", "data")
# ... and these top-level ones (the data stream's order, the starting parameters).
RECORDED_FIELDS = ("seed", "batch_size", "init_from")
# Fields of the recorded sections that may change on resume: how the same model
# is computed (exactly, or at another precision on another platform) and where
# the same data is read from (the dataset fingerprint checks it is the same).
# Everything else (total_steps, cadences, keep_checkpoints, profile_*, perf.*, the
# optimizer, the mesh) may change too.
MAY_CHANGE = ("model.dtype", "model.matmul_dtype", "model.attention", "model.remat",
              "masking.encoder_buckets", "masking.pack_encoder", "data.dir", "data.val_split",
              "data.worker_count", "data.synthesize_subjects", "data.synthesize_days")

# Recorded fields added after run.json existed, with the value that means the behaviour
# before them: a run.json without one reads as that value, so run directories written
# before the field still resume. Add a new recorded field here with its old-behaviour value.
ADDED_LATER = {
    # Overrides of the named size's widths (configs/pretrain.py); 0 is the size's own.
    **{f"model.{name}": 0 for name in model_config_lib.SIZE_FIELDS},
    "data.source": "files",  # The training split's files (configs/pretrain.py).
}


class WorkdirMismatchError(errors.Error, ValueError):
  """The workdir belongs to a run with another model, masking or data config."""


class WorkdirLockedError(errors.Error, RuntimeError):
  """Another live process writes this workdir."""


# ----------------------------------------------------------------------------
# run.json: what the run that owns the workdir trains.
# ----------------------------------------------------------------------------
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def run_record(config: ml_collections.ConfigDict, meta) -> dict[str, Any]:
  """The config fields that decide what is trained, and the fingerprint of dataset `meta`."""
  flat = _flatten(config.to_dict())
  fields = {k: v for k, v in flat.items()
            if (k.split(".")[0] in RECORDED_SECTIONS or k in RECORDED_FIELDS)
            and k not in MAY_CHANGE}
  return json.loads(json.dumps({
      "config": fields,
      "dataset": {
          "channels": [c.to_json() for c in meta.channels],
          "norm_mean": np.asarray(meta.norm_mean).tolist(),
          "norm_std": np.asarray(meta.norm_std).tolist(),
          "record_counts": dict(meta.record_counts),
      },
  }))


def _describe(a: Any, b: Any) -> str:
  """`a` (the workdir's) vs `b` (this run's), short enough for one line."""
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and len(a) > 4:
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"differs first at [{i}]: {a[i]!r} in the workdir, {b[i]!r} now"
  return f"{a!r} in the workdir, {b!r} now"


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """One line per field of two run records that differs ("(absent)" when one lacks it).

  A field of ADDED_LATER that a record lacks reads as its old-behaviour value.
  """
  lines = []
  for section, label in (("config", "config."), ("dataset", "dataset ")):
    have, want = recorded.get(section, {}), current.get(section, {})
    if section == "config":
      have, want = {**ADDED_LATER, **have}, {**ADDED_LATER, **want}
    for k in sorted(set(have) | set(want)):
      a, b = have.get(k, "(absent)"), want.get(k, "(absent)")
      if a != b:
        lines.append(f"{label}{k}: {_describe(a, b)}")
  return lines


def check_record(workdir: epath.Path, record: dict[str, Any]) -> bool:
  """Raises WorkdirMismatchError if WORKDIR/run.json records another run; reads only.

  Returns whether the workdir has a record (False: a new workdir, or one from
  before run.json existed, which the run adopts once its checkpoint restored).
  """
  path = workdir / RUN_FILE
  if not path.exists():
    return False
  try:
    recorded = json.loads(path.read_text())
  except ValueError as e:  # Written atomically: only damage or another program truncates it.
    raise WorkdirMismatchError(
        f"{path} is not valid JSON ({e}): the record of the run that owns {workdir} is "
        "damaged. Nothing was written. If the workdir is this run's, delete "
        f"{path} (the run records it again once its checkpoint restores); else pass a new "
        "--workdir.") from None
  if not isinstance(recorded, dict):
    raise WorkdirMismatchError(f"{path} is not a run record (a JSON object); delete it if "
                               f"{workdir} is this run's, else pass a new --workdir.")
  diff = differences(recorded, record)
  if diff:
    raise WorkdirMismatchError(
        f"{workdir} belongs to another run: {path} records a different model, masking or data "
        "config than this one:\n  " + "\n  ".join(diff) + "\nNothing was written. To start a "
        "fresh run, pass a new --workdir. To fine-tune that run's parameters with these "
        f"settings, pass a new --workdir and --config.init_from={workdir}.")
  return True


def write_record(workdir: epath.Path, record: dict[str, Any]) -> None:
  """Writes WORKDIR/run.json (process 0 only)."""
  if jax.process_index() == 0:
    storage.write_text_atomic(workdir / RUN_FILE, json.dumps(record, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------
# goodput.json: the run's attempts.
# ----------------------------------------------------------------------------
def read_attempts(workdir: epath.Path) -> list[dict[str, Any]]:
  """The attempts WORKDIR/goodput.json records ([] if none). The file is a report, not
  the run's state: an unreadable one is replaced with a warning, never a reason to stop."""
  path = workdir / GOODPUT_FILE
  try:
    attempts = json.loads(path.read_text())["attempts"]
    if not isinstance(attempts, list):
      raise ValueError("'attempts' is not a list")
    for a in attempts:
      for key in ("start_step", "last_step", "wall_s", "step_s", "measured_steps"):
        if not isinstance(a[key], (int, float)):
          raise ValueError(f"attempt field {key!r} is not a number")
    return attempts
  except FileNotFoundError:
    return []
  except (ValueError, KeyError, TypeError) as e:
    logging.warning("%s is not a goodput history (%s: %s): starting a new one; the earlier "
                    "attempts are not counted.", path, type(e).__name__, e)
    return []


def write_goodput(workdir: epath.Path, summary: dict[str, Any]) -> None:
  """Writes WORKDIR/goodput.json atomically (process 0 only)."""
  if jax.process_index() == 0:
    storage.write_text_atomic(workdir / GOODPUT_FILE, json.dumps(summary, indent=1))


# ----------------------------------------------------------------------------
# lock.json: the lease of the one process that writes the workdir.
# ----------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
  """When process `pid` of this host started, as "BOOT_ID:TICKS" (Linux), or None.

  With the pid alone, a pid that a new process got after the holder crashed (or
  after a reboot) would look like the holder, alive, and its lease would never
  be taken over. TICKS is field 22 of /proc/PID/stat (start time since boot).
  """
  try:
    boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return f"{boot}:{stat.rpartition(')')[2].split()[19]}"  # Fields after "(comm)" start at 3.


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


class Lease:
  """The right to write a workdir, held by process 0 as WORKDIR/lock.json.

  The file holds host, pid, the pid's start time, a token, the holder's
  `timeout_s` and a heartbeat (time.time() of the last renewal), renewed every
  `timeout_s / 4` by a background thread. acquire() takes a missing or stale
  lease (no renewal for the holder's recorded timeout, not the taker's own: a
  taker started with a shorter one would otherwise take a live lease between two
  renewals; or a pid on this host that is gone or, by its start time, now
  another process's) - the latter with a warning - and refuses a live one with
  WorkdirLockedError: at once when its pid runs on this host, else once a
  renewal shows its holder is alive (so a job restarted on a new host after a
  crash waits up to `timeout_s` instead of failing). A holder that finds the
  file taken over sets `lost`; check() then stops the run before it writes.
  Other processes of a multi-process job hold nothing and wait for process 0's
  verdict.
  """

  def __init__(self, workdir: str | os.PathLike, *, timeout_s: float, poll_s: float = 1.0):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.timeout_s = timeout_s
    self.heartbeat_s = timeout_s / 4
    self.poll_s = min(poll_s, self.heartbeat_s)
    self.me = {"host": socket.gethostname(), "pid": os.getpid(),
               "pid_start": _process_start(os.getpid()), "token": uuid.uuid4().hex}
    self.lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # --- Reading and writing the file ------------------------------------------------
  def _read(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:  # Written atomically, so only a foreign file can be unreadable.
      logging.warning("Unreadable lease file %s: taking it over.", self.path)
      return None

  def _write(self) -> None:
    storage.write_text_atomic(self.path, json.dumps(
        {**self.me, "timeout_s": self.timeout_s, "heartbeat": time.time()}))

  def _timeout_of(self, lock: dict[str, Any]) -> float:
    """The holder's lease timeout, as it recorded it; this process's own for a lease file
    from before the timeout was recorded."""
    timeout = lock.get("timeout_s")
    ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
    return float(timeout) if ok else self.timeout_s

  def _holder(self, lock: dict[str, Any]) -> str:
    age = time.time() - lock.get("heartbeat", 0)
    return (f"host {lock.get('host')}, pid {lock.get('pid')}, last heartbeat {age:.0f} s ago "
            f"(lease file {self.path})")

  def _stale(self, lock: dict[str, Any]) -> str | None:
    """Why `lock` is stale, or None while its holder may be alive."""
    timeout = self._timeout_of(lock)
    if time.time() - lock.get("heartbeat", 0) > timeout:
      return f"no heartbeat for more than {timeout:g} s (its config.lease_timeout_s)"
    if lock.get("host") == self.me["host"]:
      pid = int(lock.get("pid", -1))
      if not _pid_alive(pid):
        return "its process is gone"
      start = _process_start(pid)
      if lock.get("pid_start") and start and lock["pid_start"] != start:
        return f"its process is gone (pid {pid} now belongs to a process started later)"
    if lock.get("host") == self.me["host"] and lock.get("pid") == self.me["pid"]:
      return "left by an earlier run in this process"
    return None

  # --- Acquiring, renewing, releasing -------------------------------------------------
  def acquire(self) -> None:
    """Takes the lease (process 0) or raises WorkdirLockedError; every process agrees."""
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except WorkdirLockedError as e:
        error = e
    if jax.process_count() > 1:
      ok = multihost_utils.process_allgather(np.array(error is None))
      if not np.all(ok) and error is None:
        raise WorkdirLockedError(f"process 0 could not take the lease of {self.path.parent} "
                                 "(its log says why)")
    if error is not None:
      raise error

  def _acquire(self) -> None:
    lock = self._read()
    if lock is not None:
      first = lock
      while (reason := self._stale(lock)) is None:
        if lock.get("host") == self.me["host"] or lock.get("heartbeat") != first.get("heartbeat"):
          raise self._refusal(lock)  # A live pid here, or a renewal seen: alive.
        time.sleep(self.poll_s)
        lock = self._read()
        if lock is None:
          break
      if lock is not None:
        logging.warning("Taking over the lease of %s from %s: %s.", self.path.parent,
                        self._holder(lock), reason)
    self._write()
    time.sleep(min(0.5, self.poll_s))  # Two starts that wrote at once: the last rename wins.
    lock = self._read()
    if lock is None or lock.get("token") != self.me["token"]:
      raise self._refusal(lock or {})
    self._thread = threading.Thread(target=self._renew, name="lsm2-lease", daemon=True)
    self._thread.start()

  def _refusal(self, lock: dict[str, Any]) -> WorkdirLockedError:
    return WorkdirLockedError(
        f"{self.path.parent} is being written by another process: {self._holder(lock)}. Two "
        "runs must not write one workdir. Wait for it to finish or stop it, or use another "
        f"--workdir. If it is gone, its lease is taken over after {self._timeout_of(lock):g} s "
        f"without a heartbeat (its config.lease_timeout_s), or delete {self.path}.")

  def _renew(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        lock = self._read()
        if lock is None or lock.get("token") != self.me["token"]:
          self.lost = (f"the lease of {self.path.parent} was taken over by "
                       f"{self._holder(lock) if lock else 'nobody (the file is gone)'}")
          logging.error("%s: stopping before the next write.", self.lost)
          return
        self._write()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not renew the lease %s (%s: %s); retrying.", self.path,
                        type(e).__name__, e)

  def check(self) -> None:
    """Raises WorkdirLockedError if another process has taken the lease over."""
    if self.lost:
      raise WorkdirLockedError(f"{self.lost}; this run stops without writing anything more.")

  def release(self) -> None:
    """Stops renewing and deletes the lease file if it is still this process's (also when
    acquire() was interrupted after writing it, before renewing began)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    lock = self._read()
    if lock is not None and lock.get("token") == self.me["token"]:
      self.path.unlink()
