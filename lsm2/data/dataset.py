"""Whole-split reading for evaluation, inspection and tests (training uses lsm2.data.pipeline)."""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from lsm2.data import example
from lsm2.data import metadata as metadata_lib
from lsm2.data.metadata import DatasetMetadata, load_metadata
from lsm2.data.record import MINUTES_PER_DAY, DayRecord
from lsm2.data.shards import CorruptShardError, iter_shard


def iter_records(meta: DatasetMetadata, split: str, *,
                 verify_checksums: bool = True) -> Iterator[DayRecord]:
  """Yields the split's records in storage order (shard by shard), as stored (not normalized)."""
  for path in meta.shard_paths(split):
    records = iter_shard(path, meta.format, verify_checksums=verify_checksums,
                         expected_records=meta.shard_records[path.name])
    for index, data in enumerate(records):
      try:
        yield example.decode_record(data, meta.num_channels, meta.labels)
      except example.RecordDecodeError as e:
        raise CorruptShardError(path, index, str(e)) from None


def read_split(data_dir: str | os.PathLike, split: str, *, normalize: bool = True,
               limit: int | None = None) -> dict[str, np.ndarray]:
  """Reads a split into memory: the evaluation view of a dataset.

  Returns "signals" float32[n, 1440, C] (normalized with the stored train
  statistics and 0 at unobserved minutes, or as stored when normalize=False),
  "observed" bool[n, 1440, C], "subject_id" and "day" (str arrays), and
  "label/NAME" per label: float [n] with NaN for missing regression values,
  int64 [n] with -1 for missing class indices, int64 [n, 1440] for minute
  labels (-1 = no label at that minute). Storage order; at most `limit` records.
  Data checksums are verified.
  """
  meta = load_metadata(data_dir)
  records = []
  for rec in iter_records(meta, split):
    if limit is not None and len(records) >= limit:
      break
    records.append(rec)
  c = meta.num_channels
  out: dict[str, np.ndarray] = {
      "signals": np.stack([r.signals for r in records]) if records
                 else np.zeros((0, 1440, c), np.float32),
      "observed": np.stack([r.observed for r in records]) if records
                  else np.zeros((0, 1440, c), bool),
      "subject_id": np.array([r.subject_id for r in records], dtype=str),
      "day": np.array([r.day for r in records], dtype=str),
  }
  # Values that another writer left non-finite are unobserved, never passed on.
  out["observed"] &= np.isfinite(out["signals"])
  if normalize:
    out["signals"] = metadata_lib.normalize(out["signals"], out["observed"], meta.norm_mean, meta.norm_std)
  else:
    out["signals"][~out["observed"]] = 0.0
  for name, spec in meta.labels.items():
    values = [r.labels[name] for r in records]
    if spec.level == "minute":
      out[f"label/{name}"] = (np.stack(values) if values
                              else np.zeros((0, MINUTES_PER_DAY), np.int64))
    else:
      out[f"label/{name}"] = (np.array(values, np.float32) if spec.kind == "regression"
                              else np.array(values, np.int64))
  return out

