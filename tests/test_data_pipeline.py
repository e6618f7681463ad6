"""Grain input pipeline: values, resumption, per-process coverage, global batches, errors."""
import collections
import itertools
import json
import sys

import numpy as np
import pytest

from lsm2.data import dataset, example, grain_sources, metadata, pipeline
from lsm2.data.record import DayRecord
from lsm2.data.shards import CorruptShardError
from lsm2.data.synthesize import write_synthetic_dataset

FORMATS = ("tfrecord", "array_record")


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """7 subjects x 3 days: 15 train records (odd, so processes get unequal shares)."""
  dirs = {}
  for fmt in FORMATS:
    dirs[fmt] = tmp_path_factory.mktemp(fmt)
    write_synthetic_dataset(dirs[fmt], subjects=7, days=3, seed=1, fmt=fmt, shards=2)
  return dirs


@pytest.fixture(scope="module")
def expected(data_dirs):
  """Normalized train records keyed by their bytes: the pipeline must yield exactly these."""
  z = dataset.read_split(data_dirs["tfrecord"], "train")
  assert len(z["signals"]) == 15
  return {_key(s): o for s, o in zip(z["signals"], z["observed"])}


def _key(signals):
  return (np.asarray(signals) + 0.0).tobytes()  # -0.0 and 0.0 compare equal: one key.


