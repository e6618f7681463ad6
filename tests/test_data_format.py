"""Day-record format: encoding, shards, metadata validation and the documented errors."""
import json
import shutil
import struct

import numpy as np
import pytest

from lsm2.data import crc32c, dataset, example, inspect, metadata, shards
from lsm2.data.channels import DEFAULT_CHANNELS, Channel, get_channel
from lsm2.data.metadata import LabelSpec, MetadataError
from lsm2.data.record import DayRecord, sanitize
from lsm2.data.writer import DatasetWriter, make_writer

CHANNELS = (Channel("a", "ppg", "bpm", 0, 250), Channel("b", "accel", "g", -5, 5),
            Channel("c", "other", "1", -1e6, 1e6))
LABELS = (LabelSpec("flag", "binary", "subject", ("no", "yes")),
          LabelSpec("kind", "categorical", "day", ("x", "y", "z")),
          LabelSpec("score", "regression", "subject"),
          LabelSpec("bouts", "categorical", "minute", ("p", "q", "r")))


def _bouts(rng):
  """A minute label: a few class runs on -1 (unlabelled) minutes."""
  bouts = np.full(1440, -1, np.int64)
  for _ in range(3):
    start = int(rng.integers(0, 1400))
    bouts[start:start + int(rng.integers(5, 40))] = rng.integers(0, 3)
  return bouts


def _record(rng, subject, day, labels=None):
  signals = np.clip(rng.normal(0, 2, (1440, len(CHANNELS))), -4.9, 4.9).astype(np.float32)
  signals[:, 0] = rng.uniform(40, 200, 1440)  # All within the channels' validity ranges.
  observed = rng.random((1440, len(CHANNELS))) < 0.6
  signals[~observed] = 0
  return DayRecord(subject, day, signals, observed,
                   labels or {"flag": 1, "kind": int(rng.integers(0, 3)),
                              "score": float(rng.normal()), "bouts": _bouts(rng)})


def _write(out, records_by_split, fmt="tfrecord", shards_per_split=2):
  w = DatasetWriter(out, channels=CHANNELS, labels=LABELS, fmt=fmt)
  for split, recs in records_by_split.items():
    w.write_split(split, recs, num_records=len(recs), num_shards=shards_per_split)
  return w.finish()


@pytest.fixture(scope="module")
def records():
  rng = np.random.default_rng(0)
  recs = {"train": [_record(rng, f"s{i}", f"2024-01-0{d + 1}") for i in range(3) for d in range(3)],
          "validation": [_record(rng, "s9", "2024-02-01")]}
  recs["validation"][0].labels["score"] = float("nan")  # A missing regression label.
  recs["validation"][0].labels["kind"] = -1  # A missing class label.
  return recs


@pytest.fixture(scope="module")
def tf_dir(tmp_path_factory, records):
  out = tmp_path_factory.mktemp("tfrecord")
  _write(out, records, fmt="tfrecord")
  return out


@pytest.fixture(scope="module")
def ar_dir(tmp_path_factory, records):
  out = tmp_path_factory.mktemp("array_record")
  _write(out, records, fmt="array_record")
  return out


@pytest.fixture(params=["tfrecord", "array_record"])
def written(request):
  """(directory, format) for tests that hold for both formats."""
  name = "tf_dir" if request.param == "tfrecord" else "ar_dir"
  return request.getfixturevalue(name), request.param


def _bitwise_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def test_crc32c_known_values():
  # RFC 3720 test vectors plus a long input against a bit-by-bit reference.
  assert crc32c.crc32c(b"123456789") == 0xE3069283
  assert crc32c.crc32c(bytes(32)) == 0x8A9136AA
  assert crc32c.crc32c(b"\xff" * 32) == 0x62A8AB43
  data = np.random.default_rng(1).bytes(20_001)
  assert crc32c.crc32c(data) == _bitwise_crc32c(data)
  assert crc32c.crc32c(memoryview(data)[3:]) == _bitwise_crc32c(data[3:])


