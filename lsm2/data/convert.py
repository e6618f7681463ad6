"""Converts real wearable exports to a dataset directory of day records.

  python -m lsm2.data.convert --format actiwatch|fitabase|long_csv|parquet|apple_health|fitbit_takeout \
      --input PATH --out DIR [--max-missing 0.8]

Each subject's recording becomes a minute grid per calendar day; days with no
observed minute, or whose missing fraction (over all minutes x channels) is
above --max-missing, are dropped (0.8 suits these small real sets; the LSM-2
reference uses 0.5). Subjects are split subject-disjointly with --seed. The
summary lists subjects, days kept and dropped (and why) and missingness.
Devices that record zeros off the wrist (actiwatch, fitabase) get a non-wear
rule (converters.common.NonWearRule; per-format defaults, --nonwear-* flags).

Consumer-device exports (apple_health, fitbit_takeout: one export per subject)
take non-wear from the absence of heart rate (converters.device.HeartRateWearRule,
--nonwear-max-gap). One export converts on its own: a single subject's days
all go to the train split (normalisation statistics come from it), so a person
can embed their own data; a directory of exports is split subject-disjointly.
Their channels that hold no observed minute in the train split are left out
of the dataset (noted in the summary).

--beam runs the same conversion as an Apache Beam pipeline (lsm2.data.beam_convert;
other flags are Beam pipeline options, e.g. --runner=DataflowRunner) and writes
the same bytes; docs/data.md, "Converting at scale with Apache Beam".
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from lsm2.data import splits as splits_lib
from lsm2.data.channels import Channel
from lsm2.data.converters import actiwatch, apple_health, fitabase, fitbit_takeout, long_table
from lsm2.data.converters import labels as labels_lib
from lsm2.data.converters.common import DayStats, NonWearRule, SubjectTimeline, day_records
from lsm2.data.converters.device import HeartRateWearRule
from lsm2.data.metadata import DatasetMetadata, LabelSpec
from lsm2.data.record import DayRecord
from lsm2.data.writer import DatasetWriter, check_out_dir

FORMATS = ("actiwatch", "fitabase", "long_csv", "parquet", "apple_health", "fitbit_takeout")
# Formats whose zeros (or missing samples) can mean "not worn", with their default non-wear rules.
NONWEAR_DEFAULTS = {"actiwatch": NonWearRule(), "fitabase": fitabase.NONWEAR,
                    "apple_health": apple_health.WEAR, "fitbit_takeout": fitbit_takeout.WEAR}
DEVICE_FORMATS = ("apple_health", "fitbit_takeout")  # One export per subject.
DEVICE_MODULES = {"apple_health": apple_health, "fitbit_takeout": fitbit_takeout}


def convert(fmt: str, input_path: str | pathlib.Path, out_dir: str | pathlib.Path, *,
            max_missing: float = 0.8, seed: int = 0,
            split_fractions: Sequence[float] = (0.8, 0.1, 0.1), shards: int = 2,
            out_format: str = "tfrecord", overwrite: bool = False,
            nonwear: NonWearRule | HeartRateWearRule | bool = True,
            long_options: dict[str, Any] | None = None,
            device_options: dict[str, Any] | None = None,
            beam_args: Sequence[str] | None = None) -> tuple[DatasetMetadata, DayStats]:
  """Runs one converter end to end; returns the written metadata and the day statistics.

  nonwear: True applies the format's default rule (NONWEAR_DEFAULTS; none for
  long tables, whose gaps are explicit), False none, a NonWearRule that rule.
  long_options: keyword arguments of long_table.load (columns, channels, label files).
  device_options: apple_health: source_priority (source names, best first);
    fitbit_takeout: timezone (IANA name).
  beam_args: None converts in this process; a list of Beam pipeline flags (empty:
    the DirectRunner) runs lsm2.data.beam_convert, which writes the same bytes.
  """
  if beam_args is not None:
    from lsm2.data import beam_convert  # pylint: disable=g-import-not-at-top
    return beam_convert.convert(
        fmt, input_path, out_dir, beam_args, max_missing=max_missing, seed=seed,
        split_fractions=split_fractions, shards=shards, out_format=out_format,
        overwrite=overwrite, nonwear=nonwear, long_options=long_options,
        device_options=device_options)
  rule = check_options(fmt, out_dir, max_missing=max_missing, overwrite=overwrite,
                       nonwear=nonwear)
  stats = DayStats()
  timelines, channels, labels = read_input(fmt, input_path, stats, rule, long_options,
                                           device_options)
  if fmt in DEVICE_FORMATS and timelines:
    seen = np.any([recorded_channels(tl) for tl in timelines], axis=0)
    channels = keep_channels(channels, seen, stats, "channels the input never records")
    for tl in timelines:
      select_timeline_channels(tl, seen)
  by_subject = {}
  for tl in timelines:
    records = day_records(tl, labels, max_missing, stats)
    if records:
      by_subject[tl.subject_id] = records
  if not by_subject:
    raise no_days_error(input_path, max_missing, stats)
  assignment = assign_splits(fmt, list(by_subject), split_fractions, seed, stats)
  if fmt in DEVICE_FORMATS:
    train = [r for s in assignment["train"] for r in by_subject[s]]
    seen = np.any([r.observed.any(axis=0) for r in train], axis=0)
    channels = keep_channels(channels, seen, stats,
                             "channels without an observed minute in the train split")
    by_subject = {s: [select_channels(r, seen) for r in records]
                  for s, records in by_subject.items()}
  # Staged, then swapped in: a failure on the way leaves a dataset in out_dir as it was.
  with DatasetWriter(out_dir, channels=channels, labels=labels.values(), fmt=out_format,
                     overwrite=overwrite) as writer:
    for split in splits_lib.SPLIT_NAMES:
      records = [r for s in assignment[split] for r in by_subject[s]]
      writer.write_split(split, records, num_records=len(records), num_shards=shards)
    meta = writer.finish(source=source_metadata(
        fmt, input_path, stats, rule, max_missing=max_missing, seed=seed,
        split_fractions=split_fractions, long_options=long_options,
        device_options=device_options))
  return meta, stats


def check_options(fmt: str, out_dir: str | pathlib.Path, *, max_missing: float, overwrite: bool,
                  nonwear: NonWearRule | HeartRateWearRule | bool
                  ) -> NonWearRule | HeartRateWearRule | None:
  """Checks the options before any input is read; returns the non-wear rule to apply."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown --format {fmt!r}; expected one of {FORMATS}")
  if not 0.0 <= max_missing <= 1.0:
    raise ValueError(f"--max-missing must be in [0, 1], got {max_missing}")
  check_out_dir(out_dir, overwrite)  # Before the input is read: a bad --out fails at once.
  if isinstance(nonwear, (NonWearRule, HeartRateWearRule)) and not isinstance(
      nonwear, type(NONWEAR_DEFAULTS.get(fmt))):
    raise ValueError(f"a {type(nonwear).__name__} applies to --format " + " or ".join(
        f for f, r in NONWEAR_DEFAULTS.items() if isinstance(r, type(nonwear))) + f", not {fmt}")
  return NONWEAR_DEFAULTS.get(fmt) if nonwear is True else nonwear or None


