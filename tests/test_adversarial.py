"""File-level attacks: the home of every test where a file or a name lsm2 reads is hostile.

Sections, each under a comment banner:

- Names from outside that try to leave their directory: bucket object names,
  zip members, files inside exports and subject ids with '..' parts, absolute,
  percent-encoded or backslashed; each is refused with an error naming it, and
  nothing is written anywhere.

Edited and flipped files get a section of their own. Helpers sit at the top:
`_tree` fingerprints directories, `_refused` runs an attack and checks that it
was refused and changed nothing.
"""
import hashlib
import os
import pathlib
import tempfile
import zipfile

import numpy as np
import pandas as pd
import pytest

from lsm2 import storage
from lsm2.data.convert import convert
from lsm2.data.convert import main as convert_main

import gcs_emulator
from test_data_importers import WATCH, _export, _hr

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
