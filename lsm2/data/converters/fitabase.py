"""The Fitabase Fitbit export: wide per-hour minute steps and intensities, plus sleep and weight logs.

`minuteStepsWide_merged.csv` / `minuteIntensitiesWide_merged.csv` hold one row
per user-hour (`Id,ActivityHour,Steps00..Steps59` resp. `Intensity00..59`).
An hour without a row is 60 unobserved minutes of that channel. User ids are
text exactly as written (common.subject_ids; a missing one is an error).

Non-wear: Fitbit writes 0 steps and intensity 0 (sedentary) for every minute
the tracker is not worn, and the export has no wear flag (no heart rate).
In this export 79 user-days are zero at every recorded minute (71 of them
are dailyActivity days with SedentaryMinutes = 1440, i.e. not worn) and 41%
of user-hours are all zeros. Zero minutes (steps and intensity both 0) are
non-wear by `NONWEAR`, the shared NonWearRule with Fitbit defaults: a run of
>= 180 zero minutes with >= 120 of them in 09:00-21:00. Unlike an Actiwatch,
a Fitbit records exact zeros in sleep too: the Actiwatch default (>= 120
minutes, >= 60 in 07:00-23:00) flagged 12.8% of the 00:00-06:00 minutes of
the SleepDay dates in sleepDay_merged.csv (nights with a logged sleep, so
worn), this rule 2.5%.

Labels: day-level `minutes_asleep` (sleepDay_merged.csv, TotalMinutesAsleep on
the date Fitabase gives as SleepDay) and subject-level `bmi` (mean of the
user's weightLogInfo_merged.csv entries), missing where the user has none.
"""
from __future__ import annotations

import pathlib

import numpy as np

from lsm2.data.channels import FITBIT_CHANNELS
from lsm2.data.converters.common import (DayStats, NonWearRule, SubjectTimeline,
                                         empty_timeline, minute_index, read_table,
                                         require_columns, subject_ids)
from lsm2.data.metadata import LabelSpec

CHANNELS = FITBIT_CHANNELS
LABELS = {s.name: s for s in (LabelSpec("minutes_asleep", "regression", "day"),
                              LabelSpec("bmi", "regression", "subject"))}
NONWEAR = NonWearRule(min_run_minutes=180, min_waking_minutes=120, waking_start_hour=9,
                      waking_end_hour=21)
_WIDE = (("minuteStepsWide_merged.csv", "Steps"), ("minuteIntensitiesWide_merged.csv", "Intensity"))
_TIME_FORMATS = ("%m/%d/%Y %H:%M", "%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y %H:%M:%S")


def _parse_times(column, path):
  """Parses Fitabase timestamps (the export exists with several formats)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  for fmt in _TIME_FORMATS:
    ts = pd.to_datetime(column, format=fmt, errors="coerce")
    if not ts.isna().any():
      return ts
  raise ValueError(f"{path}: timestamps such as {column.iloc[0]!r} match none of "
                   f"{_TIME_FORMATS}")


def load(input_dir: str | pathlib.Path, stats: DayStats, rule: NonWearRule | None = NONWEAR
         ) -> tuple[list[SubjectTimeline], dict[str, LabelSpec]]:
  """Reads the wide minute files (and sleep/weight logs) into per-user minute timelines.

  Minutes judged non-wear by `rule` become unobserved (rule=None keeps every zero).
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(input_dir)
  tables = []
  for c, (name, prefix) in enumerate(_WIDE):
    path = root / name
    if not path.is_file():
      raise ValueError(f"{path} not found (--format fitabase expects the Fitabase export)")
    df = read_table(path, text_columns=["Id"])
    cols = [f"{prefix}{m:02d}" for m in range(60)]
    require_columns(df, ["Id", "ActivityHour", *cols], path)
    df["Id"] = subject_ids(df["Id"], path, "Id")
    df["time"] = _parse_times(df["ActivityHour"], path)
    dup = df.duplicated(["Id", "time"])
    if dup.any():
      raise ValueError(f"{path}: user-hour {tuple(df.loc[dup, ['Id', 'ActivityHour']].iloc[0])} "
                       "appears twice")
    values = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
    bad = int(np.isnan(values).sum() - df[cols].isna().to_numpy().sum())
    if bad:
      stats.notes.append(f"{name}: {bad} non-numeric cells treated as unobserved")
    tables.append((c, df["Id"].to_numpy(str), df["time"].to_numpy(), values))

  users = sorted(set(np.concatenate([t[1] for t in tables])))
  timelines = {}
  for user in users:
    times = np.concatenate([t[2][t[1] == user] for t in tables])
    first = pd.Timestamp(times.min()).date()
    last = pd.Timestamp(times.max()).date()
    timelines[user] = empty_timeline(user, first, last, len(CHANNELS))
  for c, ids, times, values in tables:
    for user in users:
      sel = ids == user
      if not sel.any():
        continue
      tl = timelines[user]
      hour_start = minute_index(times[sel], tl.start)
      minutes = (hour_start[:, None] + np.arange(60)[None, :]).reshape(-1)
      tl.values[minutes, c] = values[sel].reshape(-1)
  recorded = nonwear = 0
  for tl in timelines.values():
    recorded += int(np.isfinite(tl.values).any(axis=1).sum())
    if rule is not None:
      off = rule.mask(tl.values)
      nonwear += int(off.sum())
      tl.values[off] = np.nan

  sleep_path = root / "sleepDay_merged.csv"
  if sleep_path.is_file():
    sleep = read_table(sleep_path, text_columns=["Id"])
    require_columns(sleep, ["Id", "SleepDay", "TotalMinutesAsleep"], sleep_path)
    sleep["Id"] = subject_ids(sleep["Id"], sleep_path, "Id")
    sleep["day"] = _parse_times(sleep["SleepDay"], sleep_path).dt.date.astype(str)
    sleep = sleep.drop_duplicates(["Id", "day"])
    for user, g in sleep.groupby("Id"):
      if user in timelines:
        timelines[user].day_labels["minutes_asleep"] = dict(
            zip(g["day"], g["TotalMinutesAsleep"].astype(float)))
  weight_path = root / "weightLogInfo_merged.csv"
  if weight_path.is_file():
    weight = read_table(weight_path, text_columns=["Id"])
    require_columns(weight, ["Id", "BMI"], weight_path)
    weight["Id"] = subject_ids(weight["Id"], weight_path, "Id")
    for user, bmi in weight.groupby("Id")["BMI"].mean().items():
      if user in timelines:
        timelines[user].subject_labels["bmi"] = float(bmi)
  stats.subjects_in = len(timelines)
  hours = sum(len(t[1]) for t in tables) // len(tables)
  stats.notes.append(f"user-hours with minute rows: about {hours}; absent hours are unobserved")
  stats.notes.append(f"non-wear: {nonwear} of {recorded} recorded minutes marked unobserved "
                     f"({rule or 'rule off'})")
  return [timelines[u] for u in users], dict(LABELS)
