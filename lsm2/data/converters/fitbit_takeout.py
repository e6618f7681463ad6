"""Fitbit's account export (Google Takeout, or the older fitbit.com archive): per-day JSON files.

Input (`--input`): one export is one subject, as the Takeout `.zip` or the
unzipped folder. The data files are found at any depth by name (Google
Takeout puts them in `Takeout/Fitbit/Global Export Data/`, the older archive
in `MyFitbitData/NAME/Physical Activity/` and `.../Sleep/`):

  heart_rate-YYYY-MM-DD.json  [{"dateTime": "MM/DD/YY HH:MM:SS",
                                "value": {"bpm": 62, "confidence": 2}}, ...]  -> hr (mean/minute)
  steps-YYYY-MM-DD.json       [{"dateTime": "MM/DD/YY HH:MM:SS", "value": "12"}, ...]  -> steps
  calories-YYYY-MM-DD.json    [{"dateTime": ..., "value": "1.07"}, ...]  -> total_energy (kcal)
  sleep-YYYY-MM-DD.json       [{"logId": ..., "startTime": "2023-01-01T23:30:00.000",
                                "type": "stages" | "classic",
                                "levels": {"data": [{"dateTime": "2023-01-01T23:30:00.000",
                                                     "level": "wake", "seconds": 600}, ...],
                                           "shortData": [...]}}, ...]  -> sleep_stage label

A directory is one export when it holds `Takeout`, `Fitbit`, `Global Export
Data`, `Physical Activity` or `Sleep`, or data files at its top level;
otherwise every `NAME.zip` and folder `NAME/` in it holding data files is one
subject's export, named NAME.

Time: the intraday files (heart rate, steps, calories) are written in UTC;
they are converted to the local wall clock of the time zone given by
--timezone (an IANA name such as Europe/Berlin; --timezone UTC keeps the times
as written) or else the `timezone` column of the export's Profile.csv. Sleep
logs are written in local time and are used as written. Where clocks go back,
the repeated local minutes keep their first pass; skipped minutes stay
unobserved.

Minutes: each steps/calories entry is the count of the minute it starts; heart
rate is averaged over the minute's samples. When two files hold the same
minute (overlapping exports), the first file by name wins (no double
counting).

Non-wear (converters.device.HeartRateWearRule, default: gaps up to 10
minutes between heart-rate samples are worn; Fitbit samples every few
seconds while worn): Fitbit writes a steps and calories value for every minute
of the day, worn or not (calories then hold the basal estimate). Steps and
calories are observed at minutes that are worn or have steps > 0, unobserved
elsewhere. An export without any heart-rate file gets no non-wear rule (noted).

Sleep (`sleep_stage` minute label, the level covering the middle of each
minute): stages logs wake -> awake, light, deep, rem; classic logs asleep,
restless -> awake, awake. `shortData` (short wakes) is applied over `data`;
logs are applied in order of their start, a later log overriding an earlier
one where they overlap.

An entry with a missing or unparseable field is skipped and reported (file
and entry index); a file that is not valid JSON is an error naming its line.
"""
from __future__ import annotations

import datetime
import io
import json
import pathlib
import re
import zipfile
import zoneinfo

import numpy as np

from lsm2 import storage
from lsm2.data.channels import FITBIT_TAKEOUT_CHANNELS
from lsm2.data.converters import device
from lsm2.data.converters.common import DayStats, SubjectTimeline
from lsm2.data.metadata import LabelSpec
from lsm2.data.record import MINUTES_PER_DAY

CHANNELS = FITBIT_TAKEOUT_CHANNELS
LABELS = {device.SLEEP_LABEL.name: device.SLEEP_LABEL}
WEAR = device.HeartRateWearRule(max_gap_minutes=10)
KINDS = ("heart_rate", "steps", "calories", "sleep")
_FILE_RE = re.compile(r"(?:^|/)(heart_rate|steps|calories|sleep)-(\d{4}-\d{2}-\d{2})\.json$")
_MARKERS = ("Takeout", "Fitbit", "Global Export Data", "Physical Activity", "Sleep")
_INTRADAY_FORMAT = "%m/%d/%y %H:%M:%S"
_SLEEP_LEVELS = {"wake": "awake", "light": "light", "deep": "deep", "rem": "rem",
                 "asleep": "asleep", "restless": "awake", "awake": "awake"}
