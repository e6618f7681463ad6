"""Commands that replace a dataset (convert/synthesize --overwrite, tfds_info upgrade) stage
the new one and swap it in only once it is complete: a failure or a kill at any point leaves
one complete dataset, and the next run (or a reader) recovers.

Every failing case hashes the dataset directory before and after: nothing else changed.
"""
import hashlib
import pathlib
import shutil

from etils import epath
import pandas as pd
import pytest

from lsm2 import storage
from lsm2.data import dataset, metadata, synthesize, tfds_info
from lsm2.data import writer as writer_lib
from lsm2.data.convert import main as convert_main

STAGING = metadata.STAGING_DIR


def _tree(root) -> dict[str, str | None]:
  """Every file (its sha256) and directory (None) below `root`, local or gs://."""
  root = epath.Path(root)
  prefix = len(str(root).rstrip("/")) + 1
  out = {}
  for directory, dirs, files in root.walk():
    for d in dirs:
      out[str(directory / d)[prefix:]] = None
    for f in files:
      out[str(directory / f)[prefix:]] = hashlib.sha256((directory / f).read_bytes()).hexdigest()
  return out


def _records(data_dir):
  meta = metadata.load_metadata(data_dir)
  return [(r.subject_id, r.day, r.signals.tobytes(), r.observed.tobytes())
          for split in meta.splits for r in dataset.iter_records(meta, split)]


def _csv(path: pathlib.Path, subjects, value: float) -> pathlib.Path:
  ts = pd.date_range("2024-01-01", periods=1440, freq="min").strftime("%Y-%m-%d %H:%M:%S")
  pd.concat([pd.DataFrame({"subject": s, "timestamp": ts, "steps": value}) for s in subjects]
            ).to_csv(path, index=False)
  return path


def _fail_after(monkeypatch, n: int, error: Exception):
  """The writer raises `error` when encoding its (n+1)-th record: shards are half written."""
  encode, calls = writer_lib.encode_checked, []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) > n:
      raise error
    return encode(*args, **kwargs)
  monkeypatch.setattr(writer_lib, "encode_checked", failing)
  return calls


class _Killed(BaseException):
  """A kill: nothing after it runs (see _no_cleanup)."""


def _no_cleanup(monkeypatch):
  """A killed process cleans nothing up: the writer's exit path does not recover."""
  monkeypatch.setattr(writer_lib, "recover", lambda out_dir: None)


# ----------------------------------------------------------------------------- convert


def test_convert_overwrite_replaces_the_dataset_and_keeps_other_files(tmp_path, capsys):
  out = tmp_path / "data"
  old = _csv(tmp_path / "old.csv", ["a", "b", "c", "d"], 1.0)
  args = ["--format", "long_csv", "--out", str(out), "--split-fractions", "1", "0", "0"]
  assert convert_main(args + ["--input", str(old), "--shards", "2"]) == 0
  (out / "NOTES.txt").write_text("mine")
  assert convert_main(args + ["--input", str(_csv(tmp_path / "new.csv", ["x"], 2.0)),
                              "--shards", "1", "--overwrite"]) == 0, capsys.readouterr().err
  meta = metadata.load_metadata(out)
  assert meta.subjects["train"] == ["x"] and meta.splits["train"] == [
      "train-00000-of-00001.tfrecord"]
  assert [r[0] for r in _records(out)] == ["x"]
  assert not list(out.glob("train-*-of-00002.tfrecord"))  # The old shards are gone ...
  assert (out / "NOTES.txt").read_text() == "mine"  # ... the user's files stay ...
  assert not (out / STAGING).exists()  # ... and nothing is left of the staging.
  assert tfds_info.builder(out).info.splits["train"].num_examples == 1


def test_failed_convert_overwrite_leaves_the_old_dataset_byte_for_byte(tmp_path, capsys,
                                                                       monkeypatch):
  out = tmp_path / "data"
  args = ["--format", "long_csv", "--out", str(out), "--split-fractions", "1", "0", "0"]
  assert convert_main(args + ["--input", str(_csv(tmp_path / "old.csv", ["a", "b"], 1.0))]) == 0
  before = _tree(out)
  new = ["--input", str(_csv(tmp_path / "new.csv", ["x", "y", "z"], 2.0)), "--overwrite"]
  with monkeypatch.context() as m:  # The disk fills up after two records.
    _fail_after(m, 2, OSError(28, "No space left on device"))
    assert convert_main(args + new) == 2
  assert "No space left on device" in capsys.readouterr().err
  assert _tree(out) == before  # Old dataset intact, no staging left behind.
  assert convert_main(args + new) == 0  # The rerun does not trip over anything.
  assert sorted(r[0] for r in _records(out)) == ["x", "y", "z"]


