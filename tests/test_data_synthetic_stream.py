"""The endless synthetic training stream (config.data.source='synthetic_stream')."""
import json
import pathlib
import shutil

import numpy as np
import pytest

from lsm2 import config_files
from lsm2.data import example
from lsm2.data import pipeline
from lsm2.data import synthetic
from lsm2.data import synthetic_stream
from lsm2.data.metadata import METADATA_FILE, load_metadata, normalize
from lsm2.data.shards import iter_shard
from lsm2.data.synthesize import write_synthetic_dataset
from lsm2.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED, DAYS = 3, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """10 subjects x 2 days: 8 train, 1 validation, 1 test subject (ArrayRecord: no TensorFlow)."""
  out = tmp_path_factory.mktemp("stream") / "synth"
  write_synthetic_dataset(out, subjects=10, days=DAYS, seed=SEED, fmt="array_record")
  return out


@pytest.fixture(scope="module")
def meta(data_dir):
  return load_metadata(data_dir)


def _stream(data_dir, batch=4, seed=0, **kw):
  return pipeline.make_synthetic_stream_iterator(data_dir, global_batch_size=batch, seed=seed,
                                                 **kw)


def _expected_batch(meta, positions, seed=0):
  """The days at `positions` straight from the generator, normalized as evaluation reads them."""
  days = synthetic_stream.SyntheticDays(meta, draw_seed=seed)
  recs = []
  for i in positions:
    subject, day = days.locate(i)
    recs.append(synthetic.generate_subject(SEED, subject, DAYS)[1][day])
  signals = np.stack([r.signals for r in recs])
  observed = np.stack([r.observed for r in recs]) & np.isfinite(signals)
  return normalize(signals, observed, meta.norm_mean, meta.norm_std), observed


def test_stream_records_are_byte_identical_to_the_written_ones(meta):
  """Same generator, same sanitizing and serializing: subject n of the stream's code path is
  the written subject n, byte for byte."""
  written = sorted(bytes(data) for path in meta.shard_paths("train")
                   for data in iter_shard(path, meta.format,
                                          expected_records=meta.shard_records[path.name]))
  days = synthetic_stream.SyntheticDays(meta, draw_seed=0)
  ours = sorted(rec for sid in meta.subjects["train"]
                for rec in days.encode_subject(int(sid.removeprefix("synth"))))
  assert len(written) == 8 * DAYS and ours == written


def test_batches_are_normalized_with_the_paired_datasets_statistics(data_dir, meta):
  batch = next(_stream(data_dir))
  assert set(batch) == {"signals", "observed"} and batch["signals"].dtype == np.float32
  signals, observed = _expected_batch(meta, range(4))
  np.testing.assert_array_equal(batch["observed"], observed)
  np.testing.assert_array_equal(batch["signals"], signals)
  assert 0.1 < observed.mean() < 0.95  # Real days, with the generator's missingness.


def test_a_position_always_gives_the_same_day(meta):
  a = synthetic_stream.SyntheticDays(meta, draw_seed=0)
  b = synthetic_stream.SyntheticDays(meta, draw_seed=0)
  positions = [5, 300, 1]  # Another block in between: nothing depends on the read order.
  assert [a(i)[0] for i in positions] == [b(i)[0] for i in reversed(positions)][::-1]
  # Each block is a permutation of its subjects' days: no day twice, none left out.
  n = a.block_len
  for block in (0, 7):
    got = sorted(a.locate(block * n + j) for j in range(n))
    first = a.first + block * synthetic_stream.BLOCK_SUBJECTS
    assert got == [(first + s, d) for s in range(synthetic_stream.BLOCK_SUBJECTS)
                   for d in range(DAYS)]
  # Another draw seed: other people.
  other = synthetic_stream.SyntheticDays(meta, draw_seed=1)
  assert other.locate(0)[0] >= a.first + synthetic_stream.SUBJECTS_PER_SEED
  assert len(a) >= 10**12