def _records(it, n=None):
  """(key, observed) of every record in the next n batches (all when n is None)."""
  out = []
  for batch in itertools.islice(it, n):
    for s, o in zip(batch["signals"], batch["observed"]):
      out.append((_key(s), o))
  return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_batches_hold_the_normalized_records(data_dirs, expected, fmt):
  it = pipeline.make_train_iterator(data_dirs[fmt], "train", global_batch_size=4, seed=0,
                                    num_epochs=1, process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 3  # 15 records, drop_remainder.
  b = batches[0]
  assert b["signals"].shape == (4, 1440, 26) and b["signals"].dtype == np.float32
  assert b["observed"].shape == (4, 1440, 26) and b["observed"].dtype == np.bool_
  assert np.all(b["signals"][~b["observed"]] == 0) and np.abs(b["signals"]).max() <= 5
  got = _records(iter(batches))
  for key, observed in got:
    assert key in expected
    np.testing.assert_array_equal(observed, expected[key])
  assert len({k for k, _ in got}) == 12


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_from_saved_state_gives_identical_batches(data_dirs, fmt):
  kwargs = dict(global_batch_size=2, seed=5, process_index=0, process_count=1, window_size=4)
  it = pipeline.make_train_iterator(data_dirs[fmt], "train", **kwargs)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # States are JSON (Orbax's Grain handler).
  reference = [next(it) for _ in range(12)]  # Crosses epoch boundaries (7 batches/epoch).
  resumed = pipeline.make_train_iterator(data_dirs[fmt], "train", **kwargs)
  resumed.set_state(state)
  for want in reference:
    got = next(resumed)
    np.testing.assert_array_equal(got["signals"], want["signals"])
    np.testing.assert_array_equal(got["observed"], want["observed"])
  fresh = pipeline.make_train_iterator(data_dirs[fmt], "train", **kwargs)
  first = next(fresh)["signals"]
  assert not np.array_equal(first, reference[0]["signals"])  # The state mattered.


@pytest.mark.parametrize("fmt", FORMATS)
def test_processes_read_disjoint_parts_that_cover_the_split(data_dirs, expected, fmt):
  for epochs in (1, 3):
    counts = collections.Counter()
    per_process = []
    for p in range(2):
      it = pipeline.make_train_iterator(data_dirs[fmt], "train", global_batch_size=2, seed=3,
                                        num_epochs=epochs, process_index=p, process_count=2)
      keys = [k for k, _ in _records(it)]
      per_process.append(keys)
      counts.update(keys)
    assert set(counts) == set(expected)
    assert all(n == epochs for n in counts.values())  # Exactly once per epoch.
    if epochs == 1:
      assert not set(per_process[0]) & set(per_process[1])
  assert sorted(len(k) for k in per_process) != [0, 45]  # Both processes did read.


def test_array_record_global_batches_do_not_depend_on_process_count(data_dirs):
  """Two processes' local batches side by side are the single-process batches."""
  def batches(p, pc):
    it = pipeline.make_train_iterator(data_dirs["array_record"], "train", global_batch_size=4,
                                      seed=5, num_epochs=1, process_index=p, process_count=pc)
    return [[k for k, _ in _records(iter([b]))] for b in it]
  single = batches(0, 1)
  two = [a + b for a, b in zip(batches(0, 2), batches(1, 2))]
  assert len(two) == 3 and two == single[:3]


def test_epochs_are_reshuffled(data_dirs):
  it = pipeline.make_train_iterator(data_dirs["array_record"], "train", global_batch_size=1,
                                    seed=2, num_epochs=2, process_index=0, process_count=1)
  keys = [k for k, _ in _records(it)]
  assert sorted(keys[:15]) == sorted(keys[15:]) and keys[:15] != keys[15:]


def test_unshuffled_order_is_storage_order(data_dirs):
  it = pipeline.make_train_iterator(data_dirs["array_record"], "train", global_batch_size=1,
                                    seed=0, shuffle=False, num_epochs=1, process_index=0,
                                    process_count=1)
  z = dataset.read_split(data_dirs["array_record"], "train")
  assert [k for k, _ in _records(it)] == [_key(s) for s in z["signals"]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_iterator_is_one_unshuffled_pass(data_dirs, fmt):
  """Validation batches: whole batches of one pass in storage order, equal at every call."""
  make = lambda: pipeline.make_eval_iterator(data_dirs[fmt], "train", global_batch_size=4,
                                             process_index=0, process_count=1)
  first = [k for k, _ in _records(make())]
  assert len(first) == 12  # 15 records: 3 whole batches, no second epoch.
  assert [k for k, _ in _records(make())] == first
  unshuffled = pipeline.make_train_iterator(data_dirs[fmt], "train", global_batch_size=4, seed=9,
                                            shuffle=False, num_epochs=1, process_index=0,
                                            process_count=1)
  assert [k for k, _ in _records(unshuffled)] == first
  if fmt == "array_record":
    z = dataset.read_split(data_dirs[fmt], "train")
    assert first == [_key(s) for s in z["signals"][:12]]


def test_global_batch_from_process_local_data(data_dirs):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  it = pipeline.make_train_iterator(data_dirs["tfrecord"], "train", global_batch_size=4, seed=0)
  local = next(it)
  batch = pipeline.to_global_batch(local, sharding)
  assert batch["signals"].shape == (4, 1440, 26) and batch["observed"].dtype == np.bool_
  assert batch["signals"].sharding == sharding
  assert len(batch["signals"].addressable_shards) == 4
  np.testing.assert_array_equal(np.asarray(batch["signals"]), local["signals"])


@pytest.fixture
def parsed_flags():
  """Parsed absl flags, as under absl.app (Grain workers read them); unparsed afterwards."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  yield
  if not was_parsed:
    flags.FLAGS.unparse_flags()


def test_pipeline_changes_no_process_wide_setting(data_dirs):
  """Neither the allocator nor absl's flag state changes behind the caller's back."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  tuned = grain_sources.keeps_freed_memory()
  parsed = flags.FLAGS.is_parsed()
  it = pipeline.make_train_iterator(data_dirs["array_record"], "train", global_batch_size=4,
                                    seed=0, process_index=0, process_count=1)
  next(it)
  assert grain_sources.keeps_freed_memory() == tuned and flags.FLAGS.is_parsed() == parsed
  if not parsed:
    with pytest.raises(RuntimeError, match="worker_count=2 needs parsed absl flags"):
      pipeline.make_train_iterator(data_dirs["array_record"], "train", global_batch_size=4,
                                   seed=0, worker_count=2, process_index=0, process_count=1)
    assert not flags.FLAGS.is_parsed()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_malloc_tuning_applies_on_glibc_when_asked():
  assert grain_sources.keep_freed_memory() and grain_sources.keeps_freed_memory()


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_subjects_keeps_that_many_subjects(data_dirs, expected, fmt):
  it = pipeline.make_train_iterator(data_dirs[fmt], "train", global_batch_size=1, seed=0,
                                    num_epochs=1, process_index=0, process_count=1,
                                    max_subjects=2)
  got = _records(it)
  assert len(got) == 2 * 3 and all(k in expected for k, _ in got)


def test_decode_batch_equals_normalize_and_masks_non_finite_values():
  """Fused decode + normalize = metadata.normalize, also for stored NaN/Inf and clipped values."""
  rng = np.random.default_rng(0)
  mean, std = rng.normal(size=3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
  raws, days = [], []
  for i in range(3):
    signals = rng.normal(size=(1440, 3)).astype(np.float32) * 4
    observed = rng.random((1440, 3)) < 0.7
    if i == 1:
      signals[5, 0], signals[6, 1], signals[7, 2] = np.nan, np.inf, -np.inf
    record = DayRecord(f"s{i}", "2024-01-01", signals, observed, {})
    raws.append((example.encode_record(record, {}), "x.tfrecord", i))
    days.append((signals, observed))
  batch = grain_sources.DecodeBatch(3, mean, std)(raws)
  for (signals, observed), got_s, got_o in zip(days, batch["signals"], batch["observed"]):
    want_o = observed & np.isfinite(signals)
    np.testing.assert_array_equal(got_o, want_o)
    np.testing.assert_array_equal(got_s, metadata.normalize(signals, observed, mean, std))
  bad = (1, [5, 6, 7], [0, 1, 2])  # The NaN and the infinities: unobserved, 0.
  assert not batch["observed"][bad].any() and not batch["signals"][bad].any()
  assert np.abs(batch["signals"]).max() == 5
  read = grain_sources.DecodeBatch(3, mean, std, read=lambda i: raws[i])([2, 0])
  np.testing.assert_array_equal(read["signals"], batch["signals"][[2, 0]])
  bad = (raws[0][0][:-9], "x.tfrecord", 4)
  with pytest.raises(CorruptShardError, match="x.tfrecord: record 4"):
    grain_sources.DecodeBatch(3, mean, std)([raws[0], bad])


def test_verify_checksums_reports_corrupt_record(data_dirs, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  d = shutil.copytree(data_dirs["tfrecord"], tmp_path / "d")
  shard = sorted(d.glob("train-*.tfrecord"))[0]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0x10
  shard.write_bytes(bytes(data))
  it = pipeline.make_train_iterator(d, "train", global_batch_size=1, seed=0, num_epochs=1,
                                    process_index=0, process_count=1, verify_checksums=True)
  with pytest.raises(Exception, match=rf"{shard.name}: record \d+: (data|length) checksum"):
    list(it)


def _record_spans(data: bytes) -> list[tuple[int, int]]:
  """(start, end) of each record's payload in a TFRecord file."""
  spans, pos = [], 0
  while pos < len(data):
    length = int.from_bytes(data[pos:pos + 8], "little")
    spans.append((pos + 12, pos + 12 + length))
    pos += 16 + length
  return spans


def test_training_reads_verify_the_payload_checksum(data_dirs, tmp_path):
  """One flipped payload byte (a signal value) stops training, naming shard and record."""
  import shutil  # pylint: disable=g-import-not-at-top
  d = shutil.copytree(data_dirs["tfrecord"], tmp_path / "d")
  shard = sorted(d.glob("train-*.tfrecord"))[1]
  data = bytearray(shard.read_bytes())
  start, end = _record_spans(bytes(data))[2]
  data[start + (end - start) // 2] ^= 0x01  # Deep inside the packed signals: still parses.
  shard.write_bytes(bytes(data))
  with pytest.raises(CorruptShardError,
                     match=rf"{shard.name}: record 2: data checksum mismatch"):
    list(pipeline.make_train_iterator(d, "train", global_batch_size=1, seed=0, num_epochs=1,
                                      process_index=0, process_count=1))
  # Without verification the corrupt value would have been trained on silently.
  unverified = pipeline.make_train_iterator(d, "train", global_batch_size=1, seed=0,
                                            num_epochs=1, process_index=0, process_count=1,
                                            verify_checksums=False)
  assert len(list(unverified)) == 15


def test_bad_arguments_are_refused(data_dirs):
  d = data_dirs["tfrecord"]
  with pytest.raises(ValueError, match="multiple of process_count=2"):
    pipeline.make_train_iterator(d, "train", global_batch_size=3, seed=0, process_index=0,
                                 process_count=2)
  with pytest.raises(ValueError, match="2 TFRecord shards for 3 processes"):
    pipeline.make_train_iterator(d, "train", global_batch_size=3, seed=0, process_index=0,
                                 process_count=3)
  with pytest.raises(ValueError, match="has 3 records for 4 processes"):
    pipeline.make_train_iterator(data_dirs["array_record"], "validation", global_batch_size=4,
                                 seed=0, process_index=0, process_count=4)
  with pytest.raises(KeyError, match="split 'nope'"):
    pipeline.make_train_iterator(d, "nope", global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_train_iterator(d, "train", global_batch_size=2, seed=0, process_index=2,
                                 process_count=2)
  with pytest.raises(metadata.MetadataError, match="not an lsm2 dataset"):
    pipeline.make_train_iterator(d / "missing", "train", global_batch_size=2, seed=0)


def test_orbax_checkpoint_of_the_iterator(data_dirs, tmp_path):
  """The recipe in make_train_iterator's docstring: Grain's Orbax handler in a manager."""
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  kwargs = dict(global_batch_size=2, seed=9, process_index=0, process_count=1)
  it = pipeline.make_train_iterator(data_dirs["tfrecord"], "train", **kwargs)
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt",
                               item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()})
  mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = [next(it)["signals"] for _ in range(4)]
  restored = pipeline.make_train_iterator(data_dirs["tfrecord"], "train", **kwargs)
  mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
  for w in want:
    np.testing.assert_array_equal(next(restored)["signals"], w)
  mngr.close()


@pytest.mark.slow
def test_array_record_workers_decode_and_normalize(data_dirs, expected, parsed_flags):
  """Workers (taking turns over the batches) normalize into shared memory: the same batches."""
  kwargs = dict(global_batch_size=4, seed=6, num_epochs=2, process_index=0, process_count=1)
  it = pipeline.make_train_iterator(data_dirs["array_record"], "train", worker_count=2, **kwargs)
  got = _records(it)
  it.close()
  counts = collections.Counter(k for k, _ in got)
  # 2 epochs x 15 records: 3 whole batches per epoch.
  assert len(got) == 24 and set(counts) <= set(expected) and max(counts.values()) <= 2
  for key, observed in got:
    np.testing.assert_array_equal(observed, expected[key])
  without = pipeline.make_train_iterator(data_dirs["array_record"], "train", **kwargs)
  assert [k for k, _ in got] == [k for k, _ in _records(without)]


@pytest.mark.slow
def test_worker_processes_cover_and_resume(data_dirs, expected, parsed_flags):
  """Worker processes split the TFRecord file stream (InterleaveIterDataset.set_slice)."""
  fmt = "tfrecord"
  kwargs = dict(global_batch_size=1, seed=4, num_epochs=1, process_index=0, process_count=1,
                worker_count=2)
  it = pipeline.make_train_iterator(data_dirs[fmt], "train", **kwargs)
  head = _records(it, 4)
  state = it.get_state()
  tail = _records(it)
  it.close()
  assert sorted(k for k, _ in head + tail) == sorted(expected)  # One epoch, all records.
  resumed = pipeline.make_train_iterator(data_dirs[fmt], "train", **kwargs)
  resumed.set_state(state)
  assert [k for k, _ in _records(resumed)] == [k for k, _ in tail]
  resumed.close()