def test_round_trip_is_bit_exact(written, records):
  out, fmt = written
  meta = metadata.load_metadata(out)
  assert meta.format == fmt
  for split, recs in records.items():
    got = sorted(dataset.iter_records(meta, split), key=lambda r: (r.subject_id, r.day))
    want = sorted(recs, key=lambda r: (r.subject_id, r.day))
    assert len(got) == len(want)
    for g, w in zip(got, want):
      assert (g.subject_id, g.day) == (w.subject_id, w.day)
      assert g.signals.dtype == np.float32 and g.observed.dtype == np.bool_
      assert g.signals.tobytes() == w.signals.tobytes()  # Bit-exact.
      assert np.array_equal(g.observed, w.observed)
      for name in ("flag", "kind"):
        assert g.labels[name] == w.labels[name]
      assert np.float32(g.labels["score"]).tobytes() == np.float32(w.labels["score"]).tobytes()
      assert g.labels["bouts"].dtype == np.int64
      assert g.labels["bouts"].tobytes() == w.labels["bouts"].tobytes()
      assert (g.labels["bouts"] == -1).any() and (g.labels["bouts"] >= 0).any()


def test_read_split_arrays_and_missing_labels(written, records):
  out, _ = written
  meta = metadata.load_metadata(out)
  raw = dataset.read_split(out, "validation", normalize=False)
  z = dataset.read_split(out, "validation")
  rec = records["validation"][0]
  assert raw["subject_id"].tolist() == ["s9"] and raw["day"].tolist() == ["2024-02-01"]
  np.testing.assert_array_equal(raw["signals"][0], rec.signals)
  np.testing.assert_array_equal(
      z["signals"][0], metadata.normalize(rec.signals, rec.observed, meta.norm_mean, meta.norm_std))
  assert z["signals"].dtype == np.float32
  assert np.all(z["signals"][~z["observed"]] == 0) and np.abs(z["signals"]).max() <= 5
  assert np.isnan(z["label/score"][0]) and z["label/kind"][0] == -1 and z["label/flag"][0] == 1
  assert z["label/kind"].dtype == np.int64
  assert z["label/bouts"].dtype == np.int64 and z["label/bouts"].shape == (1, 1440)
  np.testing.assert_array_equal(z["label/bouts"][0], rec.labels["bouts"])
  train = dataset.read_split(out, "train", limit=4)
  assert len(train["signals"]) == 4 and train["label/bouts"].shape == (4, 1440)


def test_tensorflow_reads_the_records(tf_dir, records):
  """Plain tf.data / tf.io.parse_single_example read the shards (CRC checked by TF)."""
  out = tf_dir
  tf = pytest.importorskip("tensorflow")
  meta = metadata.load_metadata(out)
  c = meta.num_channels
  spec = {"signals": tf.io.FixedLenFeature([1440 * c], tf.float32),
          "observed": tf.io.FixedLenFeature([], tf.string),
          "subject_id": tf.io.FixedLenFeature([], tf.string),
          "day": tf.io.FixedLenFeature([], tf.string),
          "label/flag": tf.io.FixedLenFeature([], tf.int64),
          "label/kind": tf.io.FixedLenFeature([], tf.int64),
          "label/score": tf.io.FixedLenFeature([], tf.float32),
          "label/bouts": tf.io.FixedLenFeature([1440], tf.int64)}
  files = [str(p) for p in meta.shard_paths("train")]
  got = {}
  for serialized in tf.data.TFRecordDataset(files):
    ex = tf.io.parse_single_example(serialized, spec)
    # The documented way to read `observed` (docs/data.md).
    observed = tf.reshape(tf.io.decode_raw(ex["observed"], tf.bool), [1440, c])
    key = (ex["subject_id"].numpy().decode(), ex["day"].numpy().decode())
    got[key] = (tf.reshape(ex["signals"], [1440, c]).numpy(), observed.numpy(),
                int(ex["label/kind"]), ex["label/bouts"].numpy())
  assert len(got) == len(records["train"])
  for r in records["train"]:
    s, o, kind, bouts = got[(r.subject_id, r.day)]
    assert s.tobytes() == r.signals.tobytes() and np.array_equal(o, r.observed)
    assert kind == r.labels["kind"]
    np.testing.assert_array_equal(bouts, r.labels["bouts"])


