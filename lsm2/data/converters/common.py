"""Shared converter logic: minute timelines -> day records, the day-drop rule, the summary."""
from __future__ import annotations

import dataclasses
import datetime
import re
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


# pandas.read_csv's default missing-value markers (its `na_values` documentation).
MISSING_MARKERS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def read_table(path, *, text_columns: Sequence[str] = (), **kwargs):
  """pandas.read_csv with the file named in any parse error.

  `text_columns` (subject ids) are read as text exactly as written: no number
  parsing (`01` stays `01`) and no missing-value markers (`NA` stays `NA`); the
  other columns as pandas reads them by default. A column named twice in the
  header is an error: pandas would rename the second `hr` to `hr.1`.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  try:
    names = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]
  except (ValueError, pd.errors.ParserError) as e:
    raise ValueError(f"{path}: cannot parse as CSV: {e}") from None
  counts = names.value_counts()
  if (counts > 1).any():
    raise ValueError(f"{path}: the header names column " + ", ".join(
        f"{n!r} {'twice' if k == 2 else f'{k} times'}" for n, k in counts[counts > 1].items())
        + "; give each column once")
  try:
    if text_columns:
      header = pd.read_csv(path, nrows=0, **kwargs).columns
      kwargs |= {"dtype": {c: str for c in text_columns}, "keep_default_na": False,
                 "na_values": {c: sorted(MISSING_MARKERS) for c in header
                               if c not in text_columns}}
    return pd.read_csv(path, **kwargs)
  except (ValueError, pd.errors.ParserError) as e:
    raise ValueError(f"{path}: cannot parse as CSV: {e}") from None


def subject_ids(column, path, name: str):
  """A table's subject-id column as a Series of text; raises on a missing id.

  Text is taken exactly as written (read CSVs with `read_table(text_columns=...)`):
  `1`, `01` and ` 1` are three subjects. Integer columns (Parquet) become their
  decimal digits. Other types are an error: a float cannot keep `01` apart
  from `1`. A missing id, a blank one or one of pandas' missing-value markers
  (`NA`, `null`, `None`, ...; MISSING_MARKERS) is an error naming the data row
  (counted from 1, the header excluded), never a row silently dropped.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if isinstance(column.dtype, pd.CategoricalDtype):
    column = column.astype(object)
  absent = column.isna()
  if pd.api.types.is_integer_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
    text = column.astype(str)
  elif pd.api.types.is_object_dtype(column.dtype):
    wrong = ~(absent | column.map(lambda v: isinstance(v, str))).to_numpy(bool)
    if wrong.any():
      i = int(np.flatnonzero(wrong)[0])
      raise ValueError(f"{path}: data row {i + 1}: column {name!r}: subject id "
                       f"{column.iloc[i]!r} is a {type(column.iloc[i]).__name__}, not text")
    text = column
  elif pd.api.types.is_string_dtype(column.dtype):
    text = column
  else:
    example = f" (e.g. {column[~absent].iloc[0]})" if not absent.all() else ""
    raise ValueError(f"{path}: column {name!r} holds {column.dtype} values{example}; subject "
                     "ids must be text or integers (a float cannot keep '01' and '1' apart)")
  bad = (absent | text.isin(MISSING_MARKERS) | text.str.strip().eq("")).to_numpy(bool)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    value = text.iloc[i]
    what = ("no subject id" if absent.iloc[i] else "no subject id (an empty cell)"
            if not value else f"subject id {value!r} is blank" if not value.strip()
            else f"subject id {value!r} is a missing-value marker (rename the subject if it "
            "is a real id)")
    n = int(bad.sum())
    raise ValueError(f"{path}: data row {i + 1}: column {name!r}: {what} "
                     f"({n} row{'s' if n > 1 else ''} like this)")
  return text.astype(str)


