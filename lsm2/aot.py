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
specs of lsm2/chips.py a roofline estimate of the step time and MFU. Exits 1, naming the
knobs to turn, when the step does not fit. Arguments it cannot use (an empty or
unknown --topology, a --json path that cannot be written) are refused before
anything compiles, as one `lsm2: error: ...` line. This is how maxtext's
train_compile.py catches out-of-memory and sharding errors before a job
reaches the cluster.

What the estimate leaves out: communication (all-reduces, FSDP gathers),
imperfect overlap, and kernels slower than peak. It is a lower bound on the
step time (and an upper bound on MFU), for comparing sizes, meshes and kernels.
Pallas kernels (attention="splash") are opaque to XLA's cost analysis: their
FLOPs are added analytically (`splash_flops`).
"""
from collections.abc import Sequence
import json
import os
import re
import sys

from absl import app
from absl import flags
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags

from lsm2 import errors
from lsm2 import sharding as sharding_lib
from lsm2 import storage
from lsm2.chips import CHIPS
from lsm2.chips import ChipSpec
from lsm2.model import flops as flops_lib
from lsm2.train import preflight
from lsm2.train import train

GiB = 2**30


# The XLA TPU compiler's out-of-memory reports, e.g. "Ran out of memory on HBM, the total
# memory required for HLO temporaries (41.85G) exceeds available HBM (15.75G)" or
# "Used 21.38G of 15.75G hbm".
_OOM = re.compile(r"(?:required for HLO temporaries \(|Used )([0-9.]+)([KMGT]?)")
_AVAILABLE = re.compile(r"available HBM \(([0-9.]+)([KMGT]?)\)|of ([0-9.]+)([KMGT]?) hbm")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


_TOPOLOGY_EXAMPLES = "expected e.g. 'v5e:2x2', 'v5e:16x16', 'v5p:4x4x4', 'v6e:8x8'"


class TopologyError(errors.Error, ValueError):
  """A --topology that names no TPU slice this tool can analyze."""


def check_topology(topology: str) -> None:
  """Refuses an empty --topology, which libtpu would take as its default slice (a TPU v2)."""
  if not topology.strip():
    raise TopologyError(f"--topology={topology!r} is empty: name the TPU slice, "
                        f"{_TOPOLOGY_EXAMPLES}")


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU slice such as "v5e:16x16" or "v5p:4x4x4", described by libtpu."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  check_topology(topology)
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise TopologyError(
        f"--topology={topology!r}: libtpu cannot describe it ({e}); {_TOPOLOGY_EXAMPLES} "
        "(libtpu comes with pip install 'lsm2[tpu]')") from e


def device_spec(devices: Sequence[jax.Device]) -> ChipSpec:
  """The chip spec of a slice's devices (one JAX device per chip)."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise TopologyError(f"no chip spec for device kind {kind!r}; known: {sorted(CHIPS)}")
  if len({tuple(d.coords) for d in devices}) != len(devices):
    # libtpu describes v4 slices per TensorCore; JAX meshes need megacore devices.
    raise TopologyError(f"this libtpu describes {kind} with one device per TensorCore, and JAX "
                        "meshes need one per chip (megacore): not supported")
  return CHIPS[kind]


# Kept here under its old name: lsm2.aot.splash_flops.
splash_flops = flops_lib.splash_flops


def lower_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                     num_channels: int):
  """Compiles state creation and the mask draw for `devices`, and lowers the train step.

  The arguments are the pre-flight check's (lsm2/train/preflight.py): the shardings
  training gives them, masks of the largest encoder layout. Returns (lowered train
  step, Setup, abstract (state, batch, masks)).
  """
  platform = devices[0].platform
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels, platform=platform)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  train.validate_config(config, model_cfg, mask_cfg, mesh)
  setup = train.make_setup(config, model_cfg, mask_cfg, mesh)
  # As in training: the state is created outside the mesh context, the steps run inside.
  jax.jit(setup.init_fn, out_shardings=setup.state_shardings).lower().compile()
  args = preflight.step_arguments(config, setup, train.abstract_state(setup),
                                  train.make_mask_fn(setup))
  with sharding_lib.mesh_context(mesh, config.logical_axis_rules):
    step = train.make_train_step(setup, mask_cfg.strategy_names)
    return step.lower(*args), setup, args


