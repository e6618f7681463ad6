"""Edited and flipped files of a finished run: every one is refused, none is read silently.

W is a copy of the tiny 10-step run (checkpoints at steps 5 and 10, then the export).
"""
import json
import logging
import pathlib
import shutil

import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import lsm2
from lsm2 import pretrained
from lsm2 import sharding
from lsm2.train import checkpoint
from tiny_checkpoint import tiny_pretrained


def _tree_hash(root: pathlib.Path) -> dict[str, bytes]:
  return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture
def run(tmp_path_factory, tmp_path) -> pathlib.Path:
  """A private copy W of the tiny run, to tamper with."""
  workdir, _ = tiny_pretrained(tmp_path_factory.getbasetemp())
  copy = tmp_path / "W"
  shutil.copytree(workdir, copy)
  return copy


def _edit_json(path: pathlib.Path, edit) -> None:
  data = json.loads(path.read_text())
  edit(data)
  path.write_text(json.dumps(data, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------
# Array checksums: what they detect.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8])
def test_any_single_bit_flip_changes_an_arrays_checksum(dtype):
  x = jnp.arange(24, dtype=jnp.float32).reshape(4, 6).astype(dtype)
  base = pretrained.array_checksums({"x": x})["x"]
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize]
  bits = np.asarray(x).view(unsigned)
  for i in range(bits.size):
    for bit in range(8 * bits.itemsize):
      flipped = bits.copy()
      flipped.flat[i] ^= unsigned(1 << bit)
      changed = pretrained.array_checksums({"x": jnp.asarray(flipped.view(np.asarray(x).dtype))})
      assert changed["x"] != base, (i, bit)
  # Two values swapped: the sum of the values is the same, the checksum is not.
  swapped = np.asarray(x).copy()
  swapped[0, [1, 2]] = swapped[0, [2, 1]]
  assert pretrained.array_checksums({"x": jnp.asarray(swapped)})["x"] != base


def test_checksums_are_the_same_for_any_sharding_and_cover_keys_and_bools():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
  tree = {"w": jnp.asarray(x), "ok": jnp.asarray(x > 0), "rng": jax.random.PRNGKey(3),
          "key": jax.random.key(4)}
  sharded = {**tree, "w": jax.device_put(x, NamedSharding(mesh, P("data", None)))}
  assert len(sharded["w"].addressable_shards) == 8
  sums = pretrained.array_checksums(tree)
  assert sums == pretrained.array_checksums(sharded)
  assert sorted(sums) == ["key", "ok", "rng", "w"]
  assert sums["rng"] != pretrained.array_checksums({**tree, "rng": jax.random.PRNGKey(5)})["rng"]
  with pytest.raises(pretrained.IntegrityError, match=r"here: the values of w differ"):
    pretrained.check_checksums({"w": jnp.asarray(x) + 1}, sums, "here")


def test_checkpoint_checksums_are_saved_verified_and_can_be_turned_off(tmp_path, caplog):
  """With checksums on, a restored step whose values differ is refused; turned off
  (config.checkpoint_checksums=False), the step has none and restores unverified, logged."""
  tree = {"w": jnp.arange(16.0).reshape(4, 4), "n": jnp.int32(3)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  data = lambda: iter(grain.MapDataset.range(4).to_iter_dataset())
  for on in (True, False):
    ckpt = checkpoint.Checkpointer(tmp_path / str(on), save_every=1, keep=2, checksums=on)
    assert ckpt.maybe_save(1, tree, data(), force=True)
    ckpt.wait()
    assert (tmp_path / str(on) / "checkpoints" / "1" / pretrained.CHECKSUMS).exists() == on
    with caplog.at_level(logging.INFO):
      step, restored, _ = ckpt.restore_latest(abstract, None)
    assert step == 1 and np.array_equal(restored["w"], tree["w"])
    assert ("its arrays are not verified" in caplog.text) == (not on)
    if on:
      with pytest.raises(pretrained.IntegrityError, match=r"the values of w differ"):
        pretrained.verify_checksums(ckpt.manager, 1, {**tree, "w": tree["w"] + 1}, "step 1")
    ckpt.close()


# ---------------------------------------------------------------------------
# Exports and descriptions: edits of the same byte count, swapped channels.
# ---------------------------------------------------------------------------
def _set_norm_mean(d):
  d["norm_mean"][0] += 20.0


def _swap_channels(d):
  d["channels"][0], d["channels"][1] = d["channels"][1], d["channels"][0]


@pytest.mark.parametrize("edit", [_set_norm_mean, _swap_channels])
def test_an_edited_export_description_is_refused_naming_the_file_and_the_fix(run, edit):
  _edit_json(run / "export" / "lsm2.json", edit)
  before = _tree_hash(run)
  with pytest.raises(pretrained.IntegrityError,
                     match=rf"{run}/export: the content of lsm2.json differs from the one "
                           rf"exported .*nothing was loaded. To recover, run the training "
                           rf"command on {run} again .*lsm2.load\('{run}', step=N\)"):
    lsm2.load(run)
  assert _tree_hash(run) == before


def test_a_flipped_bit_in_exported_params_is_refused(run):
  files = [f for f in (run / "export" / "params").rglob("*") if f.is_file()]
  victim = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x10
  victim.write_bytes(bytes(data))
  with pytest.raises(pretrained.IntegrityError,
                     match=rf"the content of {victim.relative_to(run / 'export')} differs"):
    lsm2.load(run)


def test_an_export_whose_manifest_lists_sizes_only_loads_with_a_warning(run, caplog):
  """Exports written before lsm2 hashed them still load, saying they are not verified."""
  manifest = run / "export" / "manifest.json"
  _edit_json(manifest, lambda d: d.update(files={k: v["bytes"] for k, v in d["files"].items()}))
  with caplog.at_level(logging.WARNING):
    assert lsm2.load(run).step == 10
  assert "lists no content hashes" in caplog.text


@pytest.mark.parametrize("field", ["norm_mean", "norm_std", "channels"])
def test_an_edited_workdir_description_is_refused_against_run_json(run, field):
  edit = {"norm_mean": _set_norm_mean, "channels": _swap_channels,
          "norm_std": lambda d: d["norm_std"].__setitem__(1, d["norm_std"][1] * 2)}[field]
  _edit_json(run / "lsm2.json", edit)
  before = _tree_hash(run)
  with pytest.raises(pretrained.IntegrityError,
                     match=rf"{run}/lsm2.json disagrees with {run}/run.json on {field}: "
                           r".*nothing was loaded"):
    lsm2.load(run, step=10)
  assert _tree_hash(run) == before


def test_an_edited_model_field_of_the_workdir_description_is_refused(run):
  _edit_json(run / "lsm2.json", lambda d: d["run_config"]["masking"].update(random_ratio=0.5))
  with pytest.raises(pretrained.IntegrityError, match=r"on run_config.masking.random_ratio"):
    lsm2.load(run, step=5)


# ---------------------------------------------------------------------------
# Checkpoints: bit rot in the arrays, tampered checksums.
# ---------------------------------------------------------------------------
def _flip_bits_in_every_array_file(step_dir: pathlib.Path) -> None:
  """One bit in every 256 bytes of every data file: OCDBT packs the parameters and the optimiser
  state into shared files in no fixed order, and a load reads only the parameters, so one flip
  could land in bytes a load never reads."""
  for victim in (f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)):
    data = np.frombuffer(victim.read_bytes(), np.uint8).copy()
    data[::256] ^= 0x01
    victim.write_bytes(data.tobytes())


@pytest.mark.parametrize("damage", ["bit_flip", "checksums"])
def test_a_damaged_checkpoint_is_never_served(run, damage, caplog):
  """Step 10 damaged, no export: the newest readable step (5) is served, with a warning; asked
  for by number, step 10 is refused. Nothing in the workdir changes."""
  shutil.rmtree(run / "export")
  if damage == "bit_flip":
    _flip_bits_in_every_array_file(run / "checkpoints" / "10")
  else:  # Values that differ from the saved ones: the checksums say so.
    _edit_json(run / "checkpoints" / "10" / "checksums" / "metadata",
               lambda d: d["arrays"].update({k: [v[0] ^ 1, v[1]] for k, v in d["arrays"].items()
                                             if k.startswith("params/")}))
  before = _tree_hash(run)
  with pytest.raises(pretrained.CheckpointUnreadableError, match=r"step 10: "):
    lsm2.load(run, step=10)
  with caplog.at_level(logging.WARNING):
    assert lsm2.load(run).step == 5
  assert "step 10" in caplog.text and "CHECKPOINT UNREADABLE" in caplog.text
  if damage == "checksums":
    assert "differ from the ones saved" in caplog.text
  assert _tree_hash(run) == before


def test_load_says_when_newer_checkpoints_than_the_export_exist(run, caplog):
  shutil.copytree(run / "checkpoints" / "10", run / "checkpoints" / "12")
  with caplog.at_level(logging.INFO):
    assert lsm2.load(run).step == 10
  assert "the export of step 10" in caplog.text and "newer checkpoints (steps [12])" in caplog.text
  assert f"lsm2.load('{run}', step=12)" in caplog.text
