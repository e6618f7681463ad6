"""Days/s of the endless synthetic stream against the file reader, one core (no workers).

  python benchmarks/synthetic_stream.py [--subjects 64] [--days 3] [--batches 40] [--repeats 3]

Writes a synthetic dataset (ArrayRecord) into a temporary directory, then times
`--batches` batches of 8 from pipeline.make_synthetic_stream_iterator (days
generated, serialized, decoded and normalized on demand) and from
pipeline.make_train_iterator on the written train split (read, decoded,
normalized), each the best of `--repeats` fresh iterators, in this process.
Prints one JSON line: `stream_days_per_s`, `files_days_per_s` and the setting.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

from lsm2.data import grain_sources
from lsm2.data import pipeline
from lsm2.data.synthesize import write_synthetic_dataset

BATCH = 8  # The CPU recipe's batch.


def _days_per_s(make, batches: int, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    it = make()
    next(it)  # Opening files, the first block: not the steady state.
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    best = min(best, time.perf_counter() - start)
  return batches * BATCH / best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--subjects", type=int, default=64)
  p.add_argument("--days", type=int, default=3)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  grain_sources.keep_freed_memory()  # As lsm2.main does.
  with tempfile.TemporaryDirectory() as tmp:
    write_synthetic_dataset(tmp, subjects=args.subjects, days=args.days, seed=0,
                            fmt="array_record")
    stream = _days_per_s(lambda: pipeline.make_synthetic_stream_iterator(
        tmp, global_batch_size=BATCH, seed=0), args.batches, args.repeats)
    files = _days_per_s(lambda: pipeline.make_train_iterator(
        tmp, "train", global_batch_size=BATCH, seed=0), args.batches, args.repeats)
  print(json.dumps({"stream_days_per_s": round(stream, 1), "files_days_per_s": round(files, 1),
                    "batch": BATCH, "batches": args.batches, "repeats": args.repeats,
                    "days_per_subject": args.days, "machine": platform.machine()}))


if __name__ == "__main__":
  main()
