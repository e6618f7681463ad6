"""Steps/s and tokens/s of the full jitted train step (masks + forward + backward + AdamW).

Runs the exact training code (lsm2.train.train: sharded state, donated jit,
AIM masks per step) on synthetic wearable days at the paper geometry
(1440 x 26, 10-minute patches: 3,744 tokens), for each model size on 1 device
and on 8 fake CPU devices (a data-parallel mesh, in a subprocess since the
device count is fixed at JAX start-up). Prints the model FLOPs per step and,
with --peak_tflops, the model FLOPs utilisation.

With --loop (default runlocal: the tiny,aim,runlocal config the README trains), the
1-device run also times the training loop's instrumentation (lsm2/train/throughput.py:
the timers, the per-step end_step (a queue put; its timing thread times the step and
checks it for slowness), the per-interval report and the goodput.json write) against the same loop without it: in
one process, instrumented and plain repeats interleaved, medians of each, and the MFU
the instrumented loop logs (on CPU: of the measured matmul peak).

  python benchmarks/train_step.py --json /tmp/train_step.json           # CPU: tiny and S
  python benchmarks/train_step.py --sizes S --batch_S 64 --dtype bfloat16 \
      --attention cudnn --devices 1 --peak_tflops 989                    # one H100
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _configure(args, size: str, batch: int, extra: str = ""):
  import pathlib  # pylint: disable=g-import-not-at-top
  from lsm2 import config_files  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain.py"
  config = config_files.load_config(path, f"{size},aim{extra}")
  with config.unlocked():
    config.batch_size = batch
    config.total_steps = 1000
    config.model.dtype = args.dtype
    config.model.matmul_dtype = args.matmul_dtype
    config.model.attention = args.attention
    config.model.remat = args.remat
    config.masking.encoder_buckets = args.buckets
    config.masking.pack_encoder = args.pack
  return config


def _day_batch(batch: int, seed: int = 0):
  """Realistic incomplete days from the synthetic generator, roughly z-scored."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lsm2.data import synthetic  # pylint: disable=g-import-not-at-top
  days = []
  subject = 0
  while len(days) < batch:
    days += synthetic.generate_subject(seed, subject, 2)[1]
    subject += 1
  signals = np.stack([d.signals for d in days[:batch]]).astype(np.float32)
  observed = np.stack([d.observed for d in days[:batch]])
  mean = np.nanmean(np.where(observed, signals, np.nan), axis=(0, 1))
  std = np.nanstd(np.where(observed, signals, np.nan), axis=(0, 1)) + 1e-3
  z = np.clip((signals - np.nan_to_num(mean)) / np.nan_to_num(std, nan=1.0), -5, 5)
  return {"signals": np.where(observed, z, 0).astype(np.float32), "observed": observed}


