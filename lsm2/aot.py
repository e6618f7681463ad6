r"""Ahead-of-time compilation of the training step for a TPU slice, on any machine.

  python -m lsm2.aot --config=configs/pretrain.py:S --topology=v5e:16x16 \
      [--config.KEY=VALUE ...] [--num_channels=26] [--json=PATH]

Builds the mesh of `config.mesh` over the devices of a TPU topology (no TPU
needed: libtpu describes the slice and its compiler runs here), then lowers and
compiles the functions training runs, taken from lsm2.train.train (state
creation, the AIM mask draw, and the train step: forward, backward, AdamW) with
the shardings training gives them. The compiled train step's memory analysis
says what one device holds (arguments, outputs, temporaries) against the chip's
HBM; its cost analysis gives the FLOPs and bytes of one step, and with the chip
specs below a roofline estimate of the step time and MFU. Exits 1, naming the
knobs to turn, when the step does not fit. This is how maxtext's
train_compile.py catches out-of-memory and sharding errors before a job
reaches the cluster.

What the estimate leaves out: communication (all-reduces, FSDP gathers),
imperfect overlap, and kernels slower than peak. It is a lower bound on the
step time (and an upper bound on MFU), for comparing sizes, meshes and kernels.
Pallas kernels (attention="splash") are opaque to XLA's cost analysis: their
FLOPs are added analytically (`splash_flops`).
"""
from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib
import re
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from lsm2 import sharding as sharding_lib
from lsm2.model import aim
from lsm2.model import flops as flops_lib
from lsm2.train import encoder_layout
from lsm2.train import train

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Per-chip figures from Google's Cloud TPU system-architecture pages."""
  name: str
  peak_bf16_flops: float  # FLOP/s.
  hbm_bytes: int
  hbm_bytes_per_s: float


# Keyed by `jax.Device.device_kind`. Sources (Cloud TPU documentation, "System
# architecture" of each version):
#   v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s
#   v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s
#   v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GB HBM2e, 2765 GB/s
#   v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GB HBM, 1640 GB/s
# The pages write "GB" for v5e, v5p and v6e; the chips hold 16, 95 and 32 GiB
# (JAX's own Pallas table, jax/_src/pallas/mosaic/tpu_info.py, lists 17.2e9,
# 103e9 and 34.4e9 bytes), so capacities are in GiB throughout.
CHIPS = {
    "TPU v4": ChipSpec("v4", 275e12, 32 * GiB, 1200e9),
    "TPU v5 lite": ChipSpec("v5e", 197e12, 16 * GiB, 819e9),
    "TPU v5": ChipSpec("v5p", 459e12, 95 * GiB, 2765e9),
    "TPU v5p": ChipSpec("v5p", 459e12, 95 * GiB, 2765e9),
    "TPU v6 lite": ChipSpec("v6e", 918e12, 32 * GiB, 1640e9),
}

# The XLA TPU compiler's own out-of-memory report, e.g. "Used 21.38G of 15.75G hbm.".
_OOM = re.compile(r"Used ([0-9.]+)([KMGT]?) of ([0-9.]+)([KMGT]?) hbm")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU slice such as "v5e:16x16" or "v5p:4x4x4", described by libtpu."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"--topology={topology!r}: libtpu cannot describe it ({e}); expected e.g. 'v5e:2x2', "
        "'v5e:16x16', 'v5p:4x4x4', 'v6e:8x8' (libtpu comes with pip install 'jax[tpu]')") from e


