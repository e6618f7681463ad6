"""The Grain training input pipeline: shards -> normalized per-process batches -> global jax.Arrays.

Built from Grain's parts and three of lsm2's own (grain_sources: TFRecordShard,
WindowShuffle, DecodeBatch):
TFRecord:     per-epoch file shuffle (MapDataset.shuffle), per-process file
              slicing, Grain's interleave over lsm2's TFRecordShard reader
              (data checksums verified), lsm2's WindowShuffle of raw records,
              then decode + normalize per batch (DecodeBatch).
ArrayRecord:  per-epoch record shuffle (MapDataset.shuffle), cut into local
              batches dealt to the processes in turn (batch, then slice), read
              by random access (ArrayRecordDataSource) right before each record
              is decoded: the global batches are the same for any process count.
Both optionally run in `worker_count` processes (Grain mp_prefetch).
Synthetic stream (make_synthetic_stream_iterator, config.data.source
"synthetic_stream"): endless fresh synthetic people generated on demand
(lsm2.data.synthetic_stream), batched like ArrayRecord.
docs/data.md explains the design and its measurements.

Within each epoch the processes read disjoint parts that together cover the
split exactly once (ArrayRecord: but for the N mod local-batch records that do
not fill a batch, a different few each epoch). With items not divisible by the
process count, processes get one item (file or batch) more or less per epoch:
use num_epochs=None (the default, endless) for multi-host training and count
steps.
"""
from __future__ import annotations

import os

import grain
from absl import flags
import jax
import numpy as np

from lsm2.data import grain_sources
from lsm2.data.metadata import load_metadata

DEFAULT_WINDOW = 256  # Raw records (~155 KB each for 26 channels) per window shuffle.
DEFAULT_CYCLE = 4  # TFRecord files read concurrently per worker.
# config.data.source: the training split's files, or endless fresh synthetic people.
TRAIN_SOURCES = ("files", "synthetic_stream")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if pc < 1 or not 0 <= pi < pc:
    raise ValueError(f"need 0 <= process_index < process_count, got {pi} and {pc}")
  return pi, pc


def make_train_iterator(data_dir: str | os.PathLike, split: str, *, global_batch_size: int,
                        seed: int, shuffle: bool = True, num_epochs: int | None = None,
                        worker_count: int = 0, process_index: int | None = None,
                        process_count: int | None = None, max_subjects: int | None = None,
                        window_size: int = DEFAULT_WINDOW, cycle_length: int = DEFAULT_CYCLE,
                        verify_checksums: bool = True) -> grain.DatasetIterator:
  """Returns a checkpointable iterator of this process's batches of one split.

  Each element is {"signals": float32[b, 1440, C], "observed": bool[b, 1440, C]}
  with b = global_batch_size // process_count: signals z-scored with the
  dataset's train statistics, clipped to [-5, 5], 0 at unobserved minutes.
  Incomplete batches are dropped: TFRecord batches run on across epochs,
  ArrayRecord batches are cut within each epoch. num_epochs=None repeats forever.

  max_subjects keeps the first K subjects of a fixed shuffle of the split's
  subjects, so smaller subsets are nested in larger ones (data-size sweeps;
  the other records are still read, then dropped).
  verify_checksums checks every TFRecord data CRC (a corrupt record raises
  CorruptShardError naming its shard and index; costs are in docs/data.md);
  ArrayRecord files verify their own chunk hashes.
  Nothing here changes process-wide settings: glibc malloc tuning is the
  caller's choice (grain_sources.keep_freed_memory(), which lsm2.main applies;
  the Grain workers then follow it), and worker_count > 0 needs absl flags
  parsed (Grain's worker start-up reads them): run under absl.app, or call
  absl.flags.FLAGS.mark_as_parsed() at your entry point.
  worker_count > 0 decodes in Grain worker processes, each batching its own
  slice of the record (ArrayRecord) or file (TFRecord) stream. Every batch
  then lives in fresh shared memory; where first-touching a page is slow (a
  VM: ~13 ms per 64-record batch here, ~200 us per record) workers only pay
  off with spare cores.

  Resuming: `it.get_state()` / `it.set_state(state)` (JSON-able), or with Orbax
  via Grain's handler, e.g. in a composite CheckpointManager:

    mngr = ocp.CheckpointManager(dir, item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data_iter": grain.checkpoint.CheckpointHandler()})
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(it)))   # restores `it` in place

  The handler writes one JSON file per process named by jax.process_index().
  After a restore the iterator yields exactly the batches an uninterrupted run
  would have seen (same seed, process layout and worker_count).
  """
  pi, pc = _process(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % pc:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={pc}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
  if max_subjects is not None and max_subjects < 1:
    raise ValueError(f"max_subjects must be None or >= 1, got {max_subjects}")
  local_batch = global_batch_size // pc
  _check_workers(worker_count)
  meta = load_metadata(data_dir)
  paths = [str(p) for p in meta.shard_paths(split)]
  counts = [meta.shard_records[os.path.basename(p)] for p in paths]
  if sum(counts) == 0:
    raise ValueError(f"split {split!r} of {data_dir} has no records")
  keep = None
  if max_subjects is not None:
    subjects = sorted(meta.subjects[split])
    order = np.random.default_rng(0).permutation(len(subjects))
    keep = {subjects[i] for i in order[:max_subjects]}

  decode = grain_sources.DecodeBatch(meta.num_channels, meta.norm_mean, meta.norm_std)
  if meta.format == "tfrecord":
    if len(paths) < pc:
      raise ValueError(f"split {split!r} has {len(paths)} TFRecord shards for {pc} processes: "
                       "each process needs at least one file (rewrite with more shards, or "
                       "use --format array_record)")
    files = grain.MapDataset.range(len(paths))
    if shuffle:
      files = files.shuffle(seed=seed)  # A fresh file order every epoch.
    files = files[pi::pc]
    shards = files.repeat(num_epochs).map(grain_sources.OpenShard(paths, counts,
                                                                   verify_checksums))
    ds = grain.experimental.InterleaveIterDataset(shards,
                                                  cycle_length=min(cycle_length, len(files)))
    if shuffle:
      ds = grain_sources.WindowShuffle(ds, window_size=window_size, seed=seed)
  else:
    read = grain_sources.ArrayRecordReads(paths, counts)
    if len(read) < pc:
      raise ValueError(f"split {split!r} has {len(read)} records for {pc} processes")
    records = grain.MapDataset.range(len(read))
    if shuffle:
      records = records.shuffle(seed=seed)  # A fresh permutation every epoch.
    if keep is None:
      # Process p takes local batches p, p + P, p + 2P, ... of the epoch's order, so
      # global batch k holds what a single process's k-th batch would.
      blocks = records.batch(local_batch, drop_remainder=True)[pi::pc]
      if len(blocks) == 0:
        raise ValueError(f"split {split!r} has {len(read)} records: too few for {pc} "
                         f"processes with local batches of {local_batch}")
      # Each record is read right before it is decoded (in cache).
      decode = grain_sources.DecodeBatch(meta.num_channels, meta.norm_mean, meta.norm_std,
                                         read=read)
      if worker_count:
        decode.enable_shared_memory_output()  # Grain does so only for a final .batch().
      ds = blocks.repeat(num_epochs).map(decode).to_iter_dataset(
          grain.ReadOptions(num_threads=0))
    else:  # The subject filter needs the records before batching.
      ds = (records[pi::pc].repeat(num_epochs).map(read)
            .to_iter_dataset(grain.ReadOptions(num_threads=0)))
  if keep is not None:
    ds = ds.filter(grain_sources.SubjectFilter(keep))
  if meta.format == "tfrecord" or keep is not None:
    ds = ds.batch(local_batch, drop_remainder=True, batch_fn=decode)
  return iter(_prefetch(ds, worker_count))


def _check_workers(worker_count: int) -> None:
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  if worker_count and not flags.FLAGS.is_parsed():
    raise RuntimeError(
        f"worker_count={worker_count} needs parsed absl flags (Grain's worker start-up reads "
        "its --grain_* flags): run under absl.app.run, or call "
        "absl.flags.FLAGS.mark_as_parsed() at your program's entry point")


def _prefetch(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  if not worker_count:
    return ds
  # Workers decode and normalize into shared memory; the hand-over copies nothing.
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=2),
                        worker_init_fn=(grain_sources.keep_freed_memory
                                        if grain_sources.keeps_freed_memory() else None))


