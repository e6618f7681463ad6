"""File-level attacks: the home of every test where a file or a name lsm2 reads is hostile.

Sections, each under a comment banner:

- Names from outside that try to leave their directory: bucket object names,
  zip members, files inside exports and subject ids with '..' parts, absolute,
  percent-encoded or backslashed; each is refused with an error naming it, and
  nothing is written anywhere.

- Edited and flipped files of a finished run W (a copy of the tiny 10-step run,
  checkpoints at steps 5 and 10, then its export): same-size edits of a description,
  swapped channels, flipped bits in exported parameters and checkpoint arrays,
  tampered checksums; each is refused (or the step skipped), nothing is read
  silently and nothing in W changes.

Helpers sit at the top: `_tree` fingerprints directories, `_refused` runs an
attack and checks that it was refused and changed nothing; `run`, at the head
of its section, is a private copy of W to tamper with.
"""
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import zipfile

import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pandas as pd
import pytest

import lsm2
from lsm2 import pretrained
from lsm2 import sharding
from lsm2 import storage
from lsm2.data.convert import convert
from lsm2.data.convert import main as convert_main
from lsm2.train import checkpoint

import gcs_emulator
from test_data_importers import WATCH, _export, _hr
from tiny_checkpoint import tiny_pretrained

BUCKET = "lsm2-adversarial"
DIRECT = ["--runner=DirectRunner"]


def _tree(*roots: pathlib.Path) -> dict[str, str]:
  """{path: sha256 of its bytes, or 'dir'} of everything below `roots` (symlinks not followed)."""
  out = {}
  for root in roots:
    for directory, dirs, files in os.walk(root):
      for name in dirs:
        out[os.path.join(directory, name)] = "dir"
      for name in files:
        path = pathlib.Path(directory, name)
        out[os.fspath(path)] = ("link " + os.readlink(path) if path.is_symlink()
                                else hashlib.sha256(path.read_bytes()).hexdigest())
  return out


def _refused(call, fragment: str, *watched: pathlib.Path) -> str:
  """Runs `call`: a StorageError holding `fragment` and 'nothing was written', and every
  directory in `watched` exactly as before (no file added, changed or removed)."""
  before = _tree(*watched)
  with pytest.raises(storage.StorageError) as e:
    call()
  message = str(e.value)
  assert fragment in message and "nothing was written" in message, message
  assert _tree(*watched) == before
  return message


@pytest.fixture(name="outside")
def _outside(tmp_path_factory):
  """An empty directory beside the test's own: where the attacks aim to write."""
  return tmp_path_factory.mktemp("OUTSIDE")


ESCAPES = ("dotdot", "absolute", "encoded", "backslash")


def _escaping_names(outside: pathlib.Path) -> dict[str, tuple[str, str]]:
  """Relative names that lead to outside/evil.pth: '..' parts, absolute ('p//x' below prefix
  'p/' is '/x'), percent-encoded and backslashed; with the reason the refusal gives."""
  up = outside.relative_to("/").as_posix()
  return {
      "dotdot": ("../" * 16 + f"{up}/evil.pth", "a '..' part"),
      "absolute": (f"/{up}/evil.pth", "a leading '/'"),
      "encoded": ("%2e%2e%2f" * 16 + up.replace("/", "%2f") + "%2fevil.pth", "a '..' part"),
      "backslash": ("..\\" * 16 + up.replace("/", "\\") + "\\evil.pth", "a '..' part"),
  }


# -------------------------------------------- Names from outside that try to leave their directory


@pytest.mark.parametrize("name,reason", [
    ("a/b.json", None), ("a/", None), ("a/..b/.c", None), ("../x", "a '..' part"),
    ("a/../../x", "a '..' part"), ("/x", "a leading '/'"), ("a//x", "an empty part ('//')"),
    ("", "an empty name"), ("%2e%2e%2fx", "a '..' part"), ("%2fx", "a leading '/'"),
    ("a\\..\\..\\x", "a '..' part"), ("a/%2F..%2Fy", "a '..' part")])
def test_contained_refuses_every_escaping_spelling(tmp_path, name, reason):
  if reason is None:
    assert os.fspath(storage.contained(tmp_path, name, "file")) == os.fspath(tmp_path / name)
  else:
    with pytest.raises(storage.StorageError) as e:
      storage.contained(tmp_path, name, "file")
    assert str(e.value) == (f"file {name!r} leads outside {tmp_path} ({reason}): refused, "
                            "nothing was written")


def test_contained_follows_symlinks_out_of_the_root(tmp_path, outside):
  (tmp_path / "link").symlink_to(outside)
  with pytest.raises(storage.StorageError, match=f"resolves to {outside}/x"):
    storage.contained(tmp_path, "link/x", "file")
  assert os.fspath(storage.contained(tmp_path, "inner/x", "file")) == f"{tmp_path}/inner/x"