def test_failed_beam_overwrite_leaves_the_old_dataset_byte_for_byte(tmp_path, capsys,
                                                                    monkeypatch):
  """--beam hands its workers' shards to the same staged writer (beam_convert._finish)."""
  pytest.importorskip("apache_beam")
  from lsm2.data import beam_convert  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # The DirectRunner's scratch goes here.
  out = tmp_path / "data"
  args = ["--format", "long_csv", "--out", str(out), "--split-fractions", "1", "0", "0"]
  assert convert_main(args + ["--input", str(_csv(tmp_path / "old.csv", ["a", "b"], 1.0))]) == 0
  before = _tree(out)
  new = ["--input", str(_csv(tmp_path / "new.csv", ["x", "y", "z"], 2.0)), "--shards", "3",
         "--overwrite", "--beam", "--runner=DirectRunner"]
  move, moved = beam_convert._move, []  # pylint: disable=protected-access

  def failing_move(src, dst):  # The disk fills up after the first shard moved in.
    if moved:
      raise OSError(28, "No space left on device")
    moved.append(dst)
    move(src, dst)
  with monkeypatch.context() as m:
    m.setattr(beam_convert, "_move", failing_move)
    assert convert_main(args + new) == 2
  assert "No space left on device" in capsys.readouterr().err
  assert moved and _tree(out) == before  # A shard had reached the staging: deleted again.
  assert convert_main(args + new) == 0, capsys.readouterr().err
  assert sorted(r[0] for r in _records(out)) == ["x", "y", "z"]
  assert not (out / STAGING).exists()


def test_a_staged_dataset_that_does_not_check_out_replaces_nothing(tmp_path, monkeypatch):
  """finish() reads the staged dataset back before the swap: a shard that lost bytes on the
  way (a flaky disk or bucket) fails the write, naming the shard, and the old dataset stays."""
  d = tmp_path / "d"
  synthesize.write_synthetic_dataset(d, subjects=4, days=1, seed=1)
  before = _tree(d)
  write_tfds = tfds_info.write_tfds_metadata

  def truncating(meta, out_dir):  # Runs on the staging once every shard is written.
    shard = epath.Path(out_dir) / meta.splits["train"][0]
    shard.write_bytes(shard.read_bytes()[:-1])
    write_tfds(meta, out_dir)
  monkeypatch.setattr(tfds_info, "write_tfds_metadata", truncating)
  with pytest.raises(metadata.MetadataError, match=r"does not check out, so it did not replace "
                     r".*train-00000-of-00001\.tfrecord has \d+ bytes, metadata says"):
    synthesize.write_synthetic_dataset(d, subjects=3, days=1, seed=2, overwrite=True)
  assert _tree(d) == before


# ----------------------------------------------------------------------------- upgrade


@pytest.fixture
def legacy(tmp_path, monkeypatch):
  """A dataset written before TFDS support (no dataset_info.json), with a file of the user's."""
  d = tmp_path / "d"
  with monkeypatch.context() as m:
    m.setattr(tfds_info, "write_tfds_metadata", lambda meta, out_dir: None)
    synthesize.write_synthetic_dataset(d, subjects=4, days=1, seed=5, shards=2)
  (d / "NOTES.txt").write_text("mine")
  return d


def test_upgrade_in_place(legacy, capsys):
  records = _records(legacy)
  before = _tree(legacy)
  assert tfds_info.main(["upgrade", str(legacy), str(legacy)]) == 1  # Refused, untouched.
  assert "already holds a dataset" in capsys.readouterr().err
  assert _tree(legacy) == before
  assert tfds_info.main(["upgrade", str(legacy), str(legacy), "--overwrite"]) == 0, (
      capsys.readouterr().err)
  assert _records(legacy) == records  # Every record, read from the upgraded directory.
  assert sum(s.num_examples for s in tfds_info.builder(legacy).info.splits.values()) == 4
  assert all(p.stat().st_size > 0 for p in legacy.glob("*.tfrecord"))
  assert (legacy / "NOTES.txt").read_text() == "mine" and not (legacy / STAGING).exists()


def test_failed_upgrade_in_place_leaves_the_dataset_byte_for_byte(legacy, capsys, monkeypatch):
  before = _tree(legacy)
  _fail_after(monkeypatch, 2, ValueError("injected failure"))
  assert tfds_info.main(["upgrade", str(legacy), str(legacy), "--overwrite"]) == 1
  assert "injected failure" in capsys.readouterr().err
  assert _tree(legacy) == before


# ----------------------------------------------------------------------------- kills


