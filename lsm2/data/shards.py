"""Shard files: naming, TFRecord reading (own framing code), ArrayRecord access, clear errors.

A split is stored as `{split}-{i:05d}-of-{n:05d}.tfrecord` or `.array_record`
files. Every record is a serialized tf.train.Example (lsm2.data.example).

TFRecord framing per record: uint64 length, uint32 masked CRC-32C of the length,
the data, uint32 masked CRC-32C of the data. Reading is lsm2's own (docs/data.md says why: Grain's
TFRecord reader checks no checksum and opens local files only): readers always
check the framing and the length checksum, so a truncated or misaligned shard
is reported with its file and record index, and the data checksum (~12 us per
day record with google-crc32c) when `verify_checksums=True`, the default of
training, `python -m lsm2.data.inspect` and dataset.read_split. ArrayRecord
(Riegeli) verifies its own chunk hashes.

TFRecord shards are read through etils.epath, on a local disk or a gs://
bucket alike (lsm2.data.writer writes them with TensorFlow's writer). ArrayRecord's reader and
writer open local files only (its C++ file layer has no bucket support), so an
ArrayRecord dataset on a bucket is refused with the ways out
(`check_array_record_is_local`).
"""
from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator

from lsm2 import storage
from lsm2.data.crc32c import masked_crc32c

FORMATS = {"tfrecord": ".tfrecord", "array_record": ".array_record"}
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<i>\d{5})-of-(?P<n>\d{5})"
                       r"(?P<ext>\.tfrecord|\.array_record)$")
# Random access: one record per Riegeli chunk. Uncompressed: snappy halves the
# files (the unobserved minutes are zeros) but read ~25% slower here.
ARRAY_RECORD_WRITER_OPTIONS = "group_size:1,uncompressed"
ARRAY_RECORD_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


class CorruptShardError(ValueError):
  """A shard that cannot be read: names the file and the record index."""

  def __init__(self, path: str | os.PathLike, index: int | None, problem: str):
    self.path = str(path)
    self.index = index
    where = self.path if index is None else f"{self.path}: record {index}"
    super().__init__(f"{where}: {problem}")


def check_format(fmt: str) -> str:
  if fmt not in FORMATS:
    raise ValueError(f"unknown shard format {fmt!r}; expected one of {sorted(FORMATS)}")
  return fmt


def shard_filename(split: str, index: int, count: int, fmt: str) -> str:
  return f"{split}-{index:05d}-of-{count:05d}{FORMATS[check_format(fmt)]}"


def parse_shard_filename(name: str) -> tuple[str, int, int, str]:
  """Returns (split, index, count, format) or raises naming the file."""
  m = _SHARD_RE.match(name)
  if not m:
    raise ValueError(f"{name!r} is not a shard file name "
                     "'{split}-{i:05d}-of-{n:05d}.tfrecord|.array_record'")
  fmt = "tfrecord" if m["ext"] == ".tfrecord" else "array_record"
  return m["split"], int(m["i"]), int(m["n"]), fmt


# ----------------------------------------------------------------------------- TFRecord


def _record_length(header: bytes, path: str, index: int) -> int:
  """Validates a 12-byte record header; returns the data length."""
  if len(header) < 12:
    raise CorruptShardError(path, index, f"truncated record header ({len(header)} of 12 bytes)")
  length_bytes = bytes(header[:8])
  if masked_crc32c(length_bytes) != struct.unpack("<I", header[8:12])[0]:
    raise CorruptShardError(path, index, "length checksum mismatch (corrupt or not a TFRecord)")
  return struct.unpack("<Q", length_bytes)[0]


def _check_data(data, footer, path: str, index: int, length: int, verify: bool) -> None:
  if len(data) < length:
    raise CorruptShardError(path, index, f"truncated record: {len(data)} of {length} bytes")
  if len(footer) < 4:
    raise CorruptShardError(path, index, "truncated record: missing data checksum")
  if verify and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
    raise CorruptShardError(path, index, "data checksum mismatch (corrupt record)")


def read_tfrecord_at(f, path: str, index: int, verify_checksums: bool) -> bytes | None:
  """Reads the record at the file position of `f`; None at a clean end of file."""
  header = f.read(12)
  if not header:
    return None
  length = _record_length(header, path, index)
  data = f.read(length)
  footer = f.read(4)
  _check_data(data, footer, path, index, length, verify_checksums)
  return data