@pytest.fixture(name="gcs", scope="module")
def _gcs(tmp_path_factory):
  """A GCS emulator with bucket BUCKET (tests/gcs_emulator.py); this process points at it."""
  with gcs_emulator.serving(tmp_path_factory.mktemp("gcs"), BUCKET) as emulator:
    yield emulator


@pytest.fixture(name="system_tmp")
def _system_tmp(tmp_path_factory, monkeypatch):
  """The system temporary directory (where Beam and the downloads write) moved under pytest's,
  away from the watched tmp_path: Beam leaves empty scratch directories there."""
  scratch = tmp_path_factory.mktemp("system_tmp")
  monkeypatch.setenv("TMPDIR", str(scratch))
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  return scratch


# A real input per format next to the hostile object: a worker's copy (long_csv), the names
# scan of the device formats (apple_health, fitbit_takeout), which created files before.
BUCKET_INPUTS = {
    "long_csv": ("t.csv", b"subject,timestamp,hr\n"),
    "apple_health": ("ann.xml", b"<HealthData/>"),
    "fitbit_takeout": ("ann/Takeout/Fitbit/Global Export Data/steps-2024-03-10.json", b"[]"),
}


@pytest.mark.parametrize("fmt,kind", [  # The names scans are fast; a worker's copy runs Beam.
    *((fmt, kind) for fmt in ("apple_health", "fitbit_takeout") for kind in ESCAPES),
    ("long_csv", "dotdot"), ("long_csv", "encoded")])
def test_bucket_object_names_leading_outside_are_refused(gcs, tmp_path, outside, system_tmp,
                                                         fmt, kind):
  """--beam from a bucket: an object whose name leads outside the input is refused before
  anything is downloaded, naming it; nothing appears outside, in --out or beside it."""
  pytest.importorskip("apache_beam")
  prefix = f"escape_{fmt}_{kind}"
  real, data = BUCKET_INPUTS[fmt]
  gcs.upload(BUCKET, f"{prefix}/{real}", data)
  evil, reason = _escaping_names(outside)[kind]
  gcs.upload(BUCKET, f"{prefix}/{evil}", b"payload")
  # The listing shows a '..' or '/' part as a folder of that name ('../', '/'); the encoded
  # and backslashed names are one object name each.
  shown = {"dotdot": "../", "absolute": "/"}.get(kind, evil)
  _refused(lambda: convert(fmt, f"gs://{BUCKET}/{prefix}", tmp_path / "out", beam_args=DIRECT),
           f"object name {shown!r} leads outside gs://{BUCKET}/{prefix} ({reason})",
           tmp_path, outside)
  assert not (tmp_path / "out").exists()