def device_spec(devices: Sequence[jax.Device]) -> ChipSpec:
  """The chip spec per JAX device (a v4 topology has one device per TensorCore, two per chip)."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise ValueError(f"no chip spec for device kind {kind!r}; known: {sorted(CHIPS)}")
  chip = CHIPS[kind]
  per_chip = len(devices) / len({tuple(d.coords) for d in devices})
  return ChipSpec(chip.name, chip.peak_bf16_flops / per_chip, int(chip.hbm_bytes / per_chip),
                  chip.hbm_bytes_per_s / per_chip)


def splash_flops(model_cfg, n_keep: int, batch: int) -> float:
  """FLOPs of the splash kernels in one train step (which XLA's cost analysis cannot see).

  Each attention call computes every tile of its lengths padded to 128: 2 products
  forward, 7 backward (the dq kernel recomputes q k^T and forms dO v^T and dS k; the
  dk/dv kernel q k^T, dO v^T, P^T dO and dS^T q), 2 more when the forward is
  rematerialized.
  """
  pad = lambda n: -(-n // 128) * 128
  products = 9 + (2 if model_cfg.remat != "none" else 0)
  per_example = (model_cfg.enc_depth * 2 * pad(n_keep) ** 2 * model_cfg.enc_width
                 + model_cfg.dec_depth * 2 * pad(model_cfg.num_tokens) ** 2 * model_cfg.dec_width)
  return float(batch * products * per_example)


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _abstract_masks(config, setup, mesh, mask_shardings, masks):
  """The masks the largest compiled encoder layout gives the step (encoder_layout.py).

  Unpacked buckets end at n_keep, the fixed split's shapes; packed ones at every kept
  token of a group, laid out by `aim.pack_visible`.
  """
  masks = _abstract(masks, mask_shardings)
  if not config.masking.pack_encoder:
    return masks
  groups = sharding_lib.data_parallel_size(mesh)
  n_keep = setup.model_cfg.num_tokens - setup.mask_cfg.n_drop
  length = max(encoder_layout.layout_buckets(config.masking.encoder_buckets, n_keep,
                                             config.batch_size, groups))
  packed = jax.eval_shape(lambda m: aim.pack_visible(m, length, groups), masks)
  shard = sharding_lib.batch_sharding(mesh)
  return masks.replace(pack_idx=jax.ShapeDtypeStruct(packed.pack_idx.shape, packed.pack_idx.dtype,
                                                     sharding=shard),
                       unpack_idx=jax.ShapeDtypeStruct(packed.unpack_idx.shape,
                                                       packed.unpack_idx.dtype, sharding=shard))


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                       num_channels: int):
  """Compiles state creation, the mask draw and the train step for `devices`.

  Returns (compiled train step, Setup); raises what the compiler raises (an
  out-of-memory error among them).
  """
  platform = devices[0].platform
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels, platform=platform)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  train.validate_config(config, model_cfg, mask_cfg, mesh)
  setup = train.make_setup(config, model_cfg, mask_cfg, mesh)
  state = train.abstract_state(setup)
  shape = (config.batch_size, model_cfg.time_steps, model_cfg.num_channels)
  batch = {"signals": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=setup.batch_sharding),
           "observed": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=setup.batch_sharding)}
  # As in training: the state is created outside the mesh context, the steps run inside.
  jax.jit(setup.init_fn, out_shardings=setup.state_shardings).lower().compile()
  with sharding_lib.mesh_context(mesh, config.logical_axis_rules):
    mask_step = train.make_mask_fn(setup).lower(state["rng"], state["step"], batch["observed"])
    masks = mask_step.out_info
    mask_shardings = mask_step.compile().output_shardings
    masks = _abstract_masks(config, setup, mesh, mask_shardings, masks)
    step = train.make_train_step(setup, mask_cfg.strategy_names)
    return step.lower(state, batch, masks).compile(), setup


def analyze(config: ml_collections.ConfigDict, topology: str, num_channels: int = 26) -> dict:
  """Compiles the train step for `topology` and returns the report (see the module docstring).

  Keys: topology, devices, device_kind, mesh, batch_size, model_size, attention, dtype,
  hbm_bytes_per_device (arguments + outputs - donated aliases + temporaries + code),
  hbm_capacity_bytes, fits, argument/output/temp bytes, flops_per_step (all devices),
  est_step_s, est_mfu (analytic model FLOPs over est_step_s at peak).
  """
  devices = topology_devices(topology)
  spec = device_spec(devices)
  report = {"topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
            "chip": spec.name, "hbm_capacity_bytes": spec.hbm_bytes,
            "batch_size": config.batch_size, "model_size": config.model.size,
            "mesh": dict(zip(sharding_lib.MESH_AXES,
                             sharding_lib.mesh_shape(config.mesh, len(devices))))}
  try:
    compiled, setup = compile_train_step(config, devices, num_channels)
  except jax.errors.JaxRuntimeError as e:
    match = _OOM.search(str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or match is None:
      raise
    # The compiler itself refused: it does not fit. Its figure is what the program needs.
    model_cfg, _ = train.model_and_mask_configs(config, num_channels, platform="tpu")
    used = float(match.group(1)) * _UNITS[match.group(2)]
    return {**report, "attention": model_cfg.attention, "dtype": model_cfg.dtype,
            "hbm_bytes_per_device": int(used), "fits": False, "compiler_error": _OOM_line(e),
            "flops_per_step": None, "est_step_s": None, "est_mfu": None}
  memory = compiled.memory_analysis()
  hbm = (memory.argument_size_in_bytes + memory.output_size_in_bytes
         - memory.alias_size_in_bytes + memory.temp_size_in_bytes
         + memory.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  model_cfg, mask_cfg = setup.model_cfg, setup.mask_cfg
  n_keep = model_cfg.num_tokens - mask_cfg.n_drop
  # Per device: the compiled module is one device's program.
  flops = float(cost.get("flops", 0.0))
  if model_cfg.attention == "splash":
    flops += splash_flops(model_cfg, n_keep, config.batch_size) / len(devices)
  step_s = max(flops / spec.peak_bf16_flops, float(cost.get("bytes accessed", 0.0)) / spec.hbm_bytes_per_s)
  model_flops = flops_lib.step_flops(model_cfg, n_keep, config.batch_size)
  return {**report, "attention": model_cfg.attention, "dtype": model_cfg.dtype,
          "hbm_bytes_per_device": int(hbm), "fits": hbm <= spec.hbm_bytes,
          "argument_bytes": int(memory.argument_size_in_bytes),
          "output_bytes": int(memory.output_size_in_bytes),
          "alias_bytes": int(memory.alias_size_in_bytes),
          "temp_bytes": int(memory.temp_size_in_bytes),
          "flops_per_step": flops * len(devices), "model_flops_per_step": model_flops,
          "est_step_s": step_s,
          "est_mfu": model_flops / (step_s * spec.peak_bf16_flops * len(devices)) if step_s else None}


def _OOM_line(error: Exception) -> str:
  return next((line.strip() for line in str(error).splitlines() if _OOM.search(line)), str(error))


def knobs(report: dict) -> str:
  """What to change when a step does not fit."""
  mesh = report["mesh"]
  hints = [f"a smaller --config.batch_size (now {report['batch_size']}; per device "
           f"{report['batch_size'] // max(mesh['data'] * mesh['fsdp'], 1)})",
           "--config.model.remat=attention or =full (recompute activations in the backward pass)"]
  if mesh["fsdp"] == 1:
    hints.append("FSDP: shard parameters and optimizer state, e.g. --config.mesh.data=1 "
                  "--config.mesh.fsdp=-1")
  if report.get("attention") not in ("splash", "blocked"):
    hints.append("--config.model.attention=splash (attention logits never reach HBM)")
  hints.append("a topology with more HBM per chip or more chips")
  return "; ".join(hints)


def format_report(report: dict) -> str:
  gib = lambda b: "-" if b is None else f"{b / GiB:.2f} GiB"
  rows = [("topology", f"{report['topology']} ({report['devices']} x {report['device_kind']})"),
          ("mesh", " x ".join(f"{k}={v}" for k, v in report["mesh"].items())),
          ("model / batch", f"{report['model_size']} / {report['batch_size']}"),
          ("attention / dtype", f"{report['attention']} / {report['dtype']}")]
  for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"):
    if key in report:
      rows.append((key.replace("_bytes", "s per device"), gib(report[key])))
  rows += [("HBM per device", f"{gib(report['hbm_bytes_per_device'])} of "
                              f"{gib(report['hbm_capacity_bytes'])}"),
           ("fits", "yes" if report["fits"] else "NO")]
  if report.get("flops_per_step") is not None:
    rows += [("FLOPs per step", f"{report['flops_per_step']:.3e} (model {report['model_flops_per_step']:.3e})"),
             ("est. step time", f"{report['est_step_s'] * 1e3:.1f} ms (roofline)"),
             ("est. MFU", f"{report['est_mfu']:.1%} (roofline bound)")]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (PATH[:ARG]).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:16x16", "TPU slice, e.g. v5e:16x16, v5p:4x4x4, v6e:8x8.")
_NUM_CHANNELS = flags.DEFINE_integer("num_channels", 26, "Signals per minute of the dataset.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  report = analyze(_CONFIG.value, _TOPOLOGY.value, _NUM_CHANNELS.value)
  print(format_report(report))
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(report, indent=2) + "\n")
  if not report["fits"]:
    print(f"\nThe train step does not fit in {report['hbm_capacity_bytes'] / GiB:.2f} GiB per "
          f"device. Knobs: {knobs(report)}.", file=sys.stderr)
    sys.exit(1)


def run():
  """The command line; the process compiles on the CPU host (no accelerator backend)."""
  jax.config.update("jax_platforms", "cpu")
  # libtpu takes a lock on the local TPU; compiling for a described slice needs none, so
  # other JAX processes on this machine (or a TPU VM's own job) do not block it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
