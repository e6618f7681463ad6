"""Named-channel inputs: a DataFrame or dict of named series placed at a model's channels.

A user's data carries channel names, not the model's channel order. Each input
name is matched to a model channel by name: exactly, then through the
registry (`channels.resolve_name`: case, spaces and the documented aliases,
e.g. "heart_rate" or "HKQuantityTypeIdentifierHeartRate" -> "hr"). A name
that matches no channel of the model is ignored and reported, never placed
elsewhere; two inputs naming the same channel are an error. Model channels
without an input stay unobserved (AIM masks them, as in pretraining).

Values are checked as pretraining data are (`record.sanitize`): a value
outside its channel's validity range (`channels.outside_valid_range`, the
ranges the model's dataset declared, e.g. hr 25..220 bpm) is unobserved, and
the report counts them per input (`ChannelReport.out_of_range`; lsm2.api logs
a warning), so `hr = 1e6` or `-50` never reaches the model as a heart rate.

Inputs:
  * pandas DataFrame with a DatetimeIndex: one column per channel, any span of
    minutes. Times are floored to the minute (rows in one minute averaged); a
    time-zone-aware index uses its local wall clock. Each calendar day with an
    observed value becomes one [1440, C] day; NaN and absent minutes are unobserved.
    The index must be minute data: a frame whose rows are all more than a
    minute apart (daily or hourly rows) is refused, naming the spacing, since
    placing a day's summary at one minute would pass it off as that minute's value.
  * dict name -> array [1440] (one day) or [N, 1440] (N days); NaN = unobserved.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lsm2 import errors
from lsm2.data.channels import Channel, normalize_name, outside_valid_range, resolve_name
from lsm2.data.record import MINUTES_PER_DAY


class NamedInputError(errors.Error, ValueError):
  """A named input that cannot be placed: the message names the input, value or spacing."""


@dataclasses.dataclass(frozen=True)
class ChannelReport:
  """How input names were placed: used (input -> model channel), ignored (input -> why), unobserved.

  out_of_range: input name -> how many of its values lay outside the channel's
  validity range and were made unobserved (only inputs with any).
  """
  used: dict[str, str]
  ignored: dict[str, str]
  unobserved: tuple[str, ...]
  days: tuple[str, ...] = ()  # ISO days of the output rows (DataFrame input).
  out_of_range: dict[str, int] = dataclasses.field(default_factory=dict)

  def __str__(self) -> str:
    lines = ["channels used: " + (", ".join(f"{k} -> {v}" if k != v else k
                                            for k, v in self.used.items()) or "none")]
    if self.ignored:
      lines.append("ignored: " + "; ".join(f"{k} ({why})" for k, why in self.ignored.items()))
    if self.unobserved:
      lines.append("model channels without input (unobserved, masked): "
                   + ", ".join(self.unobserved))
    if self.out_of_range:
      lines.append("values outside the channel's valid range (unobserved, masked): " + ", ".join(
          f"{k} {n} (of {self.used[k]})" if k != self.used[k] else f"{k} {n}"
          for k, n in self.out_of_range.items()))
    if self.days:
      lines.append(f"days: {len(self.days)} ({self.days[0]} .. {self.days[-1]})")
    return "\n".join(lines)


@dataclasses.dataclass
class NamedInput:
  """Inputs placed on the model's channel order."""
  signals: np.ndarray  # float32 [N, 1440, C], NaN where unobserved.
  observed: np.ndarray  # bool [N, 1440, C].
  report: ChannelReport
  single: bool  # One day given as dict of [1440] arrays.
  slots: dict[str, int]  # Used input name -> model channel index.


def is_named(data: Any) -> bool:
  """True for the inputs this module places (a DataFrame or a mapping of names)."""
  if isinstance(data, Mapping):
    return True
  try:
    import pandas as pd  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return isinstance(data, pd.DataFrame)


def match_channels(names: Sequence[str], model_channels: Sequence[str]
                   ) -> tuple[dict[str, int], dict[str, str]]:
  """(input name -> model channel index, ignored input name -> reason)."""
  index = {c: i for i, c in enumerate(model_channels)}
  normalized = {normalize_name(c): i for i, c in enumerate(model_channels)}
  slots, ignored, owner = {}, {}, {}
  for name in names:
    if not isinstance(name, str):
      raise TypeError(f"channel names must be strings, got {name!r}")
    registry = resolve_name(name)
    if name in index:
      i = index[name]
    elif normalize_name(name) in normalized:
      i = normalized[normalize_name(name)]
    elif registry in index:
      i = index[registry]
    else:
      ignored[name] = (f"registry channel {registry!r}, not a channel of this model"
                       if registry else "unknown channel name (not in the registry or its aliases)")
      continue
    if i in owner:
      raise NamedInputError(f"inputs {owner[i]!r} and {name!r} both name model channel "
                       f"{model_channels[i]!r}; give one of them")
    owner[i] = name
    slots[name] = i
  return slots, ignored