def read_tfrecord_mapped(mm, pos: int, path: str, index: int,
                         verify_checksums: bool) -> tuple[memoryview, int] | None:
  """Like read_tfrecord_at on an mmap: returns a zero-copy view and the next position.

  Reading through mmap avoids a fresh 150 KB allocation (an mmap syscall and
  page faults in malloc) per record: the largest cost of plain file reads.
  """
  if pos >= len(mm):
    return None
  length = _record_length(mm[pos:pos + 12], path, index)
  start, end = pos + 12, pos + 12 + length
  data = memoryview(mm)[start:min(end, len(mm))]
  _check_data(data, mm[end:end + 4], path, index, length, verify_checksums)
  return data, end + 4


def iter_tfrecord(path: str | os.PathLike, *, verify_checksums: bool = False,
                  expected_records: int | None = None) -> Iterator[bytes]:
  """Yields the records of one TFRecord file in order."""
  path = str(path)
  with storage.as_path(path).open("rb") as f:
    index = 0
    while (data := read_tfrecord_at(f, path, index, verify_checksums)) is not None:
      yield data
      index += 1
  if expected_records is not None and index != expected_records:
    raise CorruptShardError(path, None, f"holds {index} records, metadata.json says "
                            f"{expected_records}")


# ----------------------------------------------------------------------------- ArrayRecord


class ArrayRecordNotLocalError(storage.StorageError):
  """An ArrayRecord dataset on a bucket: array_record reads and writes local files only."""


def check_array_record_is_local(path: str | os.PathLike) -> None:
  """Raises ArrayRecordNotLocalError, with the ways out, if ArrayRecord `path` is a URL."""
  if storage.is_remote(path):
    raise ArrayRecordNotLocalError(
        f"{path}: ArrayRecord shards cannot be read or written on a bucket (array_record opens "
        "local files only). Copy the dataset to a local disk (`gcloud storage cp -r DIR "
        "/local/dir`) and point config.data.dir there, or write it as TFRecord "
        "(--format tfrecord), which lsm2 reads from gs:// directly; see docs/launching.md.")


class ArrayRecordWriter:

  def __init__(self, path: str | os.PathLike):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    check_array_record_is_local(path)
    self.path = str(path)
    self._w = array_record_module.ArrayRecordWriter(self.path, ARRAY_RECORD_WRITER_OPTIONS)

  def write(self, data: bytes) -> None:
    self._w.write(data)

  def close(self) -> None:
    self._w.close()


def open_array_record(path: str | os.PathLike):
  """Opens an ArrayRecord reader; a damaged file raises CorruptShardError."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  check_array_record_is_local(path)
  try:
    reader = array_record_module.ArrayRecordReader(str(path), ARRAY_RECORD_READER_OPTIONS)
  except Exception as e:  # The C++ layer raises bare RuntimeError/ValueError.
    raise CorruptShardError(path, None, f"cannot open ArrayRecord file: {e}") from None
  if not reader.ok():  # A damaged file opens "successfully" with 0 records.
    problem = "not a valid ArrayRecord file"
    try:
      reader.close()
    except Exception as e:  # pylint: disable=broad-except
      problem = str(e)
    raise CorruptShardError(path, None, f"cannot open ArrayRecord file: {problem}")
  return reader


def close_array_record(reader, path: str | os.PathLike) -> None:
  try:
    reader.close()
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptShardError(path, None, f"ArrayRecord file is damaged: {e}") from None


def read_array_record(reader, path: str, index: int) -> bytes:
  try:
    return reader.read([index])[0]
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptShardError(path, index, f"cannot read record: {e}") from None


def iter_shard(path: str | os.PathLike, fmt: str, *, verify_checksums: bool = False,
               expected_records: int | None = None) -> Iterator[bytes]:
  """Yields one shard's records in order, whatever the format."""
  if check_format(fmt) == "tfrecord":
    yield from iter_tfrecord(path, verify_checksums=verify_checksums,
                             expected_records=expected_records)
    return
  reader = open_array_record(path)
  n = reader.num_records()
  if expected_records is not None and n != expected_records:
    raise CorruptShardError(path, None, f"holds {n} records, metadata.json says "
                            f"{expected_records}")
  for i in range(n):
    yield read_array_record(reader, str(path), i)
  close_array_record(reader, path)
