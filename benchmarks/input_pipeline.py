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
and `cpu_us_per_record_{format}_w{workers}`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

from lsm2.data import pipeline, synthetic
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
            repeats: int) -> tuple[float, float]:
  """Median records/s and CPU us/record over `repeats` runs of `batches` batches (after warm-up).

  A worker prefetches at most a few batches ahead, so the CPU time of a timed
  run is that of about its own batches.
  """
  it = pipeline.make_train_iterator(data_dir, "train", global_batch_size=batch_size, seed=0,
                                    worker_count=workers, process_index=0, process_count=1)
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
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}: {results}")


if __name__ == "__main__":
  main()