def test_decoder_reads_tensorflow_written_examples():
  """lsm2's decoder reads what TensorFlow serializes; TensorFlow parses lsm2's wire-level encoder.

  `observed` is stored as packed bits here, the layout of datasets written
  before TFDS support: they stay readable.
  """
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(2)
  rec = _record(rng, "tf-subject", "2024-03-04")
  feature = {
      "signals": tf.train.Feature(float_list=tf.train.FloatList(value=rec.signals.reshape(-1))),
      "observed": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[np.packbits(rec.observed.reshape(-1)).tobytes()])),
      "subject_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"tf-subject"])),
      "day": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"2024-03-04"])),
      "label/flag": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
      "label/kind": tf.train.Feature(int64_list=tf.train.Int64List(value=[-1])),
      "label/score": tf.train.Feature(float_list=tf.train.FloatList(value=[2.5])),
      "label/bouts": tf.train.Feature(int64_list=tf.train.Int64List(value=rec.labels["bouts"])),
  }
  data = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
  got = example.decode_record(data, len(CHANNELS), {s.name: s for s in LABELS})
  assert got.signals.tobytes() == rec.signals.tobytes()
  assert np.array_equal(got.observed, rec.observed)
  np.testing.assert_array_equal(got.labels.pop("bouts"), rec.labels["bouts"])
  assert got.labels == {"flag": 1, "kind": -1, "score": 2.5}
  # And the encoder's bytes are what TensorFlow parses (packed varints, -1 as 10 bytes).
  ours = example.encode_record(rec, {s.name: s for s in LABELS})
  parsed = tf.train.Example.FromString(ours).features.feature
  assert list(parsed["label/bouts"].int64_list.value) == rec.labels["bouts"].tolist()
  assert list(parsed["label/kind"].int64_list.value) == [rec.labels["kind"]]


def test_metadata_contents(written, records):
  out, _ = written
  meta = metadata.load_metadata(out)
  train = records["train"]
  sig = np.stack([r.signals for r in train]).reshape(-1, len(CHANNELS)).astype(np.float64)
  obs = np.stack([r.observed for r in train]).reshape(-1, len(CHANNELS))
  for c in range(len(CHANNELS)):
    v = sig[obs[:, c], c]
    np.testing.assert_allclose(meta.norm_mean[c], v.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(meta.norm_std[c], v.std(), rtol=1e-5)
  assert meta.record_counts == {"train": 9, "validation": 1}
  assert meta.subjects == {"train": ["s0", "s1", "s2"], "validation": ["s9"]}
  assert meta.splits["train"][0].startswith("train-00000-of-00002")
  assert meta.splits["validation"] == [meta.splits["validation"][0]]  # min(shards, records)
  assert meta.noise_std is None
  miss = meta.missingness
  assert sum(miss["histogram"]["counts"]["train"]) == 9
  all_obs = np.concatenate([obs.reshape(-1), records["validation"][0].observed.reshape(-1)])
  assert miss["overall_fraction"] == pytest.approx(1 - all_obs.mean())
  assert set(miss["day_fraction_percentiles"]) == {"p10", "p50", "p90"}
  assert meta.labels["kind"] == LABELS[1]


def test_sanitize_masks_and_counts_bad_values():
  rng = np.random.default_rng(3)
  rec = _record(rng, "s", "2024-01-01")
  rec.observed[:] = True
  rec.signals[5, 1] = np.nan
  rec.signals[6, 1] = np.inf
  rec.signals[7, 0] = 300.0  # Above channel a's valid_max of 250.
  rec.observed[8, 2] = False
  rec.signals[8, 2] = np.nan  # Already unobserved: filled, not counted.
  clean, counts = sanitize(rec, CHANNELS)
  assert (counts.nonfinite, counts.out_of_range) == (2, 1)
  assert not clean.observed[5, 1] and not clean.observed[6, 1] and not clean.observed[7, 0]
  assert clean.signals[5, 1] == 0 and clean.signals[8, 2] == 0
  assert np.all(np.isfinite(clean.signals))
  assert np.isnan(rec.signals[5, 1])  # The caller's record is untouched.


def test_writer_counts_sanitized_values_in_metadata(tmp_path):
  rng = np.random.default_rng(4)
  rec = _record(rng, "s", "2024-01-01")
  rec.observed[:3, 0] = True
  rec.signals[:3, 0] = [np.nan, -np.inf, 1e9]
  meta = _write(tmp_path, {"train": [rec]}, shards_per_split=1)
  assert meta.sanitized == {"nonfinite": 2, "out_of_range": 1}
  back = next(dataset.iter_records(meta, "train"))
  assert not back.observed[:3, 0].any() and np.all(back.signals[:3, 0] == 0)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda r: setattr(r, "signals", r.signals[:1000]), ValueError, r"shape \(1000, 3\)"),
    (lambda r: setattr(r, "signals", r.signals.astype(np.int32)), TypeError, "floating-point"),
    (lambda r: setattr(r, "observed", r.observed.astype(np.uint8)), TypeError, "bool"),
    (lambda r: setattr(r, "day", "2024-13-01"), ValueError, "ISO date"),
    (lambda r: setattr(r, "subject_id", ""), ValueError, "subject_id"),
    (lambda r: r.labels.update(extra=1), ValueError, "unknown labels"),
    (lambda r: r.labels.pop("kind"), ValueError, "missing label 'kind'"),
    (lambda r: r.labels.update(kind=3), ValueError, r"class index 3 outside"),
    (lambda r: r.labels.update(score="high"), ValueError, "must be a number"),
])
def test_writer_rejects_bad_records(tmp_path, mutate, error, match):
  rec = _record(np.random.default_rng(5), "s0", "2024-01-01")
  mutate(rec)
  w = DatasetWriter(tmp_path, channels=CHANNELS, labels=LABELS)
  with pytest.raises(error, match=match) as e:
    w.write_split("train", [rec], num_records=1)
  assert "split 'train'" in str(e.value)


