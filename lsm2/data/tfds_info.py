"""TFDS metadata for an lsm2 dataset: `tfds.builder_from_directory(DIR)` reads it.

A dataset directory holds, beside lsm2's metadata.json, TFDS's
dataset_info.json and features.json, written with TFDS's own API
(`tfds.folder_dataset.write_metadata`) from the shard list and record counts
the writer already knows. The shards keep their names,
`{split}-{i:05d}-of-{n:05d}.{tfrecord|array_record}`, which is the TFDS file
template `{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}`. The records are lsm2's
tf.train.Examples (lsm2.data.example), laid out as these TFDS features decode
them:

  signals     Tensor float32 [1440, C]
  observed    Tensor bool [1440, C], encoding BYTES
  subject_id  Text
  day         Text ('YYYY-MM-DD')
  label/NAME  ClassLabel (binary, categorical; -1 = missing), Scalar float32
              (regression; NaN = missing), Tensor int64 [1440] (minute labels:
              class index per minute, -1 = no label at that minute)

Normalisation statistics, channel registry and label specs stay in
metadata.json (TFDS's `info.metadata` carries none of them).

  python -m lsm2.data.tfds_info upgrade OLD_DIR NEW_DIR

rewrites a dataset written before TFDS support (packed `observed` bits, no
dataset_info.json), which lsm2 still reads, into one TFDS reads too.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from lsm2 import storage
from lsm2.data.metadata import DatasetMetadata, LabelSpec
from lsm2.data.record import MINUTES_PER_DAY

FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
TFDS_FILES = ("dataset_info.json", "features.json")
TFDS_LABEL_FILES = "*.labels.txt"  # ClassLabel names, beside features.json.
UPGRADE_COMMAND = "python -m lsm2.data.tfds_info upgrade OLD_DIR NEW_DIR"


def _label_feature(spec: LabelSpec):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  doc = f"{spec.kind} label per {spec.level}"
  if spec.kind == "regression":
    return tfds.features.Scalar(np.float32, doc=f"{doc}; NaN = missing")
  if spec.level == "minute":  # A Tensor decodes to one array (a Sequence to a list).
    return tfds.features.Tensor(
        shape=(MINUTES_PER_DAY,), dtype=np.int64,
        doc=f"{doc}: index into {list(spec.classes)} per minute, -1 = no label")
  return tfds.features.ClassLabel(names=list(spec.classes), doc=f"{doc}; -1 = missing")


def features(num_channels: int, labels: dict[str, LabelSpec]):
  """The tfds.features.FeaturesDict of an lsm2 dataset's records."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shape = (MINUTES_PER_DAY, num_channels)
  spec = {
      "signals": tfds.features.Tensor(
          shape=shape, dtype=np.float32,
          doc="minute x channel values as stored (not normalised); 0 where unobserved"),
      "observed": tfds.features.Tensor(shape=shape, dtype=np.bool_,
                                       encoding=tfds.features.Encoding.BYTES,
                                       doc="True where the value was measured"),
      "subject_id": tfds.features.Text(doc="subject id as written in the source"),
      "day": tfds.features.Text(doc="local calendar day YYYY-MM-DD"),
  }
  if labels:
    spec["label"] = tfds.features.FeaturesDict(
        {name: _label_feature(s) for name, s in labels.items()})
  return tfds.features.FeaturesDict(spec)


def write_tfds_metadata(meta: DatasetMetadata, out_dir: str | os.PathLike) -> None:
  """Writes dataset_info.json and features.json for the shards `meta` lists."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out_dir = storage.as_path(out_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=out_dir, template=FILENAME_TEMPLATE,
                                           dataset_name="lsm2", filetype_suffix=meta.format)
  split_infos = [
      tfds.core.SplitInfo(name=split, shard_lengths=[meta.shard_records[f] for f in files],
                          num_bytes=sum(meta.shard_bytes[f] for f in files),
                          filename_template=template.replace(split=split))
      for split, files in meta.splits.items()
      if files]  # TFDS lists the splits it finds files of: an empty split has none.
  channels = ", ".join(meta.channel_names)
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=features(meta.num_channels, meta.labels),
      split_infos=split_infos, filename_template=template, check_data=False,
      description=(f"lsm2 wearable day records: {meta.num_channels} channels ({channels}) x "
                   f"{MINUTES_PER_DAY} minutes. Normalisation statistics, channel registry "
                   "and label specs are in metadata.json."))


def builder(data_dir: str | os.PathLike):
  """tfds.builder_from_directory(data_dir), or an error naming the upgrade command."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = storage.as_path(data_dir)
  if not (data_dir / TFDS_FILES[0]).is_file():
    raise FileNotFoundError(
        f"{data_dir} has no {TFDS_FILES[0]}: it was written before TFDS support (lsm2 still "
        f"reads it); rewrite it for TFDS with: {UPGRADE_COMMAND}")
  return tfds.builder_from_directory(os.fspath(data_dir))


def upgrade(old_dir: str | os.PathLike, new_dir: str | os.PathLike, *,
            num_shards: int | None = None, overwrite: bool = False) -> DatasetMetadata:
  """Rewrites any lsm2 dataset into `new_dir` in the current layout (TFDS-readable).

  `new_dir` may be `old_dir` (with overwrite): the new dataset is staged beside
  the old one, which it replaces only once it is complete (lsm2.data.writer).
  """
  from lsm2.data import dataset  # pylint: disable=g-import-not-at-top
  from lsm2.data.metadata import load_metadata  # pylint: disable=g-import-not-at-top
  from lsm2.data.writer import DatasetWriter, check_out_dir  # pylint: disable=g-import-not-at-top
  check_out_dir(new_dir, overwrite)  # Before reading: completes an interrupted earlier upgrade.
  old = load_metadata(old_dir)
  with DatasetWriter(new_dir, channels=old.channels, labels=old.labels.values(),
                     fmt=old.format, overwrite=overwrite) as writer:
    for split, files in old.splits.items():
      writer.write_split(split, dataset.iter_records(old, split),
                         num_records=old.record_counts[split],
                         num_shards=num_shards or len(files))
    return writer.finish(noise_std=old.noise_std, source=old.source)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  up = sub.add_parser("upgrade", help="rewrite a dataset into the current, TFDS-readable layout")
  up.add_argument("old_dir")
  up.add_argument("new_dir")
  up.add_argument("--overwrite", action="store_true",
                  help="replace the dataset in NEW_DIR, which may be OLD_DIR (the new one is "
                  "written beside it and swapped in once complete)")
  args = p.parse_args(argv)
  try:
    meta = upgrade(args.old_dir, args.new_dir, overwrite=args.overwrite)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.new_dir}: {sum(meta.record_counts.values())} records, "
        f"splits {sorted(meta.splits)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