def make_synthetic_stream_iterator(data_dir: str | os.PathLike, *, global_batch_size: int,
                                   seed: int, worker_count: int = 0,
                                   process_index: int | None = None,
                                   process_count: int | None = None) -> grain.DatasetIterator:
  """Endless batches of fresh synthetic people, paired with the synthetic dataset `data_dir`.

  Batches are make_train_iterator's (same fields, normalized with data_dir's
  train statistics), but every day comes from a new subject of the same
  generator (lsm2.data.synthetic_stream): never one of data_dir's subjects,
  so its validation and test splits stay unseen. `seed` picks the people.
  As for ArrayRecord, global batch k is stream positions [k G, (k + 1) G)
  for any process count, each process taking its own slice, and the state
  (the next batch index) resumes exactly.
  """
  pi, pc = _process(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % pc:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={pc}")
  _check_workers(worker_count)
  # Here, not at the top: the generator (scipy's filters) adds ~1.8 s to importing this
  # module, which evaluation and lsm2.data.dataset import without ever streaming.
  from lsm2.data import synthetic_stream  # pylint: disable=g-import-not-at-top
  meta = load_metadata(data_dir)
  days = synthetic_stream.SyntheticDays(meta, draw_seed=seed)
  local_batch = global_batch_size // pc
  decode = grain_sources.DecodeBatch(meta.num_channels, meta.norm_mean, meta.norm_std,
                                     read=days)
  if worker_count:
    decode.enable_shared_memory_output()
  # Global batch k = positions [kG, (k+1)G): local batch k*P + p is process p's k-th.
  blocks = grain.MapDataset.range(len(days)).batch(local_batch, drop_remainder=True)[pi::pc]
  ds = blocks.map(decode).to_iter_dataset(grain.ReadOptions(num_threads=0))
  return iter(_prefetch(ds, worker_count))


def make_eval_iterator(data_dir: str | os.PathLike, split: str, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None
                       ) -> grain.DatasetIterator:
  """One pass over a split in storage order (validation): the same batches at every call.

  Batches are make_train_iterator's (normalized, this process's share of each
  global batch, incomplete last batch dropped), without shuffling or repeats.
  """
  # Without shuffling the seed is never read.
  return make_train_iterator(data_dir, split, global_batch_size=global_batch_size, seed=0,
                             shuffle=False, num_epochs=1, process_index=process_index,
                             process_count=process_count)


def to_global_batch(local_batch: dict[str, np.ndarray],
                    sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global jax.Arrays laid out by `sharding`.

  The global batch dimension is the concatenation of the processes' local
  batches (process order), as jax.make_array_from_process_local_data defines.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}
