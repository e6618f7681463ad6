"""Actiwatch activity counts in the Depresjon layout: one `timestamp,date,activity` CSV per subject.

Input directory: `condition/*.csv`, `control/*.csv` (any sub-directory works:
its name is not used, only the file name) and optionally `scores.csv` with one
row per subject (`number` = file name without .csv). Timestamps are local wall
clock; minutes that are absent (partial first/last days, the skipped hour of a
daylight-saving change) are unobserved; a repeated minute (the repeated hour
when clocks go back) keeps its first value. Non-wear: `NonWearRule`.

Labels from scores.csv (Garcia-Ceja et al. 2018): `depressed` (condition vs
control), `madrs1`/`madrs2` (MADRS at start/end, condition group only), `age`
(5-year band) and `gender` (coded 1 = female, 2 = male in the dataset).
"""
from __future__ import annotations

import math
import pathlib

import numpy as np

from lsm2 import storage
from lsm2.data.channels import ACTIWATCH_CHANNELS
from lsm2.data.converters.common import (DayStats, NonWearRule, SubjectTimeline,
                                         empty_timeline, minute_index, read_table,
                                         require_columns)
from lsm2.data.metadata import LabelSpec

CHANNELS = ACTIWATCH_CHANNELS


def _label_specs(scores) -> dict[str, LabelSpec]:
  bands = sorted({str(b).strip() for b in scores["age"].dropna()} - {""}) if scores is not None else []
  specs = [LabelSpec("depressed", "binary", "subject", ("control", "depressed")),
           LabelSpec("madrs1", "regression", "subject"),
           LabelSpec("madrs2", "regression", "subject"),
           LabelSpec("gender", "binary", "subject", ("female", "male"))]
  if len(bands) >= 2:
    specs.append(LabelSpec("age", "categorical", "subject", tuple(bands)))
  return {s.name: s for s in specs}


def _number(value) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _subject_labels(stem: str, row, specs: dict[str, LabelSpec]) -> dict[str, float | int]:
  labels: dict[str, float | int] = {
      "depressed": 1 if stem.startswith("condition") else 0 if stem.startswith("control") else -1}
  if row is None:
    return labels
  labels["madrs1"] = _number(row.get("madrs1"))
  labels["madrs2"] = _number(row.get("madrs2"))
  gender = _number(row.get("gender"))
  labels["gender"] = int(gender) - 1 if gender in (1.0, 2.0) else -1
  if "age" in specs:
    band = str(row.get("age")).strip()
    labels["age"] = specs["age"].classes.index(band) if band in specs["age"].classes else -1
  return labels


def load(input_dir: str | pathlib.Path, stats: DayStats, rule: NonWearRule | None = NonWearRule()
         ) -> tuple[list[SubjectTimeline], dict[str, LabelSpec]]:
  """Reads every subject CSV under `input_dir` into minute timelines (rule=None: no non-wear)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(input_dir)
  if not root.is_dir():
    raise ValueError(f"--input {root} is not a directory")
  files = sorted(p for p in root.rglob("*.csv") if p.name != "scores.csv")
  for p in files:  # A symlink to outside the folder is refused.
    storage.contained(root, p.relative_to(root).as_posix(), "file")
  if not files:
    raise ValueError(f"{root}: no subject CSV files (expected e.g. condition/condition_1.csv)")
  scores = None
  if (root / "scores.csv").is_file():
    scores = read_table(root / "scores.csv", dtype=str, keep_default_na=True)
    require_columns(scores, ["number", "age", "gender"], root / "scores.csv")
  specs = _label_specs(scores)
  rows = {} if scores is None else {str(r["number"]).strip(): r for _, r in scores.iterrows()}
  stems = [p.stem for p in files]
  if len(set(stems)) != len(stems):
    raise ValueError(f"{root}: two subject files share a name; subject ids must be unique")
  timelines, duplicates, nonwear, non_numeric, unscored = [], 0, 0, 0, []
  for path in files:
    df = read_table(path)
    require_columns(df, ["timestamp", "activity"], path)
    if df.empty:
      raise ValueError(f"{path}: no data rows (only a header); remove the file or add its "
                       "recording")
    ts = pd.to_datetime(df["timestamp"], format="%Y-%m-%d %H:%M:%S", errors="coerce")
    if ts.isna().any():
      bad = df["timestamp"][ts.isna()].iloc[0]
      raise ValueError(f"{path}: timestamp {bad!r} is not 'YYYY-MM-DD HH:MM:SS'")
    activity = pd.to_numeric(df["activity"], errors="coerce").to_numpy(np.float32)
    non_numeric += int(np.isnan(activity).sum())
    t = ts.to_numpy()
    tl = empty_timeline(path.stem, ts.min().date(), ts.max().date(), len(CHANNELS))
    idx = minute_index(t, tl.start)
    first = np.unique(idx, return_index=True)[1]
    duplicates += len(idx) - len(first)
    tl.values[idx[first], 0] = activity[first]
    if rule is not None:
      off = rule.mask(tl.values)
      nonwear += int(off.sum())
      tl.values[off] = np.nan
    row = rows.get(path.stem)
    if row is None:
      unscored.append(path.stem)
    tl.subject_labels = _subject_labels(path.stem, row, specs)
    timelines.append(tl)
  stats.subjects_in = len(timelines)
  stats.notes.append(f"non-wear: {nonwear} minutes marked unobserved ({rule or 'rule off'})")
  if non_numeric:
    stats.notes.append(f"non-numeric or empty activity values (unobserved): {non_numeric}")
  if duplicates:
    stats.notes.append(f"repeated minutes (clock changes) ignored: {duplicates}")
  if unscored:
    stats.notes.append(f"subjects without a scores.csv row (labels missing): {unscored}")
  return timelines, specs
