"""Input pipeline throughput: day-records/s through read + parse + normalize + batch.

  python benchmarks/input_pipeline.py [--data DIR] [--json PATH]

Without --data it synthesizes its own data (TFRecord and ArrayRecord copies)
in a temporary directory and also reports the generator's speed. Measures the
training iterator (lsm2.data.pipeline.make_train_iterator) with 0 and 2 worker
processes; prints one line per setting (median of several timed runs) and
with --json writes the best worker setting per format as
`records_per_s_tfrecord` and `records_per_s_array_record`.
"""
from __future__ import annotations

import argparse
import json
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


def measure(data_dir: pathlib.Path, workers: int, batch_size: int, batches: int,
            repeats: int) -> float:
  """Median records/s over `repeats` timed runs of `batches` batches (after warm-up)."""
  it = pipeline.make_train_iterator(data_dir, "train", global_batch_size=batch_size, seed=0,
                                    worker_count=workers, process_index=0, process_count=1)
  try:
    for _ in range(3 if workers else 1):  # Start workers, fill buffers.
      next(it)
    rates = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(batches):
        next(it)
      rates.append(batches * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)
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
        rate = measure(root / fmt, workers, args.batch_size, args.batches, args.repeats)
        print(f"{fmt:13s} workers={workers}: {rate:8.0f} day-records/s "
              f"(batch {args.batch_size}, median of {args.repeats} x {args.batches} batches)")
        key = f"records_per_s_{fmt}"
        results[key] = max(results.get(key, 0.0), rate)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}: {results}")


if __name__ == "__main__":
  main()
