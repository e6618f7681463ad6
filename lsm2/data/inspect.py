"""Summarizes a dataset directory, checking every record on the way.

  python -m lsm2.data.inspect DIR [--json PATH] [--png PATH] [--days N] [--split S]

Prints counts per split, channels, the per-day missing-fraction histogram and
percentiles, per-channel missingness and label balance (days per class; for
minute labels, minutes per class). Every record is read and decoded with its
data checksum verified, so a corrupt shard is reported (file and record
index). --json writes the summary (keys include `records` per split,
`missing_fraction_per_day` p10/p50/p90 and `channels`); --png draws a heat map
of a few days with their masks.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from lsm2 import storage
from lsm2.data.dataset import iter_records
from lsm2.data.metadata import DatasetMetadata, MetadataError, load_metadata, normalize
from lsm2.data.record import DayRecord
from lsm2.data.shards import CorruptShardError
from lsm2.data.writer import HISTOGRAM_BINS, day_percentiles


def _label_summary(meta: DatasetMetadata, values: dict[str, list]) -> dict[str, Any]:
  out = {}
  for name, spec in meta.labels.items():
    v = np.asarray(values[name], np.float64)
    if spec.kind == "regression":
      ok = v[~np.isnan(v)]
      out[name] = {"kind": spec.kind, "level": spec.level, "count": int(ok.size),
                   "missing": int(v.size - ok.size),
                   "mean": float(ok.mean()) if ok.size else None,
                   "std": float(ok.std()) if ok.size else None}
    else:
      # Minute labels ([days, 1440]) count minutes per class; the others count days.
      counts = {c: int(np.sum(v == i)) for i, c in enumerate(spec.classes)}
      out[name] = {"kind": spec.kind, "level": spec.level, "counts": counts,
                   "missing": int(np.sum(v == -1)),
                   "unit": "minutes" if spec.level == "minute" else "days"}
      if spec.level == "minute":
        out[name]["labelled_days"] = int(np.sum((v >= 0).any(axis=1))) if v.size else 0
  return out


def summarize(data_dir: str | os.PathLike, *, keep_days: int = 0, keep_split: str | None = None
              ) -> tuple[dict[str, Any], list[DayRecord]]:
  """Reads every record; returns the summary dict and the first `keep_days` of `keep_split`."""
  meta = load_metadata(data_dir)
  edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
  summary: dict[str, Any] = {
      "data_dir": str(data_dir), "format": meta.format,
      "channels": list(meta.channel_names),
      "channel_groups": {c.name: c.group for c in meta.channels},
      "records": {}, "subjects": {}, "missing_fraction_per_day_by_split": {},
      "histogram": {"bin_edges": edges.tolist(), "counts": {}},
      "labels": {}, "source": meta.source,
  }
  kept: list[DayRecord] = []
  all_fractions = []
  missing_minutes = np.zeros(meta.num_channels, np.int64)
  total_minutes = 0
  for split in meta.splits:
    fractions, subjects = [], set()
    labels: dict[str, list] = {n: [] for n in meta.labels}
    for rec in iter_records(meta, split, verify_checksums=True):
      fractions.append(rec.missing_fraction)
      subjects.add(rec.subject_id)
      missing_minutes += (~rec.observed).sum(0)
      total_minutes += rec.observed.shape[0]
      for n in labels:
        labels[n].append(rec.labels[n])
      if split == keep_split and len(kept) < keep_days:
        kept.append(rec)
    summary["records"][split] = len(fractions)
    summary["subjects"][split] = len(subjects)
    summary["missing_fraction_per_day_by_split"][split] = day_percentiles(np.asarray(fractions))
    summary["histogram"]["counts"][split] = np.histogram(fractions, edges)[0].tolist()
    summary["labels"][split] = _label_summary(meta, labels)
    all_fractions += fractions
  summary["missing_fraction_per_day"] = day_percentiles(np.asarray(all_fractions))
  summary["missing_fraction_overall"] = float(missing_minutes.sum()
                                              / max(total_minutes * meta.num_channels, 1))
  summary["missing_fraction_per_channel"] = {
      c: float(m / max(total_minutes, 1)) for c, m in zip(meta.channel_names, missing_minutes)}
  return summary, kept


def _fmt(x: float | None) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def render(summary: dict[str, Any]) -> str:
  """The human-readable report."""
  lines = [f"dataset {summary['data_dir']} ({summary['format']})"]
  chans = summary["channels"]
  lines.append(f"channels ({len(chans)}): " + ", ".join(
      f"{c} [{summary['channel_groups'][c]}]" for c in chans))
  for split, n in summary["records"].items():
    p = summary["missing_fraction_per_day_by_split"][split]
    lines.append(f"  {split:12s} {n:7d} days  {summary['subjects'][split]:5d} subjects  "
                 f"missing/day p10/p50/p90 {_fmt(p['p10'])}/{_fmt(p['p50'])}/{_fmt(p['p90'])}")
  p = summary["missing_fraction_per_day"]
  lines.append(f"missing fraction: overall {summary['missing_fraction_overall']:.3f}; per day "
               f"p10/p50/p90 {_fmt(p['p10'])}/{_fmt(p['p50'])}/{_fmt(p['p90'])}")
  edges = summary["histogram"]["bin_edges"]
  counts = np.sum([c for c in summary["histogram"]["counts"].values()], axis=0)
  top = max(int(counts.max()), 1)
  lines.append("per-day missing fraction histogram (all splits):")
  for lo, hi, n in zip(edges[:-1], edges[1:], counts):
    lines.append(f"  {lo:.1f}-{hi:.1f} {int(n):7d} {'#' * int(round(40 * n / top))}")
  lines.append("missing fraction per channel: " + ", ".join(
      f"{c} {f:.2f}" for c, f in summary["missing_fraction_per_channel"].items()))
  for split, labels in summary["labels"].items():
    for name, s in labels.items():
      if s["kind"] == "regression":
        lines.append(f"  label {name} ({split}): n={s['count']} mean={_fmt(s['mean'])} "
                     f"std={_fmt(s['std'])} missing={s['missing']}")
      else:
        counts = ", ".join(f"{c}={n}" for c, n in s["counts"].items())
        if s["unit"] == "minutes":
          lines.append(f"  label {name} ({split}, minutes per class over {s['labelled_days']} "
                       f"labelled days): {counts}, unlabelled={s['missing']}")
        else:
          lines.append(f"  label {name} ({split}): {counts}, missing={s['missing']}")
  return "\n".join(lines)


def _plain(text: str) -> str:
  """Text that matplotlib draws as written: a `$` would start mathtext (ids may hold one)."""
  return text.replace("$", r"\$")


def plot_days(meta: DatasetMetadata, records: Sequence[DayRecord], path: str | os.PathLike) -> None:
  """Heat map per day: normalized values (channels x minutes), unobserved minutes in grey."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not records:
    raise ValueError("no days to plot")
  height = len(records) * (0.8 + 0.13 * meta.num_channels)
  fig, axes = plt.subplots(len(records), 1, figsize=(12, height), squeeze=False,
                           layout="constrained")
  cmap = plt.get_cmap("coolwarm").with_extremes(bad="0.8")
  for ax, rec in zip(axes[:, 0], records):
    z = normalize(rec.signals, rec.observed, meta.norm_mean, meta.norm_std)
    im = ax.imshow(np.ma.masked_array(z.T, ~rec.observed.T), aspect="auto", cmap=cmap,
                   vmin=-3, vmax=3, interpolation="nearest")
    title = f"{rec.subject_id} {rec.day}: {rec.missing_fraction:.0%} missing (grey)"
    ax.set_title(_plain(title), fontsize=9)
    ax.set_yticks(range(meta.num_channels))
    ax.set_yticklabels([_plain(n) for n in meta.channel_names], fontsize=5)
    ax.set_xticks(range(0, 1441, 180))
    ax.set_xticklabels([f"{h:02d}:00" for h in range(0, 25, 3)], fontsize=7)
  fig.colorbar(im, ax=axes[:, 0].tolist(), label="z-score", shrink=0.6)
  png = io.BytesIO()  # Then one write: `path` may be on a bucket.
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  storage.as_path(path).write_bytes(png.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m lsm2.data.inspect", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("data_dir")
  p.add_argument("--json", help="write the summary as JSON here")
  p.add_argument("--png", help="write a heat map of a few days here")
  p.add_argument("--days", type=int, default=4, help="days in the heat map")
  p.add_argument("--split", default="train", help="split the heat-map days come from")
  args = p.parse_args(argv)
  try:
    storage.check_reachable(args.data_dir, "DATA_DIR")
    summary, days = summarize(args.data_dir, keep_days=args.days if args.png else 0,
                              keep_split=args.split)
    if args.png:
      plot_days(load_metadata(args.data_dir), days, args.png)
  except (MetadataError, CorruptShardError, storage.StorageError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(render(summary))
  if args.json:
    storage.as_path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.json}")
  if args.png:
    print(f"wrote {args.png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
