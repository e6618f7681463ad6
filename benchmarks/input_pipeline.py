"""Input pipeline throughput: day-records/s through read + parse + normalize + batch.

  python benchmarks/input_pipeline.py [--data DIR] [--json PATH] [--pieces]

Without --data it synthesizes its own data (TFRecord and ArrayRecord copies)
in a temporary directory and also reports the generator's speed. Measures the
training iterator (lsm2.data.pipeline.make_train_iterator) with 0 and 2 worker
processes; prints one line per setting (medians of several timed runs: wall
records/s, and CPU microseconds per record summed over this process and its
workers, which depends less on other jobs sharing the machine) and with --json
writes the best worker setting per format as `records_per_s_tfrecord` and
`records_per_s_array_record`, plus every setting's `records_per_s_{format}_w{workers}`
and `cpu_us_per_record_{format}_w{workers}`. TFRecord data checksums are verified
(the training default); `records_per_s_tfrecord_w0_noverify` measures the same
pipeline without, and `crc_us_per_record` the checksum alone (copy + CRC-32C of
every record of the TFRecord copy, best of 3), `decode_records_per_s` the record
decoder alone on the same records, and `protobuf_version` the protobuf it ran
with (decoding must not depend on it: lsm2/data/example.py). `records_per_s_tfds` reads the
ArrayRecord copy the TFDS way: `tfds.builder_from_directory(...).as_data_source`
(TFDS's own decoding) through a Grain MapDataset (shuffle, batch, 0 workers).
`--pieces` adds each I/O piece's day-records/s, lsm2's own beside the
library's (`pieces_{piece}_{lsm2|library}[_{variant}]_records_per_s`; see
`pieces` and docs/data.md, "Which I/O pieces are lsm2's own").
`convert_subject_days_per_s_single` / `_beam` (and `_beam_w2`) time
`lsm2.data.convert` on a long_csv table of the same subjects (convert_speed).
As a program's entry point it opts in to glibc malloc tuning
(grain_sources.keep_freed_memory, as lsm2.main does) and marks absl flags
parsed (Grain's workers read them).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

from absl import flags
import google.protobuf

from lsm2.data import example, grain_sources, metadata, pipeline, synthetic
from lsm2.data.crc32c import masked_crc32c
from lsm2.data.synthesize import write_synthetic_dataset


def generator_speed(days: int = 4, subjects: int = 25) -> float:
  """Subject-days/s of the synthetic generator alone (one core, no writing)."""
  start = time.perf_counter()
  for i in range(subjects):
    synthetic.generate_subject(0, i, days)
  return subjects * days / (time.perf_counter() - start)


def cpu_seconds() -> float:
  """CPU time of this process and its child processes (Grain workers) so far (Linux /proc)."""
  total = time.process_time()
  tick = os.sysconf("SC_CLK_TCK")
  me = str(os.getpid())
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:  # The process ended meanwhile.
      continue
    if fields[1] == me:  # Fields after the name: state, ppid, ..., utime (12), stime (13).
      total += (int(fields[11]) + int(fields[12])) / tick
  return total


def measure(data_dir: pathlib.Path, workers: int, batch_size: int, batches: int,
            repeats: int, verify_checksums: bool = True, it=None) -> tuple[float, float]:
  """Median records/s and CPU us/record over `repeats` runs of `batches` batches (after warm-up).

  Of the training iterator, or of `it` (batches of `batch_size`). A worker
  prefetches at most a few batches ahead, so the CPU time of a timed run is
  that of about its own batches.
  """
  if it is None:
    it = pipeline.make_train_iterator(data_dir, "train", global_batch_size=batch_size, seed=0,
                                      worker_count=workers, process_index=0, process_count=1,
                                      verify_checksums=verify_checksums)
  try:
    for _ in range(3 if workers else 1):  # Start workers, fill buffers.
      next(it)
    rates, cpu = [], []
    for _ in range(repeats):
      start, start_cpu = time.perf_counter(), cpu_seconds()
      for _ in range(batches):
        next(it)
      records = batches * batch_size
      rates.append(records / (time.perf_counter() - start))
      cpu.append((cpu_seconds() - start_cpu) / records * 1e6)
    return statistics.median(rates), statistics.median(cpu)
  finally:
    it.close()


def tfrecord_payloads(data_dir: pathlib.Path) -> list[memoryview]:
  """Every serialized Example of the split `train` of a TFRecord dataset, in file order."""
  views = []
  for path in sorted(data_dir.glob("train-*.tfrecord")):
    data = memoryview(path.read_bytes())
    pos = 0
    while pos < len(data):
      length = int.from_bytes(data[pos:pos + 8], "little")
      views.append(data[pos + 12:pos + 12 + length])
      pos += 16 + length
  return views


def us_per_record(views: list[memoryview], work) -> float:
  """Microseconds per record of `work(view)` over all `views`, best of 3 passes."""
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for v in views:
      work(v)
    best = min(best, (time.perf_counter() - start) / len(views) * 1e6)
  return best


def decode_records_per_s(data_dir: pathlib.Path, num_channels: int) -> float:
  """Records/s of the record decoder alone (lsm2.data.example.decode_arrays), one process."""
  return 1e6 / us_per_record(tfrecord_payloads(data_dir),
                             lambda v: example.decode_arrays(v, num_channels))


def crc_us_per_record(data_dir: pathlib.Path) -> float:
  """Microseconds per record of the data checksum alone (what verify_checksums adds)."""
  return us_per_record(tfrecord_payloads(data_dir), masked_crc32c)


def tfds_records_per_s(data_dir: pathlib.Path, batch_size: int, batches: int,
                       repeats: int) -> float:
  """Median records/s of TFDS's data source (its own decoding) batched by Grain."""
  import grain  # pylint: disable=g-import-not-at-top
  from lsm2.data import tfds_info  # pylint: disable=g-import-not-at-top
  source = tfds_info.builder(data_dir).as_data_source(split="train")
  ds = grain.MapDataset.source(source).shuffle(seed=0).repeat().batch(batch_size)
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
  next(it)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    rates.append(batches * batch_size / (time.perf_counter() - start))
  return statistics.median(rates)


