"""tf.train.Example encoding of a day record, at the protobuf wire level (no TensorFlow).

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
decodes these records too. A packed float list is a length-prefixed run of
little-endian float32, so the decoder reads `signals` with one np.frombuffer;
int64 lists are packed varints, encoded and decoded with numpy (a minute label
is 1440 of them). Reading with tf.data is shown in docs/data.md and tested in
tests/test_data_format.py.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

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


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
  if pos < end and buf[pos] < 0x80:  # Fast path: one byte.
    return buf[pos], pos + 1
  result = shift = 0
  while True:
    if pos >= end:
      raise RecordDecodeError("truncated varint")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise RecordDecodeError("varint longer than 10 bytes")


def _read_len(buf: bytes, pos: int, end: int) -> tuple[int, int]:
  n, pos = _read_varint(buf, pos, end)
  if pos + n > end:
    raise RecordDecodeError(f"length {n} at byte {pos} runs past the end of its message")
  return pos, pos + n


def _skip(buf: bytes, wire: int, pos: int, end: int) -> int:
  if wire == 0:
    return _read_varint(buf, pos, end)[1]
  if wire == 1:
    pos += 8
  elif wire == 2:
    return _read_len(buf, pos, end)[1]
  elif wire == 5:
    pos += 4
  else:
    raise RecordDecodeError(f"unsupported wire type {wire}")
  if pos > end:
    raise RecordDecodeError("truncated field")
  return pos


def _decode_feature(buf: bytes, pos: int, end: int) -> tuple[str, Any]:
  """Returns ('bytes', [memoryview]), ('float', np.ndarray) or ('int64', np.ndarray)."""
  kind, values = "none", None
  while pos < end:
    tag, pos = _read_varint(buf, pos, end)
    field, wire = tag >> 3, tag & 7
    if wire != 2 or field not in (1, 2, 3):
      pos = _skip(buf, wire, pos, end)
      continue
    lo, hi = _read_len(buf, pos, end)
    pos = hi
    if field == 1:
      kind, values = "bytes", []
      p = lo
      while p < hi:
        t, p = _read_varint(buf, p, hi)
        if t != 0x0A:
          raise RecordDecodeError(f"bytes_list: unexpected tag {t}")
        a, p = _read_len(buf, p, hi)
        values.append(memoryview(buf)[a:p])
    elif field == 2:
      kind, values = "float", _decode_floats(buf, lo, hi)
    else:
      kind, values = "int64", _decode_int64s(buf, lo, hi)
  return kind, values


def _decode_floats(buf: bytes, lo: int, hi: int) -> np.ndarray:
  parts = []
  p = lo
  while p < hi:
    t, p = _read_varint(buf, p, hi)
    if t == 0x0A:  # Packed.
      a, p = _read_len(buf, p, hi)
      if (p - a) % 4:
        raise RecordDecodeError(f"packed float list of {p - a} bytes is not a multiple of 4")
      parts.append(np.frombuffer(buf, dtype="<f4", count=(p - a) // 4, offset=a))
    elif t == 0x0D:  # One unpacked fixed32.
      if p + 4 > hi:
        raise RecordDecodeError("truncated float")
      parts.append(np.frombuffer(buf, dtype="<f4", count=1, offset=p))
      p += 4
    else:
      raise RecordDecodeError(f"float_list: unexpected tag {t}")
  if len(parts) == 1:
    return parts[0]
  return np.concatenate(parts) if parts else np.zeros(0, "<f4")


def _decode_packed_varints(buf: bytes, lo: int, hi: int) -> np.ndarray:
  """int64 values of the packed varints in buf[lo:hi] (two's complement, as protobuf)."""
  b = np.frombuffer(buf, np.uint8, count=hi - lo, offset=lo)
  ends = np.flatnonzero(b < 0x80)
  if b.size and (ends.size == 0 or ends[-1] != b.size - 1):
    raise RecordDecodeError("truncated varint")
  starts = np.r_[0, ends[:-1] + 1] if ends.size else ends
  lengths = ends - starts + 1
  if lengths.size and lengths.max() > 10:
    raise RecordDecodeError("varint longer than 10 bytes")
  shifts = 7 * (np.arange(b.size) - np.repeat(starts, lengths))
  parts = (b & 0x7F).astype(np.uint64) << shifts.astype(np.uint64)
  if not parts.size:
    return np.zeros(0, np.int64)
  return np.bitwise_or.reduceat(parts, starts).view(np.int64)


def _decode_int64s(buf: bytes, lo: int, hi: int) -> np.ndarray:
  parts = []
  p = lo
  while p < hi:
    t, p = _read_varint(buf, p, hi)
    if t == 0x0A:
      a, p = _read_len(buf, p, hi)
      parts.append(_decode_packed_varints(buf, a, p))
    elif t == 0x08:
      v, p = _read_varint(buf, p, hi)
      parts.append(np.array([v], np.uint64).view(np.int64))
    else:
      raise RecordDecodeError(f"int64_list: unexpected tag {t}")
  if len(parts) == 1:
    return parts[0]
  return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def decode_features(buf: bytes | memoryview,
                    keys: frozenset[str] | None = None) -> dict[str, tuple[str, Any]]:
  """Decodes a serialized tf.train.Example into {key: (kind, values)}.

  With `keys`, other features are skipped without decoding their values.
  """
  end = len(buf)
  pos = 0
  features: dict[str, tuple[str, Any]] = {}
  while pos < end:
    tag, pos = _read_varint(buf, pos, end)
    if tag != 0x0A:  # Example.features
      pos = _skip(buf, tag & 7, pos, end)
      continue
    flo, fhi = _read_len(buf, pos, end)
    pos = fhi
    p = flo
    while p < fhi:
      t, p = _read_varint(buf, p, fhi)
      if t != 0x0A:  # Features.feature map entry
        p = _skip(buf, t & 7, p, fhi)
        continue
      elo, ehi = _read_len(buf, p, fhi)
      p = ehi
      key, span = None, None
      q = elo
      while q < ehi:
        t2, q = _read_varint(buf, q, ehi)
        if t2 == 0x0A:
          a, q = _read_len(buf, q, ehi)
          try:
            key = bytes(buf[a:q]).decode()
          except UnicodeDecodeError:
            raise RecordDecodeError("feature key is not UTF-8") from None
        elif t2 == 0x12:
          span = _read_len(buf, q, ehi)
          q = span[1]
        else:
          q = _skip(buf, t2 & 7, q, ehi)
      if key is None:
        raise RecordDecodeError("feature map entry without a key")
      if keys is None or key in keys:
        features[key] = _decode_feature(buf, *span) if span else ("none", None)
  return features


def _single_bytes(features: Mapping[str, tuple[str, Any]], key: str) -> memoryview:
  kind, values = features.get(key, ("missing", None))
  if kind != "bytes" or len(values) != 1:
    raise RecordDecodeError(f"feature {key!r} must be a bytes_list with one value, got "
                            f"{kind}{'' if values is None else f' of length {len(values)}'}")
  return values[0]


_ARRAY_KEYS = frozenset({"signals", "observed"})


def decode_arrays(buf: bytes | memoryview, num_channels: int, fields_only: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Decodes signals float32[1440, C] (read-only view) and observed bool[1440, C].

  Also returns the decoded feature dict for further fields (only these two
  with fields_only=True, the training hot path).
  """
  features = decode_features(buf, _ARRAY_KEYS if fields_only else None)
  kind, signals = features.get("signals", ("missing", None))
  expected = MINUTES_PER_DAY * num_channels
  if kind != "float":
    raise RecordDecodeError(f"feature 'signals' must be a float_list, got {kind}")
  if signals.size != expected:
    raise RecordDecodeError(f"feature 'signals' has {signals.size} values, expected "
                            f"{expected} = {MINUTES_PER_DAY} x {num_channels} channels")
  stored = _single_bytes(features, "observed")
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
          observed.reshape(MINUTES_PER_DAY, num_channels), features)


def decode_subject_id(features: Mapping[str, tuple[str, Any]]) -> str:
  return bytes(_single_bytes(features, "subject_id")).decode()


def decode_record(buf: bytes, num_channels: int, labels: Mapping[str, LabelSpec]) -> DayRecord:
  """Decodes every field, and the `labels`, into a DayRecord (signals copied, writable)."""
  signals, observed, features = decode_arrays(buf, num_channels)
  day = bytes(_single_bytes(features, "day")).decode()
  values_of: dict[str, float | int | np.ndarray] = {}
  for name, spec in labels.items():
    key = f"label/{name}"
    fkind, values = features.get(key, ("missing", None))
    want = "float" if spec.kind == "regression" else "int64"
    size = MINUTES_PER_DAY if spec.level == "minute" else 1
    if fkind != want or len(values) != size:
      raise RecordDecodeError(
          f"feature {key!r} must be a {want}_list with {size} value(s) ({spec.level} label), got "
          f"{fkind}{'' if values is None else f' of length {len(values)}'}")
    if spec.level == "minute":
      values_of[name] = values
    else:
      values_of[name] = float(values[0]) if spec.kind == "regression" else int(values[0])
  return DayRecord(decode_subject_id(features), day, signals.copy(), observed, values_of)


