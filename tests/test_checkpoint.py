"""Orbax checkpointing: resharding restore, unreadable steps fall back and are moved aside,
another model's checkpoint is refused; params export (swapped in atomically) and restore
(lsm2.pretrained, the format inference reads)."""
import logging
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
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


def _save(directory, mesh, steps, keep=3, params_only=False):
  ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=keep)
  for step in steps:
    state = _state(mesh, P(), value=float(step))
    if params_only:
      state = {"params": state, "opt": jnp.ones((3,)) * step}
    ckpt.maybe_save(step, state, _data_iter(), force=True)
  ckpt.wait()
  ckpt.close()


def _truncate_arrays(step_dir) -> None:
  """Cuts every array data file of a step's train state in half (what a torn copy leaves)."""
  files = [f for f in (pathlib.Path(step_dir) / pretrained.STATE).rglob("*")
           if f.is_file() and f.parent.name == "d"]  # OCDBT data files.
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def _snapshot(root) -> dict[str, bytes]:
  """Every file under `root` with its bytes: proves that nothing was modified."""
  root = pathlib.Path(root)
  return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


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


def test_corrupt_latest_step_falls_back_is_moved_aside_and_its_step_saves_again(tmp_path, caplog):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  _save(tmp_path, mesh, (1, 2), keep=2)
  steps_dir = pretrained.checkpoint_dir(tmp_path)
  _truncate_arrays(steps_dir / "2")
  torn = _snapshot(steps_dir / "2")
  with caplog.at_level(logging.WARNING):
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2)
    step, state, _ = ckpt.restore_latest(_abstract(mesh, P()), _data_iter())
  assert step == 1
  assert int(state["step"]) == 1
  assert "CHECKPOINT UNREADABLE: step 2" in caplog.text and "could not be restored" in caplog.text
  assert "moved step 2 aside" in caplog.text
  # Moved out of Orbax's sight, byte for byte, with the reason beside it; never deleted.
  [moved] = list((tmp_path / checkpoint.CORRUPT_DIR).iterdir())
  assert moved.name.startswith("2.")
  kept = _snapshot(moved)
  reason = kept.pop("REASON.txt").decode()
  assert reason.split(":")[0].isidentifier()  # "ValueError: OUT_OF_RANGE: ...": the error.
  assert kept == torn
  assert ckpt.manager.all_steps() == [1]
  # Step 2 is saved again (not skipped as "not newer than the latest"), and keep=2
  # counts only readable steps: 1 and 2 stay, then 2 and 3.
  assert ckpt.maybe_save(2, _state(mesh, P(), value=2.0), _data_iter(), force=True)
  ckpt.wait()
  assert ckpt.manager.all_steps() == [1, 2]
  ckpt.maybe_save(3, _state(mesh, P(), value=3.0), _data_iter(), force=True)
  ckpt.wait()
  assert ckpt.manager.all_steps() == [2, 3]
  assert _snapshot(moved) == {**torn, "REASON.txt": (moved / "REASON.txt").read_bytes()}
  step, state, _ = ckpt.restore_latest(_abstract(mesh, P()), _data_iter())
  assert step == 3 and float(state["w"][0, 0]) == 3.0
  ckpt.close()


def test_a_checkpoint_of_another_model_raises_and_changes_nothing(tmp_path):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  _save(tmp_path, mesh, (1, 2))
  before = _snapshot(tmp_path)
  other = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=NamedSharding(mesh, P())),
           "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
           "extra": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(mesh, P()))}
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=3)
  with pytest.raises(pretrained.CheckpointMismatchError) as e:
    ckpt.restore_latest(other, _data_iter())
  message = str(e.value)
  where = f"checkpoint step 2 in {pretrained.checkpoint_dir(tmp_path)}"
  assert f"{where} does not fit this model" in message
  assert "w is float32[8, 8] in the checkpoint, float32[4, 8] in this model" in message
  assert "extra is not in the checkpoint" in message
  assert "nothing was restored, moved or deleted" in message
  assert f"--config.init_from={tmp_path}" in message
  ckpt.close()
  assert _snapshot(tmp_path) == before
  assert not (tmp_path / checkpoint.CORRUPT_DIR).exists()


def test_no_readable_step_raises_and_moves_nothing(tmp_path):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  _save(tmp_path, mesh, (1,))
  _truncate_arrays(pretrained.checkpoint_dir(tmp_path) / "1")
  before = _snapshot(tmp_path)
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=3)
  with pytest.raises(pretrained.CheckpointUnreadableError,
                     match=r"no checkpoint step in .* could be read: step 1: .*Nothing was moved"):
    ckpt.restore_latest(_abstract(mesh, P()), _data_iter())
  ckpt.close()
  assert _snapshot(tmp_path) == before
  assert not (tmp_path / checkpoint.CORRUPT_DIR).exists()


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