def _rate(run, records: int, repeats: int) -> float:
  """Median records/s of `run()` (which handles `records` records) after one warm-up call."""
  run()
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    rates.append(records / (time.perf_counter() - start))
  return statistics.median(rates)


def _drain(it, n: int) -> None:
  for _ in range(n):
    next(it)


def _grain_window_shuffle_pipeline(data_dir: pathlib.Path, batch_size: int):
  """The TFRecord training pipeline with Grain's WindowShuffleIterDataset for lsm2's."""
  import grain  # pylint: disable=g-import-not-at-top
  from lsm2.data import metadata  # pylint: disable=g-import-not-at-top
  meta = metadata.load_metadata(data_dir)
  paths = [str(p) for p in meta.shard_paths("train")]
  counts = [meta.shard_records[os.path.basename(p)] for p in paths]
  files = grain.MapDataset.range(len(paths)).shuffle(seed=0).repeat(None)
  ds = grain.experimental.InterleaveIterDataset(
      files.map(grain_sources.OpenShard(paths, counts, True)),
      cycle_length=min(pipeline.DEFAULT_CYCLE, len(paths)))
  ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=pipeline.DEFAULT_WINDOW,
                                                   seed=0)
  decode = grain_sources.DecodeBatch(meta.num_channels, meta.norm_mean, meta.norm_std)
  return iter(ds.batch(batch_size, drop_remainder=True, batch_fn=decode))