def read_input(fmt: str, input_path: str | pathlib.Path, stats: DayStats,
               rule: NonWearRule | HeartRateWearRule | None,
               long_options: dict[str, Any] | None = None,
               device_options: dict[str, Any] | None = None
               ) -> tuple[list[SubjectTimeline], tuple[Channel, ...], dict[str, LabelSpec]]:
  """The format's reader: (per-subject timelines, channels, label specs)."""
  if fmt == "actiwatch":
    timelines, labels = actiwatch.load(input_path, stats, rule)
    return timelines, actiwatch.CHANNELS, labels
  if fmt == "fitabase":
    timelines, labels = fitabase.load(input_path, stats, rule)
    return timelines, fitabase.CHANNELS, labels
  if fmt in ("long_csv", "parquet"):
    return long_table.load(input_path, stats, fmt=fmt, **(long_options or {}))
  if fmt in DEVICE_FORMATS:
    module = DEVICE_MODULES[fmt]
    timelines, labels = module.load(input_path, stats, rule, **(device_options or {}))
    return timelines, module.CHANNELS, labels
  raise ValueError(f"unknown --format {fmt!r}; expected one of {FORMATS}")


def recorded_channels(timeline: SubjectTimeline) -> np.ndarray:
  """bool[C]: the channels with at least one recorded minute in `timeline`."""
  return np.isfinite(timeline.values).any(axis=0)


def keep_channels(channels: Sequence[Channel], keep: np.ndarray, stats: DayStats,
                  why: str) -> tuple[Channel, ...]:
  """The channels where `keep` (device formats: an export may lack one), noting those left out."""
  if not keep.all():
    stats.notes.append(f"{why}, left out: {[c.name for c, k in zip(channels, keep) if not k]}")
  return tuple(c for c, k in zip(channels, keep) if k)


def select_timeline_channels(timeline: SubjectTimeline, keep: np.ndarray) -> None:
  if not keep.all():
    timeline.values = timeline.values[:, keep]


def select_channels(record: DayRecord, keep: np.ndarray) -> DayRecord:
  return record if keep.all() else dataclasses.replace(
      record, signals=record.signals[:, keep], observed=record.observed[:, keep])


