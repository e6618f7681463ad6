"""A generic long table (CSV or Parquet): one row per subject-minute, one column per channel.

Columns: a subject column (default `subject`), a timestamp column (default
`timestamp`, anything pandas parses; time-zone-aware stamps use their local
wall clock) and channel columns (default: all other columns). Each channel
must be a registry channel (lsm2.data.channels) or be declared with
--channel NAME:GROUP:UNIT:MIN:MAX. Timestamps are floored to the minute; rows
that fall in the same minute are averaged. Missing rows (gaps) and NaN/empty
cells are unobserved minutes; non-numeric cells are an error. Labels come
from separate label files (lsm2.data.converters.labels, --labels).
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from lsm2.data.channels import Channel, get_channel
from lsm2.data.converters import labels as labels_lib
from lsm2.data.converters.common import (DayStats, SubjectTimeline, empty_timeline,
                                         minute_index, read_table, require_columns)
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
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"--input {path} is not a file")
  if fmt == "parquet":
    try:
      df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types.  pylint: disable=broad-except
      raise ValueError(f"{path}: cannot read as Parquet: {e}") from None
  else:
    df = read_table(path)
  require_columns(df, [subject_column, timestamp_column], path)
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
  ts = pd.to_datetime(df[timestamp_column], errors="coerce")
  if ts.isna().any():
    bad = df[timestamp_column][ts.isna()].iloc[0]
    raise ValueError(f"{path}: column {timestamp_column!r}: cannot parse timestamp {bad!r}")
  if getattr(ts.dt, "tz", None) is not None:
    ts = ts.dt.tz_localize(None)
  df = df.assign(_minute=ts.dt.floor("min"), _subject=df[subject_column].astype(str))
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
