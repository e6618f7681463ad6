"""Writes a synthetic dataset directory (the embedded default data, see lsm2.data.synthetic).

  python -m lsm2.data.synthesize --out DIR --subjects N --days D --seed S \
      [--format tfrecord|array_record] [--shards K]

Runs with config.data.synthesize_subjects > 0 (the demo, runlocal) write one
into config.data.dir when it holds no dataset (`ensure_synthetic_dataset`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence

import jax
from jax.experimental import multihost_utils

from lsm2 import errors
from lsm2 import storage
from lsm2.data import splits as splits_lib
from lsm2.data import synthetic
from lsm2.data import writer as writer_lib
from lsm2.data.channels import DEFAULT_CHANNELS
from lsm2.data.metadata import METADATA_FILE, DatasetMetadata
from lsm2.data.record import DayRecord


def _subject_id(index: int) -> str:
  return f"synth{index:06d}"


def _records(seed: int, indices: Sequence[int], days: int) -> Iterator[DayRecord]:
  for i in indices:
    yield from synthetic.generate_subject(seed, i, days)[1]


def write_synthetic_dataset(out_dir: str | os.PathLike, *, subjects: int, days: int, seed: int,
                            fmt: str = "tfrecord", shards: int = 2,
                            split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                            overwrite: bool = False, progress: bool = False) -> DatasetMetadata:
  """Generates subjects x days records into subject-disjoint train/validation/test splits.

  Each split is written to min(shards, its record count) shard files. Returns
  the metadata (also written to OUT/metadata.json), including the generator's
  known per-channel observation noise as `noise_std`.
  """
  if subjects < 1 or days < 1:
    raise ValueError(f"need subjects >= 1 and days >= 1, got subjects={subjects} days={days}")
  index_of = {_subject_id(i): i for i in range(subjects)}
  assignment = splits_lib.assign_subjects(index_of, split_fractions, seed)
  with writer_lib.DatasetWriter(out_dir, channels=DEFAULT_CHANNELS,
                                labels=synthetic.LABEL_SPECS, fmt=fmt,
                                overwrite=overwrite) as writer:  # Staged, then swapped in.
    for split in splits_lib.SPLIT_NAMES:
      indices = [index_of[s] for s in assignment[split]]
      writer.write_split(split, _records(seed, indices, days), num_records=len(indices) * days,
                         num_shards=shards, progress=progress)
    return writer.finish(
        noise_std=synthetic.NOISE_STD_VECTOR.tolist(),
        source={"generator": "lsm2.data.synthetic", "seed": seed, "subjects": subjects,
                "days": days, "split_fractions": list(split_fractions)})


def ensure_synthetic_dataset(config) -> None:
  """Writes config.data.synthesize_subjects x synthesize_days synthetic subject-days into
  config.data.dir if it holds no dataset (nothing when synthesize_subjects <= 0).

  Process 0 alone decides and writes; every process waits at the same barrier,
  so they agree even when the directory appears while they check.
  """
  if config.data.synthesize_subjects <= 0:
    return
  data_dir = storage.as_path(config.data.dir)
  if jax.process_index() == 0:
    writer_lib.recover(data_dir)  # A kill during an earlier write: its dataset, or none.
  if jax.process_index() == 0 and not (data_dir / METADATA_FILE).exists():
    logging.info("No dataset at %s: synthesizing %d subjects x %d days.", data_dir,
                 config.data.synthesize_subjects, config.data.synthesize_days)
    write_synthetic_dataset(data_dir, subjects=config.data.synthesize_subjects,
                            days=config.data.synthesize_days, seed=config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("lsm2_synthesize")


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m lsm2.data.synthesize", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output dataset directory")
  p.add_argument("--subjects", type=int, required=True)
  p.add_argument("--days", type=int, required=True, help="days per subject")
  p.add_argument("--seed", type=int, required=True)
  p.add_argument("--format", choices=("tfrecord", "array_record"), default="tfrecord")
  p.add_argument("--shards", type=int, default=2, help="shard files per split (at most)")
  p.add_argument("--split-fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1),
                 metavar=("TRAIN", "VALIDATION", "TEST"))
  p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
  args = p.parse_args(argv)
  start = time.perf_counter()
  try:
    meta = write_synthetic_dataset(args.out, subjects=args.subjects, days=args.days,
                                   seed=args.seed, fmt=args.format, shards=args.shards,
                                   split_fractions=args.split_fractions,
                                   overwrite=args.overwrite, progress=True)
  # One line, no traceback: a bad argument, a dataset already there, or storage that cannot
  # be written (StorageError: e.g. a missing bucket, named by the probe before any shard).
  except (ValueError, FileExistsError, errors.Error) as e:
    print(f"lsm2: error: {e}", file=sys.stderr)
    return 2
  seconds = time.perf_counter() - start
  total = sum(meta.record_counts.values())
  pct = meta.missingness["day_fraction_percentiles"]
  print(f"wrote {total} subject-days ({meta.record_counts}) to {args.out} in {seconds:.1f}s "
        f"({total / seconds:.0f} subject-days/s); per-day missing fraction "
        f"p10/p50/p90 = {pct['p10']:.2f}/{pct['p50']:.2f}/{pct['p90']:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
