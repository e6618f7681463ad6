"""Orbax checkpointing: resharding restore, skipping corrupt steps; params export and restore
(lsm2.pretrained, the format inference reads)."""
import logging

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import pytest

from lsm2 import pretrained
from lsm2 import sharding
from lsm2.train import checkpoint


def _state(mesh, spec, value=0.0):
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) + value
  return {"w": jax.device_put(x, NamedSharding(mesh, spec)),
          "step": jax.device_put(jnp.int32(value), NamedSharding(mesh, P()))}


def _abstract(mesh, spec):
  return {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, spec)),
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}


def _data_iter():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def test_restore_reshards_and_resumes_data_iterator(tmp_path):
  save_mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2)
  it = _data_iter()
  [next(it) for _ in range(5)]
  ckpt.maybe_save(3, _state(save_mesh, P("data", None)), it, force=True)
  ckpt.wait()
  expected_next = next(it)

  # Restore onto a different layout: fsdp x tensor, with columns split too.
  new_mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  it2 = _data_iter()
  step, state, data_restored = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2).restore_latest(
      _abstract(new_mesh, P("fsdp", "tensor")), it2)
  assert step == 3 and data_restored
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(64).reshape(8, 8))
  assert state["w"].sharding.spec == P("fsdp", "tensor")
  assert state["w"].sharding.mesh.shape == new_mesh.shape
  assert next(it2) == expected_next


def test_corrupt_latest_step_falls_back_with_warning(tmp_path, caplog):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=3)
  for step in (1, 2):
    ckpt.maybe_save(step, _state(mesh, P(), value=float(step)), _data_iter(), force=True)
  ckpt.wait()
  # Truncate the newest step: every array file of its state is emptied.
  for f in (pretrained.checkpoint_dir(tmp_path) / "2" / pretrained.STATE).rglob("*"):
    if f.is_file() and f.suffix not in (".json",) and "metadata" not in f.name:
      f.write_bytes(b"")
  with caplog.at_level(logging.WARNING):
    step, state, _ = checkpoint.Checkpointer(tmp_path, save_every=1, keep=3).restore_latest(
        _abstract(mesh, P()), _data_iter())
  assert step == 1
  assert int(state["step"]) == 1
  assert "step 2" in caplog.text and "could not be restored" in caplog.text


def test_no_checkpoint_returns_none(tmp_path):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert checkpoint.Checkpointer(tmp_path, save_every=1, keep=1).restore_latest(
      _abstract(mesh, P()), None) is None


def test_export_round_trip(tmp_path):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  params = _state(mesh, P(), value=7.0)
  out = pretrained.export_params(tmp_path, params, {"model": {"enc_width": 8}})
  assert pretrained.read_description(out) == {"model": {"enc_width": 8}}
  back = pretrained.restore_params(out / pretrained.EXPORT_PARAMS, _abstract(mesh, P()))
  np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(params["w"]))
  with pytest.raises(FileNotFoundError, match="no lsm2 description here"):
    pretrained.read_description(tmp_path / "nowhere")


def test_restore_params_only_at_a_chosen_step(tmp_path):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=3)
  for step in (1, 2):
    state = {"params": _state(mesh, P(), value=float(step)), "opt": jnp.ones((3,)) * step}
    ckpt.maybe_save(step, state, _data_iter(), force=True)
  ckpt.wait()
  abstract = _abstract(mesh, P())
  step, params = pretrained.restore_checkpoint_params(tmp_path, abstract)
  assert step == 2 and int(params["step"]) == 2
  step, params = pretrained.restore_checkpoint_params(tmp_path, abstract, step=1)
  assert step == 1 and float(params["w"][0, 0]) == 1.0
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
    pretrained.restore_checkpoint_params(tmp_path, abstract, step=7)