HR, STEPS, CALORIES = 0, 1, 2  # Quantity (= channel) indices.


class _Source:
  """An export as a folder or a zip: lists its files and opens them by relative name.

  Every name must stay inside the export (storage.contained): a zip member named
  '../x' or '/x', or a file that is a symlink to outside the folder, refuses the export.
  """

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._zip = None
    if path.is_file():
      try:
        self._zip = zipfile.ZipFile(path)
      except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a zip archive or folder: {e}") from None
      self.names = sorted(n for n in self._zip.namelist() if not n.endswith("/"))
      what = "zip member"
    else:
      self.names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
      what = "file"
    for name in self.names:
      storage.contained(path, name, what)

  def read(self, name: str) -> bytes:
    if self._zip is not None:
      return self._zip.read(name)
    return (self.path / name).read_bytes()

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()


def _has_data(names) -> bool:
  return any(_FILE_RE.search(n) for n in names)


def find_exports(input_path: str | pathlib.Path) -> list[tuple[str, pathlib.Path]]:
  """[(subject id, export path)]: one export, or every export in a directory of exports."""
  root = pathlib.Path(input_path)
  if not root.exists():
    raise ValueError(f"--input {root} does not exist")
  if root.is_file():
    return [(root.stem, root)]
  if any((root / m).exists() for m in _MARKERS) or _has_data(p.name for p in root.iterdir()):
    return [(root.name, root)]
  found = []
  for p in sorted(root.iterdir()):
    if p.is_file() and p.suffix.lower() == ".zip":
      found.append((p.stem, p))
    elif p.is_dir() and _has_data(q.name for q in p.rglob("*.json")):
      found.append((p.name, p))
  if not found:
    raise ValueError(f"{root}: no Fitbit export (heart_rate-*.json, steps-*.json, calories-*.json "
                     "or sleep-*.json files, a Takeout .zip, or a directory of exports)")
  return found


def _timezone(source: _Source, override: str | None) -> zoneinfo.ZoneInfo:
  """The export's time zone: --timezone, else the `timezone` column of its Profile.csv."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  name, where = override, "--timezone"
  if not name:
    profiles = [n for n in source.names if n.rsplit("/", 1)[-1] == "Profile.csv"]
    for p in profiles:
      try:
        df = pd.read_csv(io.BytesIO(source.read(p)), dtype=str)
      except (ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{source.path}/{p}: cannot parse as CSV: {e}") from None
      if "timezone" in df.columns and df["timezone"].notna().any():
        name, where = str(df["timezone"].dropna().iloc[0]).strip(), f"{source.path}/{p}"
        break
    else:
      raise ValueError(f"{source.path}: no Profile.csv with a timezone column; pass --timezone "
                       "(the IANA time zone the UTC intraday times convert to, e.g. "
                       "Europe/Berlin; UTC keeps them as written)")
  try:
    return zoneinfo.ZoneInfo(name)
  except (zoneinfo.ZoneInfoNotFoundError, ValueError):
    raise ValueError(f"{where}: unknown time zone {name!r} (expected an IANA name such as "
                     "America/New_York)") from None


def _load_json(source: _Source, name: str) -> list:
  try:
    data = json.loads(source.read(name))
  except json.JSONDecodeError as e:
    raise ValueError(f"{source.path}/{name}: line {e.lineno}, column {e.colno}: not valid JSON "
                     f"({e.msg})") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{source.path}/{name}: not UTF-8 text: {e}") from None
  if not isinstance(data, list):
    raise ValueError(f"{source.path}/{name}: expected a JSON list of entries, got "
                     f"{type(data).__name__}")
  return data


def _intraday(entries: list, kind: str, where: str, issues: device.IssueLog
              ) -> tuple[np.ndarray, np.ndarray]:
  """(UTC seconds, values) of the well-formed entries; the others go to `issues`."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  times, values, index = [], [], []
  for i, e in enumerate(entries):
    try:
      v = e["value"]["bpm"] if kind == "heart_rate" else e["value"]
      times.append(e["dateTime"])
      values.append(v)
      index.append(i)
    except (KeyError, TypeError):
      issues.add(f"{where} entry {i}: expected {{'dateTime': ..., 'value': "
                 f"{'{bpm: ...}' if kind == 'heart_rate' else '...'}}}, got {str(e)[:80]}")
  ts = pd.to_datetime(pd.Series(times, dtype=object), format=_INTRADAY_FORMAT, errors="coerce")
  vals = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(np.float64)
  with np.errstate(invalid="ignore"):
    bad = ts.isna().to_numpy() | ~np.isfinite(vals) | (vals < 0)
  for j in np.flatnonzero(bad):
    issues.add(f"{where} entry {index[j]}: dateTime {times[j]!r} / value {values[j]!r} is not a "
               f"'{_INTRADAY_FORMAT}' time with a non-negative number")
  good = ~bad
  seconds = ts[good].to_numpy().astype("datetime64[s]").astype(np.int64)
  return seconds, vals[good]


