"""Writes a dataset directory: sanitized records into round-robin shards, then metadata.json.

Normalization statistics (per-channel mean and std over observed minutes) are
accumulated while the train split is written, never from other splits, as exact
sums (ChannelMoments), so they do not depend on the order the records come in:
the Beam converter (lsm2.data.beam_convert) combines them in any order and gets
the same bits.
TFDS's dataset_info.json and features.json (lsm2.data.tfds_info) come next, and
metadata.json last, so a directory without it is an unfinished write.

Everything is first written to DIR/.lsm2-staging/ (metadata.STAGING_DIR) and
checked (load_metadata: every shard there with the size written); only then
does it replace the dataset in DIR (`_swap_in`). At every moment one complete
dataset exists, the old one in DIR or the new one staged, so a failed or
killed write never loses the old dataset, and `recover` (run by the next
writer, `check_out_dir`) completes or undoes a swap that a kill interrupted.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath
import numpy as np

from lsm2 import storage
from lsm2.data import example, tfds_info
from lsm2.data.channels import Channel, check_channel_set
from lsm2.data.metadata import (METADATA_FILE, STAGING_DIR, DatasetMetadata, LabelSpec,
                                MetadataError, load_metadata)
from lsm2.data.record import DayRecord, SanitizeCounts, sanitize
from lsm2.data.shards import (FORMATS, ArrayRecordWriter, check_array_record_is_local,
                              check_format, shard_filename)

HISTOGRAM_BINS = 10  # Per-day missing fraction histogram over [0, 1].
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


# Exact sums: a float64 is an integer multiple of 2**-1074.
_EXACT_SCALE = 1074


def _exact(x: float) -> int:
  """x * 2**1074 as an exact integer."""
  num, den = float(x).as_integer_ratio()
  return num << (_EXACT_SCALE - den.bit_length() + 1)


class ChannelMoments:
  """Per-channel count, sum and sum of squares over observed minutes, summed exactly.

  Each record's float64 sums (numpy, fixed order) are added as exact integers,
  so the result is the same whatever order records are added and partial
  results merged in (a Beam combine merges them in any order).
  """

  def __init__(self, c: int):
    self.n = [0] * c
    self.s1 = [0] * c
    self.s2 = [0] * c

  def add(self, signals: np.ndarray, observed: np.ndarray) -> None:
    x = signals.astype(np.float64)  # Zero at unobserved minutes (sanitized).
    n_r, s1, s2 = observed.sum(0).tolist(), x.sum(0).tolist(), (x * x).sum(0).tolist()
    for k in range(len(self.n)):
      self.n[k] += n_r[k]
      self.s1[k] += _exact(s1[k])
      self.s2[k] += _exact(s2[k])

  def merge(self, other: ChannelMoments) -> ChannelMoments:
    for k in range(len(self.n)):
      self.n[k] += other.n[k]
      self.s1[k] += other.s1[k]
      self.s2[k] += other.s2[k]
    return self

  def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    """float64[C] mean and (population) std, each correctly rounded from the exact sums."""
    mean, std = [], []
    scale = 1 << _EXACT_SCALE
    for n, s1, s2 in zip(self.n, self.s1, self.s2):
      mean.append(s1 / (n * scale))  # Python's int division rounds correctly.
      var = (s2 * scale * n - s1 * s1) / (scale * scale * n * n)
      std.append(math.sqrt(max(var, 0.0)))
    return np.asarray(mean, np.float64), np.asarray(std, np.float64)


@dataclasses.dataclass
class SplitTally:
  """What a split's records add to metadata.json; merging tallies is order-independent."""
  subjects: set[str]
  day_missing: list[float]
  missing_per_channel: np.ndarray  # int64[C]
  minutes_per_channel: np.ndarray  # int64[C]
  sanitized: SanitizeCounts
  moments: ChannelMoments  # Normalisation statistics (used for the train split only).

  @classmethod
  def empty(cls, c: int) -> SplitTally:
    return cls(set(), [], np.zeros(c, np.int64), np.zeros(c, np.int64), SanitizeCounts(),
               ChannelMoments(c))

  def add(self, rec: DayRecord, counts: SanitizeCounts, moments: bool) -> None:
    """Adds a sanitized record (and what sanitize masked); `moments`: a train record."""
    self.subjects.add(rec.subject_id)
    self.day_missing.append(rec.missing_fraction)
    self.missing_per_channel += (~rec.observed).sum(0)
    self.minutes_per_channel += rec.observed.shape[0]
    self.sanitized.add(counts)
    if moments:
      self.moments.add(rec.signals, rec.observed)

  def merge(self, other: SplitTally) -> SplitTally:
    self.subjects |= other.subjects
    self.day_missing += other.day_missing
    self.missing_per_channel += other.missing_per_channel
    self.minutes_per_channel += other.minutes_per_channel
    self.sanitized.add(other.sanitized)
    self.moments.merge(other.moments)
    return self


