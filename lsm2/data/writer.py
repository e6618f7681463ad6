"""Writes a dataset directory: sanitized records into round-robin shards, then metadata.json.

Normalization statistics (per-channel mean and std over observed minutes) are
accumulated while the train split is written, never from other splits.
TFDS's dataset_info.json and features.json (lsm2.data.tfds_info) come next, and
metadata.json last, so a directory without it is an unfinished write.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath
import numpy as np

from lsm2 import storage
from lsm2.data import example, tfds_info
from lsm2.data.channels import Channel, check_channel_set
from lsm2.data.metadata import METADATA_FILE, DatasetMetadata, LabelSpec
from lsm2.data.record import DayRecord, SanitizeCounts, sanitize
from lsm2.data.shards import (FORMATS, check_array_record_is_local, check_format, make_writer,
                              shard_filename)

HISTOGRAM_BINS = 10  # Per-day missing fraction histogram over [0, 1].
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


class _ChannelStats:
  """Streaming per-channel mean/variance over observed minutes (Chan et al. merge)."""

  def __init__(self, c: int):
    self.n = np.zeros(c, np.float64)
    self.mean = np.zeros(c, np.float64)
    self.m2 = np.zeros(c, np.float64)

  def add(self, signals: np.ndarray, observed: np.ndarray) -> None:
    n_r = observed.sum(0).astype(np.float64)
    x = signals.astype(np.float64)  # Zero at unobserved minutes (sanitized).
    s1, s2 = x.sum(0), (x * x).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
      mean_r = np.where(n_r > 0, s1 / n_r, 0.0)
    m2_r = np.maximum(s2 - n_r * mean_r * mean_r, 0.0)
    total = self.n + n_r
    with np.errstate(invalid="ignore", divide="ignore"):
      w = np.where(total > 0, n_r / total, 0.0)
    delta = mean_r - self.mean
    self.m2 += m2_r + delta * delta * self.n * w
    self.mean += delta * w
    self.n = total


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> list[epath.Path]:
  """Checks, changing nothing, that a dataset can go to `out_dir`; returns the files it replaces.

  Raises (naming the path and the reason) when it is not a directory, cannot
  be created or written, or holds a dataset or shards and `overwrite` is off.
  Converters call it before reading their input, so a bad --out fails at once.
  """
  out = storage.as_path(out_dir)
  if storage.is_remote(out):
    # A bucket has no directories to create nor permission bits to read: a probe
    # object is written and deleted (bucket missing, no credentials: raised here).
    storage.check_writable(out, "--out")
    if not out.exists():
      return []
  elif out.exists():
    if not out.is_dir():
      raise ValueError(f"--out {out}: exists and is not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
      raise ValueError(f"--out {out}: directory is not writable (permission denied)")
  else:
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
      parent = parent.parent
    if not parent.is_dir():
      raise ValueError(f"--out {out}: cannot create it: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise ValueError(f"--out {out}: cannot create it: {parent} is not writable "
                       "(permission denied)")
    return []
  existing = [p for p in out.iterdir() if p.name == METADATA_FILE or p.suffix in FORMATS.values()
              or p.name in tfds_info.TFDS_FILES or p.match(tfds_info.TFDS_LABEL_FILES)]
  if existing and not overwrite:
    what = ("a dataset" if (out / METADATA_FILE).exists()
            else "shards of an unfinished write (no metadata.json)")
    raise FileExistsError(f"{out} already holds {what}, e.g. {existing[0].name}; "
                          "pass overwrite=True (--overwrite) or choose an empty directory")
  return existing


class DatasetWriter:
  """Writes splits of day records to `out_dir`; `finish()` writes metadata.json.

  Usage:
    w = DatasetWriter(out, channels=..., labels=[LabelSpec(...)], fmt="tfrecord")
    w.write_split("train", records, num_records=n, num_shards=4)
    ...
    meta = w.finish(noise_std=..., source={...})
  """

  def __init__(self, out_dir: str | os.PathLike, *, channels: Sequence[Channel],
               labels: Iterable[LabelSpec] = (), fmt: str = "tfrecord",
               overwrite: bool = False):
    self.out_dir = storage.as_path(out_dir)
    self.channels = check_channel_set(channels)
    self.labels = {s.name: s for s in labels}
    self.fmt = check_format(fmt)
    if self.fmt == "array_record":
      check_array_record_is_local(self.out_dir)
    existing = check_out_dir(self.out_dir, overwrite)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    for p in existing:
      p.unlink()
    c = len(self.channels)
    self._stats = _ChannelStats(c)
    self._splits: dict[str, list[str]] = {}
    self._counts: dict[str, int] = {}
    self._shard_records: dict[str, int] = {}
    self._shard_bytes: dict[str, int] = {}
    self._subjects: dict[str, list[str]] = {}
    self._day_missing: dict[str, list[float]] = {}
    self._missing_per_channel = np.zeros(c, np.int64)
    self._minutes_per_channel = np.zeros(c, np.int64)
    self._sanitized = SanitizeCounts()

  def write_split(self, split: str, records: Iterable[DayRecord], *, num_records: int,
                  num_shards: int = 1, progress: bool = False) -> int:
    """Writes `num_records` records (round-robin over min(num_shards, num_records) shards)."""
    if not _SPLIT_RE.match(split):
      raise ValueError(f"split name {split!r} must match {_SPLIT_RE.pattern}")
    if split in self._splits:
      raise ValueError(f"split {split!r} was already written")
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    n_shards = min(num_shards, num_records)
    files = [shard_filename(split, i, n_shards, self.fmt) for i in range(n_shards)]
    writers = [make_writer(self.out_dir / f, self.fmt) for f in files]
    per_shard = [0] * n_shards
    subjects: set[str] = set()
    day_missing: list[float] = []
    seen_days: set[tuple[str, str]] = set()
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      records = tqdm(records, total=num_records, desc=f"writing {split}", unit="day")
    count = 0
    try:
      for record in records:
        if count >= num_records:
          raise ValueError(f"split {split!r}: more than num_records={num_records} records")
        rec, counts = sanitize(record, self.channels, where=f"split {split!r}")
        where = f"split {split!r}: record ({rec.subject_id!r}, {rec.day!r}): "
        if (rec.subject_id, rec.day) in seen_days:
          raise ValueError(f"{where}duplicate subject-day")
        seen_days.add((rec.subject_id, rec.day))
        unknown = set(rec.labels) - set(self.labels)
        if unknown:
          raise ValueError(f"{where}unknown labels {sorted(unknown)} "
                           f"(declared: {sorted(self.labels)})")
        for name, spec in self.labels.items():
          if name not in rec.labels:
            raise ValueError(f"{where}missing label {name!r}")
          rec.labels[name] = spec.check_value(rec.labels[name], where)
        writers[count % n_shards].write(example.encode_record(rec, self.labels))
        per_shard[count % n_shards] += 1
        self._sanitized.add(counts)
        subjects.add(rec.subject_id)
        day_missing.append(rec.missing_fraction)
        missing = (~rec.observed).sum(0)
        self._missing_per_channel += missing
        self._minutes_per_channel += rec.observed.shape[0]
        if split == "train":
          self._stats.add(rec.signals, rec.observed)
        count += 1
    finally:
      for w in writers:
        w.close()
    if count != num_records:
      raise ValueError(f"split {split!r}: got {count} records, expected num_records={num_records}")
    self._splits[split] = files
    self._counts[split] = count
    for f, n in zip(files, per_shard):
      self._shard_records[f] = n
      self._shard_bytes[f] = (self.out_dir / f).stat().length
    self._subjects[split] = sorted(subjects)
    self._day_missing[split] = day_missing
    return count

  def finish(self, *, noise_std: Sequence[float] | None = None,
             source: Mapping[str, Any] | None = None) -> DatasetMetadata:
    """Checks subject-disjointness, computes train statistics and writes metadata.json."""
    if "train" not in self._splits or self._counts["train"] == 0:
      raise ValueError("a dataset needs a non-empty 'train' split (normalization statistics "
                       "are computed on it)")
    owner: dict[str, str] = {}
    for split, subjects in self._subjects.items():
      for s in subjects:
        if owner.setdefault(s, split) != split:
          raise ValueError(f"subject {s!r} appears in splits {owner[s]!r} and {split!r}")
    empty = [ch.name for ch, n in zip(self.channels, self._stats.n) if n == 0]
    if empty:
      raise ValueError(f"channels {empty} have no observed minute in the train split: "
                       "their normalization statistics are undefined")
    std = np.sqrt(self._stats.m2 / self._stats.n)
    std = np.where(std > 1e-6, std, 1.0)  # A constant channel keeps unit scale.
    if noise_std is not None and len(noise_std) != len(self.channels):
      raise ValueError(f"noise_std has {len(noise_std)} values for {len(self.channels)} channels")
    meta = DatasetMetadata(
        channels=self.channels, norm_mean=self._stats.mean.astype(np.float32),
        norm_std=std.astype(np.float32),
        noise_std=None if noise_std is None else np.asarray(noise_std, np.float32),
        splits=self._splits, record_counts=self._counts, labels=self.labels,
        missingness=self._missingness_summary(), format=self.fmt,
        shard_records=self._shard_records, shard_bytes=self._shard_bytes,
        subjects=self._subjects,
        sanitized={"nonfinite": self._sanitized.nonfinite,
                   "out_of_range": self._sanitized.out_of_range},
        source=dict(source or {}), data_dir=self.out_dir)
    tfds_info.write_tfds_metadata(meta, self.out_dir)
    meta.save(self.out_dir)
    return meta

  def _missingness_summary(self) -> dict[str, Any]:
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    all_days = np.concatenate([np.asarray(v, np.float64) for v in self._day_missing.values()])
    minutes = self._minutes_per_channel.sum()
    summary = {
        "overall_fraction": float(self._missing_per_channel.sum() / max(minutes, 1)),
        "per_channel_fraction": {
            ch.name: float(m / max(t, 1)) for ch, m, t in
            zip(self.channels, self._missing_per_channel, self._minutes_per_channel)},
        "histogram": {"bin_edges": [float(e) for e in edges], "counts": {}},
        "day_fraction_percentiles": day_percentiles(all_days),
        "per_split": {},
    }
    for split, fr in self._day_missing.items():
      fr = np.asarray(fr, np.float64)
      summary["histogram"]["counts"][split] = np.histogram(fr, edges)[0].tolist()
      summary["per_split"][split] = {
          "mean_day_fraction": float(fr.mean()) if fr.size else None,
          "day_fraction_percentiles": day_percentiles(fr)}
    return summary


def day_percentiles(fractions: np.ndarray) -> dict[str, float | None]:
  """p10/p50/p90 of per-day missing fractions (None for no days)."""
  if len(fractions) == 0:
    return {"p10": None, "p50": None, "p90": None}
  p = np.percentile(fractions, [10, 50, 90])
  return {"p10": float(p[0]), "p50": float(p[1]), "p90": float(p[2])}
