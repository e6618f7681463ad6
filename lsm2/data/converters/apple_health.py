"""Apple Health's "Export All Health Data": export.xml (or the export.zip holding it).

Input (`--input`): one export is one subject, as `export.xml`, `export.zip`
(its `apple_health_export/export.xml` member is streamed from the archive) or
the unzipped folder (holding `export.xml` or `apple_health_export/export.xml`).
A directory of exports (`NAME.zip`, `NAME.xml` or folders `NAME/`) is one
subject per export, named NAME. The file is parsed as a stream
(xml.parsers.expat: nothing but the current element's attributes is held), so
memory follows the days the export covers, not its size.

Records read (top-level `Record` elements; the copies inside `Correlation`
elements are skipped):

  HKQuantityTypeIdentifierHeartRate                 hr                rate   count/min
  HKQuantityTypeIdentifierStepCount                 steps             count  count
  HKQuantityTypeIdentifierActiveEnergyBurned        active_energy     count  kcal, Cal, kJ
  HKQuantityTypeIdentifierHeartRateVariabilitySDNN  hrv_sdnn          rate   ms
  HKQuantityTypeIdentifierRespiratoryRate           respiratory_rate  rate   count/min
  HKCategoryTypeIdentifierSleepAnalysis             minute label `sleep_stage`

Other record types are counted in the summary. Samples are spread over the
minutes they cover (converters.device: counts split in proportion, rates
averaged); quantity samples longer than 60 minutes (daily totals written by
apps) cannot be placed at minutes and are skipped and counted.

Source priority: per quantity and minute only the best source covering that
minute is used (never a sum over sources, so watch and phone steps are never
counted twice). Sources rank by: the order of --source-priority (names as in
`sourceName`), then watches (a `device` with `model:Watch`, or "Watch" in the
source name) before iPhones (`model:iPhone`, or "iPhone" in the name) before
any other app, then by name. A source's kind is decided by its first record.

Days are local wall-clock days of the UTC offsets the export writes with every
date (`2024-03-10 08:00:30 -0700`); samples are placed in real time first, so
an interval across a daylight-saving change keeps its true duration (see
converters.device for the repeated and the skipped hour).

Non-wear (converters.device.HeartRateWearRule, default: gaps up to 20
minutes between heart-rate samples are worn): a watch measures heart rate
every few minutes while worn. At worn minutes a count without a sample
(steps, active energy) is 0 when the export records that count at all; elsewhere
it is unobserved unless a sample (e.g. the phone's steps) covers it. A count
the export never records stays unobserved everywhere (and is left out of the
dataset). Rates are observed only where sampled. Without the rule
(--no-nonwear) counts are observed only where sampled.

Sleep (`sleep_stage` minute label, the value covering the middle of each
minute): InBed -> in_bed, Asleep/AsleepUnspecified -> asleep, Awake -> awake,
AsleepCore -> light, AsleepDeep -> deep, AsleepREM -> rem (also as the raw
values 0-5). A stage beats asleep, which beats in_bed; ties go to the source
priority.

A record with a missing or unparseable attribute (date, value, unit, source),
an unknown unit or an end before its start is skipped and reported with the
export name, line number and element; the conversion goes on. XML that is not
well formed is an error naming the line and column.
"""
from __future__ import annotations

import array
import dataclasses
import datetime
import math
import pathlib
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from xml.parsers import expat

import numpy as np

from lsm2 import storage
from lsm2.data.channels import get_channel
from lsm2.data.converters import device
from lsm2.data.converters.common import DayStats, SubjectTimeline
from lsm2.data.metadata import LabelSpec

LABELS = {device.SLEEP_LABEL.name: device.SLEEP_LABEL}
WEAR = device.HeartRateWearRule(max_gap_minutes=20)
MAX_SAMPLE_SECONDS = 3600  # Longer quantity samples are daily totals; they are skipped.
MAX_SLEEP_SECONDS = 24 * 3600
BATCH = 100_000  # Samples (or covered minutes) buffered before they go to the minute grid.
EXPORT_XML = "export.xml"