def make_writer(path: str | os.PathLike, fmt: str):
  """A writer of one new shard: write(bytes) per record, then close().

  TFRecord shards are written by TensorFlow's tf.io.TFRecordWriter (local or
  gs://), imported here only: reading and inference never need TensorFlow.
  """
  if check_format(fmt) == "array_record":
    return ArrayRecordWriter(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.TFRecordWriter(os.fspath(path))


def encode_checked(record: DayRecord, channels: Sequence[Channel],
                   labels: Mapping[str, LabelSpec], split: str
                   ) -> tuple[DayRecord, SanitizeCounts, bytes]:
  """Sanitizes one record of `split`, checks its labels and serializes it.

  Returns the sanitized record, what sanitize masked and the stored bytes: the
  one per-record step of every writer (DatasetWriter, the Beam converter).
  """
  rec, counts = sanitize(record, channels, where=f"split {split!r}")
  where = f"split {split!r}: record ({rec.subject_id!r}, {rec.day!r}): "
  unknown = set(rec.labels) - set(labels)
  if unknown:
    raise ValueError(f"{where}unknown labels {sorted(unknown)} (declared: {sorted(labels)})")
  for name, spec in labels.items():
    if name not in rec.labels:
      raise ValueError(f"{where}missing label {name!r}")
    rec.labels[name] = spec.check_value(rec.labels[name], where)
  return rec, counts, example.encode_record(rec, labels)


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> list[epath.Path]:
  """Checks that a dataset can go to `out_dir`; returns the dataset files it would replace.

  Raises (naming the path and the reason) when it is not a directory, cannot
  be created or written, or holds a dataset or shards and `overwrite` is off.
  Converters call it before reading their input, so a bad --out fails at once.
  It changes nothing, except that it first completes or undoes a replacement
  of the dataset there that a kill interrupted (`recover`).
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
  recover(out)
  existing = dataset_files(out)
  if existing and not overwrite:
    what = ("a dataset" if (out / METADATA_FILE).exists()
            else "shards of an unfinished write (no metadata.json)")
    raise FileExistsError(f"{out} already holds {what}, e.g. {existing[0].name}; "
                          "pass overwrite=True (--overwrite) or choose an empty directory")
  return existing


def dataset_files(out: epath.Path) -> list[epath.Path]:
  """The files of a dataset directly in directory `out`: metadata.json, shards, TFDS's files
  (what replacing it deletes; other files there are the user's and stay)."""
  return [p for p in out.iterdir() if p.name == METADATA_FILE or p.suffix in FORMATS.values()
          or p.name in tfds_info.TFDS_FILES or p.match(tfds_info.TFDS_LABEL_FILES)]


def dataset_problem(data_dir: epath.Path) -> str | None:
  """Why `data_dir` itself holds no complete dataset (load_metadata's error), or None."""
  if not (data_dir / METADATA_FILE).is_file():  # load_metadata would read a staged one.
    return f"it has no {METADATA_FILE}"
  try:
    load_metadata(data_dir)
  except (MetadataError, OSError) as e:
    return str(e)
  return None


def _swap_in(staged: epath.Path, out: epath.Path) -> None:
  """Replaces the dataset in `out` by the complete one in `staged`, then deletes `staged`.

  `out`'s metadata.json goes first (from then on `staged` is the complete copy),
  then its other dataset files; `staged`'s files are linked or copied in
  (storage.place_tree), metadata.json last (now `out` is complete); `staged`
  is deleted, its metadata.json first. A kill at any point leaves one of them
  complete, and `recover` finishes the job.
  """
  (out / METADATA_FILE).unlink(missing_ok=True)
  for p in dataset_files(out):
    p.unlink()
  storage.place_tree(staged, out, last=METADATA_FILE)
  storage.delete_tree(staged, first=METADATA_FILE)


def recover(out_dir: str | os.PathLike) -> None:
  """Completes or undoes a dataset swap into `out_dir` that a kill interrupted.

  A complete staged dataset replaces an incomplete one in `out_dir` (the kill
  came during `_swap_in`). Any other staged directory is deleted: an unfinished
  write, or a finished one beside the complete dataset that the interrupted
  command never replaced (it did not report success; running it again writes it).
  """
  out = storage.as_path(out_dir)
  staged = out / STAGING_DIR
  if not staged.exists():
    return
  if dataset_problem(staged) is None and (problem := dataset_problem(out)) is not None:
    logging.warning("%s is not a complete dataset (%s): replacing it by the complete one that "
                    "an interrupted write left in %s.", out, problem, staged)
    _swap_in(staged, out)
  else:
    logging.warning("Deleting %s, left by a dataset write that did not finish.", staged)
    storage.delete_tree(staged, first=METADATA_FILE)


class DatasetWriter:
  """Writes splits of day records to `out_dir`; `finish()` writes metadata.json.

  Usage:
    with DatasetWriter(out, channels=..., labels=[LabelSpec(...)], fmt="tfrecord") as w:
      w.write_split("train", records, num_records=n, num_shards=4)
      ...
      meta = w.finish(noise_std=..., source={...})

  Files go to `staging_dir` (OUT/.lsm2-staging); finish() checks them and swaps
  them into `out_dir`, replacing the dataset there (see the module docstring).
  Leaving the `with` block by an exception deletes what was staged; without
  one, the next writer to `out_dir` does (`recover`).
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
    check_out_dir(self.out_dir, overwrite)  # Also recovers: no staging_dir from here on.
    self.staging_dir = self.out_dir / STAGING_DIR
    if not storage.is_remote(self.staging_dir):  # A bucket has no directories to make.
      self.staging_dir.mkdir(parents=True)
    self._splits: dict[str, list[str]] = {}
    self._counts: dict[str, int] = {}
    self._shard_records: dict[str, int] = {}
    self._shard_bytes: dict[str, int] = {}
    self._tallies: dict[str, SplitTally] = {}

  def __enter__(self) -> DatasetWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      return
    try:  # Deletes the unfinished write; completes a swap that failed half-way.
      recover(self.out_dir)
    except Exception:  # pylint: disable=broad-except  # The original error matters more.
      logging.exception("Could not clean up %s after a failed write; the next write to %s "
                        "will.", self.staging_dir, self.out_dir)

  def write_split(self, split: str, records: Iterable[DayRecord], *, num_records: int,
                  num_shards: int = 1, progress: bool = False) -> int:
    """Writes `num_records` records (round-robin over min(num_shards, num_records) shards)."""
    self._check_new_split(split)
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    n_shards = min(num_shards, num_records)
    files = [shard_filename(split, i, n_shards, self.fmt) for i in range(n_shards)]
    writers = [make_writer(self.staging_dir / f, self.fmt) for f in files]
    per_shard = [0] * n_shards
    tally = SplitTally.empty(len(self.channels))
    seen_days: set[tuple[str, str]] = set()
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      records = tqdm(records, total=num_records, desc=f"writing {split}", unit="day")
    count = 0
    try:
      for record in records:
        if count >= num_records:
          raise ValueError(f"split {split!r}: more than num_records={num_records} records")
        rec, counts, data = encode_checked(record, self.channels, self.labels, split)
        if (rec.subject_id, rec.day) in seen_days:
          raise ValueError(f"split {split!r}: record ({rec.subject_id!r}, {rec.day!r}): "
                           "duplicate subject-day")
        seen_days.add((rec.subject_id, rec.day))
        writers[count % n_shards].write(data)
        per_shard[count % n_shards] += 1
        tally.add(rec, counts, moments=split == "train")
        count += 1
    finally:
      for w in writers:
        w.close()
    if count != num_records:
      raise ValueError(f"split {split!r}: got {count} records, expected num_records={num_records}")
    self._add_split(split, files, per_shard, tally)
    return count

  def add_written_split(self, split: str, files: Sequence[str], shard_records: Sequence[int],
                        tally: SplitTally) -> None:
    """Registers a split whose shards (now in staging_dir) were written elsewhere, e.g. by Beam.

    `files` and `shard_records` follow the names and round-robin layout of
    write_split; `tally` sums the split's records (SplitTally.add).
    """
    self._check_new_split(split)
    expected = [shard_filename(split, i, len(files), self.fmt) for i in range(len(files))]
    if list(files) != expected or len(shard_records) != len(files):
      raise ValueError(f"split {split!r}: shards {list(files)} ({list(shard_records)} records) "
                       f"are not the files {expected}")
    self._add_split(split, list(files), list(shard_records), tally)

  def _check_new_split(self, split: str) -> None:
    if not _SPLIT_RE.match(split):
      raise ValueError(f"split name {split!r} must match {_SPLIT_RE.pattern}")
    if split in self._splits:
      raise ValueError(f"split {split!r} was already written")

  def _add_split(self, split: str, files: list[str], per_shard: list[int],
                 tally: SplitTally) -> None:
    self._splits[split] = files
    self._counts[split] = sum(per_shard)
    for f, n in zip(files, per_shard):
      self._shard_records[f] = n
      self._shard_bytes[f] = (self.staging_dir / f).stat().length
    self._tallies[split] = tally

  def finish(self, *, noise_std: Sequence[float] | None = None,
             source: Mapping[str, Any] | None = None) -> DatasetMetadata:
    """Checks subject-disjointness, computes train statistics, writes metadata.json and puts
    the checked dataset in out_dir's place."""
    if "train" not in self._splits or self._counts["train"] == 0:
      raise ValueError("a dataset needs a non-empty 'train' split (normalization statistics "
                       "are computed on it)")
    owner: dict[str, str] = {}
    for split, tally in self._tallies.items():
      for s in tally.subjects:
        if owner.setdefault(s, split) != split:
          raise ValueError(f"subject {s!r} appears in splits {owner[s]!r} and {split!r}")
    moments = self._tallies["train"].moments
    empty = [ch.name for ch, n in zip(self.channels, moments.n) if n == 0]
    if empty:
      raise ValueError(f"channels {empty} have no observed minute in the train split: "
                       "their normalization statistics are undefined")
    mean, std = moments.mean_std()
    std = np.where(std > 1e-6, std, 1.0)  # A constant channel keeps unit scale.
    if noise_std is not None and len(noise_std) != len(self.channels):
      raise ValueError(f"noise_std has {len(noise_std)} values for {len(self.channels)} channels")
    meta = DatasetMetadata(
        channels=self.channels, norm_mean=mean.astype(np.float32),
        norm_std=std.astype(np.float32),
        noise_std=None if noise_std is None else np.asarray(noise_std, np.float32),
        splits=self._splits, record_counts=self._counts, labels=self.labels,
        missingness=self._missingness_summary(), format=self.fmt,
        shard_records=self._shard_records, shard_bytes=self._shard_bytes,
        subjects={split: sorted(t.subjects) for split, t in self._tallies.items()},
        sanitized={"nonfinite": sum(t.sanitized.nonfinite for t in self._tallies.values()),
                   "out_of_range": sum(t.sanitized.out_of_range for t in self._tallies.values())},
        source=dict(source or {}), data_dir=self.out_dir)
    tfds_info.write_tfds_metadata(meta, self.staging_dir)
    meta.save(self.staging_dir)
    if (problem := dataset_problem(self.staging_dir)) is not None:
      raise MetadataError(f"the dataset written to {self.staging_dir} does not check out, so it "
                          f"did not replace {self.out_dir}: {problem}")
    _swap_in(self.staging_dir, self.out_dir)
    return meta

  def _missingness_summary(self) -> dict[str, Any]:
    """Missingness per channel and of days; order-independent (fsum), as the statistics."""
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    tallies = self._tallies.values()
    all_days = np.concatenate([np.asarray(t.day_missing, np.float64) for t in tallies])
    missing = sum(t.missing_per_channel for t in tallies)
    minutes_per_channel = sum(t.minutes_per_channel for t in tallies)
    minutes = minutes_per_channel.sum()
    summary = {
        "overall_fraction": float(missing.sum() / max(minutes, 1)),
        "per_channel_fraction": {
            ch.name: float(m / max(t, 1)) for ch, m, t in
            zip(self.channels, missing, minutes_per_channel)},
        "histogram": {"bin_edges": [float(e) for e in edges], "counts": {}},
        "day_fraction_percentiles": day_percentiles(all_days),
        "per_split": {},
    }
    for split, tally in self._tallies.items():
      fr = np.asarray(tally.day_missing, np.float64)
      summary["histogram"]["counts"][split] = np.histogram(fr, edges)[0].tolist()
      summary["per_split"][split] = {
          "mean_day_fraction": math.fsum(tally.day_missing) / fr.size if fr.size else None,
          "day_fraction_percentiles": day_percentiles(fr)}
    return summary


def day_percentiles(fractions: np.ndarray) -> dict[str, float | None]:
  """p10/p50/p90 of per-day missing fractions (None for no days)."""
  if len(fractions) == 0:
    return {"p10": None, "p50": None, "p90": None}
  p = np.percentile(fractions, [10, 50, 90])
  return {"p10": float(p[0]), "p50": float(p[1]), "p90": float(p[2])}
