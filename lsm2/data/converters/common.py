"""Shared converter logic: minute timelines -> day records, the day-drop rule, the summary."""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence

import numpy as np

from lsm2.data.metadata import LabelSpec
from lsm2.data.record import MINUTES_PER_DAY, DayRecord


@dataclasses.dataclass
class SubjectTimeline:
  """One subject's minute grid from midnight of `start` over whole calendar days.

  values: float32[days * 1440, C], NaN where nothing was recorded.
  """
  subject_id: str
  start: datetime.date
  values: np.ndarray
  subject_labels: dict[str, float | int] = dataclasses.field(default_factory=dict)
  # Day-level labels: name -> {ISO day -> value}; absent days get the missing value.
  day_labels: dict[str, dict[str, float | int]] = dataclasses.field(default_factory=dict)
  # Minute-level labels: name -> int64[days * 1440] class indices (-1 = no label).
  minute_labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def num_days(self) -> int:
    return self.values.shape[0] // MINUTES_PER_DAY


def empty_timeline(subject_id: str, first: datetime.date, last: datetime.date,
                   num_channels: int) -> SubjectTimeline:
  days = (last - first).days + 1
  return SubjectTimeline(subject_id, first,
                         np.full((days * MINUTES_PER_DAY, num_channels), np.nan, np.float32))


def minute_index(timestamps: np.ndarray, start: datetime.date) -> np.ndarray:
  """Minutes since midnight of `start` for datetime64 timestamps (wall clock, floored)."""
  origin = np.datetime64(start.isoformat(), "m")
  return (timestamps.astype("datetime64[m]") - origin).astype(np.int64)


@dataclasses.dataclass
class DayStats:
  """What a converter kept and dropped (printed as its summary)."""
  subjects_in: int = 0
  days_in: int = 0
  kept: int = 0
  dropped_empty: int = 0
  dropped_missing: int = 0
  missing_kept: list[float] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self, max_missing: float, subjects_out: int) -> str:
    fr = np.asarray(self.missing_kept)
    lines = [
        f"subjects: {self.subjects_in} read, {subjects_out} with at least one kept day",
        f"days: {self.days_in} calendar days, {self.kept} kept, "
        f"{self.dropped_empty} dropped as empty (no observed minute), "
        f"{self.dropped_missing} dropped with missing fraction > {max_missing}",
    ]
    if fr.size:
      lines.append(f"missing fraction of kept days: mean {fr.mean():.3f}, "
                   f"p10/p50/p90 {np.percentile(fr, 10):.3f}/{np.percentile(fr, 50):.3f}/"
                   f"{np.percentile(fr, 90):.3f}")
    lines += self.notes
    return "\n".join(lines)


def missing_value(spec: LabelSpec) -> float | int:
  return float("nan") if spec.kind == "regression" else -1


def day_records(timeline: SubjectTimeline, labels: Mapping[str, LabelSpec], max_missing: float,
                stats: DayStats) -> list[DayRecord]:
  """Cuts a timeline into day records, dropping empty days and days above `max_missing`."""
  records = []
  c = timeline.values.shape[1]
  days = timeline.values.reshape(timeline.num_days, MINUTES_PER_DAY, c)
  for d in range(timeline.num_days):
    stats.days_in += 1
    observed = np.isfinite(days[d])
    n_obs = int(observed.sum())
    if n_obs == 0:
      stats.dropped_empty += 1
      continue
    missing = 1.0 - n_obs / observed.size
    if missing > max_missing:
      stats.dropped_missing += 1
      continue
    day = (timeline.start + datetime.timedelta(days=d)).isoformat()
    values = {}
    for name, spec in labels.items():
      if spec.level == "subject":
        values[name] = timeline.subject_labels.get(name, missing_value(spec))
      elif spec.level == "minute":
        minutes = timeline.minute_labels.get(name)
        values[name] = (np.full(MINUTES_PER_DAY, -1, np.int64) if minutes is None
                        else minutes[d * MINUTES_PER_DAY:(d + 1) * MINUTES_PER_DAY].copy())
      else:
        values[name] = timeline.day_labels.get(name, {}).get(day, missing_value(spec))
    signals = np.where(observed, days[d], 0.0).astype(np.float32)
    records.append(DayRecord(timeline.subject_id, day, signals, observed, values))
    stats.kept += 1
    stats.missing_kept.append(missing)
  return records


@dataclasses.dataclass(frozen=True)
class NonWearRule:
  """Non-wear of devices that record zeros off the wrist: long zero runs in waking hours.

  A maximal run of consecutive zero minutes (a minute is zero when it has a
  recorded value and all its recorded channels are exactly 0) that lasts at
  least `min_run_minutes` and has at least `min_waking_minutes` of its
  minutes inside waking hours [waking_start_hour, waking_end_hour) is
  non-wear in its entirety (a device taken off in the evening often stays off
  overnight). Runs mostly at night are kept: a still sleeper records zeros.
  """
  min_run_minutes: int = 120
  min_waking_minutes: int = 60
  waking_start_hour: int = 7
  waking_end_hour: int = 23

  def __post_init__(self):
    if self.min_run_minutes < 1 or self.min_waking_minutes < 0:
      raise ValueError(f"non-wear rule: min_run_minutes must be >= 1 and min_waking_minutes "
                       f">= 0, got {self.min_run_minutes} and {self.min_waking_minutes}")
    if not 0 <= self.waking_start_hour < self.waking_end_hour <= 24:
      raise ValueError(f"non-wear rule: waking hours must satisfy 0 <= start < end <= 24, got "
                       f"{self.waking_start_hour}-{self.waking_end_hour}")

  def mask(self, values: np.ndarray) -> np.ndarray:
    """bool[n]: minutes of `values` (float[n] or float[n, C], NaN = not recorded) judged non-wear.

    Minute 0 is midnight (a SubjectTimeline).
    """
    v = values.reshape(values.shape[0], -1)
    recorded = ~np.isnan(v)
    # A minute with nothing recorded is not zero: a gap ends a run.
    zero = recorded.any(axis=1) & np.all((v == 0) | ~recorded, axis=1)
    edges = np.diff(np.concatenate([[0], zero.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    n = v.shape[0]
    minute_of_day = np.arange(n) % MINUTES_PER_DAY
    waking = ((minute_of_day >= self.waking_start_hour * 60)
              & (minute_of_day < self.waking_end_hour * 60))
    waking_cum = np.concatenate([[0], np.cumsum(waking)])
    out = np.zeros(n, bool)
    for s, e in zip(starts, ends):
      if e - s >= self.min_run_minutes and waking_cum[e] - waking_cum[s] >= self.min_waking_minutes:
        out[s:e] = True
    return out


def read_table(path, **kwargs):
  """pandas.read_csv with the file named in any parse error."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  try:
    return pd.read_csv(path, **kwargs)
  except (ValueError, pd.errors.ParserError) as e:
    raise ValueError(f"{path}: cannot parse as CSV: {e}") from None


def require_columns(df, columns: Sequence[str], path) -> None:
  missing = [c for c in columns if c not in df.columns]
  if missing:
    raise ValueError(f"{path}: missing columns {missing} (has {list(df.columns)})")
