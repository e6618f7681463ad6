"""Device mesh and shardings from config data (the maxtext way).

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallel
with parameters and optimizer state sharded) and `tensor` (model parallel over
MLP hidden units and attention heads). Parameters carry logical axis names
(`embed`, `mlp`, `heads`, ...; see lsm2/model/mae.py) and `logical_axis_rules`
map those names onto mesh axes, so a new parallelism layout is a config change.
"""
from collections.abc import Iterator, Mapping, Sequence
import contextlib
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from flax import nnx

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (one may be -1 = all remaining devices) for `num_devices`."""
  unknown = [a for a in mesh_sizes if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"config.mesh: unknown axis {unknown[0]!r}; axes are {MESH_AXES}")
  sizes = [int(mesh_sizes.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  for name, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"config.mesh.{name}: size must be positive or -1, got {s}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh: {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh: {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
        f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all global devices).

  Axis types are Auto: GSPMD propagates shardings through the model from the
  annotated parameters and batch, so model code needs no per-op annotations.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


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
