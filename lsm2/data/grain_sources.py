"""lsm2's own Grain pieces: TFRecord shard reading, window shuffle, decode + normalize.

The rest of the pipeline is Grain's (shuffle, slicing, repeat, interleave,
batch, ArrayRecordDataSource); docs/data.md lists which piece is whose, with
the measurements behind each choice. Everything here is picklable (Grain's
worker processes receive the pipeline by cloudpickle) and checkpointable
(iterator state is plain JSON-able data).
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from lsm2.data import example
from lsm2.data.metadata import CLIP, inverse_std
from lsm2.data.record import MINUTES_PER_DAY
from lsm2 import storage
from lsm2.data.shards import (CorruptShardError, close_array_record, open_array_record,
                              read_tfrecord_at, read_tfrecord_mapped)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters.
_KEEPS_FREED_MEMORY = False  # Whether keep_freed_memory() was applied in this process.


def keeps_freed_memory() -> bool:
  """Whether keep_freed_memory() was applied here (Grain workers then apply it too)."""
  return _KEEPS_FREED_MEMORY


def keep_freed_memory(worker_index: int = 0, worker_count: int = 1) -> bool:
  """Makes glibc malloc serve and keep large blocks in the heap (process-wide).

  An explicit opt-in for a program's entry point (lsm2.main applies it unless
  --nokeep_freed_memory): no library call changes the allocator by itself.

  By default glibc maps every block above ~128 KB-32 MB freshly from the OS and
  returns it on free, so each 155 KB record and each batch pays page faults
  again (about 100 us per record in this VM: half of ArrayRecord's pipeline
  time). Blocks up to 256 MB now come from the heap and up to 1 GB of freed
  heap is kept for reuse. Returns False where mallopt is unavailable (not glibc).
  The arguments let Grain call it as a worker_init_fn.
  """
  global _KEEPS_FREED_MEMORY
  del worker_index, worker_count
  try:
    libc = ctypes.CDLL("libc.so.6")
    _KEEPS_FREED_MEMORY = bool(libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)
                               and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
  except (OSError, AttributeError):
    _KEEPS_FREED_MEMORY = False
  return _KEEPS_FREED_MEMORY


# (serialized Example, shard file name, record index in that shard)
RawRecord = tuple[bytes | memoryview, str, int]


class _WindowShuffleIterator(grain.DatasetIterator):
  """Fills a window from the parent, emits it in a seeded random order, repeats."""

  def __init__(self, parent: grain.DatasetIterator, window_size: int, seed: int):
    super().__init__(parent)
    self._window_size = window_size
    self._seed = seed
    self._window: list[Any] = []
    self._window_index = -1
    self._pos = 0  # Elements of the current window already emitted.
    self._window_start = parent.get_state()

  def _fill(self) -> None:
    self._window_start = self._parent.get_state()
    window = []
    for _ in range(self._window_size):
      try:
        window.append(next(self._parent))
      except StopIteration:
        break
    order = np.random.default_rng([self._seed, self._window_index]).permutation(len(window))
    self._window = [window[i] for i in order]

  def __next__(self):
    if self._pos >= len(self._window):
      if self._window_index >= 0 and len(self._window) < self._window_size:
        raise StopIteration  # The parent ran out while filling the last window.
      self._window_index += 1
      self._pos = 0
      self._fill()
      if not self._window:
        raise StopIteration
    item = self._window[self._pos]
    self._window[self._pos] = None  # Release memory early.
    self._pos += 1
    return item

  def get_state(self) -> dict[str, Any]:
    return {"window_start": self._window_start, "window_index": self._window_index,
            "pos": self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    self._window_index = int(state["window_index"])
    self._pos = int(state["pos"])
    self._window = []
    self._window_start = state["window_start"]
    self._parent.set_state(self._window_start)
    if self._window_index >= 0:
      self._fill()  # Re-reads the window from its start; same seed, same order.


class WindowShuffle(grain.IterDataset):
  """Shuffles within consecutive windows of `window_size` elements (checkpointable).

  Same idea as grain.experimental.WindowShuffleIterDataset, which draws each
  element's position with index_shuffle: ~130 us per element for a window of
  256 here, more than reading and decoding a day record, and with it the
  TFRecord pipeline fell below 3,000 day-records/s (docs/data.md). A numpy
  permutation per window costs next to nothing.
  """

  def __init__(self, parent: grain.IterDataset, window_size: int, seed: int):
    super().__init__(parent)
    if window_size < 1:
      raise ValueError(f"window_size must be >= 1, got {window_size}")
    self._window_size = window_size
    self._seed = seed

  def __iter__(self) -> _WindowShuffleIterator:
    return _WindowShuffleIterator(self._parent.__iter__(), self._window_size, self._seed)

  def __str__(self) -> str:
    return f"WindowShuffle(window_size={self._window_size})"


class _TFRecordShardIterator(grain.DatasetIterator):
  """Sequential reader of one shard (memory-mapped, or streamed from a bucket).

  State = (record index, byte offset).
  """

  def __init__(self, path: str, expected_records: int, verify_checksums: bool):
    super().__init__()
    self._path = path
    self._name = os.path.basename(path)
    self._expected = expected_records
    self._verify = verify_checksums
    self._index = 0
    self._offset = 0
    self._map = None  # A local shard: memory-mapped.
    self._file = None  # A shard on a bucket: streamed (etils.epath, buffered reads).
    self._stack = None
    self._done = False

  def _open(self) -> None:
    if storage.is_remote(self._path):
      self._stack = contextlib.ExitStack()  # epath's open is a context manager.
      self._file = self._stack.enter_context(storage.as_path(self._path).open("rb"))
      self._file.seek(self._offset)
      return
    with open(self._path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      # Records are views into the map; it is freed when the last one is.
      self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

  def _close(self) -> None:
    if self._file is not None:
      self._stack.close()
    self._map = self._file = self._stack = None

  def __next__(self) -> RawRecord:
    if self._done:
      raise StopIteration
    if self._map is None and self._file is None:
      self._open()
    if self._file is not None:
      data = read_tfrecord_at(self._file, self._path, self._index, self._verify)
      got = None if data is None else (data, self._offset + 16 + len(data))
    else:
      got = read_tfrecord_mapped(self._map, self._offset, self._path, self._index, self._verify)
    if got is None:
      self._close()
      self._done = True
      if self._index != self._expected:
        raise CorruptShardError(self._path, None, f"holds {self._index} records, "
                                f"metadata.json says {self._expected}")
      raise StopIteration
    data, self._offset = got
    index = self._index
    self._index += 1
    return data, self._name, index

  def get_state(self) -> dict[str, int]:
    return {"index": self._index, "offset": self._offset}

  def set_state(self, state: dict[str, int]) -> None:
    self._close()  # Reopened at the restored offset by the next __next__.
    self._index, self._offset = int(state["index"]), int(state["offset"])
    self._done = False


class TFRecordShard(grain.IterDataset):
  """One TFRecord shard as a Grain IterDataset of RawRecord."""

  def __init__(self, path: str, expected_records: int, verify_checksums: bool = False):
    super().__init__()
    self.path = path
    self.expected_records = expected_records
    self.verify_checksums = verify_checksums

  def __iter__(self) -> _TFRecordShardIterator:
    return _TFRecordShardIterator(self.path, self.expected_records, self.verify_checksums)

  def __str__(self) -> str:
    return f"TFRecordShard({os.path.basename(self.path)})"


class OpenShard:
  """File index -> TFRecordShard (Grain's shuffle and slicing give the per-epoch file order)."""

  def __init__(self, paths: list[str], counts: list[int], verify_checksums: bool):
    self.paths, self.counts, self.verify_checksums = paths, counts, verify_checksums

  def __call__(self, i: int) -> TFRecordShard:
    return TFRecordShard(self.paths[i], self.counts[i], self.verify_checksums)


class ArrayRecordReads:
  """Index -> RawRecord through grain.sources.ArrayRecordDataSource, errors naming the file.

  Every file is opened once up front to check it and its record count against
  metadata.json.
  """

  def __init__(self, paths: list[str], counts: list[int]):
    for path, count in zip(paths, counts):
      reader = open_array_record(path)
      n = reader.num_records()
      close_array_record(reader, path)
      if n != count:
        raise CorruptShardError(path, None, f"holds {n} records, metadata.json says {count}")
    self.names = [os.path.basename(p) for p in paths]
    self.starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    # "path[start:end]" gives the source the counts, so it does not open every file
    # again; it adds readahead_buffer_size:0 itself (shards.ARRAY_RECORD_READER_OPTIONS).
    self.source = grain.sources.ArrayRecordDataSource(
        [f"{p}[0:{n}]" for p, n in zip(paths, counts)],
        reader_options={"max_parallelism": "0"})

  def __len__(self) -> int:
    return self.starts[-1]

  def __call__(self, index: int) -> RawRecord:
    f = bisect.bisect_right(self.starts, index) - 1
    local = int(index) - self.starts[f]
    try:
      data = self.source[index]
    except Exception as e:  # pylint: disable=broad-except  # The C++ layer's bare errors.
      raise CorruptShardError(self.names[f], local, f"cannot read record: {e}") from None
    return data, self.names[f], local


class DecodeBatch:
  """Grain batch_fn: records -> {"signals", "observed"} float32/bool[b, 1440, C], normalized.

  The elements are RawRecords or, with `read` (ArrayRecordReads), record
  indices, each read right before it is decoded so that its bytes are still
  in the CPU cache (reading a whole batch first costs ~30 us more per record).
  Each record is decoded and z-scored straight into its row of the batch:
  (x - mean) * (1 / std) with the stored train statistics, clipped to
  [-5, 5], 0 at unobserved minutes; a stored non-finite value counts as
  unobserved. The statistics are tiled to a whole day so that every step is
  one contiguous pass over 150 KB (numpy's broadcast over a last axis of
  C=26 is ~3x slower); stacking a 10 MB batch and then normalizing it in
  passes over memory cost ~70 us per record. In Grain worker processes the
  batch is written into shared memory (`enable_shared_memory_output`), so
  the hand-over copies nothing.
  """

  def __init__(self, num_channels: int, mean: np.ndarray, std: np.ndarray,
               read: Callable[[int], RawRecord] | None = None):
    self.num_channels = num_channels
    self.mean = np.tile(np.asarray(mean, np.float32), (MINUTES_PER_DAY, 1))
    self.inv_std = np.tile(inverse_std(std), (MINUTES_PER_DAY, 1))
    self.zeros = np.zeros(MINUTES_PER_DAY * num_channels, np.float32)
    self.read = read
    self.shared_memory = False

  def enable_shared_memory_output(self) -> None:
    self.shared_memory = True

  def __call__(self, elements: Sequence[RawRecord] | Sequence[int]) -> dict[str, np.ndarray]:
    shape = (len(elements), MINUTES_PER_DAY, self.num_channels)
    alloc = grain.multiprocessing.SharedMemoryArray if self.shared_memory else np.empty
    signals, observed = alloc(shape, np.float32), alloc(shape, np.bool_)
    with np.errstate(invalid="ignore"):  # NaN from the finiteness check below.
      for row, element in enumerate(elements):
        data, name, index = element if self.read is None else self.read(element)
        try:
          x, o = example.decode_arrays(data, self.num_channels)
        except example.RecordDecodeError as e:
          raise CorruptShardError(name, index, str(e)) from None
        z = signals[row]
        np.subtract(x, self.mean, out=z)
        np.multiply(z, self.inv_std, out=z)
        np.clip(z, -CLIP, CLIP, out=z)
        # 0 * x is NaN exactly where x is not finite: one fast BLAS pass proves
        # the common case (all finite).
        if np.isfinite(np.dot(x.reshape(-1), self.zeros)):
          observed[row] = o
          np.multiply(z, o, out=z)
        else:
          np.logical_and(o, np.isfinite(x), out=observed[row])
          np.copyto(z, 0.0, where=~observed[row])
    return {"signals": signals, "observed": observed}


class SubjectFilter:
  """Keeps records whose subject is in `subjects` (for data-size sweeps)."""

  def __init__(self, subjects: set[str]):
    self.subjects = subjects

  def __call__(self, raw: RawRecord) -> bool:
    data, name, index = raw
    try:
      return example.decode_subject_id(data) in self.subjects
    except example.RecordDecodeError as e:
      raise CorruptShardError(name, index, str(e)) from None

