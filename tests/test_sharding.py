"""Mesh construction from config data."""
import jax
import pytest

from lsm2 import sharding


@pytest.mark.parametrize("sizes,expected", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"data": 1, "fsdp": 4, "tensor": 2}, (1, 4, 2)),
])
def test_mesh_shape_resolves_minus_one(sizes, expected):
  assert sharding.mesh_shape(sizes, 8) == expected


@pytest.mark.parametrize("sizes,message", [
    ({"data": 3, "fsdp": -1, "tensor": 1}, "does not divide 8"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "uses 4 devices"),
    ({"data": 0, "fsdp": -1, "tensor": 1}, "config.mesh.data"),
    ({"pipeline": 2}, "unknown axis 'pipeline'"),
])
def test_mesh_shape_errors_name_the_problem(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(sizes, 8)


def test_make_mesh_uses_all_devices_and_batch_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert mesh.devices.size == jax.device_count() == 8
  assert sharding.data_parallel_size(mesh) == 4
  assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