def test_two_processes_read_disjoint_halves_of_each_global_batch(data_dir):
  """Global batch k is positions [4k, 4k+4) for any process count: process p's k-th batch is
  its half; distinct positions are distinct days (the permutation test above)."""
  single = _stream(data_dir, process_index=0, process_count=1)
  halves = [_stream(data_dir, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(2):
    whole = next(single)
    parts = [next(h) for h in halves]
    assert parts[0]["signals"].shape[0] == 2
    for key in ("signals", "observed"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert not np.array_equal(parts[0]["signals"], parts[1]["signals"])


def test_resume_mid_stream_gives_the_same_next_batches(data_dir):
  it = _stream(data_dir, batch=2)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able, as checkpoints store it.
  expected = [next(it) for _ in range(2)]
  resumed = _stream(data_dir, batch=2)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_never_yields_a_written_subject(meta):
  days = synthetic_stream.SyntheticDays(meta, draw_seed=0)
  held_out = set(meta.subjects["validation"]) | set(meta.subjects["test"])
  assert held_out
  drawn = {example.decode_subject_id(days(i)[0]) for i in range(6)}
  assert all(int(s.removeprefix("synth")) >= synthetic_stream.FIRST_SUBJECT for s in drawn)
  assert not drawn & held_out
  # Every position's subject index is above every written one (checked without generating).
  written = max(int(s.removeprefix("synth")) for ids in meta.subjects.values() for s in ids)
  assert min(days.locate(i)[0] for i in range(0, 10**6, 997)) > written


@pytest.mark.parametrize("subject", ["synth1000000005", "alice"])
def test_a_dataset_the_stream_could_draw_from_is_refused(meta, subject):
  clash = load_metadata(meta.data_dir)
  clash.subjects["test"] = [*clash.subjects["test"], subject]
  with pytest.raises(synthetic_stream.NotPairableError,
                     match=rf"split 'test' holds subject '{subject}'"):
    synthetic_stream.SyntheticDays(clash, draw_seed=0)


def _config(data_dir, **overrides):
  config = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny,runlocal")
  with config.unlocked():
    config.update_from_flattened_dict({"data.dir": str(data_dir), "batch_size": 8,
                                       "data.synthesize_subjects": 0, **overrides})
  return config


def test_config_source_selects_the_stream(data_dir, meta):
  assert _config(data_dir).data.source == "files"  # The default reads the written split.
  batch = next(train.make_train_iterator(_config(data_dir, **{"data.source": "synthetic_stream"}),
                                         seed=0))
  signals, observed = _expected_batch(meta, range(8))
  np.testing.assert_array_equal(batch["observed"], observed)
  np.testing.assert_array_equal(batch["signals"], signals)


def test_a_bad_source_is_refused_naming_the_field(data_dir, tmp_path):
  with pytest.raises(train.errors.ConfigError,
                     match=r"config.data.source='stream' must be one of \('files', "
                           r"'synthetic_stream'\)"):
    train.train_and_evaluate(_config(data_dir, **{"data.source": "stream"}), str(tmp_path))
  with pytest.raises(train.errors.ConfigError,
                     match=r"config.data.max_train_subjects=5 needs config.data.source='files'"):
    train.train_and_evaluate(_config(data_dir, **{"data.source": "synthetic_stream",
                                                  "data.max_train_subjects": 5}),
                             str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_a_non_synthetic_dataset_is_refused_naming_the_field(data_dir, tmp_path):
  real = tmp_path / "real"
  shutil.copytree(data_dir, real)
  d = json.loads((real / METADATA_FILE).read_text())
  d["source"] = {"generator": "lsm2.data.convert"}
  (real / METADATA_FILE).write_text(json.dumps(d))
  with pytest.raises(train.errors.ConfigError,
                     match=r"config.data.source='synthetic_stream': .* is not a synthetic "
                           r"dataset .* 'lsm2.data.convert'"):
    train.make_train_iterator(_config(real, **{"data.source": "synthetic_stream"}), seed=0)
