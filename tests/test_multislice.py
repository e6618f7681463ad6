"""Multi-slice TPU jobs (issue #30): the hybrid mesh (ICI inside a slice, DCN across slices)
and the ahead-of-time compile for N slices with what crosses DCN per step.

The mesh tests use stand-in devices carrying a `slice_index` (nothing compiles); the one
compile runs `python -m lsm2.aot --num_slices=2` in a child process, as tests/test_aot.py
does, so this process never loads libtpu.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
from flax import nnx
import numpy as np
import pytest

from lsm2 import aot
from lsm2 import config_files
from lsm2 import errors
from lsm2 import sharding
from lsm2.model import mae
from lsm2.model.config import get_model_config

REPO = pathlib.Path(__file__).resolve().parents[1]


class _Device:
  """What mesh construction reads of a TPU device: its id and its slice."""

  def __init__(self, id_, slice_index):
    self.id, self.slice_index, self.process_index = id_, slice_index, slice_index
    self.platform = self.device_kind = "fake"

  def __repr__(self):
    return f"dev{self.id}@slice{self.slice_index}"


def _slices(n, per_slice):
  return [_Device(s * per_slice + i, s) for s in range(n) for i in range(per_slice)]


def _varying_axes(mesh):
  """The axes along which slice_index changes, read off the device array directly."""
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  return {name for i, name in enumerate(mesh.axis_names)
          if (np.diff(slices, axis=i) != 0).any()}


def test_by_default_only_the_data_axis_crosses_slices():
  """The run config's mesh on 2 slices of 4 devices, with FSDP inside each slice: data is
  split over the slices (the gradient all-reduce is the one collective over DCN), fsdp and
  tensor never leave a slice."""
  mesh_cfg = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny").mesh.to_dict()
  mesh_cfg.update(data=1, fsdp=-1)
  mesh = sharding.make_mesh(mesh_cfg, _slices(2, 4))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert _varying_axes(mesh) == {"data"} == set(sharding.axes_across_slices(mesh))
  # Each data index is one whole slice.
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}
  # Data parallel inside the slices too: data = 2 (ICI) x 2 (DCN), still the only one across.
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2}, _slices(2, 4))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert _varying_axes(mesh) == {"data"}
  # Named otherwise, another axis spans the slices.
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "dcn_data": 1, "dcn_fsdp": 2},
                            _slices(2, 4))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert _varying_axes(mesh) == {"fsdp"}


def test_one_slice_is_unchanged():
  """CPU/GPU devices (no slices) and one TPU slice get jax.make_mesh's mesh, dcn_* = 1."""
  mesh_cfg = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny").mesh.to_dict()
  mesh_cfg.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg)
  reference = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, devices=jax.devices())
  assert (mesh.devices == reference.devices).all()
  assert sharding.axes_across_slices(mesh) == ()
  assert sharding.hybrid_shape(mesh_cfg, 8) == ((2, 2, 2), (1, 1, 1))


@pytest.mark.parametrize("sizes, slices, message", [
    ({"dcn_data": 4}, 2, "config.mesh: dcn_data=4 x dcn_fsdp=1 x dcn_tensor=1 spans 4 slices, "
                         "but the devices are in 2: set config.mesh.dcn_data"),
    ({"dcn_data": 2}, 1, "spans 2 slices, but the devices are in 1"),
    ({"dcn_data": -1, "dcn_fsdp": 3}, 2, r"\{'dcn_data': -1, 'dcn_fsdp': 3, 'dcn_tensor': 1\} "
                                          "does not divide 2 slices"),
    ({"data": 3}, 2, r"uses 3 devices per slice, but 4 are available"),
    ({"dcn_pipeline": 2}, 2, "unknown axis 'dcn_pipeline'"),
])
def test_mesh_sizes_that_do_not_fit_the_slices_name_the_fields(sizes, slices, message):
  with pytest.raises(errors.Error, match=message):
    sharding.hybrid_shape({"data": -1, **sizes}, 4 * slices, slices)


def test_fewer_than_one_slice_is_refused_before_libtpu_loads():
  with pytest.raises(errors.Error, match="--num_slices=0: a job has at least 1 slice"):
    aot.topology_devices("v5e:2x2", 0)


def test_dcn_bytes_are_the_megascale_sends():
  """What a multi-slice TPU program puts on DCN: the payload (first element) of each send
  through the megascale runtime, by transfer type; receives, in-slice collectives and other
  host transfers are not counted."""
  hlo = """
  %all-reduce.74 = f32[1,1,128]{2,1,0:T(1,128)} all-reduce(%bitcast.1), channel_id=14, replica_groups={{0,1,2,3}}, to_apply=%add
  %send = (f32[1,1,128]{2,1,0:T(1,128)}, u32[], token[]) send(%all-reduce.74, %after-all), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[1,1,128]{2,1,0:T(1,128)}, u32[], token[]) recv(%after-all), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send.1 = (bf16[3,8,128]{2,1,0:T(8,128)(2,1)}, u32[], token[]) send(%all-reduce.70, %after-all.1), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %send.2 = (s32[16]{0}, u32[], token[]) send(%x, %after-all.2), channel_id=8, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}
  %send.3 = (f32[1024]{0}, u32[], token[]) send(%y, %after-all.3), channel_id=9, is_host_transfer=true
  """
  assert aot.dcn_bytes(hlo) == {"ALL_REDUCE": 128 * 4 + 3 * 8 * 128 * 2, "ALL_GATHER": 64}
  assert aot.dcn_bytes(hlo.replace("send(", "other(")) == {}


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[test]' installs it through jax[tpu])")


@needs_libtpu
@pytest.mark.slow
def test_aot_compiles_the_train_step_for_two_slices(tmp_path):
  """The tiny model's train step for 2 slices of v5e:2x2 (8 chips), data parallel over
  both: it fits, and what crosses DCN is the gradient all-reduce: per slice (4 devices,
  each sending its part) about the gradients' size, 2 to 4 bytes per parameter (bfloat16
  for the products' weights, float32 for the rest), plus padding of small arrays to TPU
  tiles."""
  out = tmp_path / "two_slices.json"
  cmd = [sys.executable, "-m", "lsm2.aot", f"--config={REPO / 'configs' / 'pretrain.py'}:tiny,runlocal",
         "--topology=v5e:2x2", "--num_slices=2", "--config.batch_size=8", f"--json={out}"]
  env = {**os.environ, "JAX_EXEC_TIME_OPTIMIZATION_EFFORT": "-1"}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert (r["topology"], r["slices"], r["devices"], r["chip"]) == ("v5e:2x2", 2, 8, "v5e")
  assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert r["dcn_mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert r["axes_across_slices"] == ["data"]
  assert r["fits"] and 0 < r["hbm_bytes_per_device"] < r["hbm_capacity_bytes"]
  assert r["flops_per_step"] > 0.5 * r["model_flops_per_step"] > 0
  model_cfg = get_model_config("tiny", num_channels=26, patch_time=30, patch_channels=2)
  params = sum(x.size for x in jax.tree.leaves(
      nnx.state(nnx.eval_shape(lambda: mae.LSM2MAE(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)))
  assert set(r["dcn_transfers"]) == {"ALL_REDUCE"}
  assert r["dcn_bytes_per_step"] == sum(r["dcn_transfers"].values())
  per_slice = 4 * r["dcn_bytes_per_step"]
  assert 2 * params <= per_slice <= 1.5 * 4 * params, (per_slice, params)
  assert "DCN per device" in proc.stdout and "2 slices" in proc.stdout