def no_days_error(input_path, max_missing: float, stats: DayStats) -> ValueError:
  return ValueError(f"{input_path}: no day passed the filters (max missing {max_missing}):\n"
                    + stats.summary(max_missing, 0))


def assign_splits(fmt: str, subjects: Sequence[str], split_fractions: Sequence[float], seed: int,
                  stats: DayStats) -> dict[str, list[str]]:
  """Subject-disjoint splits; a single device export goes to train whole."""
  if fmt in DEVICE_FORMATS and len(subjects) == 1:
    stats.notes.append("one export: every day in the train split")
    return {"train": list(subjects), "validation": [], "test": []}
  return splits_lib.assign_subjects(subjects, split_fractions, seed)


def source_metadata(fmt: str, input_path, stats: DayStats,
                    rule: NonWearRule | HeartRateWearRule | None, *, max_missing: float,
                    seed: int, split_fractions: Sequence[float],
                    long_options: dict[str, Any] | None,
                    device_options: dict[str, Any] | None) -> dict[str, Any]:
  """metadata.json's `source`: how the dataset was converted."""
  source = {"converter": fmt, "input": str(input_path), "max_missing": max_missing,
            "seed": seed, "split_fractions": list(split_fractions),
            "subjects_read": stats.subjects_in, "days_read": stats.days_in,
            "days_kept": stats.kept, "days_dropped_empty": stats.dropped_empty,
            "days_dropped_missing": stats.dropped_missing}
  if fmt in NONWEAR_DEFAULTS:
    source["nonwear_rule"] = dataclasses.asdict(rule) if rule else None
  if (long_options or {}).get("labels"):
    source["label_files"] = [str(f) for f in long_options["labels"]]
  if device_options:
    source.update({k: list(v) if isinstance(v, (list, tuple)) else v
                   for k, v in device_options.items()})
  return source


