"""Building blocks of the consumer-device importers (apple_health, fitbit_takeout).

Samples are accumulated on a grid of UTC minutes (real time, so durations and
daylight-saving changes are exact) and only then placed on local wall-clock
days:

* Spreading. A sample covers the minutes its interval [start, end) overlaps
  (an instantaneous sample, start == end, covers the minute it falls in). A
  count (steps, energy) is split over them in proportion to the overlap; a
  rate (heart rate, HRV, breaths/min) applies to each of them, and a minute's
  value is the mean of the samples applying to it.
* Source priority. Per quantity and minute only the best-ranked source that
  covers the minute counts; the samples of other sources are ignored there.
  Sources are never summed, so steps recorded by a watch and a phone at the
  same time are never counted twice.
* Wear. `HeartRateWearRule`: a device is worn where it records heart rate.
* Wall clock. `to_wall_clock` maps UTC minutes to local minutes with the UTC
  offset in effect. Where clocks go back, a repeated local minute keeps the
  values of its first pass (as the Actiwatch converter does) and takes a later
  pass's value only for a channel (or label) the first pass lacks; local
  minutes that clocks skip stay unobserved.
"""
from __future__ import annotations

import dataclasses
import datetime

import numpy as np

from lsm2.data.converters.common import SubjectTimeline
from lsm2.data.metadata import LabelSpec
from lsm2.data.record import MINUTES_PER_DAY

COUNT, RATE = "count", "rate"
EPOCH = datetime.date(1970, 1, 1)
# Sleep stages as minute labels. Apple's "core" sleep is Fitbit's "light" sleep (N1 + N2).
SLEEP_STAGES = ("in_bed", "awake", "asleep", "light", "deep", "rem")
SLEEP_LABEL = LabelSpec("sleep_stage", "categorical", "minute", SLEEP_STAGES)
NO_SOURCE = -1


@dataclasses.dataclass(frozen=True)
class HeartRateWearRule:
  """Wear from heart rate: minutes with a heart-rate sample, and gaps up to `max_gap_minutes`.

  A device measures heart rate periodically while on the wrist (an Apple Watch
  every few minutes, a Fitbit every few seconds), never off it. A minute is
  worn when it has a heart-rate sample or lies between two heart-rate minutes
  at most `max_gap_minutes` apart.
  """
  max_gap_minutes: int = 20

  def __post_init__(self):
    if self.max_gap_minutes < 1:
      raise ValueError(f"non-wear rule: max_gap_minutes must be >= 1, got {self.max_gap_minutes}")

  def mask(self, hr_covered: np.ndarray) -> np.ndarray:
    """bool[n]: worn minutes, from bool[n] minutes with a heart-rate sample."""
    idx = np.flatnonzero(hr_covered)
    worn = np.zeros(hr_covered.shape[0], bool)
    worn[idx] = True
    if idx.size < 2:
      return worn
    gaps = np.diff(idx)
    fill = (gaps > 1) & (gaps <= self.max_gap_minutes)
    edges = np.zeros(hr_covered.shape[0] + 1, np.int64)
    np.add.at(edges, idx[:-1][fill] + 1, 1)
    np.add.at(edges, idx[1:][fill], -1)
    worn |= np.cumsum(edges[:-1]) > 0
    return worn


