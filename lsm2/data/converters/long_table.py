"""A generic long table (CSV or Parquet): one row per subject-minute, one column per channel.

Columns: a subject column (default `subject`; ids are text exactly as
written, common.subject_ids), a timestamp column (default `timestamp`,
anything pandas parses) and channel columns (default: all other columns).
Each channel must be a registry channel (lsm2.data.channels) or be declared
with --channel NAME:GROUP:UNIT:MIN:MAX. Stamps with a UTC offset or zone are
placed on their own local wall clock (common.local_times), so a day is the
subject's local calendar day even when the offset changes (daylight saving,
travel): local minutes that clocks skip are unobserved, and where clocks go
back a repeated local minute keeps the rows of its first pass (as the
Actiwatch and device converters do). Timestamps are floored to the minute;
rows that fall in the same minute are averaged. Missing rows (gaps) and
NaN/empty cells are unobserved minutes; non-numeric cells are an error.
Labels come from separate label files (lsm2.data.converters.labels, --labels).
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from lsm2.data.channels import Channel, get_channel
from lsm2.data.converters import labels as labels_lib
from lsm2.data.converters.common import (DayStats, SubjectTimeline, empty_timeline,
                                         local_times, minute_index, read_table,
                                         require_columns, subject_ids)
from lsm2.data.metadata import LabelSpec


def load(path: str | pathlib.Path, stats: DayStats, *, fmt: str, subject_column: str = "subject",
         timestamp_column: str = "timestamp", channels: Sequence[str] | None = None,
         declared: Sequence[Channel] = (), labels: Sequence[str | pathlib.Path] = (),
         label_date_column: str = "date", label_kinds: Mapping[str, str] | None = None
         ) -> tuple[list[SubjectTimeline], tuple[Channel, ...], dict[str, LabelSpec]]:
  """Reads the table (and label files) into per-subject minute timelines.

  Returns the timelines, the channels and the label specs.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  check_channel_names(channels)
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"--input {path} is not a file")
  if fmt == "parquet":
    try:
      df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types.  pylint: disable=broad-except
      raise ValueError(f"{path}: cannot read as Parquet: {e}") from None
  else:
    df = read_table(path, text_columns=[subject_column])
  require_columns(df, [subject_column, timestamp_column], path)
  if df.empty:
    raise ValueError(f"{path}: no data rows")
  subjects = subject_ids(df[subject_column], path, subject_column)
  names = list(channels) if channels else [c for c in df.columns
                                           if c not in (subject_column, timestamp_column)]
  if not names:
    raise ValueError(f"{path}: no channel columns besides {subject_column!r} and "
                     f"{timestamp_column!r}")
  require_columns(df, names, path)
  extra = {c.name: c for c in declared}
  try:
    chans = tuple(get_channel(n, extra) for n in names)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  for n in names:
    if not (pd.api.types.is_numeric_dtype(df[n]) or df[n].isna().all()):
      converted = pd.to_numeric(df[n], errors="coerce")
      bad = df[n][converted.isna() & df[n].notna()]
      if len(bad):
        raise ValueError(f"{path}: column {n!r} holds non-numeric value {bad.iloc[0]!r}")
      df[n] = converted
  wall, utc = local_times(df[timestamp_column], path, timestamp_column)
  df = df.assign(_minute=wall.dt.floor("min"), _subject=subjects)
  if utc is not None:  # Where clocks went back, the first pass of a local minute wins.
    utc_minute = utc.dt.floor("min")
    first = utc_minute.groupby([df["_subject"], df["_minute"]]).transform("min")
    later = (utc_minute != first).to_numpy()
    if later.any():
      stats.notes.append("repeated local minutes (clocks going back): "
                         f"{int(later.sum())} rows of a later pass ignored")
      df = df[~later]
  grouped = df.groupby(["_subject", "_minute"], sort=True)[names].mean().reset_index()
  merged = len(df) - len(grouped)
  timelines = []
  for subject, g in grouped.groupby("_subject", sort=True):
    times = g["_minute"].to_numpy()
    tl = empty_timeline(subject, g["_minute"].min().date(), g["_minute"].max().date(),
                        len(chans))
    tl.values[minute_index(times, tl.start)] = g[names].to_numpy(np.float32)
    timelines.append(tl)
  stats.subjects_in = len(timelines)
  if merged:
    stats.notes.append(f"rows sharing a subject-minute were averaged: {merged} rows merged")
  kinds = dict(label_kinds or {})
  tables = [labels_lib.load(p, subject_column=subject_column, date_column=label_date_column,
                            kinds=kinds, reserved=names) for p in labels]
  return timelines, chans, labels_lib.attach(timelines, tables, kinds, stats)


def check_channel_names(channels: Sequence[str] | None) -> None:
  """--channels: no empty or repeated name (checked before any file is read)."""
  if channels is None:
    return
  names = list(channels)
  if any(not n for n in names):
    raise ValueError(f"--channels holds an empty name: {','.join(names)!r}")
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"--channels names {', '.join(map(repr, repeated))} more than once")