def _sleep_samples(entries: list, where: str, issues: device.IssueLog
                   ) -> list[tuple[str, int, int, int]]:
  """[(log start, local start s, local end s, stage)] of every level entry (data, then shortData)."""
  out = []
  for i, log in enumerate(entries):
    try:
      start = str(log["startTime"])
      levels = log["levels"]
      parts = [levels.get("data", []), levels.get("shortData", [])]
    except (KeyError, TypeError, AttributeError):
      issues.add(f"{where} log {i}: expected 'startTime' and 'levels'")
      continue
    for part, items in zip(("data", "shortData"), parts):
      for j, item in enumerate(items):
        try:
          t = datetime.datetime.fromisoformat(item["dateTime"])
          seconds = int(item["seconds"])
          stage = _SLEEP_LEVELS[item["level"]]
          if seconds < 0:
            raise ValueError
        except (KeyError, TypeError, ValueError):
          issues.add(f"{where} log {i} levels.{part}[{j}]: expected dateTime (ISO), level (one of "
                     f"{sorted(_SLEEP_LEVELS)}) and seconds >= 0, got {str(item)[:80]}")
          continue
        s = int((t.replace(tzinfo=None) - datetime.datetime(1970, 1, 1)).total_seconds())
        out.append((start, s, s + seconds, device.SLEEP_STAGES.index(stage)))
  return out


