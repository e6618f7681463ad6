r"""Ahead-of-time compilation of the training step for a TPU slice, on any machine.

  python -m lsm2.aot --config=configs/pretrain.py:S --topology=v5e:16x16 \
      [--num_slices=2] [--config.KEY=VALUE ...] [--num_channels=26] [--json=PATH]

Builds the mesh of `config.mesh` over the devices of a TPU topology (no TPU
needed: libtpu describes the slice and its compiler runs here), then lowers and
compiles the functions training runs, taken from lsm2.train.train (state
creation, the AIM mask draw, and the train step: forward, backward, AdamW) with
the shardings training gives them. The compiled train step's memory analysis
says what one device holds (arguments, outputs, temporaries) against the chip's
HBM; its cost analysis gives the FLOPs and bytes of one step, and with the chip
specs of lsm2/chips.py a roofline estimate of the step time and MFU. With
--num_slices=N the devices are N such slices joined by the data-center network
(DCN; config.mesh.dcn_* say which axes span them, lsm2/sharding.py) and the
report adds the bytes each device sends over DCN per step (`dcn_bytes`). Exits
1, naming the knobs to turn, when the step does not fit. Arguments it cannot use
(an empty or unknown --topology, --num_slices below 1, a --json path that cannot
be written) are refused before anything compiles, as one `lsm2: error: ...` line.
This is how maxtext's train_compile.py catches out-of-memory and sharding errors
before a job reaches the cluster.

What the estimate leaves out: communication (all-reduces, FSDP gathers),
imperfect overlap, and kernels slower than peak. It is a lower bound on the
step time (and an upper bound on MFU), for comparing sizes, meshes and kernels.
Pallas kernels (attention="splash") are opaque to XLA's cost analysis: their
FLOPs are added analytically (`splash_flops`).
"""
from collections.abc import Sequence
import json
import math
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


def check_num_slices(num_slices: int) -> None:
  if num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices}: a job has at least 1 slice")


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """The devices of `num_slices` TPU slices such as "v5e:16x16" or "v5p:4x4x4", described
  by libtpu (each device's `slice_index` says its slice)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  check_topology(topology)
  check_num_slices(num_slices)
  extra = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                              **extra).devices)
  except Exception as e:  # pylint: disable=broad-except
    raise TopologyError(
        f"--topology={topology!r}: libtpu cannot describe it ({e}); {_TOPOLOGY_EXAMPLES} "
        "(libtpu comes with pip install 'lsm2[tpu]')") from e


def device_spec(devices: Sequence[jax.Device]) -> ChipSpec:
  """The chip spec of a slice's devices (one JAX device per chip)."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise TopologyError(f"no chip spec for device kind {kind!r}; known: {sorted(CHIPS)}")
  # Coordinates are per slice.
  if len({(getattr(d, "slice_index", 0), *d.coords) for d in devices}) != len(devices):
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


# What crosses DCN in a multi-slice TPU program. The compiler splits a collective over
# slices into in-slice collectives (whose replica groups hold slice-local ids: the program
# is one slice's) and host transfers through the megascale runtime, e.g.
#   %send = (f32[1,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%all-reduce.74, %after-all),
#       channel_id=3, is_host_transfer=true, frontend_attributes={...,
#       _xla_megascale_transfer_type="ALL_REDUCE"}
# Each send's payload, the first element of its result, is what the device puts on DCN.
_DCN_SEND = re.compile(r"=\s*\((pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([0-9,]*)\].*?\ssend\(.*"
                       r'_xla_megascale_transfer_type="(\w+)"')


def _shape_bytes(dtype: str, dims: str) -> float:
  bits = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}.get(dtype)
  if bits is None:
    bits = 8 if dtype.startswith("f8") else int(dtype[1:])
  return math.prod(int(d) for d in dims.split(",") if d) * bits / 8


def dcn_bytes(hlo_text: str) -> dict[str, int]:
  """{transfer type (ALL_REDUCE, ...): bytes} one device sends over DCN per step, from a
  compiled TPU program's megascale sends (above). Each send counts once as written (one
  inside a loop body would count once, not per iteration). Empty for one slice.
  """
  out = {}
  for dtype, dims, kind in _DCN_SEND.findall(hlo_text):
    out[kind] = out.get(kind, 0) + int(_shape_bytes(dtype, dims))
  return out


