"""Orbax checkpointing: resharding restore, unreadable steps fall back and are moved aside
(also object by object, as on a bucket), another model's checkpoint is refused, the
processes of a job agree on the step; params export (complete only with its manifest,
swapped in so that one complete copy always exists) and restore (lsm2.pretrained, the
format inference reads)."""
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
import pytest

from lsm2 import pretrained
from lsm2 import sharding
from lsm2 import storage
from lsm2.train import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


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



@pytest.mark.parametrize("phase", ["copy", "delete", "delete_metadata_first"])
def test_moving_a_corrupt_step_aside_on_a_bucket_survives_a_kill_and_completes_once(
    tmp_path, monkeypatch, phase):
  """Object by object (a bucket), the move copies everything and REASON.txt before deleting
  the step. Killed while copying or while deleting, every file is in the step or the copy,
  and the next start completes the move into that same copy, once. (Files go in listing
  order; "delete_metadata_first" fixes the order in which the half-deleted step has lost
  its metadata and no longer reads as a checkpoint of this model.)"""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  _save(tmp_path, mesh, (1, 2), keep=2)
  steps_dir = pretrained.checkpoint_dir(tmp_path)
  _truncate_arrays(steps_dir / "2")
  torn = _snapshot(steps_dir / "2")
  _bucket_like(monkeypatch)
  if phase == "delete_metadata_first":
    listed = storage._file_names  # pylint: disable=protected-access
    monkeypatch.setattr(storage, "_file_names", lambda root: sorted(
        listed(root), key=lambda name: "metadata" not in name.lower()))
    phase = "delete"
  stamps = iter(range(100))  # A later start moves at a later time (another directory name).
  monkeypatch.setattr(checkpoint.time, "strftime", lambda *args: f"T{next(stamps)}")
  path_type = type(epath.Path("/"))
  real = {"copy": path_type.copy, "delete": path_type.unlink}[phase]
  calls = {"n": 0}

  def killed_half_way(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] > len(torn) // 2:
      raise _Killed()
    return real(self, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(path_type, "copy" if phase == "copy" else "unlink", killed_half_way)
    killed = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2)
    with pytest.raises(_Killed):
      killed.restore_latest(_abstract(mesh, P()), _data_iter())
    killed.close()
  [partial] = list((tmp_path / checkpoint.CORRUPT_DIR).iterdir())
  left = _snapshot(steps_dir / "2") if (steps_dir / "2").exists() else {}
  copied = _snapshot(partial)
  assert {**left, **copied}.keys() >= torn.keys()  # Nothing lost ...
  assert all(torn[k] == v for k, v in {**left, **copied}.items() if k in torn)
  assert ("REASON.txt" in copied) == (phase == "delete")  # ... and the reason before deletes.

  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2)  # The next start.
  step, _, _ = ckpt.restore_latest(_abstract(mesh, P()), _data_iter())
  assert step == 1 and ckpt.manager.all_steps() == [1]
  ckpt.close()
  assert list((tmp_path / checkpoint.CORRUPT_DIR).iterdir()) == [partial]  # The same copy.
  moved = _snapshot(partial)
  assert moved.pop("REASON.txt").decode().split(":")[0].isidentifier()
  assert moved == torn and not (steps_dir / "2").exists()

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


# ---------------------------------------------------------------------------
# The export manifest: on a bucket a directory move is a copy and a delete, object by object.
# ---------------------------------------------------------------------------
def _bucket_like(monkeypatch) -> None:
  """Makes lsm2 move directories here as it does on a bucket: object by object."""
  monkeypatch.setattr(storage, "renames_atomically", lambda path: False)


def _export(directory, mesh, value: float) -> pathlib.Path:
  pretrained.export_params(directory, _state(mesh, P(), value=value), {"v": value})
  return pathlib.Path(directory) / pretrained.EXPORT_DIR


def _load(path, mesh) -> tuple[float, float]:
  """(the description's value, the params' value) of the export find_export picks."""
  export = pretrained.find_export(path)
  params = pretrained.restore_params(export / pretrained.EXPORT_PARAMS, _abstract(mesh, P()))
  return pretrained.read_description(export)["v"], float(params["w"][0, 0])


