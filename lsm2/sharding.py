"""Device mesh and shardings from config data (the maxtext way).

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallel
with parameters and optimizer state sharded) and `tensor` (model parallel over
MLP hidden units and attention heads). Parameters carry logical axis names
(`embed`, `mlp`, `heads`, ...; see lsm2/model/mae.py) and `logical_axis_rules`
map those names onto mesh axes, so a new parallelism layout is a config change.

Multi-slice (TPU slices joined by the data-center network, DCN): each axis's
size is its size inside a slice (`config.mesh.data`, ICI) times its size across
slices (`config.mesh.dcn_data`, DCN). By default only `data` spans slices
(`dcn_data=-1`: all of them), as maxtext does: the one collective that then
crosses DCN is the gradient all-reduce, once per step, while the FSDP gathers
and tensor-parallel exchanges stay on the fast ICI links.
"""
from collections.abc import Iterator, Mapping, Sequence
import contextlib
import math

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from flax import nnx

from lsm2 import errors

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")
# The sizes across slices, config.mesh.dcn_<axis>; absent = these (data parallel over DCN).
DCN_AXES = tuple(f"dcn_{a}" for a in MESH_AXES)
DCN_DEFAULTS = {"dcn_data": -1, "dcn_fsdp": 1, "dcn_tensor": 1}


class MeshError(errors.ConfigError):
  """config.mesh does not fit the devices (or slices) the job has."""


def _resolve(names: Sequence[str], sizes: Sequence[int], total: int, what: str) -> list[int]:
  """Sizes of `names` (one may be -1 = the rest) whose product is `total` `what`."""
  shown = dict(zip(names, sizes))
  if list(sizes).count(-1) > 1:
    raise MeshError(f"config.mesh: at most one axis of {names} may be -1, got {shown}")
  for name, s in zip(names, sizes):
    if s == 0 or s < -1:
      raise MeshError(f"config.mesh.{name}: size must be positive or -1, got {s}")
  sizes = list(sizes)
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise MeshError(f"config.mesh: {shown} does not divide {total} {what}")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise MeshError(f"config.mesh: {shown} uses {math.prod(sizes)} {what}, "
                    f"but {total} are available")
  return sizes


def hybrid_shape(mesh_sizes: Mapping[str, int], num_devices: int, num_slices: int = 1
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(sizes inside a slice, sizes across slices) of (data, fsdp, tensor).

  The dcn_* sizes must multiply to `num_slices` (dcn_data=-1 by default: every
  slice); the ICI sizes (one may be -1) to the devices of one slice.
  """
  unknown = [a for a in mesh_sizes if a not in MESH_AXES + DCN_AXES]
  if unknown:
    raise MeshError(f"config.mesh: unknown axis {unknown[0]!r}; axes are {MESH_AXES}, and "
                    f"{DCN_AXES} across slices")
  if num_slices < 1 or num_devices % num_slices:
    raise MeshError(f"{num_devices} devices cannot be split evenly over {num_slices} slices")
  dcn = [int(mesh_sizes.get(a, DCN_DEFAULTS[a])) for a in DCN_AXES]
  shown = " x ".join(f"{a}={s}" for a, s in zip(DCN_AXES, dcn))
  if -1 not in dcn and math.prod(dcn) != num_slices:
    raise MeshError(
        f"config.mesh: {shown} spans {math.prod(dcn)} slices, but the devices are in "
        f"{num_slices}: set config.mesh.dcn_data (or dcn_fsdp, dcn_tensor) so that their "
        f"product is {num_slices}")
  dcn = _resolve(DCN_AXES, dcn, num_slices, "slices")
  per_slice = num_devices // num_slices
  ici = _resolve(MESH_AXES, [int(mesh_sizes.get(a, 1)) for a in MESH_AXES], per_slice,
                 "devices" if num_slices == 1 else "devices per slice")
  return tuple(ici), tuple(dcn)


def mesh_shape(mesh_sizes: Mapping[str, int], num_devices: int, num_slices: int = 1
               ) -> tuple[int, ...]:
  """Resolved (data, fsdp, tensor) sizes over `num_devices` in `num_slices` slices."""
  ici, dcn = hybrid_shape(mesh_sizes, num_devices, num_slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def num_slices(devices: Sequence[jax.Device]) -> int:
  """Slices the devices span: their distinct `slice_index` values (TPU slices; GPU nodes
  where XLA numbers them apart), 1 for devices without one (CPU)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all global devices).

  Axis types are Auto: GSPMD propagates shardings through the model from the
  annotated parameters and batch, so model code needs no per-op annotations.
  Devices spanning TPU slices get a hybrid mesh: along each axis the DCN part is
  outermost, so an axis with dcn size 1 never leaves a slice (module docstring).
  """
  devices = list(devices) if devices is not None else jax.devices()
  slices = num_slices(devices)
  ici, dcn = hybrid_shape(mesh_sizes, len(devices), slices)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
  # jax.make_mesh refuses devices of several slices.
  return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), MESH_AXES,
              axis_types=axis_types)


def axes_across_slices(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes along which devices change slice: those whose collectives use DCN."""
  slice_of = lambda d: getattr(d, "slice_index", 0)
  out = []
  for i, name in enumerate(mesh.axis_names):
    lines = mesh.devices.swapaxes(i, -1).reshape(-1, mesh.devices.shape[i])
    if any(len({slice_of(d) for d in line}) > 1 for line in lines):
      out.append(name)
  return tuple(out)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, str | tuple[str, ...] | None]]
                 ) -> Iterator[None]:
  """The mesh and logical-axis rules in force while steps are traced and run.

  Mesh-aware ops read both: the blocked attention splits its per-example loop
  over the axes the "batch" and "heads" rules name (lsm2/model/attention.py).
  """
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple((k, v) for k, v in rules)):
    yield


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, str | tuple[str, ...] | None]]):
  """NamedShardings for a tree of nnx Variables / State from their logical axis names."""
  with nnx.logical_axis_rules(tuple((k, v) for k, v in rules)):
    specs = nnx.get_partition_spec(tree)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))
