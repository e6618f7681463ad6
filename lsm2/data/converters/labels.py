"""Label files for the long-table converters: subject-level or day-level label columns.

A label file (CSV, or Parquet by its .parquet/.pq suffix) has the subject
column of the data table and one column per label. Without a date column it
holds one row per subject and subject-level labels; with the date column
(`--label-date-column`, default `date`) one row per subject-day and day-level
labels. Kinds are inferred per column: numeric -> regression, otherwise 2
distinct values -> binary, more -> categorical (classes sorted; numerically
when the column is numeric); `--label-kind NAME=KIND` overrides. Empty cells,
subjects without a row and days without a row get the missing value (-1, or
NaN for regression). Rows of subjects that are not in the data are ignored
and counted in the summary (label tables often list a whole cohort); a file
none of whose subjects is in the data is an error (likely mismatched ids).
Subject ids are text exactly as written, as in the data (common.subject_ids):
a missing or empty id is an error naming the row. Duplicate rows and label
names that collide with a channel or with another file's labels are errors
naming the file and column.
"""
from __future__ import annotations

import dataclasses
import datetime
import pathlib
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from lsm2.data.converters.common import (DayStats, SubjectTimeline, local_times, read_table,
                                         require_columns, subject_ids)
from lsm2.data.metadata import LABEL_KINDS, LabelSpec


@dataclasses.dataclass
class LabelTable:
  """One label file, parsed: specs and values keyed by subject (and ISO day for day labels)."""
  path: pathlib.Path
  specs: dict[str, LabelSpec]
  # Subject-level: subject -> name -> value. Day-level: subject -> name -> day -> value.
  values: dict[str, dict[str, float | int | dict[str, float | int]]]


def parse_kind_overrides(items: Sequence[str]) -> dict[str, str]:
  """`NAME=KIND` strings (the --label-kind flags) -> {name: kind}."""
  kinds = {}
  for item in items:
    name, sep, kind = item.partition("=")
    if not sep or not name or kind not in LABEL_KINDS:
      raise ValueError(f"--label-kind {item!r}: expected NAME=KIND with KIND one of {LABEL_KINDS}")
    kinds[name] = kind
  return kinds


def _read(path: pathlib.Path, subject_column: str):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if not path.is_file():
    raise ValueError(f"--labels {path} is not a file")
  if path.suffix.lower() in (".parquet", ".pq"):
    try:
      return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types.  pylint: disable=broad-except
      raise ValueError(f"{path}: cannot read as Parquet: {e}") from None
  return read_table(path, text_columns=[subject_column])


def _class_name(value) -> str:
  if isinstance(value, (float, np.floating)) and float(value).is_integer():
    return str(int(value))
  return str(value)


