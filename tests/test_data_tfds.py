"""Datasets written by lsm2 are TFDS datasets: tfds reads every record bit-exactly."""
import json

import numpy as np
import pytest

from lsm2.data import dataset, example, metadata, shards, tfds_info
from lsm2.data.synthesize import write_synthetic_dataset

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  out = {}
  for fmt in ("array_record", "tfrecord"):
    out[fmt] = tmp_path_factory.mktemp(fmt)
    write_synthetic_dataset(out[fmt], subjects=5, days=2, seed=3, fmt=fmt, shards=2)
  return out


def _lsm2_records(d, split):
  return list(dataset.iter_records(metadata.load_metadata(d), split))


def _assert_same(got, rec, labels):
  """A TFDS-decoded example (numpy) equals lsm2's DayRecord, bit for bit."""
  assert got["signals"].dtype == np.float32 and got["observed"].dtype == np.bool_
  assert got["signals"].tobytes() == rec.signals.tobytes()
  np.testing.assert_array_equal(got["observed"], rec.observed)
  assert got["subject_id"].decode() == rec.subject_id and got["day"].decode() == rec.day
  for name, spec in labels.items():
    value, want = got["label"][name], rec.labels[name]
    if spec.level == "minute":
      np.testing.assert_array_equal(value, want)
    elif spec.kind == "regression":
      assert np.float32(value).tobytes() == np.float32(want).tobytes()  # NaN too.
    else:
      assert int(value) == want


def test_builder_from_directory_describes_the_dataset(dirs):
  meta = metadata.load_metadata(dirs["array_record"])
  builder = tfds.builder_from_directory(str(dirs["array_record"]))
  assert builder.info.file_format.value == "array_record"
  assert {s: builder.info.splits[s].num_examples for s in meta.splits} == meta.record_counts
  assert builder.info.splits["train"].num_shards == len(meta.splits["train"])
  features = builder.info.features
  assert features["signals"].shape == (1440, meta.num_channels)
  assert features["signals"].np_dtype == np.float32
  assert features["observed"].np_dtype == np.bool_
  sex = features["label"]["sex"]
  assert isinstance(sex, tfds.features.ClassLabel)
  assert tuple(sex.names) == meta.labels["sex"].classes
  # lsm2's own metadata (normalisation, channels, label specs) stays beside it.
  assert json.loads((dirs["array_record"] / "metadata.json").read_text())["normalization"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_data_source_equals_lsm2_reader_with_random_access(dirs, split):
  d = dirs["array_record"]
  meta = metadata.load_metadata(d)
  records = _lsm2_records(d, split)
  source = tfds.builder_from_directory(str(d)).as_data_source(split=split)
  assert len(source) == len(records)
  order = np.random.default_rng(0).permutation(len(records))
  for i in order:  # Random access equals sequential (storage order) reading.
    _assert_same(source[int(i)], records[i], meta.labels)


def test_tfrecord_dataset_through_tfds_as_dataset(dirs):
  d = dirs["tfrecord"]
  meta = metadata.load_metadata(d)
  records = _lsm2_records(d, "train")
  ds = tfds_info.builder(d).as_dataset(split="train", shuffle_files=False)
  got = list(tfds.as_numpy(ds))
  assert len(got) == len(records)
  # tf.data interleaves the shards: match records by (subject, day).
  by_key = {(r.subject_id, r.day): r for r in records}
  for ex in got:
    _assert_same(ex, by_key[(ex["subject_id"].decode(), ex["day"].decode())], meta.labels)


def test_tfds_serialized_examples_decode_with_lsm2(dirs):
  """The other direction: TFDS's own serializer writes what lsm2's decoder reads."""
  d = dirs["array_record"]
  meta = metadata.load_metadata(d)
  features = tfds_info.features(meta.num_channels, meta.labels)
  for rec in _lsm2_records(d, "validation"):
    data = features.serialize_example({
        "signals": rec.signals, "observed": rec.observed, "subject_id": rec.subject_id,
        "day": rec.day, "label": rec.labels})
    back = example.decode_record(data, meta.num_channels, meta.labels)
    assert back.signals.tobytes() == rec.signals.tobytes()
    np.testing.assert_array_equal(back.observed, rec.observed)
    assert (back.subject_id, back.day) == (rec.subject_id, rec.day)


_ENCODE = example.encode_record


def _legacy_encode(record, labels):
  """The layout before TFDS support: `observed` as packed bits."""
  tf = pytest.importorskip("tensorflow")
  ex = tf.train.Example.FromString(_ENCODE(record, labels))
  ex.features.feature["observed"].bytes_list.value[0] = np.packbits(
      record.observed.reshape(-1)).tobytes()
  return ex.SerializeToString()


def test_old_datasets_still_load_and_upgrade_for_tfds(tmp_path, monkeypatch):
  old = tmp_path / "old"
  with monkeypatch.context() as m:
    m.setattr(example, "encode_record", _legacy_encode)
    m.setattr(tfds_info, "write_tfds_metadata", lambda meta, out_dir: None)
    write_synthetic_dataset(old, subjects=4, days=2, seed=5, fmt="array_record", shards=1)
  shard = next(old.glob("train-*.array_record"))
  raw = next(shards.iter_shard(shard, "array_record"))
  observed = example.parse(raw).features.feature["observed"].bytes_list.value[0]
  assert len(observed) == 1440 * 26 // 8  # Packed bits.
  assert not (old / "dataset_info.json").exists()
  records = _lsm2_records(old, "train")  # lsm2 still reads the old layout...
  assert len(records) == metadata.load_metadata(old).record_counts["train"] > 0
  with pytest.raises(FileNotFoundError, match="python -m lsm2.data.tfds_info upgrade"):
    tfds_info.builder(old)  # ...TFDS cannot: the error names the converting command.
  assert tfds_info.main(["upgrade", str(old), str(tmp_path / "new")]) == 0
  new = tmp_path / "new"
  source = tfds_info.builder(new).as_data_source(split="train")
  meta = metadata.load_metadata(new)
  for i, rec in enumerate(records):
    _assert_same(source[i], rec, meta.labels)
  np.testing.assert_array_equal(meta.norm_mean, metadata.load_metadata(old).norm_mean)
  assert shard.exists()  # The old directory is left as it was.


def test_overwrite_replaces_the_tfds_files(dirs, tmp_path):
  d = tmp_path / "d"
  write_synthetic_dataset(d, subjects=4, days=2, seed=1, fmt="array_record", shards=2)
  write_synthetic_dataset(d, subjects=6, days=1, seed=1, fmt="array_record", shards=1,
                          overwrite=True)
  builder = tfds_info.builder(d)
  assert builder.info.splits["train"].num_shards == 1
  assert sum(s.num_examples for s in builder.info.splits.values()) == 6
