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

Time. The loop never waits for a step (a `block_until_ready` per step would stop the
host from dispatching ahead). Instead the interval ends where the loop already reads
the step's finiteness flags from the device (the host waits there for the last step
to finish), and the interval's wall time is split into what the host measured itself:
blocked on the input iterator (`waiting_for_input`), saving checkpoints
(`checkpointing`, the blocking part of an async save), validating (`evaluating`); the
rest is the step (`perf/step_s`, per step: dispatch, mask draw, and the device time
the host waited for). Input wait that the device overlaps with a step is not lost
time, so a high `perf/input_wait_fraction` means the device was starved.
"""
import contextlib
import dataclasses
import logging
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp

from lsm2 import chips
from lsm2.model import flops as flops_lib

GiB = 2**30


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
  """The loop's bookkeeping: three timers it wraps around its parts, and `report` at a
  log step, right after the host has read the step's flags (module docstring)."""

  def __init__(self, flops: StepFlops, peak_flops: float | None, peak_label: str,
               batch_size: int, tokens: int, visible_tokens: int, devices):
    self.flops, self.peak_flops, self.peak_label = flops, peak_flops, peak_label
    self.batch_size, self.tokens, self.visible_tokens = batch_size, tokens, visible_tokens
    self.devices = list(devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.start(0)

  @classmethod
  def for_run(cls, compiled: jax.stages.Compiled, model_cfg, mask_cfg, batch_size: int,
              devices) -> "Throughput":
    """From the pre-flight's compiled step; on CPU this measures the host's peak (< 1 s)."""
    devices = list(devices)
    n_keep = model_cfg.num_tokens - mask_cfg.n_drop
    flops = step_flops(compiled, model_cfg, n_keep, batch_size, len(devices))
    peak, label = devices_peak(devices)
    return cls(flops, peak, label, batch_size, model_cfg.num_tokens, n_keep, devices)

  def start(self, step: int) -> None:
    """Opens an interval after `step`."""
    self._t0, self._step0 = time.perf_counter(), step
    self._input_s = self._checkpoint_s = self._eval_s = 0.0

  @contextlib.contextmanager
  def _timed(self, field: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      setattr(self, field, getattr(self, field) + time.perf_counter() - t)

  def waiting_for_input(self):
    return self._timed("_input_s")

  def checkpointing(self):
    return self._timed("_checkpoint_s")

  def evaluating(self):
    return self._timed("_eval_s")

  def report(self, step: int) -> dict[str, float]:
    """The `perf/` scalars of the interval that ends at `step`, and opens the next.

    Rates are per second of training: the interval's wall time less validation and
    checkpoint saves (input waits count, they are the training's).
    """
    wall = time.perf_counter() - self._t0
    steps = max(step - self._step0, 1)
    train_s = max(wall - self._eval_s - self._checkpoint_s, 1e-9)
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
        "perf/input_wait_s": self._input_s,
        "perf/input_wait_fraction": self._input_s / train_s,
        "perf/step_s": max(train_s - self._input_s, 0.0) / steps,
        "perf/checkpoint_s": self._checkpoint_s,
        "perf/eval_s": self._eval_s,
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