def channel_report(slots: Mapping[str, int], ignored: Mapping[str, str],
                   model_channels: Sequence[str], days: Sequence[str] = (),
                   out_of_range: Mapping[str, int] | None = None) -> ChannelReport:
  """The report of a placement (`match_channels` output) on `model_channels`."""
  used = {n: model_channels[i] for n, i in slots.items()}
  missing = tuple(c for i, c in enumerate(model_channels) if i not in set(slots.values()))
  return ChannelReport(used, ignored, missing, tuple(days), dict(out_of_range or {}))


def _numeric(values, name: str) -> np.ndarray:
  try:
    return np.asarray(values, np.float32)
  except (TypeError, ValueError):
    raise NamedInputError(f"input {name!r}: values must be numbers (NaN = unobserved)") from None


def place(data, model_channels: Sequence[Channel], time_steps: int = MINUTES_PER_DAY
          ) -> NamedInput:
  """Places a DataFrame or dict of named series at the model's channels (see the module docstring).

  `model_channels`: the model's channels in order, with the validity ranges of its dataset.
  """
  if time_steps != MINUTES_PER_DAY:
    raise NamedInputError(f"named inputs are minute-level days of {MINUTES_PER_DAY} minutes; "
                          f"this model takes {time_steps} time steps (pass arrays instead)")
  if isinstance(data, Mapping):
    return _place_dict(data, tuple(model_channels))
  return _place_frame(data, tuple(model_channels))


def _in_range(signals: np.ndarray, channels: Sequence[Channel], slots: Mapping[str, int]
              ) -> tuple[np.ndarray, dict[str, int]]:
  """(observed: finite and inside the validity range, input name -> values outside it)."""
  finite = np.isfinite(signals)
  outside = finite & outside_valid_range(signals, channels)
  counts = {name: int(np.count_nonzero(outside[..., i])) for name, i in slots.items()}
  return finite & ~outside, {name: n for name, n in counts.items() if n}


def _place_dict(data: Mapping, channels: Sequence[Channel]) -> NamedInput:
  names = [c.name for c in channels]
  slots, ignored = match_channels(list(data), names)
  shapes = {name: np.shape(data[name]) for name in slots}
  if not slots:
    raise NamedInputError(f"no input names a channel of this model ({names}): ignored {ignored}")
  shape = next(iter(shapes.values()))
  if len(set(shapes.values())) > 1 or shape[-1:] != (MINUTES_PER_DAY,) or len(shape) > 2:
    raise NamedInputError(f"dict inputs must all be [{MINUTES_PER_DAY}] or "
                          f"[N, {MINUTES_PER_DAY}] arrays of one shape, got {shapes}")
  single = len(shape) == 1
  n = 1 if single else shape[0]
  signals = np.full((n, MINUTES_PER_DAY, len(channels)), np.nan, np.float32)
  for name, i in slots.items():
    signals[:, :, i] = _numeric(data[name], name).reshape(n, MINUTES_PER_DAY)
  observed, outside = _in_range(signals, channels, slots)
  return NamedInput(signals, observed,
                    channel_report(slots, ignored, names, out_of_range=outside), single, slots)