@pytest.mark.parametrize("bouts, match", [
    (np.zeros(1439, np.int64), r"shape \(1440,\).*got int64 array of shape \(1439,\)"),
    (np.zeros(1440, np.float32), r"integer array of shape \(1440,\).*got float32 array"),
    (np.zeros(1440, bool), r"integer array of shape \(1440,\).*got bool array"),
    (-1, r"integer array of shape \(1440,\).*got -1"),
    ([0] * 1440, r"integer array of shape \(1440,\).*got list"),
    (np.r_[np.full(7, -1), 3, np.full(1432, 5)], r"class index 3 at minute 7 \(1433 minute\(s\) "
     r"in all\) outside \[-1, 3\)"),
    (np.full(1440, -2), r"class index -2 at minute 0"),
])
def test_writer_rejects_bad_minute_labels(tmp_path, bouts, match):
  rec = _record(np.random.default_rng(5), "s0", "2024-01-01")
  rec.labels["bouts"] = bouts
  w = DatasetWriter(tmp_path, channels=CHANNELS, labels=LABELS)
  with pytest.raises(ValueError, match=match) as e:
    w.write_split("train", [rec], num_records=1)
  assert "split 'train': record ('s0', '2024-01-01'): label 'bouts'" in str(e.value)


def test_minute_label_decoding_checks_the_length():
  rec = _record(np.random.default_rng(8), "s", "2024-01-01")
  data = example.encode_record(rec, {s.name: s for s in LABELS})
  as_day = {**{s.name: s for s in LABELS}, "bouts": LabelSpec("bouts", "categorical", "day",
                                                              ("p", "q", "r"))}
  with pytest.raises(example.RecordDecodeError,
                     match=r"'label/bouts' must be a int64_list with 1 value\(s\) \(day label\), "
                           "got int64 of length 1440"):
    example.decode_record(data, len(CHANNELS), as_day)


def test_inspect_reports_minutes_per_class(tf_dir, records):
  summary, _ = inspect.summarize(tf_dir)
  bouts = summary["labels"]["train"]["bouts"]
  want = np.concatenate([r.labels["bouts"] for r in records["train"]])
  assert bouts["unit"] == "minutes" and bouts["labelled_days"] == len(records["train"])
  assert bouts["counts"] == {c: int((want == i).sum()) for i, c in enumerate("pqr")}
  assert bouts["missing"] == int((want == -1).sum())
  assert summary["labels"]["train"]["kind"]["unit"] == "days"
  assert (f"label bouts (train, minutes per class over 9 labelled days): p={bouts['counts']['p']}"
          in inspect.render(summary))


def test_writer_rejects_duplicates_overlap_and_existing_data(tmp_path):
  rng = np.random.default_rng(6)
  w = DatasetWriter(tmp_path / "a", channels=CHANNELS, labels=LABELS)
  with pytest.raises(ValueError, match="duplicate subject-day"):
    w.write_split("train", [_record(rng, "s", "2024-01-01")] * 2, num_records=2)
  w = DatasetWriter(tmp_path / "b", channels=CHANNELS, labels=LABELS)
  w.write_split("train", [_record(rng, "s", "2024-01-01")], num_records=1)
  w.write_split("test", [_record(rng, "s", "2024-01-02")], num_records=1)
  with pytest.raises(ValueError, match="subject 's' appears in splits 'train' and 'test'"):
    w.finish()
  _write(tmp_path / "c", {"train": [_record(rng, "s", "2024-01-01")]})
  with pytest.raises(FileExistsError, match="already holds a dataset"):
    DatasetWriter(tmp_path / "c", channels=CHANNELS)