def analyze(config: ml_collections.ConfigDict, topology: str, num_channels: int = 26,
            num_slices: int = 1) -> dict:
  """Compiles the train step for `num_slices` x `topology` and returns the report (module
  docstring).

  Keys: topology, slices, devices (all slices'), device_kind, chip, mesh (whole axis
  sizes), dcn_mesh (their parts across slices), axes_across_slices, batch_size, model_size,
  attention, dtype, hbm_bytes_per_device (arguments + outputs - donated aliases +
  temporaries + code; when the compiler runs out of memory, its own figure, which
  counts all of these), hbm_capacity_bytes (the usable HBM of `CHIPS`), fits, the
  memory parts, flops_per_step
  (all devices), model_flops_per_step (lsm2.model.flops), est_step_s and est_mfu
  (model FLOPs over est_step_s at peak), dcn_transfers and their sum
  dcn_bytes_per_step (`dcn_bytes`: per device and step; 0 for one slice, None when it
  does not fit), and compiler_error when it does not fit.
  """
  devices = topology_devices(topology, num_slices)
  spec = device_spec(devices)
  ici, dcn = sharding_lib.hybrid_shape(config.mesh, len(devices), num_slices)
  report = {"topology": topology, "slices": num_slices, "devices": len(devices),
            "device_kind": devices[0].device_kind,
            "chip": spec.name, "hbm_capacity_bytes": spec.capacity_bytes,
            "batch_size": config.batch_size, "model_size": config.model.size,
            "mesh": dict(zip(sharding_lib.MESH_AXES, (i * d for i, d in zip(ici, dcn)))),
            "dcn_mesh": dict(zip(sharding_lib.MESH_AXES, dcn))}
  lowered, setup, _ = lower_train_step(config, devices, num_channels)
  report["axes_across_slices"] = list(sharding_lib.axes_across_slices(setup.mesh))
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
            "dcn_transfers": None, "dcn_bytes_per_step": None,
            "model_flops_per_step": model_flops, "est_step_s": None, "est_mfu": None}
  memory = compiled.memory_analysis()
  hbm = preflight.needed_bytes(memory)
  cost = compiled.cost_analysis()
  # Per device: the compiled module is one device's program.
  flops = float(cost.get("flops", 0.0))
  if model_cfg.attention == "splash":
    flops += splash_flops(model_cfg, n_keep, config.batch_size) / len(devices)
  transfers = dcn_bytes(compiled.as_text())
  report.update(dcn_transfers=transfers, dcn_bytes_per_step=sum(transfers.values()))
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
  size = lambda b: next(f"{b / 2**e:.2f} {u}" for e, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"),
                                                            (0, "B")) if b >= 2**e or not e)
  slices = report.get("slices", 1)
  mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
  if slices > 1:
    mesh += " (across slices: " + " x ".join(f"{k}={v}" for k, v in report["dcn_mesh"].items())
    mesh += ")"
  rows = [("topology", f"{report['topology']} ({report['devices']} x {report['device_kind']})"
                       + (f", {slices} slices" if slices > 1 else "")),
          ("mesh", mesh),
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
    if slices > 1:
      kinds = ", ".join(f"{k.lower()} {size(v)}" for k, v in report["dcn_transfers"].items())
      rows.append(("DCN per device", f"{size(report['dcn_bytes_per_step'])} per step ({kinds}; "
                                     f"axes across slices: "
                                     f"{', '.join(report['axes_across_slices'])})"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (PATH[:ARG]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:16x16",
                                "TPU slice, e.g. v5e:16x16, v5p:4x4x4, v6e:8x8.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined by DCN "
                                   "(multi-slice; config.mesh.dcn_* place the axes).")
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
  check_num_slices(_NUM_SLICES.value)
  out = check_json_path(_JSON.value) if _JSON.value else None
  report = analyze(_CONFIG.value, _TOPOLOGY.value, _NUM_CHANNELS.value, _NUM_SLICES.value)
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