def test_an_export_lists_its_files_in_a_manifest_written_last(tmp_path):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  export = _export(tmp_path, mesh, 1.0)
  listed = json.loads((export / pretrained.EXPORT_MANIFEST).read_text())["files"]
  files = {str(f.relative_to(export)): {"bytes": f.stat().st_size,
                                        "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
           for f in export.rglob("*") if f.is_file()}
  assert listed == {k: v for k, v in files.items() if k != pretrained.EXPORT_MANIFEST}
  assert pretrained.DESCRIPTION_FILE in listed
  assert any(k.startswith(f"{pretrained.EXPORT_PARAMS}/") for k in listed)
  assert pretrained.export_problem(export) is None


def _tear(export: pathlib.Path, how: str) -> str:
  """Damages export/params as an interrupted copy would; returns the expected reason."""
  files = sorted(f for f in (export / pretrained.EXPORT_PARAMS).rglob("*") if f.is_file())
  victim = max(files, key=lambda f: f.stat().st_size)
  name = str(victim.relative_to(export))
  if how == "missing":
    victim.unlink()
    return rf"{name} is missing \(listed in its manifest.json\)"
  size = victim.stat().st_size
  victim.write_bytes(victim.read_bytes()[:size // 2])
  return rf"{name} has {size // 2} bytes, its manifest.json lists {size}"


@pytest.mark.parametrize("how", ["missing", "short"])
def test_a_half_copied_export_is_refused_or_replaced_by_its_complete_copy(tmp_path, how):
  """What a kill during a bucket move leaves: export/ with lsm2.json but not all its params."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  export = _export(tmp_path, mesh, 1.0)
  reason = _tear(export, how)
  for path in (tmp_path, export):
    with pytest.raises(pretrained.IncompleteExportError,
                       match=rf"{export} is not a complete export: {reason}\. .*nothing was "
                             rf"read\. .*lsm2.load\('{tmp_path}', step=N\) reads a training"):
      pretrained.find_export(path)
  with pytest.raises(pretrained.IncompleteExportError, match=reason):
    pretrained.load_pretrained(tmp_path)
  before = _snapshot(tmp_path)
  pretrained.recover_export(tmp_path)  # No complete copy: kept as it is for the next export.
  assert _snapshot(tmp_path) == before

  # With a complete copy beside it (a swap interrupted), readers use the copy, and the
  # next start puts the copy in its place.
  complete = tmp_path / "complete"
  _export(complete, mesh, 2.0).rename(tmp_path / pretrained.EXPORT_OLD)
  assert _load(tmp_path, mesh) == (2.0, 2.0)
  assert _load(export, mesh) == (2.0, 2.0)
  pretrained.recover_export(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["complete", pretrained.EXPORT_DIR]
  assert pretrained.export_problem(export) is None and _load(export, mesh) == (2.0, 2.0)


def test_an_export_without_manifest_loads_locally_and_on_a_bucket_only_once_marked(
    tmp_path, monkeypatch):
  """Exports written before manifests: locally (atomic renames) complete as before; on a
  bucket refused with the fix until write_manifest marks them."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  export = _export(tmp_path, mesh, 1.0)
  (export / pretrained.EXPORT_MANIFEST).unlink()
  assert _load(tmp_path, mesh) == (1.0, 1.0)
  _bucket_like(monkeypatch)
  with pytest.raises(pretrained.IncompleteExportError,
                     match=rf"{export} is not a complete export: it has no manifest.json, so it "
                           r"may be part of an interrupted copy .* mark it so with .*"
                           rf"pretrained.write_manifest\('{export}'\)"):
    pretrained.find_export(tmp_path)
  pretrained.write_manifest(export)
  assert _load(tmp_path, mesh) == (1.0, 1.0)


def test_a_bucket_swap_killed_at_any_object_leaves_a_complete_export_and_is_repaired(
    tmp_path, monkeypatch):
  """Kills the object-by-object swap before each copy or delete in turn: readers always find
  a complete export (the old or the new one, never a mix), and recover_export leaves exactly
  export/ with it, idempotently."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  old = _export(tmp_path / "old", mesh, 1.0)
  new = _export(tmp_path / "new", mesh, 2.0)
  workdir = tmp_path / "run"
  _bucket_like(monkeypatch)
  path_type = type(epath.Path("/"))
  copy, unlink = path_type.copy, path_type.unlink
  ops = {"left": 0}

  def counted(real):
    def op(self, *args, **kwargs):
      if ops["left"] == 0:
        raise _Killed()
      ops["left"] -= 1
      return real(self, *args, **kwargs)
    return op

  seen = set()
  for kill_at in range(1000):
    if workdir.exists():
      shutil.rmtree(workdir)
    shutil.copytree(old, workdir / pretrained.EXPORT_DIR)
    shutil.copytree(new, workdir / pretrained.EXPORT_TMP)
    ops["left"] = kill_at
    with monkeypatch.context() as patch:
      patch.setattr(path_type, "copy", counted(copy))
      patch.setattr(path_type, "unlink", counted(unlink))
      try:
        pretrained._swap_in(epath.Path(workdir))  # pylint: disable=protected-access
        finished = True
      except _Killed:
        finished = False
    got = _load(workdir, mesh)
    assert got in ((1.0, 1.0), (2.0, 2.0)), kill_at
    assert _load(workdir / pretrained.EXPORT_DIR, mesh) == got, kill_at
    seen.add(got)
    pretrained.recover_export(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [pretrained.EXPORT_DIR], kill_at
    repaired = _load(workdir, mesh)
    assert repaired in ((1.0, 1.0), (2.0, 2.0)), kill_at
    pretrained.recover_export(workdir)  # Idempotent.
    assert _load(workdir, mesh) == repaired
    if finished:
      assert repaired == (2.0, 2.0)
      break
  assert finished and kill_at > 10 and seen == {(1.0, 1.0), (2.0, 2.0)}


# ---------------------------------------------------------------------------
# Multi-process restores: every process goes on from the same step.
# ---------------------------------------------------------------------------
_AGREE = """
import json, pathlib, sys
import grain, jax, jax.numpy as jnp, numpy as np
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lsm2 import pretrained
from lsm2.train import checkpoint
me, out, workdir = jax.process_index(), {}, pathlib.Path(sys.argv[3])

# A real checkpoint, half of each array per process; process 1's half of step 2 is torn.
rows = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
values = np.random.RandomState(0).rand(2, 4096).astype(np.float32)
ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=5)
for step in (1, 2):
  w = jax.make_array_from_callback((2, 4096), rows, lambda i: (values + step)[i])
  ckpt.maybe_save(step, {"w": w}, iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
ckpt.wait()
ckpt.close()
multihost_utils.sync_global_devices("saved")
if me == 0:
  for f in (workdir / "checkpoints/2/state/ocdbt.process_1/d").iterdir():
    f.write_bytes(b"")
multihost_utils.sync_global_devices("torn")
ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=5)
step, state, _ = ckpt.restore_latest(
    {"w": jax.ShapeDtypeStruct((2, 4096), jnp.float32, sharding=rows)}, None)
mine = state["w"].addressable_shards[0]
out["restored"] = [step, bool((np.asarray(mine.data) == (values + 1)[mine.index]).all())]
out["steps"] = ckpt.manager.all_steps()
ckpt.close()

def other_model_on_0(step):
  if me == 0:
    raise pretrained.CheckpointMismatchError("another model")
  return step

for name, steps, restore in (("mismatch", [2, 4], other_model_on_0),
                             ("listing", [2, 4] if me == 0 else [2], lambda s: s)):
  try:
    out[name] = pretrained.restore_newest(steps, restore, "ckpts")
  except (pretrained.CheckpointMismatchError, pretrained.CheckpointUnreadableError) as e:
    out[name] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out), flush=True)