def test_unknown_channel_and_bad_channel_declarations():
  assert get_channel("hr") == DEFAULT_CHANNELS[0]
  with pytest.raises(ValueError, match="unknown channel 'heartbeat'"):
    get_channel("heartbeat")
  with pytest.raises(ValueError, match="unknown sensor group 'brain'"):
    Channel("eeg", "brain", "uV", 0, 1)
  with pytest.raises(ValueError, match="NAME:GROUP:UNIT:MIN:MAX"):
    Channel.parse_spec("eeg:other")
  assert Channel.parse_spec("eeg:other:uV:-1:1") == Channel("eeg", "other", "uV", -1.0, 1.0)


def test_default_channels_match_the_spec():
  assert len(DEFAULT_CHANNELS) == 26
  groups = [c.group for c in DEFAULT_CHANNELS]
  assert (groups.count("ppg"), groups.count("eda"), groups.count("accel"),
          groups.count("temp")) == (10, 3, 11, 2)
  assert [c.name for c in DEFAULT_CHANNELS[:2]] == ["hr", "hrv_shannon_entropy_rr"]
  assert DEFAULT_CHANNELS[-1].name == "skin_temperature_slope"


def _copy(src, dst):
  shutil.copytree(src, dst)
  for p in dst.iterdir():
    p.chmod(0o644)
  return dst


def _record_start(data, index):
  """Byte offset of TFRecord record `index` (each: length, its CRC, payload, payload CRC)."""
  pos = 0
  for _ in range(index):
    pos += 16 + struct.unpack("<Q", data[pos:pos + 8])[0]
  return pos


def test_truncated_tfrecord_shard_names_file_and_record(tf_dir, tmp_path):
  d = _copy(tf_dir, tmp_path / "d")
  meta = metadata.load_metadata(d)
  shard = meta.shard_paths("train")[0]
  data = shard.read_bytes()
  shard.write_bytes(data[:_record_start(data, 2) + 100])  # Cut inside the third record.
  with pytest.raises(shards.CorruptShardError, match=rf"{shard.name}: record 2: truncated record"):
    list(shards.iter_tfrecord(shard))
  with pytest.raises(MetadataError, match=rf"{shard.name} has \d+ bytes, metadata says"):
    metadata.load_metadata(d)


def test_corrupt_tfrecord_bytes_are_detected(tf_dir, tmp_path):
  d = _copy(tf_dir, tmp_path / "d")
  meta = metadata.load_metadata(d)
  shard = meta.shard_paths("train")[0]
  data = bytearray(shard.read_bytes())
  record_size = _record_start(data, 1)
  flipped = bytearray(data)
  flipped[record_size + 5000] ^= 0x40  # Inside the float payload of record 1.
  shard.write_bytes(bytes(flipped))
  with pytest.raises(shards.CorruptShardError, match=rf"{shard.name}: record 1: data checksum"):
    list(dataset.iter_records(meta, "train"))
  header = bytearray(data)
  header[record_size + 3] ^= 0x01  # The length field of record 1.
  shard.write_bytes(bytes(header))
  with pytest.raises(shards.CorruptShardError, match=rf"{shard.name}: record 1: length checksum"):
    list(shards.iter_tfrecord(shard))


def test_bad_record_payload_names_file_and_record(tmp_path):
  path = tmp_path / "train-00000-of-00001.tfrecord"
  w = make_writer(path, "tfrecord")
  good = example.encode_record(_record(np.random.default_rng(7), "s", "2024-01-01"),
                               {s.name: s for s in LABELS})
  w.write(good)
  w.write(good.replace(b"signals", b"signalz"))  # Valid framing, wrong content.
  w.close()
  raws = list(shards.iter_tfrecord(path, verify_checksums=True))
  example.decode_arrays(raws[0], len(CHANNELS))
  with pytest.raises(example.RecordDecodeError, match="'signals' must be a float_list"):
    example.decode_arrays(raws[1], len(CHANNELS))
  with pytest.raises(example.RecordDecodeError, match="expected 2880 = 1440 x 2 channels"):
    example.decode_arrays(raws[0], 2)


