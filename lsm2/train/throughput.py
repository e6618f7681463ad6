"""What a running job does with its devices, per log interval: throughput, MFU, where the
time goes, and memory. Written as `perf/...` scalars (TensorBoard) and summarised in the
training log line.

FLOPs. Two counts of one train step, both of all devices together and both as
`lsm2.aot` reports them:
  * `perf/flops_per_step`: what the compiled step executes, from XLA's cost analysis
    of the pre-flight's compilation (its largest encoder layout), plus the splash
    attention kernels' FLOPs, which XLA cannot see (lsm2.model.flops.splash_flops).
    It counts everything XLA runs: rematerialisation, the optimizer, norms.
  * `perf/model_flops_per_step`: the model's own matmuls and attention for the
    fixed split of kept tokens (lsm2.model.flops.step_flops; backward = 2 x forward),
    with no rematerialisation. MFU and `perf/model_tflops_per_device` use this one,
    so a faster kernel or less recomputation raises MFU and padding does not.
MFU is the model FLOPs per second over the devices' peak: the bf16 dense peak of the
chip (lsm2/chips.py) on TPU and GPU; on CPU, where no table applies, the host's float32
matmul rate measured once at start-up (`measure_cpu_peak`), which the log line says.

Time. The loop itself never waits for a step to time it: a `block_until_ready` per
step in the loop would stop the host from dispatching ahead. A background thread
(`end_step` hands it each step's output) waits for the steps in order and stamps when
each finished; a step's time is the gap between its finish and the previous one's, less
the checkpoint, validation and profiler time the host spent in between, so a data stall
that starved the device is a slow step. The loop's host work is then that of the plain
loop plus a queue put per step. The interval ends where the loop already reads
the step's finiteness flags from the device (the host waits there for the last step
to finish), and the interval's wall time is split into what the host measured itself:
blocked on the input iterator (`waiting_for_input`), saving checkpoints
(`checkpointing`, the blocking part of an async save), validating (`evaluating`); the
rest is the step (`perf/step_s`, per step: dispatch, mask draw, and the device time
the host waited for). Input wait that the device overlaps with a step is not lost
time, so a high `perf/input_wait_fraction` means the device was starved.
"""
import collections
import contextlib
import dataclasses
import logging
import os
import queue
import resource
import statistics
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp

from lsm2 import chips
from lsm2.model import flops as flops_lib

GiB = 2**30
OVERLAP_STEPS = 2  # A slow step this close after a save or validation overlapped it.
WINDOW = 100  # Steps in the running median of step times.
MIN_SAMPLES = 3  # Steps measured before any is judged slow.


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one train step on all devices (module docstring)."""
  compiled: float
  model: float


def step_flops(compiled: jax.stages.Compiled, model_cfg, n_keep: int, batch_size: int,
               num_devices: int) -> StepFlops:
  """The two FLOP counts of a train step, as `lsm2.aot` computes them."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  per_device = float((cost or {}).get("flops", 0.0))  # The compiled module is one device's.
  if model_cfg.attention == "splash":
    per_device += flops_lib.splash_flops(model_cfg, n_keep, batch_size) / num_devices
  return StepFlops(per_device * num_devices, flops_lib.step_flops(model_cfg, n_keep, batch_size))


def measure_cpu_peak(n: int = 1024, repeats: int = 5, budget_s: float = 1.0) -> float:
  """The host's float32 matmul rate (FLOP/s): the best of a few jitted n x n products,
  within about `budget_s`."""
  x = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(x, x).block_until_ready()  # Compiles.
  best, start = float("inf"), time.perf_counter()
  for _ in range(repeats):
    t = time.perf_counter()
    matmul(x, x).block_until_ready()
    best = min(best, time.perf_counter() - t)
    if time.perf_counter() - start > budget_s:
      break
  return 2.0 * n**3 / best