def _utc_offsets(tz: zoneinfo.ZoneInfo, first_minute: int, n: int) -> np.ndarray:
  """int64[n]: minutes east of UTC in `tz` at each UTC minute (computed per UTC quarter hour)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  quarter0 = first_minute // 15
  quarters = (first_minute + n - 1) // 15 - quarter0 + 1
  utc = pd.to_datetime((quarter0 + np.arange(quarters)) * 15 * 60, unit="s", utc=True)
  local = utc.tz_convert(tz).tz_localize(None)
  per_quarter = ((local - utc.tz_localize(None)) // pd.Timedelta(minutes=1)).to_numpy(np.int64)
  return per_quarter[(first_minute + np.arange(n)) // 15 - quarter0]


def _export_timeline(subject: str, source: _Source, stats: DayStats,
                     rule: device.HeartRateWearRule | None, timezone: str | None
                     ) -> SubjectTimeline | None:
  files = {k: [] for k in KINDS}
  for name in source.names:
    m = _FILE_RE.search(name)
    if m:
      files[m.group(1)].append(name)
  label = source.path.name
  if not any(files.values()):
    raise ValueError(f"{source.path}: no heart_rate-*.json, steps-*.json, calories-*.json or "
                     "sleep-*.json files")
  issues = device.IssueLog(f"{label}: malformed entries")
  acc = device.MinuteAccumulator((device.RATE, device.COUNT, device.COUNT))
  intraday = [n for k in KINDS[:3] for n in sorted(files[k])]
  tz = _timezone(source, timezone) if intraday else None
  rank = np.arange(len(intraday), dtype=np.int64)  # Each file is a source; the first by name wins.
  counts = dict.fromkeys(KINDS, 0)
  for sid, name in enumerate(intraday):
    kind = _FILE_RE.search(name).group(1)
    seconds, values = _intraday(_load_json(source, name), kind, name, issues)
    counts[kind] += seconds.size
    q = KINDS.index(kind)
    acc.add(q, seconds, seconds, values, np.full(seconds.size, sid), rank)
  sleep = []
  for name in sorted(files["sleep"]):
    sleep += _sleep_samples(_load_json(source, name), name, issues)
  counts["sleep"] = len(sleep)
  if sleep:
    sl = np.array([s[1:] for s in sorted(sleep, key=lambda s: s[0])], np.int64)
  if not acc.size and not sleep:
    return None
  if acc.size:
    n, origin = acc.size, acc.origin
    values = np.stack([acc.values(q) for q in range(3)], axis=1)
    hr_covered = acc.covered(HR)
    if rule is not None and hr_covered.any():
      carried = rule.mask(hr_covered) | (acc.covered(STEPS) & (np.nan_to_num(values[:, STEPS]) > 0))
      values[~carried, STEPS] = np.nan
      values[~carried, CALORIES] = np.nan
      note = f"worn minutes (heart-rate rule) {int(carried.sum())}"
    else:
      note = ("no heart-rate data: non-wear not detected, every recorded minute observed"
              if rule is not None else "non-wear rule off")
    tl = device.to_wall_clock(subject, origin, _utc_offsets(tz, origin, n), values)
  else:
    tl, note = None, "no intraday data"
  if sleep:
    tl = _with_sleep(tl, subject, sl)
  stats.notes.append(f"{label}: entries read {counts}; time zone {tz}; {note}")
  stats.notes += issues.notes()
  return tl


def _with_sleep(tl: SubjectTimeline | None, subject: str, sl: np.ndarray) -> SubjectTimeline:
  """Adds the sleep stages (local seconds) as minute labels, extending the days if needed."""
  sample, minute = device.midpoint_minutes(sl[:, 0], sl[:, 1])
  if tl is None:
    tl = SubjectTimeline(subject, device.EPOCH + datetime.timedelta(
        days=int(minute.min()) // MINUTES_PER_DAY), np.zeros((0, len(CHANNELS)), np.float32))
  day0 = (tl.start - device.EPOCH).days
  lo = min(day0, int(minute.min()) // MINUTES_PER_DAY)
  hi = max(day0 + tl.num_days, int(minute.max()) // MINUTES_PER_DAY + 1)
  values = np.full(((hi - lo) * MINUTES_PER_DAY, len(CHANNELS)), np.nan, np.float32)
  shift = (day0 - lo) * MINUTES_PER_DAY
  values[shift:shift + tl.values.shape[0]] = tl.values
  latest = np.full(values.shape[0], -1, np.int64)  # Later entries override earlier ones.
  np.maximum.at(latest, minute - lo * MINUTES_PER_DAY, np.arange(sample.size))
  stages = np.where(latest >= 0, sl[sample[np.maximum(latest, 0)], 2], -1)
  out = SubjectTimeline(subject, device.EPOCH + datetime.timedelta(days=lo), values)
  out.minute_labels[device.SLEEP_LABEL.name] = stages
  return out


def load_export(subject: str, path: pathlib.Path, stats: DayStats,
                rule: device.HeartRateWearRule | None = WEAR, timezone: str | None = None
                ) -> SubjectTimeline | None:
  """One export (a find_exports entry) as a timeline; None (noted) without data entries."""
  source = _Source(path)
  try:
    tl = _export_timeline(subject, source, stats, rule, timezone)
  finally:
    source.close()
  if tl is None:
    stats.notes.append(f"{path.name}: no data entries; subject {subject!r} left out")
  return tl


def load(input_path: str | pathlib.Path, stats: DayStats,
         rule: device.HeartRateWearRule | None = WEAR, timezone: str | None = None
         ) -> tuple[list[SubjectTimeline], dict[str, LabelSpec]]:
  """Reads one export or a directory of exports into one minute timeline per export."""
  timelines = [tl for subject, path in find_exports(input_path)
               if (tl := load_export(subject, path, stats, rule, timezone)) is not None]
  stats.subjects_in = len(timelines)
  return timelines, dict(LABELS)