def test_corrupt_array_record_names_file(ar_dir, tmp_path):
  d = _copy(ar_dir, tmp_path / "d")
  shard = sorted(d.glob("train-*.array_record"))[0]
  shard.write_bytes(shard.read_bytes()[:1000])
  with pytest.raises(shards.CorruptShardError, match=shard.name):
    list(shards.iter_shard(shard, "array_record"))


def _edit_metadata(d, edit):
  path = d / "metadata.json"
  m = json.loads(path.read_text())
  edit(m)
  path.write_text(json.dumps(m))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["record_counts"].update(train=10), "shards hold 9 records, record_counts says 10"),
    (lambda m: m["normalization"].update(std=[1.0, 0.0, 1.0]), r"normalization.std must be finite and > 0"),
    (lambda m: m["normalization"].update(mean=[0.0]), "normalization.mean must be a list of 3"),
    (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    (lambda m: m["channels"][1].update(group="brain"), "unknown sensor group 'brain'"),
    (lambda m: m.pop("splits"), "missing field 'splits'"),
    (lambda m: m["subjects"]["validation"].append("s0"), "subject 's0' is in splits"),
    (lambda m: m["labels"]["kind"].update(kind="ordinal"), "kind must be one of"),
    (lambda m: m["splits"]["train"].reverse(), r"splits\['train'\]\[0\] = .* should be"),
    (lambda m: m["shards"][m["splits"]["train"][0]].update(records=0), "holds no records"),
])
def test_metadata_mismatch_is_refused(written, tmp_path, edit, match):
  out, _ = written
  d = _copy(out, tmp_path / "d")
  _edit_metadata(d, edit)
  with pytest.raises(MetadataError, match=match):
    metadata.load_metadata(d)


def test_missing_extra_and_unreadable_files_are_refused(written, tmp_path):
  out, fmt = written
  d = _copy(out, tmp_path / "d")
  victim = sorted(d.glob("validation-*"))[0]
  victim.unlink()
  with pytest.raises(MetadataError, match=f"{victim.name} is listed but missing"):
    metadata.load_metadata(d)
  d2 = _copy(out, tmp_path / "d2")
  (d2 / f"train-00005-of-00009.{'tfrecord' if fmt == 'tfrecord' else 'array_record'}").write_bytes(b"")
  with pytest.raises(MetadataError, match="not listed in metadata"):
    metadata.load_metadata(d2)
  (d2 / "metadata.json").write_text("{not json")
  with pytest.raises(MetadataError, match="not valid JSON"):
    metadata.load_metadata(d2)
  with pytest.raises(MetadataError, match="not an lsm2 dataset directory"):
    metadata.load_metadata(tmp_path / "nowhere")


def test_normalize_and_denormalize():
  signals = np.array([[0.0, 10.0], [np.nan, 1e6], [3.0, -np.inf]], np.float32)
  observed = np.array([[True, True], [True, True], [False, True]])
  mean, std = np.array([1.0, 0.0], np.float32), np.array([2.0, 10.0], np.float32)
  z = metadata.normalize(signals, observed, mean, std)
  np.testing.assert_array_equal(z, [[-0.5, 1.0], [0.0, 5.0], [0.0, 0.0]])
  np.testing.assert_allclose(metadata.denormalize(z[:1], mean, std), signals[:1])


def test_label_spec_validation():
  with pytest.raises(ValueError, match="binary label needs 2 class names"):
    LabelSpec("x", "binary", "subject")
  with pytest.raises(ValueError, match="level must be one of"):
    LabelSpec("x", "regression", "week")
  with pytest.raises(ValueError, match="label 'x': a minute-level label must be binary or categorical"):
    LabelSpec("x", "regression", "minute")
  spec = LabelSpec("x", "regression", "day")
  assert np.isnan(spec.check_value(float("nan")))
  with pytest.raises(ValueError, match="not finite"):
    spec.check_value(float("inf"))


def test_shard_names_round_trip():
  name = shards.shard_filename("train", 3, 12, "array_record")
  assert name == "train-00003-of-00012.array_record"
  assert shards.parse_shard_filename(name) == ("train", 3, 12, "array_record")
  with pytest.raises(ValueError, match="not a shard file name"):
    shards.parse_shard_filename("train-3-of-12.tfrecord")


