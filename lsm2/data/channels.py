"""The channel registry: what each minute-level feature is, its sensor group, unit and validity range.

`DEFAULT_CHANNELS` are the 26 LSM-2 features in the order of the method spec
(../shared/spec/LSM2_METHOD.md, section 1). A dataset declares its own channel
set in its metadata.json (the real datasets here have 1-2 channels); the
registry below lists every channel the built-in generator and converters know.
Values outside a channel's validity range are treated as unobserved.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

SENSOR_GROUPS = ("ppg", "eda", "accel", "temp", "other")


@dataclasses.dataclass(frozen=True)
class Channel:
  """One minute-level feature."""
  name: str
  group: str
  unit: str
  valid_min: float
  valid_max: float

  def __post_init__(self):
    if not self.name or not isinstance(self.name, str):
      raise ValueError(f"channel name must be a non-empty string, got {self.name!r}")
    if self.group not in SENSOR_GROUPS:
      raise ValueError(f"channel {self.name!r}: unknown sensor group {self.group!r}; "
                       f"expected one of {SENSOR_GROUPS}")
    if not float(self.valid_min) < float(self.valid_max):
      raise ValueError(f"channel {self.name!r}: valid_min={self.valid_min} must be < "
                       f"valid_max={self.valid_max}")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Channel:
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = fields - set(d)
    unknown = set(d) - fields
    if missing or unknown:
      raise ValueError(f"channel entry {dict(d)!r}: missing fields {sorted(missing)}, "
                       f"unknown fields {sorted(unknown)}")
    return cls(name=str(d["name"]), group=str(d["group"]), unit=str(d["unit"]),
               valid_min=float(d["valid_min"]), valid_max=float(d["valid_max"]))

  @classmethod
  def parse_spec(cls, spec: str) -> Channel:
    """Parses a command-line declaration `NAME:GROUP:UNIT:MIN:MAX`."""
    parts = spec.split(":")
    if len(parts) != 5:
      raise ValueError(f"channel declaration {spec!r} must be NAME:GROUP:UNIT:MIN:MAX")
    name, group, unit, lo, hi = parts
    try:
      return cls(name, group, unit, float(lo), float(hi))
    except ValueError as e:
      raise ValueError(f"channel declaration {spec!r}: {e}") from None


def _ch(name: str, group: str, unit: str, lo: float, hi: float) -> Channel:
  return Channel(name, group, unit, float(lo), float(hi))


DEFAULT_CHANNELS: tuple[Channel, ...] = (
    # PPG (10).
    _ch("hr", "ppg", "bpm", 25, 220),
    _ch("hrv_shannon_entropy_rr", "ppg", "bits", 0, 10),
    _ch("hrv_shannon_entropy_rrd", "ppg", "bits", 0, 10),
    _ch("rmssd_percentile_0595", "ppg", "ms", 0, 300),
    _ch("sdnn_percentile_0595", "ppg", "ms", 0, 400),
    _ch("hrv_percent_good", "ppg", "%", 0, 100),
    _ch("hrv_rr_80th_percentile_mean", "ppg", "ms", 250, 2500),
    _ch("hrv_rr_20th_percentile_mean", "ppg", "ms", 250, 2500),
    _ch("hrv_rr_median", "ppg", "ms", 250, 2500),
    _ch("hr_at_rest_mean", "ppg", "bpm", 25, 160),
    # EDA (3).
    _ch("eda_level_real", "eda", "uS", 0, 100),
    _ch("leads_contact_counts", "eda", "count/min", 0, 100),
    _ch("ceda_slope_real_micro_siemens", "eda", "uS/min", -50, 50),
    # Accelerometer (11).
    _ch("steps", "accel", "steps/min", 0, 300),
    _ch("jerk_auto", "accel", "g/s", 0, 50),
    _ch("log_energy", "accel", "log g^2", -20, 20),
    _ch("covariance", "accel", "g^2", -10, 10),
    _ch("log_energy_ratio", "accel", "log", -20, 20),
    _ch("zero_crossing_std", "accel", "crossings", 0, 1000),
    _ch("zero_crossing_avg", "accel", "crossings", 0, 1000),
    _ch("axis_mean", "accel", "g", -2, 2),
    _ch("altim_std", "accel", "m", 0, 100),
    _ch("kurtosis", "accel", "1", -3, 1000),
    _ch("sleep_coefficient", "accel", "1", 0, 100),
    # Temperature (2).
    _ch("wrist_temperatures", "temp", "degC", 15, 45),
    _ch("skin_temperature_slope", "temp", "degC/min", -5, 5),
)

# Channels of the real-data converters (lsm2.data.convert).
ACTIWATCH_CHANNELS: tuple[Channel, ...] = (
    _ch("activity", "accel", "counts/min", 0, 50_000),)
FITBIT_CHANNELS: tuple[Channel, ...] = (
    _ch("steps", "accel", "steps/min", 0, 300),
    _ch("intensity", "accel", "level 0-3", 0, 3),
)


def _build_registry(groups: Iterable[tuple[Channel, ...]]) -> dict[str, Channel]:
  registry: dict[str, Channel] = {}
  for chans in groups:
    for c in chans:
      if c.name in registry and registry[c.name] != c:
        raise ValueError(f"conflicting registry entries for channel {c.name!r}")
      registry[c.name] = c
  return registry


KNOWN_CHANNELS: dict[str, Channel] = _build_registry(
    (DEFAULT_CHANNELS, ACTIWATCH_CHANNELS, FITBIT_CHANNELS))


def get_channel(name: str, extra: Mapping[str, Channel] | None = None) -> Channel:
  """Looks a channel up by name in `extra`, then the registry; unknown names are an error."""
  if extra and name in extra:
    return extra[name]
  if name in KNOWN_CHANNELS:
    return KNOWN_CHANNELS[name]
  known = sorted(set(KNOWN_CHANNELS) | set(extra or {}))
  raise ValueError(f"unknown channel {name!r}; known channels: {', '.join(known)}. "
                   "Declare a new one as NAME:GROUP:UNIT:MIN:MAX "
                   f"(groups: {', '.join(SENSOR_GROUPS)}).")


def check_channel_set(channels: Iterable[Channel]) -> tuple[Channel, ...]:
  """Validates a dataset's channel list: non-empty, Channel objects, unique names."""
  channels = tuple(channels)
  if not channels:
    raise ValueError("a dataset needs at least one channel")
  seen: set[str] = set()
  for c in channels:
    if not isinstance(c, Channel):
      raise TypeError(f"expected Channel, got {type(c).__name__}: {c!r}")
    if c.name in seen:
      raise ValueError(f"duplicate channel name {c.name!r}")
    seen.add(c.name)
  return channels