def test_a_kill_at_any_point_of_the_swap_leaves_one_complete_dataset(tmp_path, monkeypatch):
  """Kills the swap after each of its file operations in turn: a reader finds the old or the
  new dataset, and recover() (which every writer runs first) leaves exactly one in place."""
  old, new = tmp_path / "old", tmp_path / "new"
  synthesize.write_synthetic_dataset(old, subjects=4, days=1, seed=1, shards=2)
  synthesize.write_synthetic_dataset(new, subjects=3, days=1, seed=2, shards=1)
  (old / "NOTES.txt").write_text("mine")
  want = {"old": _records(old), "new": _records(new)}
  backend = type(epath.Path(tmp_path)._backend)  # What local epath file operations call.
  seen, k = set(), 0
  while True:
    d = tmp_path / f"d{k}"
    shutil.copytree(old, d)
    shutil.copytree(new, d / STAGING)
    ops = []

    def step(fn):
      def counted(*args, **kwargs):
        if len(ops) == k:
          raise _Killed
        ops.append(fn.__name__)
        return fn(*args, **kwargs)
      return counted
    with monkeypatch.context() as m:
      for name in ("remove", "rmtree", "copy", "rename"):
        m.setattr(backend, name, step(getattr(backend, name)))
      m.setattr(writer_lib.os, "link", step(writer_lib.os.link))
      try:
        writer_lib._swap_in(epath.Path(d) / STAGING, epath.Path(d))  # pylint: disable=protected-access
        killed = False
      except _Killed:
        killed = True
    read = _records(d)  # A reader meanwhile: one complete dataset, old or new.
    assert read in (want["old"], want["new"]), (k, ops)
    writer_lib.recover(d)
    got = _records(d)
    assert got in (want["old"], want["new"]) and not (d / STAGING).exists(), (k, ops)
    seen.add("old" if got == want["old"] else "new")
    assert (d / "NOTES.txt").read_text() == "mine"
    if not killed:
      break
    k += 1
  assert k > 10 and seen == {"old", "new"}  # Kills before and after the point of no return.


def test_a_killed_first_write_leaves_nothing_a_rerun_trips_over(tmp_path, monkeypatch):
  d = tmp_path / "d"
  with monkeypatch.context() as m:
    _no_cleanup(m)
    _fail_after(m, 2, _Killed())
    with pytest.raises(_Killed):
      synthesize.write_synthetic_dataset(d, subjects=4, days=1, seed=1)
  assert (d / STAGING).exists() and not list(d.glob("*.tfrecord"))
  with pytest.raises(metadata.MetadataError, match="metadata.json not found"):
    metadata.load_metadata(d)
  synthesize.write_synthetic_dataset(d, subjects=4, days=1, seed=1)  # No --overwrite needed.
  assert len(_records(d)) == 4 and not (d / STAGING).exists()


# ----------------------------------------------------------------------------- on a bucket


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  with gcs_emulator.serving(tmp_path_factory.mktemp("gcs"), "lsm2-test") as emulator:
    yield emulator


def test_overwrite_on_a_bucket_is_staged_and_survives_kills(gcs, monkeypatch):
  """On a bucket a swap copies and deletes object by object: a killed write leaves the old
  dataset readable and unchanged, a kill in the middle of the copy leaves the new one
  readable from the staging, and the next write completes it."""
  d = "gs://lsm2-test/data"
  synthesize.write_synthetic_dataset(d, subjects=4, days=1, seed=1, shards=2)
  old, before = _records(d), _tree(d)
  with monkeypatch.context() as m:  # Killed while writing shards: the old dataset reads ...
    _no_cleanup(m)
    _fail_after(m, 2, _Killed())
    with pytest.raises(_Killed):
      synthesize.write_synthetic_dataset(d, subjects=3, days=1, seed=2, overwrite=True)
  assert any(name.startswith(f"{STAGING}/") for name in _tree(d))
  assert _records(d) == old  # ... not confused by the staged shards beside it.
  with monkeypatch.context() as m:  # A failed write cleans up after itself.
    _fail_after(m, 2, OSError("injected failure"))
    with pytest.raises(OSError, match="injected failure"):
      synthesize.write_synthetic_dataset(d, subjects=3, days=1, seed=2, overwrite=True)
  assert _tree(d) == before

  def killed_half_way(src, dst, *, last=""):  # storage.copy_tree, killed half-way.
    names = sorted(storage.list_files(src), key=lambda name: name == last)
    for name in names[:len(names) // 2]:
      (epath.Path(src) / name).copy(epath.Path(dst) / name, overwrite=True)
    raise _Killed
  with monkeypatch.context() as m:
    _no_cleanup(m)
    m.setattr(storage, "copy_tree", killed_half_way)
    with pytest.raises(_Killed):
      synthesize.write_synthetic_dataset(d, subjects=3, days=1, seed=2, overwrite=True)
  assert not epath.Path(f"{d}/metadata.json").exists()
  new = _records(d)  # The reader falls back to the complete staged copy.
  assert len(new) == 3 and new != old
  writer_lib.recover(d)  # What the next write (or a training start synthesizing) runs first.
  assert _records(d) == new
  assert not [n for n in gcs.objects("lsm2-test", "data/") if STAGING in n]
