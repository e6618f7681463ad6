"""Converts wearable exports on Apache Beam: the dataset `lsm2.data.convert` writes, byte for byte.

  python -m lsm2.data.convert --format long_csv --input data.csv --out DIR --beam \
      [--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp ...]

Every flag after --beam that `convert` does not know is a Beam pipeline option
(default --runner=DirectRunner). The pipeline calls the single-process path's
own functions (lsm2.data.convert, converters.common.day_records,
writer.encode_checked) and spreads their work:

  read      one task per export (apple_health, fitbit_takeout: find_exports);
            the other formats read their input in one task (a table or a
            directory holds every subject), yielding one timeline per subject.
            A gs:// input is copied to the worker's disk and read there (the
            converters read local files); errors name the gs:// path
  per subject (in parallel): the device formats' channel selection, day
            records, sanitize + label checks + tf.train.Example encoding
  global    subject-disjoint splits (splits.assign_subjects), each subject's
            offset in its split: record k of a split goes to shard k % n at
            position k // n, as DatasetWriter's round robin does
  shards    grouped by (split, shard), sorted by position, written by one task each
  metadata  normalisation statistics and missingness as exact, order-free
            combines (writer.SplitTally); metadata.json and TFDS's files are
            written once, by this process, after the pipeline succeeded

Workers write shards to a staging directory (under --temp_location, else a
local temporary one) that is moved into --out only when the whole pipeline
succeeded: bad input fails with the single-process error and leaves --out
untouched. The move goes through DatasetWriter, which stages in --out and
swaps the new dataset in only once it is complete, as without Beam.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lsm2 import storage
from lsm2.data import convert as convert_lib
from lsm2.data import splits as splits_lib
from lsm2.data.converters.common import DayStats, SubjectTimeline, day_records
from lsm2.data.shards import check_array_record_is_local, check_format, shard_filename
from lsm2.data.writer import DatasetWriter, SplitTally, encode_checked, make_writer

SUMMARY_FILE = "summary.pickle"


def import_beam():
  """apache_beam, or an error saying how to install it."""
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("converting with --beam needs Apache Beam: pip install apache-beam "
                      "(for Dataflow: pip install 'apache-beam[gcp]')") from e
  return apache_beam


def convert(fmt: str, input_path: str | pathlib.Path, out_dir: str | pathlib.Path,
            beam_args: Sequence[str], *, max_missing: float = 0.8, seed: int = 0,
            split_fractions: Sequence[float] = (0.8, 0.1, 0.1), shards: int = 2,
            out_format: str = "tfrecord", overwrite: bool = False, nonwear=True,
            long_options: dict[str, Any] | None = None,
            device_options: dict[str, Any] | None = None) -> tuple[Any, DayStats]:
  """lsm2.data.convert.convert on a Beam runner (`beam_args`: pipeline flags); same result."""
  beam = import_beam()
  from apache_beam.options import pipeline_options as po  # pylint: disable=g-import-not-at-top
  rule = convert_lib.check_options(fmt, out_dir, max_missing=max_missing, overwrite=overwrite,
                                   nonwear=nonwear)
  check_format(out_format)
  if out_format == "array_record":
    check_array_record_is_local(out_dir)
  if shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {shards}")
  options = po.PipelineOptions(list(beam_args))
  runner = options.view_as(po.StandardOptions).runner or "DirectRunner"
  temp_location = options.view_as(po.GoogleCloudOptions).temp_location
  if out_format == "array_record" and temp_location:
    check_array_record_is_local(temp_location)
  units = _units(fmt, input_path)
  staging = _staging_dir(out_dir, temp_location, runner)
  plan = _Plan(fmt=fmt, rule=rule, max_missing=max_missing, seed=seed,
               split_fractions=tuple(split_fractions), shards=shards, out_format=out_format,
               long_options=long_options, device_options=device_options,
               staging=os.fspath(staging))
  try:
    try:
      with beam.Pipeline(options=options) as p:
        _build(beam, p, units, plan)
    except Exception as e:  # pylint: disable=broad-except
      raise _original_error(e) from None
    summary = pickle.loads((staging / SUMMARY_FILE).read_bytes())
    return _finish(summary, plan, input_path, out_dir, overwrite, staging)
  finally:
    if staging.exists():
      staging.rmtree()


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The conversion options every pipeline step needs."""
  fmt: str
  rule: Any
  max_missing: float
  seed: int
  split_fractions: tuple[float, ...]
  shards: int
  out_format: str
  long_options: dict[str, Any] | None
  device_options: dict[str, Any] | None
  staging: str

  @property
  def device(self) -> bool:
    return self.fmt in convert_lib.DEVICE_FORMATS