def spread(start: np.ndarray, end: np.ndarray, value: np.ndarray, semantics: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per covered minute: (sample index, UTC minute, contribution) of samples in integer seconds.

  Counts contribute value * overlap / duration (the whole value for an
  instantaneous sample), rates their value.
  """
  start, end = np.asarray(start, np.int64), np.asarray(end, np.int64)
  value = np.asarray(value, np.float64)
  first = start // 60
  last = np.where(end > start, (end - 1) // 60, first)
  n = last - first + 1
  sample = np.repeat(np.arange(start.size), n)
  offsets = np.cumsum(n) - n
  minute = first[sample] + np.arange(sample.size) - offsets[sample]
  if semantics == RATE:
    return sample, minute, value[sample]
  s, e = start[sample], end[sample]
  overlap = np.minimum(e, minute * 60 + 60) - np.maximum(s, minute * 60)
  duration = e - s
  share = np.where(duration > 0, overlap / np.maximum(duration, 1), 1.0)
  return sample, minute, value[sample] * share


class MinuteAccumulator:
  """Per-quantity sums over UTC minutes, one source per minute (the best-ranked one).

  Arrays grow to cover every minute seen (memory follows the time span, not
  the number of samples): per quantity and minute the winning source id
  (int32), the sum of contributions (float32) and the number of samples
  (uint16: up to 65,535 samples of one quantity in a minute).
  """

  def __init__(self, semantics: tuple[str, ...]):
    self.semantics = semantics
    self.origin = 0  # UTC minute of index 0 (midnight UTC).
    q = len(semantics)
    self.source = np.full((q, 0), NO_SOURCE, np.int32)
    self.total = np.zeros((q, 0), np.float32)
    self.count = np.zeros((q, 0), np.uint16)

  @property
  def size(self) -> int:
    return self.source.shape[1]

  def ensure(self, lo: int, hi: int) -> None:
    """Grows the arrays to cover UTC minutes [lo, hi] (whole UTC days, with slack)."""
    if self.size and self.origin <= lo and hi < self.origin + self.size:
      return
    if not self.size:
      new_lo = lo // MINUTES_PER_DAY * MINUTES_PER_DAY
      new_hi = (hi // MINUTES_PER_DAY + 1) * MINUTES_PER_DAY
    else:
      old_hi = self.origin + self.size
      slack = max(self.size // 4, 30 * MINUTES_PER_DAY)
      new_lo = min(self.origin, lo // MINUTES_PER_DAY * MINUTES_PER_DAY - (
          slack if lo < self.origin else 0))
      new_hi = max(old_hi, (hi // MINUTES_PER_DAY + 1) * MINUTES_PER_DAY + (
          slack if hi >= old_hi else 0))
    q = len(self.semantics)
    shift = self.origin - new_lo if self.size else 0
    for name, fill in (("source", NO_SOURCE), ("total", 0), ("count", 0)):
      old = getattr(self, name)
      new = np.full((q, new_hi - new_lo), fill, old.dtype)
      new[:, shift:shift + old.shape[1]] = old
      setattr(self, name, new)
      del old, new  # One array at a time: the old one is freed before the next grows.
    self.origin = new_lo

  def add(self, q: int, start, end, value, source, rank: np.ndarray) -> None:
    """Adds samples of quantity `q` (seconds since the epoch, UTC; source ids).

    `rank[source id]` orders the sources (lower is better); it must come from
    one fixed total order over source ids on every call.
    """
    source = np.asarray(source, np.int64)
    if source.size == 0:
      return
    sample, minute, contrib = spread(start, end, value, self.semantics[q])
    self.ensure(int(minute.min()), int(minute.max()))
    idx = minute - self.origin
    r = rank[source[sample]]
    uniq, inv = np.unique(idx, return_inverse=True)
    best = np.full(uniq.size, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(best, inv, r)
    held = self.source[q, uniq]
    held_rank = np.where(held >= 0, rank[np.maximum(held, 0)], np.iinfo(np.int64).max)
    better = best < held_rank
    if better.any():
      by_rank = np.argsort(rank)  # rank -> source id (ranks are a permutation of 0..S-1).
      u = uniq[better]
      self.source[q, u] = by_rank[best[better]]
      self.total[q, u] = 0
      self.count[q, u] = 0
    keep = r == np.minimum(best, held_rank)[inv]
    np.add.at(self.total[q], idx[keep], contrib[keep].astype(np.float32))
    np.add.at(self.count[q], idx[keep], 1)

  def covered(self, q: int) -> np.ndarray:
    return self.source[q] >= 0

  def values(self, q: int) -> np.ndarray:
    """float32[n]: the minute's value (count: sum, rate: mean), NaN where no sample covers it."""
    covered = self.covered(q)
    out = np.full(self.size, np.nan, np.float32)
    if self.semantics[q] == RATE:
      out[covered] = self.total[q, covered] / self.count[q, covered]
    else:
      out[covered] = self.total[q, covered]
    return out


class OffsetEvidence:
  """The UTC offsets samples were written with, to place UTC minutes on the local clock.

  Keeps, per UTC hour and offset, the first and last instant seen (memory
  follows the time span). Between two instants with different offsets the
  change is put at the first whole hour of the earlier offset's wall clock
  (where daylight-saving rules put it), at the latest at the later instant.
  """

  def __init__(self):
    self._seen: dict[tuple[int, int], list[int]] = {}

  def add(self, seconds, offsets) -> None:
    """Instants (seconds since the epoch, UTC) and their offsets (minutes east of UTC)."""
    seconds, offsets = np.asarray(seconds, np.int64), np.asarray(offsets, np.int64)
    if seconds.size == 0:
      return
    keys = (seconds // 3600) * 4096 + offsets + 2048
    order = np.argsort(keys, kind="stable")
    keys, seconds = keys[order], seconds[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    lo = np.minimum.reduceat(seconds, starts)
    hi = np.maximum.reduceat(seconds, starts)
    for k, a, b in zip(keys[starts].tolist(), lo.tolist(), hi.tolist()):
      key = (k // 4096, k % 4096 - 2048)
      entry = self._seen.get(key)
      if entry is None:
        self._seen[key] = [a, b]
      else:
        entry[0], entry[1] = min(entry[0], a), max(entry[1], b)

  def offsets(self, first_minute: int, n: int) -> np.ndarray:
    """int64[n]: the offset (minutes) in effect at each UTC minute from `first_minute`."""
    if not self._seen:
      raise ValueError("no timestamps to take UTC offsets from")
    points = sorted((t, off) for (_, off), ts in self._seen.items() for t in ts)
    changes, after = [], [points[0][1]]  # Change instants; the offset from each one on.
    for (t0, o0), (t1, o1) in zip(points[:-1], points[1:]):
      if o0 != o1:
        wall_hour = ((t0 + o0 * 60) // 3600 + 1) * 3600
        changes.append(min(wall_hour - o0 * 60, t1))
        after.append(o1)
    t = (first_minute + np.arange(n, dtype=np.int64)) * 60
    return np.asarray(after, np.int64)[np.searchsorted(changes, t, side="right")]


def to_wall_clock(subject_id: str, first_minute: int, offsets: np.ndarray, values: np.ndarray,
                  minute_labels: dict[str, np.ndarray] | None = None) -> SubjectTimeline | None:
  """Places UTC-minute rows on local calendar days: a SubjectTimeline, or None without data.

  values: float32[n, C] (NaN = unobserved) for UTC minutes first_minute ..
  first_minute + n - 1; offsets: int64[n] minutes east of UTC; minute_labels:
  name -> int64[n] (-1 = none). A local minute reached twice (clocks going
  back) keeps its first pass, filled in from later passes where that has no
  value; local minutes never reached stay unobserved.
  """
  labels = minute_labels or {}
  has_data = np.isfinite(values).any(axis=1)
  for lab in labels.values():
    has_data |= lab >= 0
  rows = np.flatnonzero(has_data)
  if rows.size == 0:
    return None
  lo, hi = rows[0], rows[-1] + 1
  local = first_minute + np.arange(lo, hi, dtype=np.int64) + offsets[lo:hi]
  running = np.maximum.accumulate(local)
  first_pass = np.concatenate([[True], local[1:] > running[:-1]])
  day0 = int(local.min()) // MINUTES_PER_DAY
  day1 = int(local.max()) // MINUTES_PER_DAY
  slot = local[first_pass] - day0 * MINUTES_PER_DAY
  n_slots = (day1 - day0 + 1) * MINUTES_PER_DAY
  later = np.flatnonzero(~first_pass)  # Rows of repeated local minutes, in UTC order.
  later_slot = local[later] - day0 * MINUTES_PER_DAY
  grid = np.full((n_slots, values.shape[1]), np.nan, np.float32)
  grid[slot] = values[lo:hi][first_pass]
  for row, s in zip(later + lo, later_slot):
    grid[s] = np.where(np.isnan(grid[s]), values[row], grid[s])
  tl = SubjectTimeline(subject_id, EPOCH + datetime.timedelta(days=day0), grid)
  for name, lab in labels.items():
    out = np.full(n_slots, -1, np.int64)
    out[slot] = lab[lo:hi][first_pass]
    for row, s in zip(later + lo, later_slot):
      if out[s] < 0:
        out[s] = lab[row]
    tl.minute_labels[name] = out
  return tl


def midpoint_minutes(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(sample index, minute) of the minutes whose midpoint (second 30) lies in [start, end).

  Labels (sleep stages) take the interval covering the middle of a minute.
  """
  start, end = np.asarray(start, np.int64), np.asarray(end, np.int64)
  first = (start - 30 + 59) // 60
  last = (end - 31) // 60
  n = np.maximum(last - first + 1, 0)
  sample = np.repeat(np.arange(start.size), n)
  offsets = np.cumsum(n) - n
  return sample, first[sample] + np.arange(sample.size) - offsets[sample]


class IssueLog:
  """Malformed input that was skipped: a count and the first examples (printed in the summary)."""

  def __init__(self, what: str, keep: int = 10):
    self.what, self.keep = what, keep
    self.count = 0
    self.examples: list[str] = []

  def add(self, message: str) -> None:
    self.count += 1
    if len(self.examples) < self.keep:
      self.examples.append(message)

  def notes(self) -> list[str]:
    if not self.count:
      return []
    more = f" (first {len(self.examples)} shown)" if self.count > len(self.examples) else ""
    return [f"{self.what}: {self.count} skipped{more}:"] + [f"  {m}" for m in self.examples]