def pieces(root: pathlib.Path, batch_size: int, batches: int, repeats: int) -> dict[str, float]:
  """The I/O pieces, day-records/s per process: lsm2's own beside the library's, same data.

  Keys `pieces_{piece}_{lsm2|library}[_{variant}]_records_per_s`. For the
  pieces lsm2 retired (the decoder, TFRecord writing, interleave, ArrayRecord
  access with the epoch shuffle) only the library version the pipeline now
  uses is left to measure; the side-by-side runs that retired them are in
  benchmarks/MEASUREMENTS.md.
  """
  import grain  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import example_parser  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  from lsm2.data import example, metadata, shards  # pylint: disable=g-import-not-at-top
  from lsm2.data import tfds_info, writer  # pylint: disable=g-import-not-at-top
  out: dict[str, float] = {}

  def report(piece: str, impl: str, rate: float) -> None:
    out[f"pieces_{piece}_{impl}_records_per_s"] = rate
    print(f"  {piece:22s} {impl:30s} {rate:9.0f} day-records/s")

  tf_dir, ar_dir = root / "tfrecord", root / "array_record"
  meta = metadata.load_metadata(tf_dir)
  c = meta.num_channels
  paths = [str(p) for p in meta.shard_paths("train")]
  counts = [meta.shard_records[os.path.basename(p)] for p in paths]
  raws = [r for p in paths for r in shards.iter_tfrecord(p)]
  n = len(raws)
  print(f"pieces ({n} train records, {c} channels; median of {repeats} runs):")

  # Decoding a serialized day record into signals and observed (lsm2: protobuf's parser).
  report("decode", "library", _rate(lambda: [example.decode_arrays(r, c) for r in raws],
                                     n, repeats))
  parser = example_parser.ExampleParserNp(
      tfds_info.builder(ar_dir).info.features.get_serialized_info())
  report("decode", "library_tfds_parser", _rate(lambda: [parser.parse_example(r) for r in raws],
                                                 n, repeats))
  spec = {"signals": tf.io.FixedLenFeature([1440 * c], tf.float32),
          "observed": tf.io.FixedLenFeature([], tf.string)}
  def tf_parse():
    for i in range(0, n, batch_size):
      ex = tf.io.parse_example(raws[i:i + batch_size], spec)
      np.reshape(ex["signals"].numpy(), (-1, 1440, c))
      tf.reshape(tf.io.decode_raw(ex["observed"], tf.bool), (-1, 1440, c)).numpy()
  report("decode", "library_tf_parse_example", _rate(tf_parse, n, repeats))

  # Encoding a DayRecord with its labels (kept: lsm2's wire-level encoder).
  records = [example.decode_record(r, c, meta.labels) for r in raws]
  report("encode", "lsm2", _rate(lambda: [example.encode_record(r, meta.labels)
                                           for r in records], n, repeats))
  def pb_encode(rec):
    ex = tf_example_pb2.Example()
    f = ex.features.feature
    f["subject_id"].bytes_list.value.append(rec.subject_id.encode())
    f["day"].bytes_list.value.append(rec.day.encode())
    f["signals"].float_list.value.extend(rec.signals.reshape(-1).tolist())
    f["observed"].bytes_list.value.append(rec.observed.tobytes())
    for name, label in meta.labels.items():
      value = rec.labels[name]
      if label.kind == "regression":
        f[f"label/{name}"].float_list.value.append(value)
      else:
        f[f"label/{name}"].int64_list.value.extend(np.atleast_1d(value).tolist())
    return ex.SerializeToString(deterministic=True)
  report("encode", "library", _rate(lambda: [pb_encode(r) for r in records], n, repeats))
  features = tfds_info.features(c, meta.labels)
  def tfds_encode(rec):
    values = {"signals": rec.signals, "observed": rec.observed, "subject_id": rec.subject_id,
              "day": rec.day}
    if meta.labels:
      values["label"] = dict(rec.labels)
    return features.serialize_example(values)
  report("encode", "library_tfds_serializer", _rate(lambda: [tfds_encode(r) for r in records],
                                                     n, repeats))

  # TFRecord reading with the data checksum verified (kept: lsm2's own framing code).
  def lsm2_read():
    for p, k in zip(paths, counts):
      for _ in grain_sources.TFRecordShard(p, k, verify_checksums=True):
        pass
  report("tfrecord_read", "lsm2", _rate(lsm2_read, n, repeats))
  def grain_read():
    for p in paths:
      for _ in grain.experimental.TFRecordIterDataset(p):
        pass
  report("tfrecord_read", "library_grain_nocrc", _rate(grain_read, n, repeats))
  def tf_read():
    for _ in tf.data.TFRecordDataset(paths).as_numpy_iterator():
      pass
  report("tfrecord_read", "library_tf_data", _rate(tf_read, n, repeats))
  with tempfile.TemporaryDirectory() as tmp:
    def tf_write():
      w = writer.make_writer(os.path.join(tmp, "a.tfrecord"), "tfrecord")
      for r in raws:
        w.write(r)
      w.close()
    report("tfrecord_write", "library", _rate(tf_write, n, repeats))

  # Window shuffle (256) of raw records held in memory (kept: lsm2's WindowShuffle).
  items = grain.MapDataset.source([(r, "x", i) for i, r in enumerate(raws)]).repeat(4)
  stream = lambda: items.to_iter_dataset(grain.ReadOptions(num_threads=0))
  report("window_shuffle", "lsm2", _rate(
      lambda: _drain(iter(grain_sources.WindowShuffle(stream(), 256, 0)), 4 * n), 4 * n,
      repeats))
  report("window_shuffle", "library", _rate(
      lambda: _drain(iter(grain.experimental.WindowShuffleIterDataset(
          stream(), window_size=256, seed=0)), 4 * n), 4 * n, repeats))

  # Interleaving the TFRecord shards, checksums verified (Grain's, as in the pipeline).
  files = grain.MapDataset.range(len(paths)).map(grain_sources.OpenShard(paths, counts, True))
  report("interleave", "library", _rate(
      lambda: _drain(iter(grain.experimental.InterleaveIterDataset(
          files, cycle_length=pipeline.DEFAULT_CYCLE)), n), n, repeats))

  # ArrayRecord random access after the epoch shuffle, process 0 of 2 in blocks of half a
  # batch (Grain's shuffle, batch and slicing over ArrayRecordDataSource, as in the pipeline).
  ameta = metadata.load_metadata(ar_dir)
  apaths = [str(p) for p in ameta.shard_paths("train")]
  read = grain_sources.ArrayRecordReads(
      apaths, [ameta.shard_records[os.path.basename(p)] for p in apaths])
  block = batch_size // 2
  blocks = (grain.MapDataset.range(len(read)).shuffle(seed=0)
            .batch(block, drop_remainder=True)[0::2].repeat(None))
  nblocks = 4 * len(read) // (2 * block)
  report("array_record", "library", _rate(
      lambda: [[read(i) for i in blocks[k]] for k in range(nblocks)], nblocks * block, repeats))

  # The TFRecord training pipeline (0 workers) with lsm2's window shuffle and with Grain's.
  rate, _ = measure(tf_dir, 0, batch_size, batches, repeats)
  report("pipeline_tfrecord_w0", "lsm2_window_shuffle", rate)
  rate, _ = measure(tf_dir, 0, batch_size, batches, repeats,
                    it=_grain_window_shuffle_pipeline(tf_dir, batch_size))
  report("pipeline_tfrecord_w0", "library_window_shuffle", rate)
  return out