def test_params_restore_falls_back_read_only_and_refuses_another_model(tmp_path, caplog):
  """lsm2.load and evaluation (restore_checkpoint_params) fall back like training, but
  never move or change a file; an explicit unreadable step and another model raise."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  _save(tmp_path, mesh, (1, 2), params_only=True)
  _truncate_arrays(pretrained.checkpoint_dir(tmp_path) / "2")
  before = _snapshot(tmp_path)
  abstract = _abstract(mesh, P())
  with caplog.at_level(logging.WARNING):
    step, params = pretrained.restore_checkpoint_params(tmp_path, abstract)
  assert step == 1 and float(params["w"][0, 0]) == 1.0
  assert "CHECKPOINT UNREADABLE: step 2" in caplog.text
  with pytest.raises(pretrained.CheckpointUnreadableError, match="could be read: step 2: "):
    pretrained.restore_checkpoint_params(tmp_path, abstract, step=2)
  other = {**abstract, "w": jax.ShapeDtypeStruct((4, 8), jnp.float32)}
  with pytest.raises(pretrained.CheckpointMismatchError,
                     match=r"checkpoint step 1 in .* does not fit this model: params/w is "
                           r"float32\[8, 8\] in the checkpoint, float32\[4, 8\] in this model"):
    pretrained.restore_checkpoint_params(tmp_path, other, step=1)
  assert _snapshot(tmp_path) == before
  assert not (tmp_path / checkpoint.CORRUPT_DIR).exists()


class _Killed(Exception):
  """Stands for a SIGKILL at one point of export_params."""


def _kill_at(monkeypatch, point: str) -> None:
  """Makes export_params stop at `point`, leaving the files as a kill there would."""
  path_type = type(epath.Path("/"))
  if point == "before_description":  # The new arrays are written, the description not.
    def write_description(*args, **kwargs):
      raise _Killed()
    monkeypatch.setattr(pretrained, "write_description", write_description)
  elif point == "between_renames":  # export -> export.old done, export.tmp -> export not.
    rename = path_type.rename
    def rename_but_the_new_export(self, target):
      if self.name == pretrained.EXPORT_TMP:
        assert (self.parent / pretrained.EXPORT_OLD).exists()
        raise _Killed()
      return rename(self, target)
    monkeypatch.setattr(path_type, "rename", rename_but_the_new_export)
  else:  # "before_cleanup": the new export is in place, export.old not deleted yet.
    def rmtree(self, *args, **kwargs):
      raise _Killed()
    monkeypatch.setattr(path_type, "rmtree", rmtree)


@pytest.mark.parametrize("point,survivor", [
    ("before_description", "old"), ("between_renames", "old"), ("before_cleanup", "new")])
def test_an_interrupted_export_leaves_a_loadable_one_and_is_recovered(tmp_path, monkeypatch,
                                                                      point, survivor):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  values = {"old": 1.0, "new": 2.0}
  pretrained.export_params(tmp_path, _state(mesh, P(), value=values["old"]), {"v": "old"})
  previous = _snapshot(tmp_path / pretrained.EXPORT_DIR)
  with monkeypatch.context() as patch:
    _kill_at(patch, point)
    with pytest.raises(_Killed):
      pretrained.export_params(tmp_path, _state(mesh, P(), value=values["new"]), {"v": "new"})

  def loaded(path):
    export = pretrained.find_export(path)
    params = pretrained.restore_params(export / pretrained.EXPORT_PARAMS, _abstract(mesh, P()))
    return pretrained.read_description(export)["v"], float(params["w"][0, 0])

  # Right after the kill, the workdir and WORKDIR/export both load a complete export.
  want = (survivor, values[survivor])
  assert loaded(tmp_path) == want
  assert loaded(tmp_path / pretrained.EXPORT_DIR) == want
  if survivor == "old" and point == "before_description":
    assert _snapshot(tmp_path / pretrained.EXPORT_DIR) == previous  # Not modified.
  # The next start completes or undoes the swap the same way every time.
  pretrained.recover_export(tmp_path)
  names = sorted(p.name for p in tmp_path.iterdir())
  assert names == [pretrained.EXPORT_DIR]
  completed = "new" if point in ("between_renames", "before_cleanup") else "old"
  assert loaded(tmp_path) == (completed, values[completed])
  if completed == "old":
    assert _snapshot(tmp_path / pretrained.EXPORT_DIR) == previous
  pretrained.recover_export(tmp_path)  # Idempotent.
  assert loaded(tmp_path) == (completed, values[completed])