def _zip(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps the name exactly as given.
  return path


def _takeout_steps() -> bytes:
  return b'[{"dateTime": "03/10/24 10:00:00", "value": "5"}]'


@pytest.mark.parametrize("kind", ESCAPES)
@pytest.mark.parametrize("fmt", ["apple_health", "fitbit_takeout"])
def test_zip_members_leading_outside_are_refused(tmp_path, outside, fmt, kind):
  """export.zip / a Takeout zip with a member named to land outside: the archive is refused,
  naming the member, before its data are read; nothing is written."""
  evil, reason = _escaping_names(outside)[kind]
  if fmt == "apple_health":
    real = {"apple_health_export/export.xml": _export(
        [_hr(WATCH, "2024-03-09 10:00:00 -0800", 60)]).encode()}
    options = {}
  else:
    real = {"Takeout/Fitbit/Global Export Data/steps-2024-03-10.json": _takeout_steps()}
    options = {"timezone": "UTC"}
  archive = _zip(tmp_path / "ann.zip", {**real, evil: b"payload"})
  _refused(lambda: convert(fmt, archive, tmp_path / "out", max_missing=1.0,
                           device_options=options),
           f"zip member {evil!r} leads outside {archive} ({reason})", tmp_path, outside)
  assert not (tmp_path / "out").exists()


def test_cli_names_the_refused_member_and_exits_2(tmp_path, outside, capsys):
  evil, _ = _escaping_names(outside)["dotdot"]
  archive = _zip(tmp_path / "export.zip", {"apple_health_export/export.xml": b"", evil: b""})
  assert convert_main(["--format", "apple_health", "--input", str(archive),
                       "--out", str(tmp_path / "out")]) == 2
  assert f"error: zip member {evil!r} leads outside {archive}" in capsys.readouterr().err
  assert not (tmp_path / "out").exists() and not any(outside.iterdir())


@pytest.mark.parametrize("fmt", ["apple_health", "fitbit_takeout", "actiwatch"])
def test_files_inside_an_export_that_link_outside_are_refused(tmp_path, outside, fmt):
  """A file inside an export folder that is a symlink to a file elsewhere is refused, naming
  it and where it resolves to: an export reads only its own files."""
  secret = outside / "secret"
  secret.write_text("not the user's export")
  root = tmp_path / "ann"
  inner = {"apple_health": "apple_health_export/export.xml",
           "fitbit_takeout": "Takeout/Fitbit/Global Export Data/steps-2024-03-10.json",
           "actiwatch": "condition/condition_1.csv"}[fmt]
  (root / inner).parent.mkdir(parents=True)
  (root / inner).symlink_to(secret)
  options = {"device_options": {"timezone": "UTC"}} if fmt == "fitbit_takeout" else {}
  _refused(lambda: convert(fmt, root, tmp_path / "out", max_missing=1.0, **options),
           f"file {inner!r} leads outside {root} (it resolves to {secret})", tmp_path, outside)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("beam", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_subject_ids_never_become_file_names(tmp_path, outside, system_tmp, beam):
  """Subject ids like '../x' or '/abs' are data, not paths: they are kept as written in the
  metadata, and the dataset's files are named by split and shard alone."""
  if beam:
    pytest.importorskip("apache_beam")
  ids = ["../x", f"/{outside.relative_to('/').as_posix()}/evil", "%2e%2e%2fy", "..\\z"]
  t = pd.date_range("2024-01-01", periods=1440, freq="min")
  pd.concat([pd.DataFrame({"subject": s, "timestamp": t, "steps": np.arange(1440.0) % 7})
             for s in ids]).to_csv(tmp_path / "t.csv", index=False)
  before = _tree(tmp_path, outside)
  meta, _ = convert("long_csv", tmp_path / "t.csv", tmp_path / "out", max_missing=1.0,
                    split_fractions=(0.5, 0.25, 0.25), beam_args=DIRECT if beam else None)
  assert sorted(s for v in meta.subjects.values() for s in v) == sorted(ids)
  added = set(_tree(tmp_path, outside)) - set(before)
  out = os.fspath(tmp_path / "out")
  assert added and all(p.startswith(out) for p in added)  # Only the dataset, all inside --out.
  shards = {p.rpartition("/")[2] for p in added} - {"metadata.json"}
  assert not any(part in name for name in shards for part in ("..", "%", "\\", "evil"))


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


# ---------------------------------- Edited and flipped files: array checksums, what they detect
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


# ------- Edited and flipped files: exports and descriptions (same-size edits, swapped channels)
def _set_norm_mean(d):
  d["norm_mean"][0] += 20.0


def _swap_channels(d):
  d["channels"][0], d["channels"][1] = d["channels"][1], d["channels"][0]


@pytest.mark.parametrize("edit", [_set_norm_mean, _swap_channels])
def test_an_edited_export_description_is_refused_naming_the_file_and_the_fix(run, edit):
  _edit_json(run / "export" / "lsm2.json", edit)
  before = _tree(run)
  with pytest.raises(pretrained.IntegrityError,
                     match=rf"{run}/export: the content of lsm2.json differs from the one "
                           rf"exported .*nothing was loaded. To recover, run the training "
                           rf"command on {run} again .*lsm2.load\('{run}', step=N\)"):
    lsm2.load(run)
  assert _tree(run) == before


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
  before = _tree(run)
  with pytest.raises(pretrained.IntegrityError,
                     match=rf"{run}/lsm2.json disagrees with {run}/run.json on {field}: "
                           r".*nothing was loaded"):
    lsm2.load(run, step=10)
  assert _tree(run) == before


def test_an_edited_model_field_of_the_workdir_description_is_refused(run):
  _edit_json(run / "lsm2.json", lambda d: d["run_config"]["masking"].update(random_ratio=0.5))
  with pytest.raises(pretrained.IntegrityError, match=r"on run_config.masking.random_ratio"):
    lsm2.load(run, step=5)


# ------------ Edited and flipped files: checkpoints (bit rot in the arrays, tampered checksums)
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
  before = _tree(run)
  with pytest.raises(pretrained.CheckpointUnreadableError, match=r"step 10: "):
    lsm2.load(run, step=10)
  with caplog.at_level(logging.WARNING):
    assert lsm2.load(run).step == 5
  assert "step 10" in caplog.text and "CHECKPOINT UNREADABLE" in caplog.text
  if damage == "checksums":
    assert "differ from the ones saved" in caplog.text
  assert _tree(run) == before


def test_load_says_when_newer_checkpoints_than_the_export_exist(run, caplog):
  shutil.copytree(run / "checkpoints" / "10", run / "checkpoints" / "12")
  with caplog.at_level(logging.INFO):
    assert lsm2.load(run).step == 10
  assert "the export of step 10" in caplog.text and "newer checkpoints (steps [12])" in caplog.text
  assert f"lsm2.load('{run}', step=12)" in caplog.text
