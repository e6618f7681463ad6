"""Steps/s and tokens/s of the full jitted train step (masks + forward + backward + AdamW).

Runs the exact training code (lsm2.train.train: sharded state, donated jit,
AIM masks per step) on synthetic wearable days at the paper geometry
(1440 x 26, 10-minute patches: 3,744 tokens), for each model size on 1 device
and on 8 fake CPU devices (a data-parallel mesh, in a subprocess since the
device count is fixed at JAX start-up). Prints the model FLOPs per step and,
with --peak_tflops, the model FLOPs utilisation.

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


def _configure(args, size: str, batch: int):
  import pathlib  # pylint: disable=g-import-not-at-top
  from lsm2 import config_files  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain.py"
  config = config_files.load_config(path, f"{size},aim")
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
  ap.add_argument("--json", default=None)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  sizes = args.sizes.split(",")

  if args.child:  # One device count, in this process.
    out = {}
    for size in sizes:
      batch = getattr(args, f"batch_{size}")
      out.update(measure(args, size, batch))
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
    suffix = "" if devices == 1 else f"_{devices}dev"
    results.update({k + suffix: v for k, v in child.items()})
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