def devices_peak(devices) -> tuple[float | None, str]:
  """Peak FLOP/s of `devices` together, and what the figure is (for the log line)."""
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    # CPU devices of one process share its host's cores: one measured peak per host.
    per_host = measure_cpu_peak()
    hosts = len({d.process_index for d in devices})
    return per_host * hosts, f"of a measured CPU peak, {per_host / 1e9:.1f} GFLOP/s per host"
  spec = chips.CHIPS.get(kind)
  if spec is None:
    logging.warning("No peak FLOP/s known for device kind %r (lsm2/chips.py): MFU not "
                    "reported.", kind)
    return None, f"no peak known for {kind}"
  return spec.peak_bf16_flops * len(devices), f"of the {spec.name} bf16 peak"


def host_rss_bytes() -> int:
  """This process's resident memory now (Linux /proc), else its peak (getrusage)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, IndexError, ValueError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Bytes on macOS, KiB elsewhere.


def device_memory_bytes(devices) -> tuple[int, int] | None:
  """(in use, peak) bytes of the fullest local device, where the backend reports them
  (TPU, GPU; not CPU)."""
  stats = [s for s in (d.memory_stats() for d in devices) if s and "bytes_in_use" in s]
  if not stats:
    return None
  return (max(s["bytes_in_use"] for s in stats),
          max(s.get("peak_bytes_in_use", s["bytes_in_use"]) for s in stats))


class Throughput:
  """The loop's bookkeeping: three timers it wraps around its parts, `end_step` after
  each iteration, and `report` at a log step, right after the host has read the step's
  flags (module docstring)."""

  def __init__(self, flops: StepFlops, peak_flops: float | None, peak_label: str,
               batch_size: int, tokens: int, visible_tokens: int, devices, *,
               slow_step_factor: float = 3.0, slow_step_warmup: int = 5):
    self.flops, self.peak_flops, self.peak_label = flops, peak_flops, peak_label
    self.batch_size, self.tokens, self.visible_tokens = batch_size, tokens, visible_tokens
    self.devices = list(devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.slow_step_factor, self.slow_step_warmup = slow_step_factor, slow_step_warmup
    # This attempt's totals: the timers' seconds, compilation, the measured steps.
    self.totals = {"input": 0.0, "checkpoint": 0.0, "eval": 0.0, "profile": 0.0}
    self.compile_s = self.step_s = 0.0
    self.measured_steps = 0
    self.slow_steps: list[int] = []
    self.last_saved: int | None = None
    self._last_save = self._last_eval = -OVERLAP_STEPS - 1
    self._times = collections.deque(maxlen=WINDOW)
    self._pending: queue.Queue | None = None  # Steps for the timing thread (end_step).
    self.start(0)

  @classmethod
  def for_run(cls, compiled: jax.stages.Compiled, model_cfg, mask_cfg, batch_size: int,
              devices, **kwargs) -> "Throughput":
    """From the pre-flight's compiled step; on CPU this measures the host's peak (< 1 s)."""
    devices = list(devices)
    n_keep = model_cfg.num_tokens - mask_cfg.n_drop
    flops = step_flops(compiled, model_cfg, n_keep, batch_size, len(devices))
    peak, label = devices_peak(devices)
    return cls(flops, peak, label, batch_size, model_cfg.num_tokens, n_keep, devices, **kwargs)

  def start(self, step: int) -> None:
    """Opens an interval after `step`."""
    self._t0, self._step0 = time.perf_counter(), step
    self._mark = dict(self.totals)

  def start_loop(self, step: int, *, compiles: bool = True) -> None:
    """The loop starts after `step`: its first iteration is the attempt's compile step
    (`compiles` False: benchmarks/train_step.py's repeats of a compiled loop)."""
    self.sync()
    self.start(step)
    self._first_step = step + 1 if compiles else -1
    self._finished_at, self._step_mark = self._t0, dict(self.totals)
    if self._pending is None:
      self._pending = queue.Queue()
      threading.Thread(target=self._time_steps, name="lsm2-step-timer", daemon=True).start()

  def sync(self) -> None:
    """Waits until the timing thread has recorded every step handed to it (at a log step
    they have all finished, so this is immediate)."""
    if self._pending is not None:
      self._pending.join()

  @contextlib.contextmanager
  def _timed(self, key: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.totals[key] += time.perf_counter() - t

  def waiting_for_input(self):
    return self._timed("input")

  def checkpointing(self):
    return self._timed("checkpoint")

  def evaluating(self, step: int):
    self._last_eval = step
    return self._timed("eval")

  def profiling(self):
    """Starting or stopping a trace (StepTrace): neither the step's time nor training's."""
    return self._timed("profile")

  def saved(self, step: int) -> None:
    """A checkpoint of `step` was started (its async write may still run)."""
    self.last_saved = self._last_save = step

  def end_step(self, step: int, done: jax.Array) -> None:
    """Ends iteration `step`; `done` is an output of its train step (ready when the step
    has finished). The compile step is waited for here, once; every later step goes to
    the timing thread, which times it and logs it if slow (module docstring)."""
    delta = {k: v - self._step_mark[k] for k, v in self.totals.items()}
    self._step_mark = dict(self.totals)
    if step == self._first_step:  # Its time is compilation's.
      jax.block_until_ready(done)
      now = time.perf_counter()
      self.compile_s += self._step_time(now, delta) - delta["input"]
      self._finished_at = now
      return
    self._pending.put((step, done, delta))

  def _step_time(self, finished: float, delta: dict[str, float]) -> float:
    """Since the previous step finished, less what the host did apart from training
    (the input wait stays in: a stall is a slow step)."""
    return finished - self._finished_at - delta["checkpoint"] - delta["eval"] - delta["profile"]

  def _time_steps(self) -> None:
    """The timing thread: waits for each handed step in order and records it."""
    while True:
      step, done, delta = self._pending.get()
      try:
        jax.block_until_ready(done)
      except Exception:  # pylint: disable=broad-except
        pass  # A failed step: the loop reads the same flags and raises there.
      finished = time.perf_counter()
      try:
        self._record(step, self._step_time(finished, delta), delta["input"])
      finally:
        self._finished_at = finished
        self._pending.task_done()

  def _record(self, step: int, step_s: float, input_s: float) -> None:
    """Adds a measured step to the totals; logs it if slow against the running median."""
    self.step_s += step_s - input_s
    self.measured_steps += 1
    if step < self._first_step + self.slow_step_warmup:  # Later compiles, caches warming.
      return
    if len(self._times) >= MIN_SAMPLES:
      median = statistics.median(self._times)
      if step_s > self.slow_step_factor * median:
        self.slow_steps.append(step)
        logging.warning("Slow step %d: %.3f s, %.1fx the running median %.3f s; it "
                        "overlapped %s.", step, step_s, step_s / median, median,
                        self._overlap(step, step_s, input_s))
    self._times.append(step_s)

  def _overlap(self, step: int, step_s: float, input_s: float) -> str:
    """What a slow step overlapped, the likeliest cause first."""
    if input_s > step_s / 2:
      return f"an input stall ({input_s:.3f} s waiting for the batch)"
    if step - self._last_save <= OVERLAP_STEPS:
      return f"a checkpoint save (the async write of step {self._last_save})"
    if step - self._last_eval <= OVERLAP_STEPS:
      return f"a validation (at step {self._last_eval})"
    return ("no input stall, save or validation: the step itself (compute, or a slow "
            "host or device that the others waited for)")

  def report(self, step: int) -> dict[str, float]:
    """The `perf/` scalars of the interval that ends at `step`, and opens the next.

    Rates are per second of training: the interval's wall time less validation,
    checkpoint saves and profiler start/stop (input waits count, they are the training's).
    """
    self.sync()
    wall = time.perf_counter() - self._t0
    steps = max(step - self._step0, 1)
    interval = {k: v - self._mark[k] for k, v in self.totals.items()}
    input_s, checkpoint_s, eval_s = interval["input"], interval["checkpoint"], interval["eval"]
    train_s = max(wall - eval_s - checkpoint_s - interval["profile"], 1e-9)
    model_flops_per_s = self.flops.model * steps / train_s
    out = {
        "perf/examples_per_s": self.batch_size * steps / train_s,  # One example is one day.
        "perf/tokens_per_s": self.batch_size * self.tokens * steps / train_s,
        "perf/visible_tokens_per_s": self.batch_size * self.visible_tokens * steps / train_s,
        "perf/flops_per_step": self.flops.compiled,
        "perf/model_flops_per_step": self.flops.model,
        "perf/model_tflops_per_device": model_flops_per_s / len(self.devices) / 1e12,
        "perf/compiled_tflops_per_device": (self.flops.compiled * steps / train_s
                                            / len(self.devices) / 1e12),
        "perf/input_wait_s": input_s,
        "perf/input_wait_fraction": input_s / train_s,
        "perf/step_s": max(train_s - input_s, 0.0) / steps,
        "perf/checkpoint_s": checkpoint_s,
        "perf/eval_s": eval_s,
        "perf/host_rss_gib": host_rss_bytes() / GiB,
    }
    if self.peak_flops:
      out["perf/mfu"] = model_flops_per_s / self.peak_flops
    memory = device_memory_bytes(self.local_devices)
    if memory is not None:
      out["perf/device_gib"], out["perf/device_peak_gib"] = memory[0] / GiB, memory[1] / GiB
    self.start(step)
    return out

  def summary(self, scalars: dict[str, float]) -> str:
    """The log line's part: throughput, MFU, where the time went, memory."""
    parts = [f"{scalars['perf/examples_per_s']:.1f} examples (days)/s",
             f"{scalars['perf/tokens_per_s']:.4g} tokens/s "
             f"({scalars['perf/visible_tokens_per_s']:.4g} visible)",
             f"{scalars['perf/model_tflops_per_device']:.4g} model TFLOP/s/device"]
    if "perf/mfu" in scalars:
      parts.append(f"MFU {scalars['perf/mfu']:.2%} {self.peak_label}")
    parts.append(f"step {scalars['perf/step_s'] * 1e3:.1f} ms, input wait "
                 f"{scalars['perf/input_wait_fraction']:.0%}, eval {scalars['perf/eval_s']:.1f} s, "
                 f"checkpoint {scalars['perf/checkpoint_s']:.1f} s")
    memory = f"host {scalars['perf/host_rss_gib']:.2f} GiB"
    if "perf/device_gib" in scalars:
      memory += (f", device {scalars['perf/device_gib']:.2f} GiB "
                 f"(peak {scalars['perf/device_peak_gib']:.2f})")
    parts.append(memory)
    return "  |  ".join(parts)


# ----------------------------------------------------------------------------
# Goodput: where each attempt's wall time went, and the steps restarts repeated.
# ----------------------------------------------------------------------------
# (key in goodput.json, label in the log), in the order the log lists them.
GOODPUT_PARTS = (("productive_s", "productive steps"), ("compile_s", "compilation"),
                 ("input_wait_s", "input wait"), ("checkpoint_s", "checkpointing"),
                 ("eval_s", "validation"), ("restart_lost_s", "repeated after restarts"),
                 ("other_s", "other (start-up, restore, logging, profiling, export)"))


def attempt_entry(perf: Throughput, *, started: float, start_step: int, last_step: int,
                  status: str) -> dict[str, Any]:
  """The measured record of this attempt, as of now (`started`: its time.time() at start).

  `status`: "running" (a record on the way; a later attempt finding it so reads it as
  killed), "finished", "preempted" or "diverged".
  """
  return {"status": status, "started": started, "wall_s": time.time() - started,
          "start_step": start_step, "last_step": last_step, "last_saved": perf.last_saved,
          "step_s": perf.step_s, "measured_steps": perf.measured_steps,
          "compile_s": perf.compile_s, "input_wait_s": perf.totals["input"],
          "checkpoint_s": perf.totals["checkpoint"], "eval_s": perf.totals["eval"],
          "slow_steps": len(perf.slow_steps)}


def goodput_summary(attempts: list[dict[str, Any]]) -> dict[str, Any]:
  """goodput.json's content: every attempt with its parts (seconds and fractions of its
  wall time) and the totals over all attempts. Derived fields are recomputed from the
  measured ones, so a later attempt updates the earlier ones' repeated steps.

  Attempt i repeated nothing if attempt i + 1 started at or after the last step i
  reached; else the steps in between were computed twice, and their time (i's mean
  step time each) moves from i's productive time to `restart_lost_s`. The steps after
  a killed attempt's last record (every log interval) are not known, so not counted.
  """
  out, totals = [], {key: 0.0 for key, _ in GOODPUT_PARTS}
  totals.update(wall_s=0.0, repeated_steps=0)
  for i, a in enumerate(attempts):
    entry = {k: a[k] for k in ("status", "started", "wall_s", "start_step", "last_step",
                               "last_saved", "step_s", "measured_steps", "compile_s",
                               "input_wait_s", "checkpoint_s", "eval_s", "slow_steps")}
    later = attempts[i + 1] if i + 1 < len(attempts) else None
    if later is not None and entry["status"] == "running":
      entry["status"] = "killed"  # It never wrote its end.
    repeated = 0 if later is None else max(0, a["last_step"] - later["start_step"])
    repeated = min(repeated, a["measured_steps"])  # The compile step is compilation's.
    per_step = a["step_s"] / a["measured_steps"] if a["measured_steps"] else 0.0
    entry.update(attempt=i + 1, repeated_steps=repeated, restart_lost_s=repeated * per_step,
                 productive_s=a["step_s"] - repeated * per_step)
    measured = sum(entry[key] for key, _ in GOODPUT_PARTS if key != "other_s")
    entry["other_s"] = entry["wall_s"] - measured
    entry["fractions"] = {key: entry[key] / max(entry["wall_s"], 1e-9)
                          for key, _ in GOODPUT_PARTS}
    for key in (*(k for k, _ in GOODPUT_PARTS), "wall_s", "repeated_steps"):
      totals[key] += entry[key]
    out.append(entry)
  totals["fractions"] = {key: totals[key] / max(totals["wall_s"], 1e-9)
                         for key, _ in GOODPUT_PARTS}
  totals["attempts"] = len(out)
  return {"attempts": out, "totals": totals}


def format_goodput(summary: dict[str, Any]) -> list[str]:
  """The log's two goodput lines: this attempt's parts, then all attempts'."""
  def line(label, part):
    parts = ", ".join(f"{name} {part[key]:.1f} s ({part['fractions'][key]:.1%})"
                      for key, name in GOODPUT_PARTS)
    return f"{label}: wall {part['wall_s']:.1f} s = {parts}"
  this, totals = summary["attempts"][-1], summary["totals"]
  return [
      f"Goodput of attempt {this['attempt']} (steps {this['start_step']}..{this['last_step']}, "
      f"{this['status']}): " + line("", this)[2:],
      f"Goodput of all {totals['attempts']} attempt(s), {totals['repeated_steps']} step(s) "
      "repeated after restarts" + line("", totals)]


# ----------------------------------------------------------------------------
# Profiling: a trace of a chosen window of steps.
# ----------------------------------------------------------------------------
class StepTrace:
  """Traces steps `first` .. `first + count - 1` with jax.profiler into `logdir` (an
  XSpace file per host under logdir/plugins/profile/<time>/, which TensorBoard's
  profile plugin and Perfetto open; a gs:// logdir works). The loop calls it on
  process 0 only: one host's trace shows a pod's step, and every host tracing would
  multiply the files and the cost. Each step carries a StepTraceAnnotation with its
  number. The device is waited for at both ends of the window, so that only the
  window's steps are in the trace (twice per run)."""

  def __init__(self, logdir, first: int, count: int):
    self.logdir, self.first, self.count = str(logdir), first, count
    self.active = False

  def before_step(self, step: int, state) -> None:
    if step == self.first:
      jax.block_until_ready(state)  # The steps before the window stay out of it.
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after_step(self, step: int, state) -> None:
    if self.active and step == self.first + self.count - 1:
      self.stop(state)

  def stop(self, state=None) -> None:
    """Ends the trace (the window's last step, or the loop ended inside the window)."""
    if self.active:
      if state is not None:
        jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Profiled steps %d..%d of process 0 into %s (TensorBoard's profile tab, "
                   "or Perfetto: docs/launching.md).", self.first, self.first + self.count - 1,
                   self.logdir)
