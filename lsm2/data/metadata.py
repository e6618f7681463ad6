"""metadata.json: what a dataset directory holds, validated against its shards; normalization.

A dataset directory is `metadata.json` plus shard files (lsm2.data.shards).
The metadata lists the channels, per-channel normalization statistics computed
on the training split only, the known observation noise (synthetic data), the
shard files of every split with their record counts and byte sizes, the
subjects of every split (splits are subject-disjoint), label definitions and a
missingness summary. `load_metadata` refuses a directory whose shards do not
match (missing or extra files, other sizes, wrong names, shared subjects).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from etils import epath
import numpy as np
from jaxtyping import Bool, Float

from lsm2 import storage
from lsm2.data.channels import Channel, check_channel_set
from lsm2.data.record import MINUTES_PER_DAY
from lsm2.data.shards import FORMATS, check_array_record_is_local, parse_shard_filename

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
# Where lsm2.data.writer stages a dataset before it replaces the one in DIR.
STAGING_DIR = ".lsm2-staging"
CLIP = 5.0  # Normalized values are clipped to [-CLIP, CLIP], as in the reference.
LABEL_KINDS = ("binary", "categorical", "regression")
LABEL_LEVELS = ("subject", "day", "minute")


class MetadataError(ValueError):
  """metadata.json is missing, malformed or does not match the shard files."""


@dataclasses.dataclass
class LabelSpec:
  """A label stored with every record as `label/NAME`.

  binary/categorical values are class indices into `classes` (-1 = missing);
  regression values are floats (NaN = missing). Subject-level labels repeat
  the subject's value in each of its day records. Minute-level labels
  (binary/categorical only) are int64[1440] class indices, one per minute of
  the day, -1 where the minute has no label.
  """
  name: str
  kind: str
  level: str
  classes: tuple[str, ...] = ()

  def __post_init__(self):
    self.classes = tuple(str(c) for c in self.classes)
    if self.kind not in LABEL_KINDS:
      raise ValueError(f"label {self.name!r}: kind must be one of {LABEL_KINDS}, got {self.kind!r}")
    if self.level not in LABEL_LEVELS:
      raise ValueError(f"label {self.name!r}: level must be one of {LABEL_LEVELS}, "
                       f"got {self.level!r}")
    if self.kind == "binary" and len(self.classes) != 2:
      raise ValueError(f"label {self.name!r}: a binary label needs 2 class names, "
                       f"got {self.classes}")
    if self.kind == "categorical" and len(self.classes) < 2:
      raise ValueError(f"label {self.name!r}: a categorical label needs >= 2 classes")
    if self.kind == "regression" and self.classes:
      raise ValueError(f"label {self.name!r}: a regression label has no classes")
    if self.level == "minute" and self.kind == "regression":
      raise ValueError(f"label {self.name!r}: a minute-level label must be binary or "
                       "categorical (class indices per minute)")

  def check_value(self, value: Any, where: str = "") -> float | int | np.ndarray:
    """Returns the value as stored (int index, float or int64[1440] copy) or raises naming it."""
    if self.level == "minute":
      return self._check_minutes(value, where)
    if self.kind == "regression":
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{where}label {self.name!r}: regression value must be a number, "
                         f"got {value!r}")
      value = float(value)
      if math.isinf(value):
        raise ValueError(f"{where}label {self.name!r}: value {value} is not finite "
                         "(use NaN for a missing value)")
      return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"{where}label {self.name!r}: {self.kind} value must be a class index, "
                       f"got {value!r}")
    value = int(value)
    if not -1 <= value < len(self.classes):
      raise ValueError(f"{where}label {self.name!r}: class index {value} outside "
                       f"[-1, {len(self.classes)}) for classes {self.classes}")
    return value

  def _check_minutes(self, value: Any, where: str) -> np.ndarray:
    if (not isinstance(value, np.ndarray) or value.shape != (MINUTES_PER_DAY,)
        or not np.issubdtype(value.dtype, np.integer)):
      got = (f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray)
             else repr(value) if np.isscalar(value) else type(value).__name__)
      raise ValueError(f"{where}label {self.name!r}: a minute-level label must be an integer "
                       f"array of shape ({MINUTES_PER_DAY},) (class index per minute, -1 = none), "
                       f"got {got}")
    bad = np.flatnonzero((value < -1) | (value >= len(self.classes)))
    if bad.size:
      raise ValueError(f"{where}label {self.name!r}: class index {value[bad[0]]} at minute "
                       f"{bad[0]} ({bad.size} minute(s) in all) outside [-1, {len(self.classes)}) "
                       f"for classes {self.classes}")
    return value.astype(np.int64)

  def to_json(self) -> dict[str, Any]:
    return {"kind": self.kind, "level": self.level, "classes": list(self.classes)}


@dataclasses.dataclass
class DatasetMetadata:
  """The parsed metadata.json of a dataset directory."""
  channels: tuple[Channel, ...]
  norm_mean: Float[np.ndarray, "c"]
  norm_std: Float[np.ndarray, "c"]
  noise_std: Float[np.ndarray, "c"] | None
  splits: dict[str, list[str]]
  record_counts: dict[str, int]
  labels: dict[str, LabelSpec]
  missingness: dict[str, Any]
  format: str = "tfrecord"
  shard_records: dict[str, int] = dataclasses.field(default_factory=dict)
  shard_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
  subjects: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  sanitized: dict[str, int] = dataclasses.field(default_factory=dict)
  source: dict[str, Any] = dataclasses.field(default_factory=dict)
  data_dir: epath.Path | None = None

  @property
  def num_channels(self) -> int:
    return len(self.channels)

  @property
  def channel_names(self) -> tuple[str, ...]:
    return tuple(c.name for c in self.channels)

  def shard_paths(self, split: str) -> list[epath.Path]:
    if split not in self.splits:
      raise KeyError(f"split {split!r} not in dataset {self.data_dir} "
                     f"(splits: {sorted(self.splits)})")
    if self.data_dir is None:
      raise ValueError("metadata was not loaded from a directory")
    return [self.data_dir / f for f in self.splits[split]]

  def to_json(self) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "format": self.format,
        "minutes_per_day": 1440,
        "channels": [c.to_json() for c in self.channels],
        "normalization": {"computed_on": "train", "mean": _floats(self.norm_mean),
                          "std": _floats(self.norm_std)},
        "noise_std": None if self.noise_std is None else _floats(self.noise_std),
        "splits": self.splits,
        "record_counts": self.record_counts,
        "shards": {f: {"records": self.shard_records[f], "bytes": self.shard_bytes[f]}
                   for files in self.splits.values() for f in files},
        "subjects": self.subjects,
        "labels": {n: s.to_json() for n, s in self.labels.items()},
        "missingness": self.missingness,
        "sanitized": self.sanitized,
        "source": self.source,
    }

  def save(self, data_dir: str | os.PathLike) -> epath.Path:
    """Writes metadata.json atomically (readers never see a half-written file)."""
    path = storage.as_path(data_dir) / METADATA_FILE
    storage.write_text_atomic(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
    return path


def _floats(a: np.ndarray) -> list[float]:
  return [float(x) for x in np.asarray(a, np.float64)]


def _get(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
  if key not in d:
    raise MetadataError(f"{where}: missing field {key!r}")
  if not isinstance(d[key], typ):
    raise MetadataError(f"{where}: field {key!r} must be {typ}, got {type(d[key]).__name__}")
  return d[key]


def _vector(values: Any, c: int, field: str, where: str, positive: bool = False) -> np.ndarray:
  if not isinstance(values, list) or len(values) != c:
    raise MetadataError(f"{where}: {field} must be a list of {c} numbers (one per channel)")
  try:
    a = np.asarray(values, np.float32)
  except (TypeError, ValueError):
    raise MetadataError(f"{where}: {field} holds non-numbers: {values}") from None
  if not np.all(np.isfinite(a)) or (positive and np.any(a <= 0)):
    raise MetadataError(f"{where}: {field} must be finite{' and > 0' if positive else ''}: {values}")
  return a


def metadata_from_json(d: Mapping[str, Any], where: str) -> DatasetMetadata:
  """Parses and checks the JSON fields (shards are checked by `validate_shards`)."""
  version = _get(d, "format_version", int, where)
  if version != FORMAT_VERSION:
    raise MetadataError(f"{where}: format_version {version} is not supported "
                        f"(this code reads {FORMAT_VERSION})")
  fmt = _get(d, "format", str, where)
  if fmt not in FORMATS:
    raise MetadataError(f"{where}: unknown format {fmt!r} (expected one of {sorted(FORMATS)})")
  try:
    channels = check_channel_set(Channel.from_json(c) for c in _get(d, "channels", list, where))
  except (TypeError, ValueError) as e:
    raise MetadataError(f"{where}: channels: {e}") from None
  c = len(channels)
  norm = _get(d, "normalization", dict, where)
  mean = _vector(norm.get("mean"), c, "normalization.mean", where)
  std = _vector(norm.get("std"), c, "normalization.std", where, positive=True)
  noise = d.get("noise_std")
  noise_std = None if noise is None else _vector(noise, c, "noise_std", where)
  if noise_std is not None and np.any(noise_std < 0):
    raise MetadataError(f"{where}: noise_std must be >= 0: {noise}")
  splits = _get(d, "splits", dict, where)
  if not splits:
    raise MetadataError(f"{where}: no splits")
  record_counts = _get(d, "record_counts", dict, where)
  shards = _get(d, "shards", dict, where)
  subjects = _get(d, "subjects", dict, where)
  try:
    labels = {n: LabelSpec(n, s["kind"], s["level"], tuple(s.get("classes", ())))
              for n, s in _get(d, "labels", dict, where).items()}
  except (KeyError, TypeError, ValueError) as e:
    raise MetadataError(f"{where}: labels: {e}") from None
  shard_records, shard_bytes = {}, {}
  for split, files in splits.items():
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
      raise MetadataError(f"{where}: splits[{split!r}] must be a list of file names")
    for f in files:
      entry = shards.get(f)
      if not isinstance(entry, dict) or not {"records", "bytes"} <= set(entry):
        raise MetadataError(f"{where}: shards[{f!r}] must give 'records' and 'bytes'")
      shard_records[f], shard_bytes[f] = int(entry["records"]), int(entry["bytes"])
  return DatasetMetadata(
      channels=channels, norm_mean=mean, norm_std=std, noise_std=noise_std,
      splits={k: list(v) for k, v in splits.items()},
      record_counts={k: int(v) for k, v in record_counts.items()}, labels=labels,
      missingness=dict(d.get("missingness", {})), format=fmt, shard_records=shard_records,
      shard_bytes=shard_bytes, subjects={k: list(v) for k, v in subjects.items()},
      sanitized=dict(d.get("sanitized", {})), source=dict(d.get("source", {})))


def validate_shards(meta: DatasetMetadata, data_dir: epath.Path, where: str) -> None:
  """Checks the shard files against the metadata (names, presence, sizes, counts, subjects)."""
  # One listing, then one size query per shard: few requests on a bucket too.
  present = {p.name for ext in FORMATS.values() for p in data_dir.glob(f"*{ext}")}
  listed: set[str] = set()
  for split, files in meta.splits.items():
    if split not in meta.record_counts:
      raise MetadataError(f"{where}: record_counts has no entry for split {split!r}")
    for i, f in enumerate(files):
      try:
        fsplit, idx, count, fmt = parse_shard_filename(f)
      except ValueError as e:
        raise MetadataError(f"{where}: splits[{split!r}]: {e}") from None
      if fsplit != split or idx != i or count != len(files) or fmt != meta.format:
        raise MetadataError(
            f"{where}: splits[{split!r}][{i}] = {f!r} should be "
            f"{split}-{i:05d}-of-{len(files):05d}{FORMATS[meta.format]}")
      path = data_dir / f
      if f not in present:
        raise MetadataError(f"{where}: shard {path} is listed but missing")
      size = path.stat().length
      if size != meta.shard_bytes[f]:
        raise MetadataError(f"{where}: shard {path} has {size} bytes, metadata says "
                            f"{meta.shard_bytes[f]} (truncated, replaced or rewritten)")
      if meta.shard_records[f] < 1:
        raise MetadataError(f"{where}: shard {f} holds no records (writers never leave one empty)")
      listed.add(f)
    total = sum(meta.shard_records[f] for f in files)
    if total != meta.record_counts[split]:
      raise MetadataError(f"{where}: split {split!r}: shards hold {total} records, "
                          f"record_counts says {meta.record_counts[split]}")
  unlisted = sorted(present - listed)
  if unlisted:
    raise MetadataError(f"{where}: shard files not listed in metadata: {unlisted}")
  owner: dict[str, str] = {}
  for split, subjects in meta.subjects.items():
    for s in subjects:
      if owner.setdefault(s, split) != split:
        raise MetadataError(f"{where}: subject {s!r} is in splits {owner[s]!r} and {split!r}; "
                            "splits must be subject-disjoint")


def load_metadata(data_dir: str | os.PathLike) -> DatasetMetadata:
  """Reads and validates DIR/metadata.json against the shard files in DIR (local or gs://)."""
  data_dir = storage.as_path(data_dir)
  path = data_dir / METADATA_FILE
  staged = data_dir / STAGING_DIR
  if not path.is_file() and (staged / METADATA_FILE).is_file():
    # A kill while the writer swapped a new dataset in: the staged one is complete (the
    # next write to data_dir puts it in place).
    meta = load_metadata(staged)
    logging.warning("Reading %s: the replacement of the dataset in %s was interrupted (writing "
                    "to it again completes it).", staged, data_dir)
    return meta
  if not path.is_file():
    raise MetadataError(f"{path} not found: {data_dir} is not an lsm2 dataset directory "
                        "(write one with python -m lsm2.data.synthesize or lsm2.data.convert)")
  try:
    d = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise MetadataError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise MetadataError(f"{path}: expected a JSON object")
  meta = metadata_from_json(d, str(path))
  if meta.format == "array_record":
    check_array_record_is_local(data_dir)
  validate_shards(meta, data_dir, str(path))
  meta.data_dir = data_dir
  return meta


def normalize(signals: Float[np.ndarray, "... c"], observed: Bool[np.ndarray, "... c"],
              mean: Float[np.ndarray, "c"], std: Float[np.ndarray, "c"]) -> np.ndarray:
  """z-scores per channel, clips to [-5, 5] and writes 0 wherever unobserved or non-finite."""
  signals = np.asarray(signals, np.float32)
  z = (signals - np.asarray(mean, np.float32)) * inverse_std(std)
  np.clip(z, -CLIP, CLIP, out=z)
  np.copyto(z, 0.0, where=~(observed & np.isfinite(signals)))
  return z


def inverse_std(std: Float[np.ndarray, "c"]) -> np.ndarray:
  """float32 1/std; normalization multiplies by it (same arithmetic in every reader)."""
  return (1.0 / np.asarray(std, np.float64)).astype(np.float32)


def denormalize(z: Float[np.ndarray, "... c"], mean: Float[np.ndarray, "c"],
                std: Float[np.ndarray, "c"]) -> np.ndarray:
  """Inverse of the z-score (clipping is not undone)."""
  return np.asarray(z, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