def _staging_dir(out_dir, temp_location: str | None, runner: str):
  """A new directory for the workers' shards: under --temp_location, else a local temporary one."""
  name = f"lsm2-convert-{uuid.uuid4().hex[:12]}"
  if temp_location:
    staging = storage.as_path(temp_location) / name
  elif "direct" not in runner.lower():
    raise ValueError(f"--runner={runner} needs --temp_location (a directory every worker can "
                     "write, e.g. gs://BUCKET/tmp): the shards are staged there")
  else:  # Beside --out (its nearest existing parent), so moving the shards is a rename.
    near = None
    if not storage.is_remote(out_dir):
      near = pathlib.Path(out_dir).parent
      while not near.is_dir() and near != near.parent:
        near = near.parent
    writable = near is not None and os.access(near, os.W_OK)
    return storage.as_path(tempfile.mkdtemp(prefix=f".{name}-", dir=near if writable else None))
  staging.mkdir(parents=True)
  return staging


def _units(fmt: str, input_path) -> list[tuple[int, str | None, Any]]:
  """The read tasks (index, subject, path): one per export (device formats), else the input."""
  if fmt not in convert_lib.DEVICE_FORMATS:
    return [(0, None, input_path)]
  find = convert_lib.DEVICE_MODULES[fmt].find_exports
  if not storage.is_remote(input_path):
    return [(i, s, p) for i, (s, p) in enumerate(find(input_path))]
  remote = storage.as_path(input_path)
  with tempfile.TemporaryDirectory() as tmp:  # find_exports looks at names only: it runs on
    skeleton = _download(remote, pathlib.Path(tmp), names_only=True)  # an empty copy.
    with _named_as(skeleton, remote):
      found = find(skeleton)
    return [(i, s, os.fspath(remote / p.relative_to(skeleton)) if p != skeleton
             else os.fspath(remote)) for i, (s, p) in enumerate(found)]


def _download(remote, local_dir: pathlib.Path, names_only: bool = False) -> pathlib.Path:
  """Copies a file or directory tree from a bucket to local_dir/NAME (empty files: names_only).

  Every object name is checked before anything is written (storage.contained): one that
  would land outside local_dir/NAME (a '..' part, an absolute name, also percent-encoded)
  is refused, naming it.
  """
  local = storage.contained(local_dir, remote.name, "--input")
  if remote.is_dir():
    base = len(os.fspath(remote).rstrip("/")) + 1
    copies = []
    for directory, dirs, files in remote.walk():
      prefix = os.fspath(directory)[base:]
      prefix += "/" if prefix else ""
      for name in dirs:  # Listed with their '/': '../' and '/' ('p//x') are caught here.
        storage.contained(remote, prefix + name, "object name")
      for name in files:
        storage.contained(remote, prefix + name, "object name")
        copies.append((directory / name, prefix + name))
    for source, relative in copies:
      (local / relative).parent.mkdir(parents=True, exist_ok=True)
      _fetch(source, local / relative, names_only)
  elif remote.exists():
    _fetch(remote, local, names_only)
  return local  # Missing: the converter says so, naming `remote` (_named_as).


def _fetch(remote, local: pathlib.Path, names_only: bool) -> None:
  if names_only:
    local.touch()
  else:
    remote.copy(local)


@contextlib.contextmanager
def _named_as(local: pathlib.Path, remote):
  """Converter errors about a downloaded copy name the bucket path it came from."""
  try:
    yield
  except ValueError as e:
    raise ValueError(str(e).replace(os.fspath(local), os.fspath(remote))) from None


def _original_error(e: Exception) -> Exception:
  """The converter's own error inside a Beam failure (which appends "[while running 'STEP']")."""
  inner = e.__cause__ or e.__context__
  while inner is not None:
    if isinstance(inner, (ValueError, OSError, TypeError)) and str(e).startswith(str(inner)):
      return inner
    inner = inner.__cause__ or inner.__context__
  return e


# ----------------------------------------------------------------------------- pipeline steps


def _read(unit, plan: _Plan):
  """One input unit -> its timelines, and ("info", (unit index, channels, labels, stats))."""
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top
  index, subject, path = unit
  stats = DayStats()
  with contextlib.ExitStack() as stack:
    if storage.is_remote(path):  # The converters read local files: this worker's copy.
      tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
      local = _download(storage.as_path(path), tmp)
      stack.enter_context(_named_as(local, path))
      path = local
    if subject is None:
      timelines, channels, labels = convert_lib.read_input(
          plan.fmt, path, stats, plan.rule, plan.long_options, plan.device_options)
    else:
      module = convert_lib.DEVICE_MODULES[plan.fmt]
      tl = module.load_export(subject, path, stats, plan.rule, **(plan.device_options or {}))
      timelines, channels, labels = [tl] if tl is not None else [], module.CHANNELS, dict(
          module.LABELS)
      stats.subjects_in = len(timelines)
  yield pvalue.TaggedOutput("info", (index, channels, labels, stats))
  yield from timelines


