"""TensorBoard scalars and hyperparameters for training and evaluation, without TensorFlow.

CLU's writers reach TensorBoard through tf.summary, so `import clu.metric_writers` imports
TensorFlow: ~7-14 s and several hundred MB at the start of every training and evaluation
process, on every host of a pod, for files that are only a TFRecord of `Event` protos. A
local directory gets those files written here (the protos are TensorBoard's own, the framing
is TFRecord's); a bucket (gs://) goes through CLU's SummaryWriter, because reaching a bucket
takes TensorFlow's filesystem anyway. Either way the writer also logs each write as a
console line, as CLU's default writer does, and processes other than 0 only log.
"""
from __future__ import annotations

from collections.abc import Mapping
import os
import socket
import struct
import threading
import time
from typing import Any, Protocol

from absl import logging
import jax
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary

from lsm2 import storage
from lsm2.data.crc32c import masked_crc32c


class MetricWriter(Protocol):
  """What training and evaluation write through (a subset of clu's MetricWriter)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...
  def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...


def _frame(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
  """A float32 scalar as tf.summary.scalar writes it (a tensor for the scalars plugin)."""
  return summary_pb2.Summary.Value(
      tag=tag,
      tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)],
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto()),
      metadata=summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")))


class EventFileWriter:
  """Appends `Event` records to one new events.out.tfevents.* file in a local directory."""

  _counter = 0
  _counter_lock = threading.Lock()

  def __init__(self, logdir: str | os.PathLike):
    os.makedirs(logdir, exist_ok=True)
    with self._counter_lock:  # Two writers in one process and second get two files.
      EventFileWriter._counter += 1
      n = EventFileWriter._counter
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{n}.v2"
    self.path = os.path.join(os.fspath(logdir), name)
    self._lock = threading.Lock()
    self._file = open(self.path, "ab")  # pylint: disable=consider-using-with
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    with self._lock:
      self._file.write(_frame(event.SerializeToString()))
      self._file.flush()  # A few hundred bytes per log step: readers see them at once.

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [_scalar_value(tag, v) for tag, v in scalars.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._write(event_pb2.Event(wall_time=time.time(), step=0,
                                summary=hparams_summary.hparams_pb(dict(hparams))))

  def flush(self) -> None:
    with self._lock:
      self._file.flush()

  def close(self) -> None:
    with self._lock:
      self._file.close()


class _LoggingWriter:
  """Console lines in the format of clu's LoggingWriter."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("[Hyperparameters] %s", dict(hparams))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class _Both:
  """Every write to each writer, in order."""

  def __init__(self, *writers: MetricWriter):
    self.writers = writers

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()


def create_writer(logdir: str | os.PathLike) -> MetricWriter:
  """TensorBoard events in `logdir` plus console lines; processes other than 0 only log."""
  if jax.process_index() > 0:
    return _LoggingWriter()
  if storage.is_remote(logdir):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
    return metric_writers.create_default_writer(os.fspath(logdir), asynchronous=True)
  return _Both(EventFileWriter(logdir), _LoggingWriter())