def _check_minutes(index) -> None:
  """Refuses an index whose rows are all more than a minute apart (not minute data)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  times = index.unique().sort_values()
  if len(times) < 2:
    return  # One time: nothing tells its resolution.
  gaps = times[1:] - times[:-1]
  i = int(np.argmin(gaps))
  if gaps[i] > pd.Timedelta(minutes=1):
    raise NamedInputError(
        f"the DataFrame's rows are at least {gaps[i]} apart (e.g. {times[i]} and "
        f"{times[i + 1]}): named inputs are minute data, and daily or hourly rows would each be "
        "taken as one minute's value. For minute readings that are merely sparse, pass "
        "df.resample('min').mean() (absent minutes stay unobserved)")


def _place_frame(df, channels: Sequence[Channel]) -> NamedInput:
  import pandas as pd  # pylint: disable=g-import-not-at-top
  names = [c.name for c in channels]
  if not isinstance(df.index, pd.DatetimeIndex):
    raise NamedInputError(f"a DataFrame input needs a DatetimeIndex of minutes, got "
                          f"{type(df.index).__name__}")
  if df.columns.duplicated().any():
    raise NamedInputError(f"DataFrame columns {list(df.columns[df.columns.duplicated()])} repeat")
  labels = {str(c): c for c in df.columns}  # Matched by name as text.
  slots, ignored = match_channels(list(labels), names)
  if not slots:
    raise NamedInputError(f"no column names a channel of this model ({names}): "
                          f"ignored {ignored}")
  index = df.index.tz_localize(None) if df.index.tz is not None else df.index
  _check_minutes(index)
  cols = {}
  for name in slots:
    column = df[labels[name]]
    if not (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)):
      converted = pd.to_numeric(column, errors="coerce")
      bad = column[converted.isna() & column.notna()]
      if len(bad):
        raise NamedInputError(f"column {name!r} holds non-numeric value {bad.iloc[0]!r}")
      column = converted
    cols[name] = column.astype(np.float64).to_numpy(copy=True)  # The caller's frame stays as is.
  # Readings are checked before a minute's rows are averaged: one bad reading is dropped,
  # the good ones of its minute kept.
  outside = {}
  for name, values in cols.items():
    bad = np.isfinite(values) & outside_valid_range(values[:, None], [channels[slots[name]]])[:, 0]
    if bad.any():
      values[bad] = np.nan
      outside[name] = int(np.count_nonzero(bad))
  minute = index.floor("min")
  frame = pd.DataFrame(cols, index=minute).groupby(level=0).mean()
  values = frame.to_numpy(np.float32)
  has = np.isfinite(values).any(axis=1)
  frame, values = frame[has], values[has]
  if not len(frame):
    raise NamedInputError(f"the DataFrame has no observed value in columns {list(slots)}")
  day = frame.index.normalize()
  days = day.unique()
  row = days.get_indexer(day)
  minute_of_day = ((frame.index - day) // pd.Timedelta(minutes=1)).to_numpy()
  signals = np.full((len(days), MINUTES_PER_DAY, len(channels)), np.nan, np.float32)
  targets = np.array([slots[n] for n in frame.columns])
  signals[row[:, None], minute_of_day[:, None], targets[None, :]] = values
  report = channel_report(slots, ignored, names, [d.date().isoformat() for d in days], outside)
  return NamedInput(signals, np.isfinite(signals), report, False, slots)


def place_mask(mask, named: NamedInput) -> np.ndarray:
  """bool [N, 1440, C]: a `mask` shaped like the named input (same names, index or shapes) placed alike."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  out = np.zeros(named.observed.shape, bool)
  unknown = [n for n in (mask if isinstance(mask, Mapping) else mask.columns) if n not in named.slots]
  if unknown:
    raise NamedInputError(f"mask names {unknown} are not inputs placed at a model channel "
                     f"(placed: {list(named.slots)})")
  if isinstance(mask, Mapping):
    for name, values in mask.items():
      values = np.asarray(values)
      if values.dtype != bool or values.size != out.shape[0] * MINUTES_PER_DAY:
        raise NamedInputError(f"mask {name!r} must be bool shaped like its input, got {values.dtype} "
                         f"{values.shape}")
      out[:, :, named.slots[name]] = values.reshape(out.shape[:2])
    return out
  if not isinstance(mask, pd.DataFrame) or not isinstance(mask.index, pd.DatetimeIndex):
    raise NamedInputError("the mask of a DataFrame input must be a bool DataFrame with a DatetimeIndex")
  index = mask.index.tz_localize(None) if mask.index.tz is not None else mask.index
  minute = index.floor("min")
  days = pd.DatetimeIndex([pd.Timestamp(d) for d in named.report.days])
  row = days.get_indexer(minute.normalize())
  if (row < 0).any():
    raise NamedInputError(f"mask time {index[row < 0][0]} is not on a day of the input "
                     f"({named.report.days[0]} .. {named.report.days[-1]} with data)")
  m = ((minute - minute.normalize()) // pd.Timedelta(minutes=1)).to_numpy()
  for name in mask.columns:
    values = mask[name].to_numpy()
    if values.dtype != bool:
      raise NamedInputError(f"mask column {name!r} must be bool, got {values.dtype}")
    out[row[values], m[values], named.slots[name]] = True
  return out