def _header(infos):
  """(channels, labels, load stats in input order) from every read unit's info."""
  infos = sorted(infos, key=lambda i: i[0])
  stats = DayStats()
  for _, channels, labels, s in infos:
    if (channels, labels) != (infos[0][1], infos[0][2]):
      raise ValueError(f"input units disagree on channels or labels: {channels} vs {infos[0][1]}")
    stats.subjects_in += s.subjects_in
    stats.notes += s.notes
  return (infos[0][1], infos[0][2], stats) if infos else ((), {}, stats)


def _any(masks: Iterable[np.ndarray | None]) -> np.ndarray | None:
  """Elementwise OR of bool[C] masks; None for none (a Beam combine: order-free)."""
  out = None
  for m in masks:
    if m is not None:
      out = m.copy() if out is None else out | m
  return out


def _subject_days(tl: SubjectTimeline, header, seen, plan: _Plan):
  """A timeline -> (subject id, its day records, its DayStats), as convert() cuts it."""
  if plan.device and seen is not None and not seen.all():
    tl = dataclasses.replace(tl, values=tl.values[:, seen])
  stats = DayStats()
  return tl.subject_id, day_records(tl, header[1], plan.max_missing, stats), stats


def _add_stats(total: DayStats, s: DayStats) -> DayStats:
  total.days_in += s.days_in
  total.kept += s.kept
  total.dropped_empty += s.dropped_empty
  total.dropped_missing += s.dropped_missing
  total.missing_kept += s.missing_kept
  return total


def _sum_stats(stats: Iterable[DayStats]) -> DayStats:
  total = DayStats()
  for s in stats:
    _add_stats(total, s)
  return total


def _layout(counts: dict[str, int], header, seen, plan: _Plan):
  """Splits, each subject's (split, first index) and the shard counts; None without days."""
  if not counts:
    return None
  channels, notes = header[0], DayStats()
  if plan.device and seen is not None:
    channels = convert_lib.keep_channels(channels, seen, notes, "channels the input never records")
  assignment = convert_lib.assign_splits(plan.fmt, sorted(counts), plan.split_fractions,
                                         plan.seed, notes)
  offsets, shards = {}, {}
  for split in splits_lib.SPLIT_NAMES:
    total = 0
    for s in assignment[split]:
      offsets[s] = (split, total)
      total += counts[s]
    shards[split] = min(plan.shards, total)
  return {"channels": channels, "assignment": assignment, "offsets": offsets,
          "shards": shards, "notes": notes.notes}


def _train_channels(item, layout):
  """bool[C] of the channels a train subject observes (device formats), else nothing."""
  subject, records, _ = item
  if layout is not None and layout["offsets"][subject][0] == "train":
    yield np.any([r.observed.any(axis=0) for r in records], axis=0)


