"""tf.train.Example encoding of a day record: written at the protobuf wire level; read in place or by protobuf.

Features (the names other tools see):
  signals     float_list, packed: 1440*C float32, row-major [minute, channel].
  observed    bytes_list, one value: the row-major bool[1440, C] as 1440*C bytes of
              0/1 (TFDS's Tensor(dtype=bool, encoding=BYTES), so tfds decodes it).
              Datasets written before TFDS support store np.packbits of it instead
              (big bit order, 1440*C/8 bytes); the decoder reads both.
  subject_id  bytes_list, one UTF-8 value.
  day         bytes_list, one value 'YYYY-MM-DD'.
  label/NAME  int64_list [class index, -1 = missing] for binary/categorical labels,
              float_list [value, NaN = missing] for regression labels, int64_list of
              1440 class indices (minute order, -1 = no label) for minute labels.

This is the layout of the TFDS features lsm2.data.tfds_info declares, so tfds
decodes these records too. The training path (`decode_arrays`) reads `signals`
and `observed` in place off the wire when a record has the layout that lsm2,
TensorFlow and TFDS write (one packed float run, one bytes value; other
features, e.g. a day's 1,440 minute labels, are skipped unread); any other
layout, and every damaged record, goes through protobuf's own tf.train.Example
(the TensorFlow-free copy TFDS ships), which also names what is wrong.
`decode_record` always uses protobuf. Numeric lists reach numpy through their
packed bytes (`_floats`, `_int64s`), never value by value: protobuf 6 turns a
repeated field into numpy one Python float at a time (~5 ms per 26-channel
day, against ~15 us in protobuf 7), and apache-beam pins protobuf < 7, so the
speed would otherwise depend on which extras are installed. Encoding stays at the
wire level: a packed float list is a length prefix and raw little-endian
float32, and int64 lists are packed varints written with numpy (a minute label
is 1440 of them). That is ~5x faster than filling the protobuf message
(docs/data.md, "Which I/O pieces are lsm2's own"), and the bytes are
deterministic (fields in this order). Reading with tf.data is shown in
docs/data.md and tested in tests/test_data_format.py.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf import message

if TYPE_CHECKING:
  from tensorflow_datasets.proto import tf_example_pb2

from lsm2.data.metadata import LabelSpec
from lsm2.data.record import MINUTES_PER_DAY, DayRecord


class RecordDecodeError(ValueError):
  """A serialized record that is not a valid day-record Example."""


# ----------------------------------------------------------------------------- encoding


def _varint(n: int) -> bytes:
  if n < 0:
    n += 1 << 64  # Two's complement, as protobuf encodes negative int64.
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
  return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _bytes_feature(values: list[bytes]) -> bytes:
  return _len_field(1, b"".join(_len_field(1, v) for v in values))


def _float_feature(payload: bytes) -> bytes:
  return _len_field(2, _len_field(1, payload) if payload else b"")


_VARINT_SHIFTS = np.arange(0, 64, 7, dtype=np.uint64)  # 10 groups of 7 bits.


def _varints(values) -> bytes:
  """Packed protobuf varints of int64 values (a negative one takes 10 bytes, as in protobuf)."""
  groups = np.asarray(values, np.int64).reshape(-1).view(np.uint64)[:, None] >> _VARINT_SHIFTS
  length = np.maximum((groups != 0).sum(axis=1), 1)[:, None]  # Bytes per value.
  k = np.arange(len(_VARINT_SHIFTS))
  groups = (groups & np.uint64(0x7F)) | ((k < length - 1) * np.uint64(0x80))  # Continuation bit.
  return groups.astype(np.uint8)[k < length].tobytes()


def _int64_feature(values) -> bytes:
  packed = _varints(values)
  return _len_field(3, _len_field(1, packed) if packed else b"")


def _entry(key: str, feature: bytes) -> bytes:
  return _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature))


def encode_record(record: DayRecord, labels: Mapping[str, LabelSpec]) -> bytes:
  """Serializes a (sanitized, labels checked) record with the `labels` in that order."""
  signals = np.ascontiguousarray(record.signals, dtype="<f4")
  observed = np.ascontiguousarray(record.observed, dtype=np.bool_)
  entries = [
      _entry("subject_id", _bytes_feature([record.subject_id.encode()])),
      _entry("day", _bytes_feature([record.day.encode()])),
      _entry("signals", _float_feature(signals.tobytes())),
      _entry("observed", _bytes_feature([observed.tobytes()])),
  ]
  for name, spec in labels.items():
    value = record.labels[name]
    if spec.kind == "regression":
      entries.append(_entry(f"label/{name}", _float_feature(struct.pack("<f", value))))
    else:
      entries.append(_entry(f"label/{name}", _int64_feature(value)))
  return _len_field(1, b"".join(entries))


# ----------------------------------------------------------------------------- decoding


def parse(buf: bytes | memoryview) -> tf_example_pb2.Example:
  """The tf.train.Example in `buf` (protobuf's own parser), or RecordDecodeError."""
  # Imported here: tensorflow_datasets' package import takes seconds at every process
  # start, and training's in-place reader never needs the message.
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  try:
    return tf_example_pb2.Example.FromString(buf)
  except message.DecodeError as e:
    raise RecordDecodeError(f"not a tf.train.Example: {e}") from None


_KINDS = {"float_list": "float", "int64_list": "int64", "bytes_list": "bytes"}


def _list(features, key: str, want: str, size: int | None = None, what: str = ""):
  """Feature `key`'s FloatList/Int64List/BytesList, which must be a `want`_list (of `size` values)."""
  feature = features[key] if key in features else None
  kind = None if feature is None else feature.WhichOneof("kind")
  values = None if kind is None else getattr(feature, kind)
  got = "missing" if feature is None else _KINDS.get(kind, "none")
  if got != want or (size is not None and len(values.value) != size):
    raise RecordDecodeError(f"feature {key!r} must be a {want}_list{what}, got {got}"
                            f"{'' if values is None else f' of length {len(values.value)}'}")
  return values


def _packed_payload(values) -> memoryview:
  """The packed wire payload of a FloatList/Int64List: its one field, serialized again.

  Serializing is C code in protobuf's upb and cpp backends and always writes
  the field packed, whatever the record used; the payload runs to the end.
  """
  wire = values.SerializeToString()
  if not wire:
    return memoryview(b"")
  pos = 1  # After the tag byte (field 1, length-delimited), skip the varint length.
  while wire[pos] & 0x80:
    pos += 1
  return memoryview(wire)[pos + 1:]


def _floats(values) -> np.ndarray:
  """A FloatList as float32, read from its packed bytes."""
  return np.frombuffer(_packed_payload(values), "<f4")


_VARINT_BITS = np.uint64(0x7F)


def _int64s(values) -> np.ndarray:
  """An Int64List as int64, its packed varints decoded with numpy."""
  data = np.frombuffer(_packed_payload(values), np.uint8)
  if not data.size:
    return np.zeros(0, np.int64)
  last = data < 0x80  # The last byte of each varint.
  starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
  index = np.cumsum(last) - last  # Which value each byte belongs to.
  shift = 7 * (np.arange(data.size) - starts[index])
  groups = (data.astype(np.uint64) & _VARINT_BITS) << shift.astype(np.uint64)
  return np.bitwise_or.reduceat(groups, starts).view(np.int64)


def _single_bytes(features, key: str) -> bytes:
  return _list(features, key, "bytes", 1, " with one value").value[0]


def _varint_at(buf, pos: int) -> tuple[int, int]:
  """The varint at buf[pos] and the position after it (IndexError past the end)."""
  value = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7


def _only_field(buf, start: int, end: int, tag: int) -> tuple[int, int] | None:
  """The span of buf[start:end] when it is exactly one length-delimited field `tag`."""
  if start >= end or buf[start] != tag:
    return None
  size, pos = _varint_at(buf, start + 1)
  return (pos, end) if pos + size == end else None


_WANTED = {b"signals": 0x12, b"observed": 0x0A}  # Key -> tag of its list (float, bytes).


def _canonical_payloads(buf) -> tuple[memoryview, memoryview] | None:
  """The packed floats of 'signals' and the one value of 'observed', read off the wire in
  place, when the record is laid out as lsm2, TensorFlow and TFDS write it; otherwise None
  (the caller then decodes with protobuf, which also names what is wrong).

  Other features are skipped unread, so a day's labels cost nothing here.
  """
  buf = memoryview(buf)
  try:
    outer = _only_field(buf, 0, len(buf), 0x0A)  # Example.features
    if outer is None:
      return None
    pos, end = outer
    found = {}
    while pos < end:
      if buf[pos] != 0x0A:  # Features.feature: map entries only.
        return None
      size, pos = _varint_at(buf, pos + 1)
      entry_end = pos + size
      if buf[pos] != 0x0A:  # The entry's key comes first in every writer we read.
        return None
      key_size, key_start = _varint_at(buf, pos + 1)
      key = bytes(buf[key_start:key_start + key_size])
      if key in _WANTED:
        if key in found:
          return None
        value = _only_field(buf, key_start + key_size, entry_end, 0x12)  # The Feature.
        values = value and _only_field(buf, *value, _WANTED[key])  # Its float/bytes list.
        payload = values and _only_field(buf, *values, 0x0A)  # One packed run / one value.
        if payload is None:
          return None
        found[key] = buf[payload[0]:payload[1]]
      pos = entry_end
    if pos != end or len(found) != 2:
      return None
    return found[b"signals"], found[b"observed"]
  except IndexError:  # Truncated: protobuf's parser says so.
    return None


def _arrays(signals: np.ndarray, stored: bytes | memoryview, num_channels: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """Checks the decoded `signals` values and the stored `observed` bytes against the shape."""
  expected = MINUTES_PER_DAY * num_channels
  if signals.size != expected:
    raise RecordDecodeError(f"feature 'signals' has {signals.size} values, expected "
                            f"{expected} = {MINUTES_PER_DAY} x {num_channels} channels")
  if len(stored) == expected:
    values = np.frombuffer(stored, np.uint8)
    if values.max(initial=0) > 1:
      raise RecordDecodeError("feature 'observed' holds a byte other than 0 or 1")
    observed = values.view(np.bool_)
  elif len(stored) == -(-expected // 8):  # Written before TFDS support: packed bits.
    observed = np.unpackbits(np.frombuffer(stored, np.uint8), count=expected).view(np.bool_)
  else:
    raise RecordDecodeError(f"feature 'observed' has {len(stored)} bytes, expected {expected} "
                            f"(one per value of {MINUTES_PER_DAY} x {num_channels})")
  return (signals.reshape(MINUTES_PER_DAY, num_channels),
          observed.reshape(MINUTES_PER_DAY, num_channels))


def _feature_arrays(features, num_channels: int) -> tuple[np.ndarray, np.ndarray]:
  return _arrays(_floats(_list(features, "signals", "float")),
                 _single_bytes(features, "observed"), num_channels)


def decode_arrays(buf: bytes | memoryview, num_channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Decodes signals float32[1440, C] and observed bool[1440, C] (read-only views of `buf`
  where the layout allows: the training pipeline normalises them into its batch)."""
  payloads = _canonical_payloads(buf)
  if payloads is None:
    return _feature_arrays(parse(buf).features.feature, num_channels)
  floats, stored = payloads
  if len(floats) % 4:
    raise RecordDecodeError(f"feature 'signals' holds {len(floats)} bytes, not whole float32s")
  return _arrays(np.frombuffer(floats, "<f4"), stored, num_channels)


def decode_subject_id(buf: bytes | memoryview) -> str:
  return _single_bytes(parse(buf).features.feature, "subject_id").decode()


def decode_record(buf: bytes, num_channels: int, labels: Mapping[str, LabelSpec]) -> DayRecord:
  """Decodes every field, and the `labels`, into a DayRecord (fresh, writable arrays)."""
  features = parse(buf).features.feature
  signals, observed = _feature_arrays(features, num_channels)
  values_of: dict[str, float | int | np.ndarray] = {}
  for name, spec in labels.items():
    want = "float" if spec.kind == "regression" else "int64"
    size = MINUTES_PER_DAY if spec.level == "minute" else 1
    values = _list(features, f"label/{name}", want, size,
                   f" with {size} value(s) ({spec.level} label)")
    if spec.level == "minute":
      values_of[name] = _int64s(values)
    else:
      values_of[name] = float(values.value[0]) if spec.kind == "regression" else int(values.value[0])
  return DayRecord(_single_bytes(features, "subject_id").decode(),
                   _single_bytes(features, "day").decode(), signals.copy(), observed.copy(),
                   values_of)