@dataclasses.dataclass(frozen=True)
class Quantity:
  channel: str
  semantics: str
  units: dict[str, float]  # Accepted unit -> factor to the channel's unit.


QUANTITIES = {
    "HKQuantityTypeIdentifierHeartRate": Quantity("hr", device.RATE, {"count/min": 1.0}),
    "HKQuantityTypeIdentifierStepCount": Quantity("steps", device.COUNT, {"count": 1.0}),
    "HKQuantityTypeIdentifierActiveEnergyBurned": Quantity(
        "active_energy", device.COUNT, {"kcal": 1.0, "Cal": 1.0, "kJ": 1 / 4.184}),
    "HKQuantityTypeIdentifierHeartRateVariabilitySDNN": Quantity("hrv_sdnn", device.RATE,
                                                                 {"ms": 1.0}),
    "HKQuantityTypeIdentifierRespiratoryRate": Quantity("respiratory_rate", device.RATE,
                                                        {"count/min": 1.0}),
}
CHANNELS = tuple(get_channel(q.channel) for q in QUANTITIES.values())
SLEEP_TYPE = "HKCategoryTypeIdentifierSleepAnalysis"
_SLEEP = {"InBed": "in_bed", "Asleep": "asleep", "AsleepUnspecified": "asleep",
          "Awake": "awake", "AsleepCore": "light", "AsleepDeep": "deep", "AsleepREM": "rem"}
SLEEP_VALUES = {f"HKCategoryValueSleepAnalysis{k}": v for k, v in _SLEEP.items()}
SLEEP_VALUES.update({str(i): v for i, v in enumerate(
    ("in_bed", "asleep", "awake", "light", "deep", "rem"))})  # HealthKit's raw values.
SPECIFICITY = {"in_bed": 0, "asleep": 1, "awake": 2, "light": 2, "deep": 2, "rem": 2}
SOURCE_KINDS = ("watch", "iphone", "other")


def _source_kind(name: str, device_attr: str) -> int:
  if "model:Watch" in device_attr or "Watch" in name:
    return 0
  if "model:iPhone" in device_attr or "iPhone" in name:
    return 1
  return 2