def measure(args, size: str, batch: int) -> dict:
  """Median seconds per train step of one size on this process's devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from lsm2.data import pipeline  # pylint: disable=g-import-not-at-top
  from lsm2.model import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from lsm2 import sharding  # pylint: disable=g-import-not-at-top
  from lsm2.train import encoder_layout, train  # pylint: disable=g-import-not-at-top

  batch = -(-batch // jax.device_count()) * jax.device_count()  # A multiple of the devices.
  config = _configure(args, size, batch)
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  train.validate_config(config, model_cfg, mask_cfg, mesh)
  setup = train.make_setup(config, model_cfg, mask_cfg, mesh)
  state = train.create_state(setup)
  n_keep = model_cfg.num_tokens - mask_cfg.n_drop
  train_step = train.make_train_step(setup, mask_cfg.strategy_names)
  layout = encoder_layout.make_mask_layout(config, train.make_mask_fn(setup), model_cfg, mask_cfg,
                                           mesh)
  batch_arrays = pipeline.to_global_batch(_day_batch(batch), setup.batch_sharding)
  times = []
  with sharding.mesh_context(mesh, config.logical_axis_rules):
    # A step that compiles (the first, or the first of a new encoder bucket: masks change
    # every step) is not timed; at most 3x the steps are run to collect enough.
    for _ in range(3 * (args.steps + 1)):
      compiled = train_step._cache_size()
      start = time.perf_counter()
      masks = layout.draw(state["rng"], state["step"], batch_arrays["observed"])
      state, out = train_step(state, batch_arrays, masks)
      jax.block_until_ready(out["loss"])
      if train_step._cache_size() == compiled:
        times.append(time.perf_counter() - start)
      if len(times) == args.steps:
        break
  if not times:
    sys.exit(f"every step of {size} compiled a new encoder bucket: raise --steps")
  step_s = statistics.median(times)
  flops = flops_lib.step_flops(model_cfg, n_keep, batch)
  result = {
      f"steps_per_s_{size}": 1.0 / step_s,
      f"tokens_per_s_{size}": batch * model_cfg.num_tokens / step_s,
      f"flops_per_step_{size}": flops,
      f"batch_{size}": batch,
      f"devices_{size}": jax.device_count(),
  }
  if args.peak_tflops:
    result[f"mfu_{size}"] = flops / step_s / (args.peak_tflops * 1e12 * jax.device_count())
  return result


def measure_loop(args) -> dict:
  """Seconds per step of the training loop with and without its instrumentation, and the
  MFU it logs (module docstring); interleaved repeats, medians."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from lsm2.data import pipeline  # pylint: disable=g-import-not-at-top
  from lsm2 import sharding  # pylint: disable=g-import-not-at-top
  from lsm2.train import encoder_layout, run_dir, throughput, train  # pylint: disable=g-import-not-at-top

  config = _configure(args, "tiny", 8, extra=",runlocal")
  log_every = config.log_every
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  setup = train.make_setup(config, model_cfg, mask_cfg, mesh)
  state = train.create_state(setup)
  train_step = train.make_train_step(setup, mask_cfg.strategy_names)
  layout = encoder_layout.make_mask_layout(config, train.make_mask_fn(setup), model_cfg, mask_cfg,
                                           mesh)
  local = _day_batch(config.batch_size)
  batch = pipeline.to_global_batch(local, setup.batch_sharding)
  masks = layout.draw(state["rng"], state["step"], batch["observed"])
  compiled = train_step.lower(state, batch, masks).compile()
  perf = throughput.Throughput.for_run(compiled, model_cfg, mask_cfg, config.batch_size,
                                       mesh.devices.flat)
  workdir = epath.Path(tempfile.mkdtemp())
  started = time.time()

  def run(state, step0: int, instrumented: bool):
    """args.loop_steps steps of the loop's body; returns the state and seconds per step."""
    t = time.perf_counter()
    flags = []
    if instrumented:  # Compiled by the warm-up: no step of a repeat is waited for as one.
      perf.start_loop(step0, compiles=False)
    for step in range(step0 + 1, step0 + args.loop_steps + 1):
      if instrumented:
        with perf.waiting_for_input():
          b = pipeline.to_global_batch(local, setup.batch_sharding)
      else:
        b = pipeline.to_global_batch(local, setup.batch_sharding)
      m = layout.draw(state["rng"], state["step"], b["observed"])
      state, out = train_step(state, b, m)
      flags.append(out["finite"])
      if step % log_every == 0:  # The loop reads the flags here, instrumented or not.
        jax.device_get(flags)
        flags = []
        if instrumented:
          scalars.append(perf.report(step))
          run_dir.write_goodput(workdir, throughput.goodput_summary([throughput.attempt_entry(
              perf, started=started, start_step=0, last_step=step, status="running")]))
      if instrumented:
        with perf.checkpointing():
          pass
        perf.end_step(step, out["finite"])
    jax.block_until_ready(state)
    return state, (time.perf_counter() - t) / args.loop_steps

  scalars, times = [], {True: [], False: []}
  with sharding.mesh_context(mesh, config.logical_axis_rules):
    state, _ = run(state, 0, False)  # Warm: every function compiled, caches filled.
    step = args.loop_steps
    for repeat in range(args.loop_repeats):  # Each goes first in every other pair: no order bias.
      for instrumented in ((False, True) if repeat % 2 == 0 else (True, False)):
        state, per_step = run(state, step, instrumented)
        times[instrumented].append(per_step)
        step += args.loop_steps
  # The instrumentation's own host time, apart from the load's noise: its per-step calls
  # on a finished step (nothing to wait for), and the per-interval report and goodput write.
  ready = jax.device_put(True)
  bookkeeping = throughput.Throughput(perf.flops, perf.peak_flops, perf.peak_label,
                                      config.batch_size, 1, 1, mesh.devices.flat,
                                      slow_step_factor=1e9)
  bookkeeping.start_loop(0, compiles=False)
  n = 2000
  t = time.perf_counter()
  for step in range(1, n + 1):
    with bookkeeping.waiting_for_input():
      pass
    with bookkeeping.checkpointing():
      pass
    bookkeeping.end_step(step, ready)
  bookkeeping.sync()  # The timing thread's work is the instrumentation's too.
  per_step = (time.perf_counter() - t) / n
  t = time.perf_counter()
  for step in range(n + 1, n + 51):
    bookkeeping.report(step)
    run_dir.write_goodput(workdir, throughput.goodput_summary([throughput.attempt_entry(
        bookkeeping, started=started, start_step=0, last_step=step, status="running")]))
  per_interval = (time.perf_counter() - t) / 50
  host_s = per_step + per_interval / log_every

  plain, instrumented = statistics.median(times[False]), statistics.median(times[True])
  # Each instrumented repeat against the plain one just before it: robust to a drifting load.
  paired = statistics.median(i / p - 1.0 for p, i in zip(times[False], times[True]))
  return {
      "loop_config": "tiny,aim,runlocal",
      "loop_batch": config.batch_size,
      "loop_step_s_plain": plain,
      "loop_step_s_instrumented": instrumented,
      "loop_instrumentation_overhead": instrumented / plain - 1.0,
      "loop_instrumentation_overhead_paired": paired,
      "loop_instrumentation_host_s_per_step": host_s,
      "loop_instrumentation_host_fraction": host_s / plain,
      "loop_step_s_plain_repeats": times[False],
      "loop_step_s_instrumented_repeats": times[True],
      "loop_repeats": args.loop_repeats,
      "loop_steps_per_repeat": args.loop_steps,
      "loop_mfu_logged": statistics.median(s["perf/mfu"] for s in scalars),
      "loop_mfu_peak": perf.peak_label,
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default="tiny,S")
  ap.add_argument("--batch_tiny", type=int, default=8)
  ap.add_argument("--batch_S", type=int, default=1)
  ap.add_argument("--batch_B", type=int, default=1)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--devices", default="1,8", help="device counts to run (fake CPU devices)")
  ap.add_argument("--dtype", default="auto", help="compute dtype; auto: bfloat16 on TPU/GPU, float32 on CPU")
  ap.add_argument("--matmul_dtype", default="float32",
                  help="operand dtype of the dense and blocked-attention products")
  ap.add_argument("--attention", default="auto")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--buckets", type=int, default=0)
  ap.add_argument("--pack", action="store_true",
                  help="packed encoder (config.masking.pack_encoder; needs --buckets)")
  ap.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak, for MFU")
  ap.add_argument("--loop", default="runlocal", choices=("runlocal", ""),
                  help="time the loop's instrumentation at the runlocal size ('' skips it)")
  ap.add_argument("--loop_steps", type=int, default=20, help="steps per loop repeat")
  ap.add_argument("--loop_repeats", type=int, default=7)
  ap.add_argument("--json", default=None)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  sizes = [size for size in args.sizes.split(",") if size]  # "": the loop comparison only.

  if args.child:  # One device count, in this process.
    out = {}
    for size in sizes:
      batch = getattr(args, f"batch_{size}")
      out.update(measure(args, size, batch))
    import jax  # pylint: disable=g-import-not-at-top
    if args.loop and jax.device_count() == 1:
      out.update(measure_loop(args))
    print(json.dumps(out))
    return

  results = {}
  for devices in (int(d) for d in args.devices.split(",")):
    env = dict(os.environ)
    if devices > 1:  # Fake CPU devices; on an accelerator pass --devices with the real count.
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    passed = {k: v for k, v in vars(args).items() if k not in ("json", "child")}
    cmd = [sys.executable, __file__, "--child",
           *(f"--{k}" if v is True else f"--{k}={v}" for k, v in passed.items() if v is not False)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      sys.exit(f"benchmark child ({devices} devices) failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    for size in sizes:
      b = child[f"batch_{size}"]
      line = (f"{size:>4} x{devices} devices  batch {b:3d}: {child[f'steps_per_s_{size}']:.3f} steps/s  "
              f"{child[f'tokens_per_s_{size}']:,.0f} tokens/s  "
              f"{child[f'flops_per_step_{size}'] / 1e9:,.1f} GFLOP/step  "
              f"{child[f'flops_per_step_{size}'] * child[f'steps_per_s_{size}'] / 1e9:,.1f} GFLOP/s")
      if f"mfu_{size}" in child:
        line += f"  MFU {100 * child[f'mfu_{size}']:.1f}%"
      print(line, flush=True)
    if "loop_step_s_plain" in child:
      print(f"loop ({child['loop_config']}, batch {child['loop_batch']}): "
            f"{child['loop_step_s_plain'] * 1e3:.2f} ms/step plain, "
            f"{child['loop_step_s_instrumented'] * 1e3:.2f} ms/step instrumented "
            f"({100 * child['loop_instrumentation_overhead']:+.2f}%, repeat by repeat "
            f"{100 * child['loop_instrumentation_overhead_paired']:+.2f}%; medians of "
            f"{child['loop_repeats']} interleaved repeats of {child['loop_steps_per_repeat']} "
            f"steps); its own host time {child['loop_instrumentation_host_s_per_step'] * 1e6:.0f} "
            f"us/step ({100 * child['loop_instrumentation_host_fraction']:.3f}%); logged MFU {100 * child['loop_mfu_logged']:.2f}% {child['loop_mfu_peak']}",
            flush=True)
    suffix = "" if devices == 1 else f"_{devices}dev"
    results.update({k + suffix: v for k, v in child.items()})
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