def _nonwear_from_args(args: argparse.Namespace) -> NonWearRule | HeartRateWearRule | bool:
  """The `nonwear` argument of convert(): the format's default rule with the flags given."""
  changes = {k: v for k, v in (("min_run_minutes", args.nonwear_min_run),
                               ("min_waking_minutes", args.nonwear_min_waking),
                               ("max_gap_minutes", args.nonwear_max_gap)) if v is not None}
  if args.nonwear_waking_hours:
    changes["waking_start_hour"], changes["waking_end_hour"] = args.nonwear_waking_hours
  if args.no_nonwear:
    if changes:
      raise ValueError("--no-nonwear contradicts the --nonwear-* settings")
    return False
  if not changes:
    return True
  if args.format not in NONWEAR_DEFAULTS:
    raise ValueError(f"--nonwear-* settings apply to --format {' or '.join(NONWEAR_DEFAULTS)}, "
                     f"not {args.format}")
  default = NONWEAR_DEFAULTS[args.format]
  fields = {f.name for f in dataclasses.fields(default)}
  if set(changes) - fields:
    flags = {"min_run_minutes": "--nonwear-min-run", "min_waking_minutes": "--nonwear-min-waking",
             "waking_start_hour": "--nonwear-waking-hours", "waking_end_hour": "--nonwear-waking-hours",
             "max_gap_minutes": "--nonwear-max-gap"}
    raise ValueError(f"{sorted({flags[k] for k in set(changes) - fields})} do not apply to "
                     f"--format {args.format} (its non-wear rule is a {type(default).__name__})")
  return dataclasses.replace(default, **changes)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m lsm2.data.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--input", required=True, help="input directory (actiwatch, fitabase), file, or "
                 "export (apple_health, fitbit_takeout: a file, zip or folder, or a directory "
                 "of exports)")
  p.add_argument("--out", required=True, help="output dataset directory")
  p.add_argument("--max-missing", type=float, default=0.8,
                 help="drop days whose missing fraction is above this (default 0.8)")
  p.add_argument("--seed", type=int, default=0, help="seed of the subject split")
  p.add_argument("--split-fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1),
                 metavar=("TRAIN", "VALIDATION", "TEST"))
  p.add_argument("--shards", type=int, default=2, help="shard files per split (at most)")
  p.add_argument("--out-format", choices=("tfrecord", "array_record"), default="tfrecord")
  p.add_argument("--overwrite", action="store_true",
                 help="replace a dataset already in --out (the new one is written beside it "
                 "and swapped in once complete: a failed write keeps the old one)")
  g = p.add_argument_group("non-wear rule (actiwatch, fitabase; defaults per format)")
  g.add_argument("--nonwear-min-run", type=int,
                 help="minutes of exact zeros (default: actiwatch 120, fitabase 180)")
  g.add_argument("--nonwear-min-waking", type=int,
                 help="of which at least this many in waking hours (default: actiwatch 60, "
                 "fitabase 120)")
  g.add_argument("--nonwear-waking-hours", type=int, nargs=2, metavar=("START", "END"),
                 help="waking hours [START, END) (default: actiwatch 7 23, fitabase 9 21)")
  g.add_argument("--nonwear-max-gap", type=int,
                 help="apple_health, fitbit_takeout: minutes between heart-rate samples still "
                 "counted as worn (default: apple_health 20, fitbit_takeout 10)")
  g.add_argument("--no-nonwear", action="store_true",
                 help="apply no non-wear rule: every recorded zero stays observed")
  g = p.add_argument_group("long_csv / parquet")
  g.add_argument("--subject-column", default="subject")
  g.add_argument("--timestamp-column", default="timestamp")
  g.add_argument("--channels", help="comma-separated channel columns (default: all others)")
  g.add_argument("--channel", action="append", default=[], metavar="NAME:GROUP:UNIT:MIN:MAX",
                 help="declare a channel that is not in the registry (repeatable)")
  g.add_argument("--labels", action="append", default=[], metavar="PATH",
                 help="label file (CSV, or .parquet): the subject column and label columns, one "
                 "row per subject; with a --label-date-column, one row per subject-day "
                 "(day-level labels). Repeatable")
  g.add_argument("--label-date-column", default="date")
  g.add_argument("--label-kind", action="append", default=[], metavar="NAME=KIND",
                 help="regression, binary or categorical (default: numeric columns are "
                 "regression, others binary with 2 values, else categorical). Repeatable")
  g = p.add_argument_group("apple_health / fitbit_takeout")
  g.add_argument("--source-priority", default="",
                 help="apple_health: comma-separated sourceName values, best first (default: "
                 "watches, then iPhones, then other apps, each by name)")
  g.add_argument("--timezone", help="fitbit_takeout: IANA time zone of the UTC intraday times "
                 "(default: the export's Profile.csv)")
  g = p.add_argument_group("conversion at scale (Apache Beam; see docs/data.md)")
  g.add_argument("--beam", action="store_true",
                 help="convert on Apache Beam (pip install apache-beam): the same dataset, "
                 "the work spread per subject. Other flags (--runner=DataflowRunner "
                 "--project=... --region=... --temp_location=gs://...) are Beam pipeline "
                 "options; default --runner=DirectRunner")
  args, beam_args = p.parse_known_args(argv)
  if beam_args and not args.beam:
    p.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam pipeline options need --beam)")
  try:
    if (args.labels or args.label_kind) and args.format not in ("long_csv", "parquet"):
      raise ValueError(f"--labels applies to --format long_csv or parquet, not {args.format}")
    device_options = {}
    if args.source_priority:
      if args.format != "apple_health":
        raise ValueError(f"--source-priority applies to --format apple_health, not {args.format}")
      device_options["source_priority"] = [n.strip() for n in args.source_priority.split(",")
                                           if n.strip()]
    if args.timezone:
      if args.format != "fitbit_takeout":
        raise ValueError(f"--timezone applies to --format fitbit_takeout, not {args.format}")
      device_options["timezone"] = args.timezone
    long_options = {"subject_column": args.subject_column,
                    "timestamp_column": args.timestamp_column,
                    "channels": args.channels.split(",") if args.channels else None,
                    "declared": [Channel.parse_spec(s) for s in args.channel],
                    "labels": args.labels, "label_date_column": args.label_date_column,
                    "label_kinds": labels_lib.parse_kind_overrides(args.label_kind)}
    meta, stats = convert(
        args.format, args.input, args.out, max_missing=args.max_missing, seed=args.seed,
        split_fractions=args.split_fractions, shards=args.shards, out_format=args.out_format,
        overwrite=args.overwrite, nonwear=_nonwear_from_args(args), long_options=long_options,
        device_options=device_options, beam_args=beam_args if args.beam else None)
  except (ValueError, OSError, ImportError) as e:  # OSError: a file that cannot be read or
    print(f"error: {e}", file=sys.stderr)       # written; ImportError: --beam without Beam.
    return 2
  print(stats.summary(args.max_missing, sum(len(v) for v in meta.subjects.values())))
  print(f"splits (subject-disjoint): " + ", ".join(
      f"{s}: {len(meta.subjects[s])} subjects / {meta.record_counts[s]} days" for s in meta.splits))
  print(f"wrote {args.out} ({meta.format}); overall missing fraction "
        f"{meta.missingness['overall_fraction']:.3f}; values masked by validity rules: "
        f"{meta.sanitized}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