def test_decoder_equals_protobufs_values_under_the_installed_protobuf():
  """Whatever protobuf pip picked (Beam pins < 7), both decoders (decode_record; the training
  path's decode_arrays, in place or through protobuf) return exactly what protobuf's own
  repeated fields hold, for encodings other writers use too: unpacked floats and varints,
  negative int64s, a packed field split in two chunks."""
  from google.protobuf import __version__ as protobuf_version
  from tensorflow_datasets.proto import tf_example_pb2
  rng = np.random.default_rng(11)
  rec = _record(rng, "pb", "2024-05-06")
  bouts = rec.labels["bouts"].copy()
  bouts[:4] = [-(2**63), 2**63 - 1, -2, 300]  # Every varint length, 1 to 10 bytes.

  def tag(field, wire):
    return example._varint((field << 3) | wire)

  unpacked_floats = b"".join(tag(1, 5) + struct.pack("<f", v) for v in rec.signals.reshape(-1))
  half = rec.signals.size // 2 * 4
  raw = rec.signals.astype("<f4").tobytes()
  split_floats = example._len_field(1, raw[:half]) + example._len_field(1, raw[half:])
  unpacked_ints = b"".join(tag(1, 0) + example._varint(int(v)) for v in bouts)
  for floats, ints in ((unpacked_floats, unpacked_ints), (split_floats, unpacked_ints)):
    entries = [example._entry("signals", example._len_field(2, floats)),
               example._entry("observed", example._bytes_feature([rec.observed.tobytes()])),
               example._entry("subject_id", example._bytes_feature([b"pb"])),
               example._entry("day", example._bytes_feature([b"2024-05-06"])),
               example._entry("label/bouts", example._len_field(3, ints))]
    data = example._len_field(1, b"".join(entries))
    feature = tf_example_pb2.Example.FromString(data).features.feature
    got = example.decode_record(data, len(CHANNELS), {"bouts": LABELS[3]})
    reference = np.asarray(feature["signals"].float_list.value, np.float32).reshape(1440, -1)
    assert got.signals.tobytes() == reference.tobytes() == rec.signals.tobytes(), protobuf_version
    # Not the layout the in-place reader takes: the training decoder falls back to protobuf.
    assert example._canonical_payloads(data) is None
    signals, observed = example.decode_arrays(data, len(CHANNELS))
    assert signals.tobytes() == reference.tobytes() and np.array_equal(observed, rec.observed)
    np.testing.assert_array_equal(got.labels["bouts"],
                                  np.asarray(feature["label/bouts"].int64_list.value, np.int64))
    np.testing.assert_array_equal(got.labels["bouts"], bouts)
    assert got.signals.flags.writeable and got.labels["bouts"].dtype == np.int64
  # And lsm2's own packed encoding, labels included: the training decoder reads it in place.
  data = example.encode_record(rec, {s.name: s for s in LABELS})
  ours = example.decode_record(data, len(CHANNELS), {s.name: s for s in LABELS})
  assert ours.signals.tobytes() == rec.signals.tobytes()
  np.testing.assert_array_equal(ours.labels["bouts"], rec.labels["bouts"])
  assert example._canonical_payloads(data) is not None
  signals, observed = example.decode_arrays(memoryview(data), len(CHANNELS))
  assert signals.tobytes() == rec.signals.tobytes() and np.array_equal(observed, rec.observed)
  # Truncated or trailing bytes: protobuf's parser names the damage.
  for bad in (data[:-3], data + b"\x0a"):
    assert example._canonical_payloads(bad) is None
    with pytest.raises(example.RecordDecodeError, match="not a tf.train.Example"):
      example.decode_arrays(bad, len(CHANNELS))


def test_in_place_reader_takes_what_tensorflow_writes():
  """TensorFlow's serializer (map entries key first, packed floats) is read in place too."""
  tf = pytest.importorskip("tensorflow")
  rec = _record(np.random.default_rng(12), "tf", "2024-06-07")
  feature = {
      "label/kind": tf.train.Feature(int64_list=tf.train.Int64List(value=[2])),
      "signals": tf.train.Feature(float_list=tf.train.FloatList(value=rec.signals.reshape(-1))),
      "observed": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec.observed.tobytes()])),
  }
  data = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
  assert example._canonical_payloads(data) is not None
  signals, observed = example.decode_arrays(data, len(CHANNELS))
  assert signals.tobytes() == rec.signals.tobytes() and np.array_equal(observed, rec.observed)
