"""The channel registry: what each minute-level feature is, its sensor group, unit and validity range.

`DEFAULT_CHANNELS` are the 26 LSM-2 features in the order of the method summary
(docs/method.md). A dataset declares its own channel
set in its metadata.json (the real datasets here have 1-2 channels); the
registry below lists every channel the built-in generator and converters know.
Values outside a channel's validity range are treated as unobserved.

Every registry channel has a one-line meaning (DESCRIPTIONS); ALIASES map the
names devices, exports and users give channels to registry names
(`resolve_name`), so named inputs reach the right channel of a model; and
DEVICE_PROFILES list the channels a device records.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

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
# Channels of consumer-device exports (converters apple_health, fitbit_takeout).
DEVICE_CHANNELS: tuple[Channel, ...] = (
    _ch("active_energy", "other", "kcal/min", 0, 60),
    _ch("total_energy", "other", "kcal/min", 0, 60),
    _ch("hrv_sdnn", "ppg", "ms", 0, 500),
    _ch("respiratory_rate", "other", "breaths/min", 2, 60),
)

# What each registry channel measures (one line per channel; docs/data.md shows the table).
DESCRIPTIONS: dict[str, str] = {
    "hr": "heart rate, mean over the minute",
    "hrv_shannon_entropy_rr": "Shannon entropy of the minute's RR intervals",
    "hrv_shannon_entropy_rrd": "Shannon entropy of the successive RR-interval differences",
    "rmssd_percentile_0595": "RMSSD of the RR intervals between their 5th and 95th percentile",
    "sdnn_percentile_0595": "SDNN of the RR intervals between their 5th and 95th percentile",
    "hrv_percent_good": "share of RR intervals of good quality",
    "hrv_rr_80th_percentile_mean": "mean of the RR intervals above their 80th percentile",
    "hrv_rr_20th_percentile_mean": "mean of the RR intervals below their 20th percentile",
    "hrv_rr_median": "median RR interval",
    "hr_at_rest_mean": "resting heart rate estimate",
    "eda_level_real": "skin conductance level (tonic EDA)",
    "leads_contact_counts": "EDA electrode contact counts",
    "ceda_slope_real_micro_siemens": "slope of the continuous EDA signal",
    "steps": "steps taken in the minute",
    "jerk_auto": "autocorrelation of the accelerometer jerk",
    "log_energy": "log of the accelerometer signal energy",
    "covariance": "covariance between accelerometer axes",
    "log_energy_ratio": "log ratio of accelerometer energy between axes",
    "zero_crossing_std": "standard deviation of accelerometer zero crossings",
    "zero_crossing_avg": "mean accelerometer zero crossings",
    "axis_mean": "mean accelerometer axis value (wrist orientation)",
    "altim_std": "standard deviation of the altimeter",
    "kurtosis": "kurtosis of the accelerometer magnitude",
    "sleep_coefficient": "movement-based sleep likelihood",
    "wrist_temperatures": "wrist skin temperature",
    "skin_temperature_slope": "slope of the wrist skin temperature",
    "activity": "Actiwatch activity counts in the minute",
    "intensity": "Fitbit activity intensity level (0 sedentary .. 3 very active)",
    "active_energy": "active energy burned in the minute (excludes basal energy)",
    "total_energy": "total energy burned in the minute (basal + active)",
    "hrv_sdnn": "heart-rate variability, SDNN of the RR intervals of a short recording",
    "respiratory_rate": "breaths per minute",
}


def _build_registry(groups: Iterable[tuple[Channel, ...]]) -> dict[str, Channel]:
  registry: dict[str, Channel] = {}
  for chans in groups:
    for c in chans:
      if c.name in registry and registry[c.name] != c:
        raise ValueError(f"conflicting registry entries for channel {c.name!r}")
      registry[c.name] = c
  return registry


KNOWN_CHANNELS: dict[str, Channel] = _build_registry(
    (DEFAULT_CHANNELS, ACTIWATCH_CHANNELS, FITBIT_CHANNELS, DEVICE_CHANNELS))
APPLE_HEALTH_CHANNELS: tuple[Channel, ...] = tuple(
    KNOWN_CHANNELS[n] for n in ("hr", "steps", "active_energy", "hrv_sdnn", "respiratory_rate"))
FITBIT_TAKEOUT_CHANNELS: tuple[Channel, ...] = tuple(
    KNOWN_CHANNELS[n] for n in ("hr", "steps", "total_energy"))

# Other names of registry channels, as spelt by devices, exports and users. Names are
# matched after `normalize_name` (lower case, spaces and hyphens as underscores).
ALIASES: dict[str, str] = {
    "heart_rate": "hr", "heartrate": "hr", "bpm": "hr", "pulse": "hr",
    "hkquantitytypeidentifierheartrate": "hr",
    "step_count": "steps", "stepcount": "steps", "hkquantitytypeidentifierstepcount": "steps",
    "active_energy_burned": "active_energy", "active_calories": "active_energy",
    "hkquantitytypeidentifieractiveenergyburned": "active_energy",
    "calories": "total_energy", "total_calories": "total_energy",
    "energy_expenditure": "total_energy",
    "sdnn": "hrv_sdnn", "heart_rate_variability_sdnn": "hrv_sdnn",
    "hkquantitytypeidentifierheartratevariabilitysdnn": "hrv_sdnn",
    "breathing_rate": "respiratory_rate", "resp_rate": "respiratory_rate",
    "hkquantitytypeidentifierrespiratoryrate": "respiratory_rate",
    "activity_counts": "activity",
    "wrist_temperature": "wrist_temperatures", "skin_temperature": "wrist_temperatures",
    "eda": "eda_level_real", "skin_conductance": "eda_level_real",
}

# Channel sets of devices: what a model can expect from data a user holds (the
# evaluation's device-subset robustness entries restrict inputs to these).
DEVICE_PROFILES: dict[str, tuple[str, ...]] = {
    "apple_watch_basic": ("hr", "steps", "active_energy"),
    "apple_watch": tuple(c.name for c in APPLE_HEALTH_CHANNELS),
    "fitbit_takeout": tuple(c.name for c in FITBIT_TAKEOUT_CHANNELS),
    "fitbit_fitabase": tuple(c.name for c in FITBIT_CHANNELS),
    "actiwatch": tuple(c.name for c in ACTIWATCH_CHANNELS),
    "phone": ("steps",),
}


def normalize_name(name: str) -> str:
  """The form names are matched in: lower case, spaces and hyphens as underscores."""
  return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def resolve_name(name: str) -> str | None:
  """The registry name of a channel name or alias (see ALIASES); None if unknown."""
  key = normalize_name(name)
  if key in KNOWN_CHANNELS:
    return key
  return ALIASES.get(key)


def profile_channels(profile: str) -> tuple[str, ...]:
  """The registry channel names of a device profile (DEVICE_PROFILES); unknown names raise."""
  if profile not in DEVICE_PROFILES:
    raise ValueError(f"unknown device profile {profile!r}; known profiles: "
                     + ", ".join(f"{n} ({'+'.join(c)})" for n, c in DEVICE_PROFILES.items()))
  return DEVICE_PROFILES[profile]


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


def outside_valid_range(values: np.ndarray, channels: Sequence[Channel]) -> np.ndarray:
  """bool like `values` (channels on the last axis): True where a value lies outside its
  channel's [valid_min, valid_max].

  The one validity rule for every path into a model: `record.sanitize` (what
  datasets store) and named inference (lsm2.data.named) mask these values
  alike, so a model never sees at inference what its training data excluded.
  NaN is never outside (it is unobserved already); infinities are.
  """
  lo = np.array([c.valid_min for c in channels], np.float32)
  hi = np.array([c.valid_max for c in channels], np.float32)
  with np.errstate(invalid="ignore"):
    return (values < lo) | (values > hi)


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