def analyze(config: ml_collections.ConfigDict, topology: str, num_channels: int = 26) -> dict:
  """Compiles the train step for `topology` and returns the report (module docstring).

  Keys: topology, devices, device_kind, chip, mesh, batch_size, model_size,
  attention, dtype, hbm_bytes_per_device (arguments + outputs - donated aliases +
  temporaries + code; when the compiler runs out of memory, its own figure, which
  counts all of these), hbm_capacity_bytes (the usable HBM of `CHIPS`), fits, the
  memory parts, flops_per_step
  (all devices), model_flops_per_step (lsm2.model.flops), est_step_s and est_mfu
  (model FLOPs over est_step_s at peak), and compiler_error when it does not fit.
  """
  devices = topology_devices(topology)
  spec = device_spec(devices)
  report = {"topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
            "chip": spec.name, "hbm_capacity_bytes": spec.capacity_bytes,
            "batch_size": config.batch_size, "model_size": config.model.size,
            "mesh": dict(zip(sharding_lib.MESH_AXES,
                             sharding_lib.mesh_shape(config.mesh, len(devices))))}
  lowered, setup, _ = lower_train_step(config, devices, num_channels)
  model_cfg, mask_cfg = setup.model_cfg, setup.mask_cfg
  report.update(attention=model_cfg.attention, dtype=model_cfg.dtype)
  n_keep = model_cfg.num_tokens - mask_cfg.n_drop
  model_flops = flops_lib.step_flops(model_cfg, n_keep, config.batch_size)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    match = _OOM.search(str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or match is None:
      raise
    # The compiler refused: it does not fit. Its "memory required for HLO temporaries"
    # is the whole program's (a 12 GiB-argument, 6 GiB-output sum with no temporaries
    # reads "(18.00G)"), so it is the figure itself.
    needed = float(match.group(1)) * _UNITS[match.group(2)]
    available = _AVAILABLE.search(str(e))
    if available:  # The compiler's own limit.
      value, unit = (available.group(1), available.group(2)) if available.group(1) else (
          available.group(3), available.group(4))
      report["hbm_capacity_bytes"] = int(float(value) * _UNITS[unit])
    return {**report, "hbm_bytes_per_device": int(needed), "fits": False,
            "compiler_error": _oom_line(e), "flops_per_step": None,
            "model_flops_per_step": model_flops, "est_step_s": None, "est_mfu": None}
  memory = compiled.memory_analysis()
  hbm = preflight.needed_bytes(memory)
  cost = compiled.cost_analysis()
  # Per device: the compiled module is one device's program.
  flops = float(cost.get("flops", 0.0))
  if model_cfg.attention == "splash":
    flops += splash_flops(model_cfg, n_keep, config.batch_size) / len(devices)
  step_s = max(flops / spec.peak_bf16_flops,
               float(cost.get("bytes accessed", 0.0)) / spec.hbm_bytes_per_s)
  return {**report, "hbm_bytes_per_device": int(hbm), "fits": hbm <= spec.capacity_bytes,
          "argument_bytes": int(memory.argument_size_in_bytes),
          "output_bytes": int(memory.output_size_in_bytes),
          "alias_bytes": int(memory.alias_size_in_bytes),
          "temp_bytes": int(memory.temp_size_in_bytes),
          "flops_per_step": flops * len(devices), "model_flops_per_step": model_flops,
          "est_step_s": step_s,
          "est_mfu": (model_flops / (step_s * spec.peak_bf16_flops * len(devices))
                      if step_s else None)}


def _oom_line(error: Exception) -> str:
  return next((line.strip() for line in str(error).splitlines() if _OOM.search(line)), str(error))


def format_report(report: dict) -> str:
  gib = lambda b: "-" if b is None else f"{b / GiB:.2f} GiB"
  rows = [("topology", f"{report['topology']} ({report['devices']} x {report['device_kind']})"),
          ("mesh", " x ".join(f"{k}={v}" for k, v in report["mesh"].items())),
          ("model / batch", f"{report['model_size']} / {report['batch_size']}"),
          ("attention / dtype", f"{report['attention']} / {report['dtype']}")]
  for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"):
    if key in report:
      rows.append((key.replace("_bytes", " per device"), gib(report[key])))
  rows += [("HBM per device", f"{gib(report['hbm_bytes_per_device'])} of "
                              f"{gib(report['hbm_capacity_bytes'])}"),
           ("fits", "yes" if report["fits"] else "NO")]
  if report.get("flops_per_step") is not None:
    rows += [("FLOPs per step", f"{report['flops_per_step']:.3e} "
                                f"(model {report['model_flops_per_step']:.3e})"),
             ("est. step time", f"{report['est_step_s'] * 1e3:.1f} ms (roofline)"),
             ("est. MFU", f"{report['est_mfu']:.1%} (roofline bound)")]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (PATH[:ARG]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:16x16",
                                "TPU slice, e.g. v5e:16x16, v5p:4x4x4, v6e:8x8.")
_NUM_CHANNELS = flags.DEFINE_integer("num_channels", 26, "Signals per minute of the dataset.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON here.")


def check_json_path(path: str) -> epath.Path:
  """--json as a path that can be written, proven before a compile of minutes.

  The report is written beside it and renamed into place (storage.write_text_atomic),
  so what must be writable is its directory.
  """
  out = storage.as_path(path)
  if out.is_dir():
    raise storage.StorageError(f"--json={path} is a directory; name a file, e.g. {out / 'aot.json'}")
  storage.check_writable(out.parent, f"--json={path}: its directory")
  return out


def main(argv):
  try:
    _main(argv)
  except errors.Error as e:  # Its message says what is wrong and what to do.
    print(f"lsm2: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = check_json_path(_JSON.value) if _JSON.value else None
  report = analyze(_CONFIG.value, _TOPOLOGY.value, _NUM_CHANNELS.value)
  print(format_report(report))
  if out is not None:
    storage.write_text_atomic(out, json.dumps(report, indent=2) + "\n")
  if not report["fits"]:
    knobs = preflight.knobs(report["batch_size"], report["mesh"], report["attention"])
    print(f"\nThe train step does not fit in {report['hbm_capacity_bytes'] / GiB:.2f} GiB per "
          f"device. Knobs: {knobs}.", file=sys.stderr)
    sys.exit(1)


def run():
  """The command line; the process compiles on the CPU host (no accelerator backend)."""
  jax.config.update("jax_platforms", "cpu")
  # libtpu takes a lock on the local TPU; compiling for a described slice needs none, so
  # other JAX processes on this machine (or a TPU VM's own job) do not block it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Nor does it need the TPU VM metadata server (absent, and slow to time out, elsewhere).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
