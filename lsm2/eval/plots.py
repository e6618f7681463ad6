"""PNG plots of evaluation results (matplotlib's Agg renderer via `Figure`, no pyplot state).

Every function takes plain numbers/arrays, writes one PNG to `path` and
returns the path. Missing values (None/NaN) are drawn as gaps and labelled
"n/a", never as zero.
"""
from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

from etils import epath
import numpy as np
from jaxtyping import Bool, Float
from matplotlib.figure import Figure

from lsm2 import storage


def _as_float(value: float | None) -> float:
  return np.nan if value is None else float(value)


def _save(fig: Figure, path: str | os.PathLike) -> epath.Path:
  """Renders to memory, then writes one file (local or gs://: matplotlib writes local files only)."""
  path = storage.as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
  path.write_bytes(png.getvalue())
  return path


def plot_metric_by_condition(
    results: Mapping[str, Mapping[str, float | None]],
    path: str | os.PathLike,
    *,
    metric_name: str,
    title: str = "",
) -> epath.Path:
  """Grouped bar chart: one group per condition (e.g. removed sensor group or time segment).

  Args:
    results: series (e.g. model name) -> condition -> metric value. Conditions
      are drawn in first-seen order; a condition missing from a series, or a
      None/NaN value, leaves a labelled gap.
    path: PNG file to write.
    metric_name: y-axis label.
    title: figure title.
  """
  if not results:
    raise ValueError("results is empty: nothing to plot")
  conditions = list(dict.fromkeys(c for series in results.values() for c in series))
  fig = Figure(figsize=(max(4.0, 1.2 * len(conditions) * max(1, len(results)) / 2 + 2), 3.5))
  ax = fig.add_subplot()
  width = 0.8 / len(results)
  x = np.arange(len(conditions))
  for i, (name, series) in enumerate(results.items()):
    heights = np.array([_as_float(series.get(c)) for c in conditions])
    pos = x - 0.4 + width * (i + 0.5)
    ax.bar(pos, np.nan_to_num(heights, nan=0.0), width, label=name)
    for p, h in zip(pos, heights):
      if np.isnan(h):
        ax.text(p, 0, "n/a", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(x, conditions, rotation=30, ha="right")
  ax.set_ylabel(metric_name)
  ax.set_title(title)
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_error_by_missingness(
    bucket_names: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike,
    *,
    metric_name: str = "MSE",
    title: str = "",
    counts: Sequence[int] | None = None,
) -> epath.Path:
  """Line plot of an error per missingness bucket, one line per series (model or baseline).

  `counts` (days per bucket), when given, is written under each bucket name.
  """
  if not series:
    raise ValueError("series is empty: nothing to plot")
  for name, values in series.items():
    if len(values) != len(bucket_names):
      raise ValueError(f"series {name!r} has {len(values)} values for {len(bucket_names)} buckets")
  if counts is not None and len(counts) != len(bucket_names):
    raise ValueError(f"counts has {len(counts)} entries for {len(bucket_names)} buckets")
  fig = Figure(figsize=(6, 3.5))
  ax = fig.add_subplot()
  x = np.arange(len(bucket_names))
  for name, values in series.items():
    ax.plot(x, [_as_float(v) for v in values], marker="o", label=name)
  labels = list(bucket_names)
  if counts is not None:
    labels = [f"{b}\n(n={c})" for b, c in zip(bucket_names, counts)]
  ax.set_xticks(x, labels, fontsize=8)
  ax.set_xlabel("missing fraction of the day")
  ax.set_ylabel(metric_name)
  ax.set_title(title)
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_reconstructed_day(
    values: Float[np.ndarray, "t c"],
    observed: Bool[np.ndarray, "t c"],
    target_mask: Bool[np.ndarray, "t c"],
    predicted: Float[np.ndarray, "t c"],
    path: str | os.PathLike,
    *,
    channel_names: Sequence[str] | None = None,
    line_channels: Sequence[int] = (0, 1, 2),
    title: str = "",
) -> epath.Path:
  """Heat maps of one day (model input, masked targets, prediction) and a few channel traces.

  Input shows only visible minutes (observed and not masked); "masked" shows
  the hidden observed minutes the model had to predict; "predicted" shows the
  model's output where it had to predict (masked or unobserved minutes: what
  `reconstruct` fills), not at visible minutes, where a masked autoencoder's
  output is never trained and means nothing; line plots overlay the true
  observed values, that prediction and shade the masked minutes.
  """
  values, observed = np.asarray(values), np.asarray(observed)
  target_mask, predicted = np.asarray(target_mask), np.asarray(predicted)
  shapes = {values.shape, observed.shape, target_mask.shape, predicted.shape}
  if values.ndim != 2 or len(shapes) != 1:
    raise ValueError(
        f"values {values.shape}, observed {observed.shape}, target_mask {target_mask.shape} and "
        f"predicted {predicted.shape} must be equal [T, C] shapes")
  n_time, n_chan = values.shape
  names = list(channel_names) if channel_names is not None else [str(c) for c in range(n_chan)]
  if len(names) != n_chan:
    raise ValueError(f"channel_names has {len(names)} entries for C={n_chan}")
  line_channels = [c for c in line_channels if 0 <= c < n_chan]
  visible = observed & ~target_mask
  hidden = observed & target_mask
  panels = [
      ("input (visible minutes)", np.where(visible, values, np.nan)),
      ("masked targets (observed)", np.where(hidden, values, np.nan)),
      ("predicted (masked and unobserved minutes)",
       np.where(visible, np.nan, predicted.astype(np.float64))),
  ]
  finite = np.concatenate([p[np.isfinite(p)] for _, p in panels] + [np.zeros(1)])
  vmax = float(np.percentile(np.abs(finite), 99)) or 1.0
  n_rows = len(panels) + len(line_channels)
  fig = Figure(figsize=(10, 1.6 * n_rows + 0.5))
  axes = fig.subplots(n_rows, 1, sharex=True, squeeze=False)[:, 0]
  hours = np.arange(n_time) * 24.0 / n_time
  for ax, (label, data) in zip(axes, panels):
    im = ax.imshow(data.T, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                   interpolation="nearest", extent=(0, 24, n_chan - 0.5, -0.5))
    ax.set_ylabel("channel", fontsize=8)
    ax.set_title(label, fontsize=9)
  # One colour bar beside every row, so all rows keep the same width and the hours line up.
  fig.colorbar(im, ax=list(axes), pad=0.01, fraction=0.03)
  for ax, c in zip(axes[len(panels):], line_channels):
    truth = np.where(observed[:, c], values[:, c], np.nan)
    ax.plot(hours, truth, lw=0.8, color="k", label="observed")
    ax.plot(hours, np.where(visible[:, c], np.nan, predicted[:, c]), lw=0.8, color="tab:red",
            label="predicted")
    ax.fill_between(hours, 0, 1, where=target_mask[:, c], transform=ax.get_xaxis_transform(),
                    color="tab:orange", alpha=0.2, label="masked")
    ax.set_ylabel(names[c], fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
  axes[-1].set_xlabel("hour of day")
  if title:
    fig.suptitle(title)
  return _save(fig, path)