def _column_spec(df, column: str, level: str, kind: str | None, path) -> tuple[LabelSpec, list]:
  """The LabelSpec of one column and its values as stored (class index or float)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  cells = df[column]
  present = cells.notna()
  numeric = pd.api.types.is_numeric_dtype(cells) and not pd.api.types.is_bool_dtype(cells)
  distinct = cells[present].unique()
  if kind is None:
    kind = "regression" if numeric else "binary" if len(distinct) == 2 else "categorical"
  if kind == "regression":
    values = pd.to_numeric(cells, errors="coerce")
    bad = cells[values.isna() & present]
    if len(bad):
      raise ValueError(f"{path}: label column {column!r} is regression but holds non-numeric "
                       f"value {bad.iloc[0]!r}")
    if np.isinf(values).any():
      raise ValueError(f"{path}: label column {column!r} holds an infinite value")
    return LabelSpec(column, "regression", level), [float(v) for v in values]
  order = sorted(distinct) if numeric else sorted(distinct, key=str)
  classes = [_class_name(v) for v in order]
  if len(set(classes)) != len(classes):
    raise ValueError(f"{path}: label column {column!r}: classes {classes} are not distinct as text")
  if kind == "binary" and len(classes) != 2:
    raise ValueError(f"{path}: label column {column!r} is binary but has {len(classes)} distinct "
                     f"values {classes}")
  if kind == "categorical" and len(classes) < 2:
    raise ValueError(f"{path}: label column {column!r} is categorical but has "
                     f"{len(classes)} distinct value(s) {classes}")
  index = {v: i for i, v in enumerate(order)}
  values = [index[v] if p else -1 for v, p in zip(cells, present)]
  return LabelSpec(column, kind, level, tuple(classes)), values


def load(path: str | pathlib.Path, *, subject_column: str, date_column: str,
         kinds: Mapping[str, str], reserved: Collection[str]) -> LabelTable:
  """Parses one label file; `reserved` are names a label may not take (the channels)."""
  path = pathlib.Path(path)
  df = _read(path, subject_column)
  require_columns(df, [subject_column], path)
  day_level = date_column in df.columns
  keys = [subject_column] + ([date_column] if day_level else [])
  names = [c for c in df.columns if c not in keys]
  if not names:
    raise ValueError(f"{path}: no label columns besides {keys}")
  for name in names:
    if not isinstance(name, str) or not name:
      raise ValueError(f"{path}: label column name {name!r} is not a non-empty string")
    if name in reserved:
      raise ValueError(f"{path}: label column {name!r} has the name of a channel")
  df = df.assign(**{subject_column: subject_ids(df[subject_column], path, subject_column)})
  if day_level:
    dates, _ = local_times(df[date_column], path, date_column, "date")
    timed = df[date_column][dates != dates.dt.normalize()]
    if len(timed):
      raise ValueError(f"{path}: column {date_column!r}: {timed.iloc[0]!r} is not a date "
                       "(it has a time of day)")
    df = df.assign(**{date_column: [d.isoformat() for d in dates.dt.date]})
  dup = df.duplicated(keys)
  if dup.any():
    first = tuple(df.loc[dup, keys].iloc[0])
    raise ValueError(f"{path}: {'subject-day' if day_level else 'subject'} {first} has more than "
                     "one row")
  level = "day" if day_level else "subject"
  subjects = df[subject_column].tolist()
  days = df[date_column].tolist() if day_level else [None] * len(df)
  specs, values = {}, {}
  for name in names:
    spec, column = _column_spec(df, name, level, kinds.get(name), path)
    specs[name] = spec
    for subject, day, value in zip(subjects, days, column):
      entry = values.setdefault(subject, {})
      if day_level:
        entry.setdefault(name, {})[day] = value
      else:
        entry[name] = value
  return LabelTable(path, specs, values)


def attach(timelines: Sequence[SubjectTimeline], tables: Sequence[LabelTable],
           kinds: Mapping[str, str], stats: DayStats) -> dict[str, LabelSpec]:
  """Puts the tables' values on the timelines; returns all label specs; notes what was unmatched."""
  specs: dict[str, LabelSpec] = {}
  owner: dict[str, pathlib.Path] = {}
  for table in tables:
    for name, spec in table.specs.items():
      if name in specs:
        raise ValueError(f"{table.path}: label column {name!r} is also in {owner[name]}")
      specs[name], owner[name] = spec, table.path
  unused = sorted(set(kinds) - set(specs))
  if unused:
    raise ValueError(f"--label-kind names {unused} that no label file has "
                     f"(labels: {sorted(specs)})")
  by_subject = {tl.subject_id: tl for tl in timelines}
  for table in tables:
    unknown = sorted(set(table.values) - set(by_subject))
    if len(unknown) == len(table.values):
      raise ValueError(f"{table.path}: none of its {len(unknown)} subjects is in the data "
                       f"(e.g. {unknown[:3]}; data subjects e.g. {sorted(by_subject)[:3]})")
    if unknown:
      stats.notes.append(f"{table.path.name}: {len(unknown)} subjects not in the data, ignored: "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    level = next(iter(table.specs.values())).level
    outside = 0
    for subject, entry in table.values.items():
      tl = by_subject.get(subject)
      if tl is None:
        continue
      if level == "subject":
        tl.subject_labels.update(entry)
        continue
      tl.day_labels.update(entry)
      first = tl.start.isoformat()
      last = (tl.start + datetime.timedelta(days=tl.num_days - 1)).isoformat()
      outside += sum(not first <= day <= last for day in next(iter(entry.values())))
    if outside:
      stats.notes.append(f"{table.path.name}: {outside} subject-day rows outside the subject's "
                         "recorded days, ignored")
    unlabeled = sorted(set(by_subject) - set(table.values))
    if unlabeled:
      stats.notes.append(f"{table.path.name}: {len(unlabeled)} data subjects without a row "
                         f"(labels missing): {unlabeled[:5]}{' ...' if len(unlabeled) > 5 else ''}")
  return specs
