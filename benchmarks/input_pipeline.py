"""Input pipeline throughput: day-records/s through read + parse + normalize + batch.

  python benchmarks/input_pipeline.py [--data DIR] [--json PATH]

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
every record of the TFRecord copy, best of 3). `records_per_s_tfds` reads the
ArrayRecord copy the TFDS way: `tfds.builder_from_directory(...).as_data_source`
(TFDS's own decoding) through a Grain MapDataset (shuffle, batch, 0 workers).
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

from lsm2.data import grain_sources, pipeline, synthetic
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
            repeats: int, verify_checksums: bool = True) -> tuple[float, float]:
  """Median records/s and CPU us/record over `repeats` runs of `batches` batches (after warm-up).

  A worker prefetches at most a few batches ahead, so the CPU time of a timed
  run is that of about its own batches.
  """
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


def crc_us_per_record(data_dir: pathlib.Path) -> float:
  """Microseconds per record of the data checksum alone (what verify_checksums adds)."""
  paths = sorted(data_dir.glob("train-*.tfrecord"))
  views = []
  for path in paths:
    data = memoryview(path.read_bytes())
    pos = 0
    while pos < len(data):
      length = int.from_bytes(data[pos:pos + 8], "little")
      views.append(data[pos + 12:pos + 12 + length])
      pos += 16 + length
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for v in views:
      masked_crc32c(v)
    best = min(best, (time.perf_counter() - start) / len(views) * 1e6)
  return best


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
    results: dict[str, float] = {}
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
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}: {results}")


if __name__ == "__main__":
  main()