"""


def test_two_processes_fall_back_together_when_one_cannot_read_its_shard(tmp_path):
  """Process 1 alone cannot read its half of step 2. Without agreement process 0 would go on
  from step 2 and process 1 from step 1; with a bare agreement after the failure, process 1's
  collective would pair with the barrier that ends process 0's Orbax restore. Both restore
  step 1; step 2 is moved aside once; a mismatch on one process stops both."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs = [subprocess.Popen([sys.executable, "-c", _AGREE, f"127.0.0.1:{port}", str(i),
                             str(tmp_path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for out in outputs:
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, out[-5000:]
    results.append(json.loads(lines[0][len("RESULT "):]))
  for r in results:
    assert r["restored"] == [1, True] and r["steps"] == [1]
    assert r["mismatch"].startswith("CheckpointMismatchError: ")
    assert r["listing"].startswith("CheckpointUnreadableError: the processes of this job see "
                                   "different checkpoint steps in ckpts")
  assert "process(es) [0] found a checkpoint that does not fit" in results[1]["mismatch"]
  assert "could not be restored (CheckpointUnreadableError: process(es) [1] could not read" in (
      outputs[0])
  [moved] = list((tmp_path / checkpoint.CORRUPT_DIR).iterdir())
  assert moved.name.startswith("2.") and "process(es) [1]" in (moved / "REASON.txt").read_text()
