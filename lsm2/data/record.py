"""One subject-day: the unit every reader, writer, converter and the generator exchange.

A record holds `signals: float32[1440, C]` and `observed: bool[1440, C]` (True
where the minute was really measured), the subject id, the ISO date of the day
and label values (one number per subject/day label, an int64[1440] array per
minute label). `sanitize` is the single gate every record passes before it
is written: it rejects malformed arrays with a clear error and turns
non-finite and out-of-range values into unobserved minutes (counting them), so
that stored values at unobserved minutes are always a finite 0.
"""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Float, Int

from lsm2.data.channels import Channel, outside_valid_range

MINUTES_PER_DAY = 1440


@dataclasses.dataclass
class DayRecord:
  """One subject-day.

  Labels: class index (-1 = missing), float (NaN = missing) or, for minute
  labels, int64[1440] class indices (-1 = no label at that minute).
  """
  subject_id: str
  day: str
  signals: Float[np.ndarray, "t c"]
  observed: Bool[np.ndarray, "t c"]
  labels: dict[str, float | int | Int[np.ndarray, "t"]] = dataclasses.field(default_factory=dict)

  @property
  def missing_fraction(self) -> float:
    return 1.0 - float(np.count_nonzero(self.observed)) / self.observed.size


@dataclasses.dataclass
class SanitizeCounts:
  """Values turned into unobserved minutes by `sanitize`."""
  nonfinite: int = 0
  out_of_range: int = 0

  def add(self, other: SanitizeCounts) -> None:
    self.nonfinite += other.nonfinite
    self.out_of_range += other.out_of_range


def check_day(day: str, where: str = "") -> str:
  """Returns `day` if it is an ISO date string (YYYY-MM-DD), else raises."""
  try:
    if not isinstance(day, str) or len(day) != 10:
      raise ValueError
    datetime.date.fromisoformat(day)
  except ValueError:
    raise ValueError(f"{where}day must be an ISO date 'YYYY-MM-DD', got {day!r}") from None
  return day


def sanitize(record: DayRecord, channels: Sequence[Channel],
             where: str = "") -> tuple[DayRecord, SanitizeCounts]:
  """Validates a record and returns a clean copy plus what was masked.

  Raises ValueError/TypeError naming the record (and `where`, e.g. a file) for a
  wrong shape or dtype, a bad subject id or date. Non-finite values and values
  outside the channel's validity range at observed minutes become unobserved.
  """
  where = f"{where}: " if where else ""
  where = f"{where}record ({record.subject_id!r}, {record.day!r}): "
  if not isinstance(record.subject_id, str) or not record.subject_id:
    raise ValueError(f"{where}subject_id must be a non-empty string")
  check_day(record.day, where)
  c = len(channels)
  sig, obs = record.signals, record.observed
  if not isinstance(sig, np.ndarray) or not isinstance(obs, np.ndarray):
    raise TypeError(f"{where}signals and observed must be numpy arrays, got "
                    f"{type(sig).__name__} and {type(obs).__name__}")
  if sig.shape != (MINUTES_PER_DAY, c):
    raise ValueError(f"{where}signals has shape {sig.shape}, expected ({MINUTES_PER_DAY}, {c}) "
                     f"for channels {[ch.name for ch in channels]}")
  if obs.shape != sig.shape:
    raise ValueError(f"{where}observed has shape {obs.shape}, expected {sig.shape}")
  if not np.issubdtype(sig.dtype, np.floating):
    raise TypeError(f"{where}signals must be a floating-point array, got dtype {sig.dtype}")
  if obs.dtype != np.bool_:
    raise TypeError(f"{where}observed must be a bool array, got dtype {obs.dtype}")

  signals = sig.astype(np.float32)  # Always a copy: the caller's arrays stay untouched.
  observed = obs.copy()
  counts = SanitizeCounts()
  finite = np.isfinite(signals)
  bad = observed & ~finite
  counts.nonfinite = int(np.count_nonzero(bad))
  observed &= finite
  outside = observed & outside_valid_range(signals, channels)
  counts.out_of_range = int(np.count_nonzero(outside))
  observed &= ~outside
  signals[~observed] = 0.0
  return DayRecord(record.subject_id, record.day, signals, observed, dict(record.labels)), counts