class _Export:
  """One export's streaming parse into a MinuteAccumulator, sleep samples and counts."""

  def __init__(self, name: str, priority: Sequence[str]):
    self.name = name
    self.priority = {n: i for i, n in enumerate(priority)}
    self.acc = device.MinuteAccumulator(tuple(q.semantics for q in QUANTITIES.values()))
    self.offsets = device.OffsetEvidence()
    self.kinds = {t: i for i, t in enumerate(QUANTITIES)}
    self.factors = [q.units for q in QUANTITIES.values()]
    self.sources: dict[str, int] = {}
    self.source_kind: list[int] = []
    self.depth = 0
    self.records = 0
    self.imported = Counter()
    self.other_types = Counter()
    self.long_samples = Counter()
    self.issues = device.IssueLog(f"{name}: malformed records")
    self._days: dict[str, int] = {}
    # Buffered quantity samples (compact arrays): kind, source, start, end (s), value.
    self._buf = (array.array("b"), array.array("i"), array.array("q"), array.array("q"),
                 array.array("d"))
    self._buf_minutes = 0
    self._sleep: list[tuple[int, int, int, int]] = []  # start, end, stage, source.
    self._off = (array.array("q"), array.array("h"))  # Instants and UTC offsets seen.
    self._parser = None

  # --- Parsing ----------------------------------------------------------------------
  def parse(self, stream) -> None:
    p = expat.ParserCreate()
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    p.StartElementHandler = self._start
    p.EndElementHandler = self._end
    self._parser = p
    try:
      p.ParseFile(stream)
    except expat.ExpatError as e:
      raise ValueError(f"{self.name}: line {e.lineno}, column {e.offset}: not well-formed XML "
                       f"({expat.ErrorString(e.code)})") from None
    self._flush()

  def _end(self, name):
    self.depth -= 1

  def _start(self, name, attrs):
    self.depth += 1
    if self.depth != 2 or name != "Record":
      return
    self.records += 1
    typ = attrs.get("type", "")
    kind = self.kinds.get(typ)
    if kind is None and typ != SLEEP_TYPE:
      self.other_types[typ] += 1
      return
    try:
      start, off_start = self._time(attrs, "startDate")
      end, off_end = self._time(attrs, "endDate")
      if end < start:
        raise ValueError(f"endDate {attrs['endDate']!r} is before startDate "
                         f"{attrs['startDate']!r}")
      source = self._source(attrs)
      if kind is None:
        stage = SLEEP_VALUES.get(attrs.get("value", ""))
        if stage is None:
          raise ValueError(f"value {attrs.get('value')!r} is not a sleep analysis value")
        if end - start > MAX_SLEEP_SECONDS:
          self.long_samples[typ] += 1
          return
        self._sleep.append((start, end, device.SLEEP_STAGES.index(stage), source))
      else:
        unit = attrs.get("unit")
        factor = self.factors[kind].get(unit)
        if factor is None:
          raise ValueError(f"unit {unit!r} is not one of {sorted(self.factors[kind])}")
        text = attrs.get("value")
        try:
          value = float(text)
        except (TypeError, ValueError):
          value = math.nan
        if not (math.isfinite(value) and value >= 0):
          raise ValueError(f"value {text!r} is not a non-negative number")
        if end - start > MAX_SAMPLE_SECONDS:
          self.long_samples[typ] += 1
          return
        for column, v in zip(self._buf, (kind, source, start, end, value * factor)):
          column.append(v)
        self._buf_minutes += (end - start) // 60 + 1
        if self._buf_minutes >= BATCH:
          self._flush()
    except (KeyError, ValueError) as e:
      what = f"missing attribute {e}" if isinstance(e, KeyError) else str(e)
      self.issues.add(f"line {self._parser.CurrentLineNumber}: <Record type=\"{typ}\">: {what}")
      return
    self.imported[typ] += 1
    self._off[0].append(start)
    self._off[1].append(off_start)
    if off_end != off_start:
      self._off[0].append(end)
      self._off[1].append(off_end)

  def _time(self, attrs, key: str) -> tuple[int, int]:
    """(seconds since the epoch UTC, offset minutes) of 'YYYY-MM-DD HH:MM:SS +HHMM'."""
    text = attrs[key]
    if (len(text) != 25 or text[10] != " " or text[13] != ":" or text[16] != ":"
        or text[19] != " " or text[20] not in "+-"):
      raise ValueError(f"{key} {text!r} is not 'YYYY-MM-DD HH:MM:SS +HHMM'")
    day = self._days.get(text[:10])
    if day is None:
      try:
        date = datetime.date.fromisoformat(text[:10])
      except ValueError:
        raise ValueError(f"{key} {text!r}: invalid date") from None
      if not 1990 <= date.year <= 2100:
        raise ValueError(f"{key} {text!r}: year outside 1990-2100")
      day = self._days[text[:10]] = (date - device.EPOCH).days
    try:
      h, m, s = int(text[11:13]), int(text[14:16]), int(text[17:19])
      off = int(text[21:23]) * 60 + int(text[23:25])
    except ValueError:
      raise ValueError(f"{key} {text!r} is not 'YYYY-MM-DD HH:MM:SS +HHMM'") from None
    if h > 23 or m > 59 or s > 60 or off > 18 * 60:
      raise ValueError(f"{key} {text!r}: time or offset out of range")
    if text[20] == "-":
      off = -off
    return day * 86400 + h * 3600 + m * 60 + s - off * 60, off

  def _source(self, attrs) -> int:
    name = attrs["sourceName"]
    sid = self.sources.get(name)
    if sid is None:
      sid = self.sources[name] = len(self.sources)
      self.source_kind.append(_source_kind(name, attrs.get("device", "")))
    return sid

  def ranks(self) -> np.ndarray:
    """rank[source id]: position in (--source-priority, kind, name) order."""
    names = list(self.sources)
    order = sorted(range(len(names)), key=lambda i: (
        self.priority.get(names[i], len(self.priority)), self.source_kind[i], names[i]))
    rank = np.empty(len(names), np.int64)
    rank[order] = np.arange(len(names))
    return rank

  def _flush(self) -> None:
    if self._off[0]:
      self.offsets.add(*(np.frombuffer(a, a.typecode) for a in self._off))
      self._off = (array.array("q"), array.array("h"))
    if not self._buf[0]:
      return
    kind, source, start, end, value = (np.frombuffer(a, a.typecode) for a in self._buf)
    rank = self.ranks()
    for q in np.unique(kind):
      sel = kind == q
      self.acc.add(int(q), start[sel], end[sel], value[sel], source[sel], rank)
    self._buf = tuple(array.array(a.typecode) for a in self._buf)
    self._buf_minutes = 0

  # --- The subject's timeline -----------------------------------------------------------
  def timeline(self, subject_id: str, rule: device.HeartRateWearRule | None,
               stats: DayStats) -> SubjectTimeline | None:
    """The local-day timeline (None without data); notes the summary. Consumes the minute grid."""
    if self._sleep:
      sl = np.array(self._sleep, np.int64)
      self.acc.ensure(int(sl[:, 0].min() // 60), int(sl[:, 1].max() // 60))
    if not self.acc.size:
      return None
    n, origin = self.acc.size, self.acc.origin
    hr = list(QUANTITIES).index("HKQuantityTypeIdentifierHeartRate")
    worn = np.zeros(n, bool)
    if rule is not None:
      worn = rule.mask(self.acc.covered(hr))
    values = np.empty((n, len(QUANTITIES)), np.float32)
    for q in range(len(QUANTITIES)):
      values[:, q] = self.acc.values(q)
    for q, quantity in enumerate(QUANTITIES.values()):
      covered = self.acc.covered(q)
      # Only a quantity the export records: a never-recorded count stays unobserved (left out).
      if quantity.semantics == device.COUNT and covered.any():
        values[worn & ~covered, q] = 0.0
    worn_minutes = int(worn.sum())
    self.acc = None  # Its memory is free for the wall-clock mapping.
    labels = {}
    if self._sleep:
      labels[device.SLEEP_LABEL.name] = self._sleep_labels(origin, n)
    tl = device.to_wall_clock(subject_id, origin, self.offsets.offsets(origin, n), values, labels)
    stats.notes.append(f"{self.name}: {self.records} records; imported "
                       f"{dict(sorted(self.imported.items()))}; worn minutes (heart-rate rule) "
                       f"{worn_minutes}" + ("" if rule else " (rule off)"))
    rank = self.ranks()
    stats.notes.append(f"{self.name}: sources by priority: " + ", ".join(
        f"{name} ({SOURCE_KINDS[self.source_kind[sid]]})"
        for name, sid in sorted(self.sources.items(), key=lambda kv: rank[kv[1]])))
    if self.long_samples:
      stats.notes.append(f"{self.name}: samples longer than {MAX_SAMPLE_SECONDS // 60} minutes "
                         f"(sleep: 24 h) skipped: {dict(self.long_samples)}")
    if self.other_types:
      stats.notes.append(f"{self.name}: record types not imported: "
                         f"{sum(self.other_types.values())} records of {len(self.other_types)} "
                         f"types, e.g. {', '.join(t for t, _ in self.other_types.most_common(3))}")
    stats.notes += self.issues.notes()
    return tl

  def _sleep_labels(self, origin: int, n: int) -> np.ndarray:
    """int64[n] stage per UTC minute: most specific stage, then the best source."""
    sl = np.array(self._sleep, np.int64)
    sample, minute = device.midpoint_minutes(sl[:, 0], sl[:, 1])
    rank = self.ranks()
    stage = sl[sample, 2]
    specificity = np.array([SPECIFICITY[s] for s in device.SLEEP_STAGES])[stage]
    key = (specificity << 40) | ((len(rank) - rank[sl[sample, 3]]) << 8) | stage
    best = np.full(n, -1, np.int64)
    np.maximum.at(best, minute - origin, key)
    return np.where(best >= 0, best & 0xFF, -1)


@contextmanager
def _open_export(path: pathlib.Path) -> Iterator:
  """A binary stream of the export.xml in `path` (a .xml file, a .zip or an unzipped folder)."""
  if path.is_dir():
    for name in (EXPORT_XML, f"apple_health_export/{EXPORT_XML}"):
      candidate = path / name
      if candidate.is_file():
        storage.contained(path, name, "file")  # Not a symlink to outside the folder.
        with open(candidate, "rb") as f:
          yield f
        return
    raise ValueError(f"{path}: no {EXPORT_XML} (expected {path}/{EXPORT_XML} or "
                     f"{path}/apple_health_export/{EXPORT_XML})")
  if path.suffix.lower() == ".zip":
    try:
      archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
      raise ValueError(f"{path}: not a zip archive: {e}") from None
    with archive:
      for member in archive.namelist():  # A crafted archive is refused as a whole.
        storage.contained(path, member, "zip member")
      members = [m for m in archive.namelist()
                 if m == EXPORT_XML or m.endswith("/" + EXPORT_XML)]
      if len(members) != 1:
        raise ValueError(f"{path}: expected one {EXPORT_XML} member, found {members or 'none'}")
      with archive.open(members[0]) as f:
        yield f
    return
  with open(path, "rb") as f:
    yield f


def find_exports(input_path: str | pathlib.Path) -> list[tuple[str, pathlib.Path]]:
  """[(subject id, export path)]: one export, or every export in a directory of exports."""
  root = pathlib.Path(input_path)
  if not root.exists():
    raise ValueError(f"--input {root} does not exist")
  if root.is_file() or (root / EXPORT_XML).is_file() or (
      root / "apple_health_export" / EXPORT_XML).is_file():
    return [(root.stem if root.is_file() else root.name, root)]
  found = []
  for p in sorted(root.iterdir()):
    if p.is_file() and p.suffix.lower() in (".xml", ".zip"):
      found.append((p.stem, p))
    elif p.is_dir() and ((p / EXPORT_XML).is_file()
                         or (p / "apple_health_export" / EXPORT_XML).is_file()):
      found.append((p.name, p))
  if not found:
    raise ValueError(f"{root}: no Apple Health export (export.xml, export.zip, an unzipped export "
                     "folder, or a directory of them)")
  ids = [s for s, _ in found]
  if len(set(ids)) != len(ids):
    dup = sorted({s for s in ids if ids.count(s) > 1})
    raise ValueError(f"{root}: several exports share the subject name(s) {dup}")
  return found


def parse_export(path: pathlib.Path, name: str, priority: Sequence[str] = ()) -> _Export:
  """Streams one export's records into the minute grid (tests and the benchmark use it)."""
  export = _Export(name, priority)
  with _open_export(path) as stream:
    export.parse(stream)
  return export


def load_export(subject: str, path: pathlib.Path, stats: DayStats,
                rule: device.HeartRateWearRule | None = WEAR, source_priority: Sequence[str] = ()
                ) -> SubjectTimeline | None:
  """One export (a find_exports entry) as a timeline; None (noted) without an imported record."""
  tl = parse_export(path, path.name, source_priority).timeline(subject, rule, stats)
  if tl is None:
    stats.notes.append(f"{path.name}: no imported record; subject {subject!r} left out")
  return tl


def load(input_path: str | pathlib.Path, stats: DayStats,
         rule: device.HeartRateWearRule | None = WEAR, source_priority: Sequence[str] = ()
         ) -> tuple[list[SubjectTimeline], dict[str, LabelSpec]]:
  """Reads one export or a directory of exports into one minute timeline per export."""
  timelines = [tl for subject, path in find_exports(input_path)
               if (tl := load_export(subject, path, stats, rule, source_priority)) is not None]
  stats.subjects_in = len(timelines)
  return timelines, dict(LABELS)