def convert_speed(subjects: int, days: int, repeats: int = 3) -> dict[str, float]:
  """Subject-days/s of `lsm2.data.convert` on one long_csv table: single-process and on Beam.

  The table holds the synthetic generator's subjects (one row per observed
  minute, every channel); both paths convert it into byte-identical datasets
  (tests/test_data_beam.py). Wall time of the whole conversion (CSV read, day
  records, encoding, 4 shards per split, metadata) per subject-day written,
  median of `repeats`. Beam: the DirectRunner in this process
  (`convert_subject_days_per_s_beam`) and with 2 worker processes
  (`..._beam_w2`); skipped without apache_beam.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from lsm2.data.convert import convert  # pylint: disable=g-import-not-at-top
  names = [c.name for c in synthetic.DEFAULT_CHANNELS]
  runs = {"single": None}
  if importlib.util.find_spec("apache_beam"):
    importlib.import_module("apache_beam")  # Before the clock starts.
    runs["beam"] = ["--runner=DirectRunner"]
    runs["beam_w2"] = ["--runner=DirectRunner", "--direct_num_workers=2",
                       "--direct_running_mode=multi_processing"]
  else:
    print("convert on Beam: skipped (pip install apache-beam)")
  out: dict[str, float] = {}
  with tempfile.TemporaryDirectory() as tmp:
    table = pathlib.Path(tmp) / "table.csv"
    frames = []
    for i in range(subjects):
      for r in synthetic.generate_subject(0, i, days)[1]:
        rows = r.observed.any(axis=1)
        df = pd.DataFrame(np.where(r.observed, r.signals, np.nan)[rows], columns=names)
        df.insert(0, "timestamp", pd.Timestamp(r.day) + pd.to_timedelta(np.flatnonzero(rows),
                                                                          unit="min"))
        df.insert(0, "subject", r.subject_id)
        frames.append(df)
    pd.concat(frames).to_csv(table, index=False, float_format="%.6g")
    for name, beam_args in runs.items():
      rates = []
      for k in range(repeats):
        start = time.perf_counter()
        _, stats = convert("long_csv", table, pathlib.Path(tmp) / f"{name}{k}", shards=4,
                           beam_args=beam_args)
        rates.append(stats.kept / (time.perf_counter() - start))
      out[f"convert_subject_days_per_s_{name}"] = statistics.median(rates)
      print(f"convert long_csv {name:8s}: {statistics.median(rates):6.0f} subject-days/s "
            f"({stats.kept} days of {subjects} subjects, {len(names)} channels; median of "
            f"{repeats})")
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", help="existing dataset directories are DATA/tfrecord and "
                 "DATA/array_record (default: synthesize into a temporary directory)")
  p.add_argument("--json", help="write the best records/s per format to this file")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--subjects", type=int, default=40)
  p.add_argument("--days", type=int, default=8)
  p.add_argument("--pieces", action="store_true",
                 help="also measure each I/O piece against its library alternative")
  args = p.parse_args()
  flags.FLAGS.mark_as_parsed()
  grain_sources.keep_freed_memory()

  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(args.data or tmp)
    if not args.data:
      rate = generator_speed()
      print(f"synthetic generator: {rate:.0f} subject-days/s (one core, no writing)")
      for fmt in ("tfrecord", "array_record"):
        start = time.perf_counter()
        meta = write_synthetic_dataset(root / fmt, subjects=args.subjects, days=args.days,
                                       seed=0, fmt=fmt, shards=4)
        total = sum(meta.record_counts.values())
        print(f"synthesize + write {fmt}: {total / (time.perf_counter() - start):.0f} "
              f"subject-days/s ({total} records)")
    results: dict[str, float | str] = {"protobuf_version": google.protobuf.__version__}
    num_channels = metadata.load_metadata(root / "tfrecord").num_channels
    results["decode_records_per_s"] = decode_records_per_s(root / "tfrecord", num_channels)
    print(f"record decoder alone: {results['decode_records_per_s']:8.0f} day-records/s "
          f"(protobuf {results['protobuf_version']})")
    for fmt in ("tfrecord", "array_record"):
      for workers in (0, 2):
        rate, cpu = measure(root / fmt, workers, args.batch_size, args.batches, args.repeats)
        print(f"{fmt:13s} workers={workers}: {rate:8.0f} day-records/s, {cpu:5.0f} CPU-us/record "
              f"(batch {args.batch_size}, median of {args.repeats} x {args.batches} batches)")
        key = f"records_per_s_{fmt}"
        results[key] = max(results.get(key, 0.0), rate)
        results[f"{key}_w{workers}"] = rate
        results[f"cpu_us_per_record_{fmt}_w{workers}"] = cpu
    rate, cpu = measure(root / "tfrecord", 0, args.batch_size, args.batches, args.repeats,
                        verify_checksums=False)
    print(f"tfrecord      workers=0 without data checksums: {rate:8.0f} day-records/s, "
          f"{cpu:5.0f} CPU-us/record")
    results["records_per_s_tfrecord_w0_noverify"] = rate
    results["cpu_us_per_record_tfrecord_w0_noverify"] = cpu
    results["crc_us_per_record"] = crc_us_per_record(root / "tfrecord")
    print(f"data checksum alone: {results['crc_us_per_record']:.0f} us/record")
    rate = tfds_records_per_s(root / "array_record", args.batch_size, args.batches,
                              args.repeats)
    print(f"tfds data source + grain batch: {rate:8.0f} day-records/s (0 workers)")
    results["records_per_s_tfds"] = rate
    results.update(convert_speed(args.subjects, args.days))
    if args.pieces:
      results.update(pieces(root, args.batch_size, args.batches, args.repeats))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}: {results}")


if __name__ == "__main__":
  main()