def _encode(item, layout, labels, train_seen, plan: _Plan):
  """A subject's records -> ((split, shard), (position, bytes)) and ("tally", (split, tally))."""
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top
  subject, records, _ = item
  split, offset = layout["offsets"][subject]
  n = layout["shards"][split]
  channels = layout["channels"]
  if plan.device and train_seen is not None:
    channels = convert_lib.keep_channels(channels, train_seen, DayStats(), "")
  tally = SplitTally.empty(len(channels))
  for d, record in enumerate(records):
    if plan.device and train_seen is not None:
      record = convert_lib.select_channels(record, train_seen)
    rec, counts, data = encode_checked(record, channels, labels, split)
    tally.add(rec, counts, moments=split == "train")
    k = offset + d
    yield (split, k % n), (k // n, data)
  yield pvalue.TaggedOutput("tally", (split, tally))


def _write_shard(kv, layout, plan: _Plan):
  """Writes one shard file to the staging directory; returns (split, shard index, records)."""
  (split, i), items = kv
  items = sorted(items, key=lambda x: x[0])
  if [k for k, _ in items] != list(range(len(items))):
    raise ValueError(f"split {split!r} shard {i}: positions {[k for k, _ in items][:10]}... "
                     "are not 0..n-1 (a subject was encoded twice or not at all)")
  name = shard_filename(split, i, layout["shards"][split], plan.out_format)
  writer = make_writer(storage.as_path(plan.staging) / name, plan.out_format)
  try:
    for _, data in items:
      writer.write(data)
  finally:
    writer.close()
  return split, i, len(items)


def _merge_tallies(tallies: Iterable[SplitTally]) -> SplitTally:
  """A Beam combine of SplitTally: exact and order-free (merges into a fresh tally)."""
  out = None
  for t in tallies:
    if out is None:
      out = SplitTally.empty(len(t.missing_per_channel))
    out.merge(t)
  return out


def _summarize(_, header, layout, subject_stats, train_seen, shard_list, tallies, plan: _Plan):
  """Writes what the driver needs to finish the dataset into the staging directory."""
  summary = {"header": header, "layout": layout, "stats": subject_stats,
             "train_seen": train_seen, "shards": sorted(shard_list), "tallies": dict(tallies)}
  (storage.as_path(plan.staging) / SUMMARY_FILE).write_bytes(pickle.dumps(summary))


def _build(beam, p, units, plan: _Plan) -> None:
  """Adds the conversion steps to pipeline `p`."""
  side = beam.pvalue
  read = (p | "Units" >> beam.Create(units)
          | "Read" >> beam.FlatMap(_read, plan).with_outputs("info", main="timelines"))
  header = read.info | "Infos" >> beam.combiners.ToList() | "Header" >> beam.Map(_header)
  timelines = read.timelines | "Spread" >> beam.Reshuffle()
  seen = (timelines | "Recorded" >> beam.Map(convert_lib.recorded_channels)
          | "AnyRecorded" >> beam.CombineGlobally(_any))
  days = timelines | "DayRecords" >> beam.Map(_subject_days, side.AsSingleton(header),
                                               side.AsSingleton(seen), plan)
  subject_stats = (days | "DayStats" >> beam.Map(lambda x: x[2])
                   | "SumStats" >> beam.CombineGlobally(_sum_stats))
  kept = days | "Kept" >> beam.Filter(lambda x: bool(x[1]))
  counts = (kept | "Counts" >> beam.Map(lambda x: (x[0], len(x[1])))
            | "AllCounts" >> beam.combiners.ToDict())
  layout = counts | "Layout" >> beam.Map(_layout, side.AsSingleton(header),
                                         side.AsSingleton(seen), plan)
  train_seen = None
  if plan.device:
    train_seen = (kept | "TrainChannels" >> beam.FlatMap(_train_channels, side.AsSingleton(layout))
                  | "AnyTrain" >> beam.CombineGlobally(_any))
  labels = header | "Labels" >> beam.Map(lambda h: h[1])
  no_mask = p | "NoMask" >> beam.Create([None])
  encoded = (kept | "Encode" >> beam.FlatMap(
      _encode, side.AsSingleton(layout), side.AsSingleton(labels),
      side.AsSingleton(train_seen if train_seen is not None else no_mask), plan)
             .with_outputs("tally", main="records"))
  shards = (encoded.records | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.Map(_write_shard, side.AsSingleton(layout), plan))
  tallies = encoded.tally | "Tallies" >> beam.CombinePerKey(_merge_tallies)
  _ = (p | "Once" >> beam.Create([None])
       | "Summarize" >> beam.Map(
           _summarize, side.AsSingleton(header), side.AsSingleton(layout),
           side.AsSingleton(subject_stats),
           side.AsSingleton(train_seen if train_seen is not None else no_mask),
           side.AsList(shards), side.AsList(tallies), plan))


# ----------------------------------------------------------------------------- finishing


def _finish(summary, plan: _Plan, input_path, out_dir, overwrite: bool, staging):
  """Hands the workers' shards to a DatasetWriter for --out, which writes the metadata and
  swaps the dataset in (DatasetWriter.finish)."""
  channels, labels, stats = summary["header"]
  _add_stats(stats, summary["stats"])
  layout = summary["layout"]
  if layout is None:
    raise convert_lib.no_days_error(input_path, plan.max_missing, stats)
  stats.notes += layout["notes"]
  channels = layout["channels"]
  if plan.device and summary["train_seen"] is not None:
    channels = convert_lib.keep_channels(channels, summary["train_seen"], stats,
                                         "channels without an observed minute in the train split")
  per_shard = {(split, i): n for split, i, n in summary["shards"]}
  # The writer stages the dataset and swaps it in only once complete: a failure here
  # leaves a dataset in out_dir as it was.
  with DatasetWriter(out_dir, channels=channels, labels=labels.values(), fmt=plan.out_format,
                     overwrite=overwrite) as writer:
    for split in splits_lib.SPLIT_NAMES:
      n = layout["shards"][split]
      files = [shard_filename(split, i, n, plan.out_format) for i in range(n)]
      for f in files:
        _move(staging / f, writer.staging_dir / f)
      writer.add_written_split(split, files, [per_shard[(split, i)] for i in range(n)],
                               summary["tallies"].get(split) or SplitTally.empty(len(channels)))
    meta = writer.finish(source=convert_lib.source_metadata(
        plan.fmt, input_path, stats, plan.rule, max_missing=plan.max_missing, seed=plan.seed,
        split_fractions=plan.split_fractions, long_options=plan.long_options,
        device_options=plan.device_options))
  return meta, stats


def _move(src, dst) -> None:
  if storage.is_remote(src) or storage.is_remote(dst):
    src.copy(dst, overwrite=True)
  else:
    shutil.move(os.fspath(src), os.fspath(dst))