# A trailing UTC offset ("Z", "+05", "-04:00", "-0500"): only partitions the
# stamps so that each part holds one offset; pandas parses every part whole.
_OFFSET_SUFFIX = re.compile(r"(Z|[+-]\d{2}(?::?\d{2})?)$")


def local_times(column, path, name: str, what: str = "timestamp"):
  """(wall clock, UTC): time stamps on their local wall clock, and their instants if known.

  Both are datetime64 Series (UTC is None when the stamps carry no offset or
  zone). A stamp with a UTC offset or zone keeps its own local wall clock (the
  offset is dropped after parsing), so the offset may change between rows: a
  daylight-saving change, or travel. Naive stamps are wall clock already. A
  column mixing stamps with and without an offset, a missing stamp or one
  pandas cannot parse is an error naming the file, column and value.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  parsed = column
  if not pd.api.types.is_datetime64_any_dtype(column.dtype):
    try:
      parsed = pd.to_datetime(column, errors="coerce")
    except ValueError:  # "Mixed timezones detected": offsets differ between rows.
      return _parse_by_offset(column, path, name, what)
    if parsed.isna().any():
      return _parse_by_offset(column, path, name, what)
  _check_parsed(column, parsed.isna().to_numpy(), path, name, what)
  if isinstance(parsed.dtype, pd.DatetimeTZDtype):
    return parsed.dt.tz_localize(None), parsed.dt.tz_convert(None)
  return parsed, None


def _check_parsed(column, failed: np.ndarray, path, name: str, what: str) -> None:
  """Raises on the first stamp pandas could not parse (`failed`), naming it and its row."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if failed.any():
    i = int(np.flatnonzero(failed)[0])
    value = column.iloc[i]
    problem = f"no {what}" if pd.isna(value) else f"cannot parse {what} {value!r}"
    raise ValueError(f"{path}: column {name!r}: {problem} (data row {i + 1})")


def _parse_by_offset(column, path, name: str, what: str):
  """local_times for stamps whose offsets differ: pandas parses one offset per call."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  # The offset text of each stamp, from the distinct 6-character tails (few).
  codes, tails = pd.factorize(column.astype(str).str.rstrip().str.slice(-6),
                              use_na_sentinel=False)
  offsets = [m.group(1) if isinstance(t, str) and (m := _OFFSET_SUFFIX.search(t)) else ""
             for t in tails]
  keys = np.unique(offsets, return_inverse=True)[1].reshape(-1)[codes]
  order = np.argsort(keys, kind="stable")
  wall = np.empty(len(column), "datetime64[us]")
  utc = np.empty(len(column), "datetime64[us]")
  failed = np.zeros(len(column), bool)
  aware, naive = [], []
  for idx in np.split(order, np.cumsum(np.bincount(keys))[:-1]):
    part = pd.to_datetime(column.iloc[idx], errors="coerce")
    failed[idx] = part.isna().to_numpy()
    if isinstance(part.dtype, pd.DatetimeTZDtype):
      aware.append(int(idx[0]))
      wall[idx] = part.dt.tz_localize(None).to_numpy("datetime64[us]")
      utc[idx] = part.dt.tz_convert(None).to_numpy("datetime64[us]")
    else:
      naive.append(int(idx[0]))
      wall[idx] = part.to_numpy("datetime64[us]")
  _check_parsed(column, failed, path, name, what)
  if aware and naive:
    raise ValueError(f"{path}: column {name!r} mixes time stamps with a UTC offset (e.g. "
                     f"{column.iloc[min(aware)]!r}) and without (e.g. "
                     f"{column.iloc[min(naive)]!r}); write every stamp with its offset, or none")
  return (pd.Series(wall, index=column.index),
          pd.Series(utc, index=column.index) if aware else None)


def require_columns(df, columns: Sequence[str], path) -> None:
  missing = [c for c in columns if c not in df.columns]
  if missing:
    raise ValueError(f"{path}: missing columns {missing} (has {list(df.columns)})")
