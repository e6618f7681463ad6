"""Evaluation results: one flat record per metric, written as JSON, Markdown tables and CLU scalars.

A record is a dict with the keys of `RECORD_KEYS`:
  task     label name (discriminative) or generative task name
  metric   e.g. "auroc", "macro_f1", "mae", "mse"
  value    float, or None where the metric is undefined (never 0 or NaN)
  split    the split scored, e.g. "test" or "cv5(train+validation+test)"
  masking  "natural" (the data as recorded), "remove_group:G", "remove_segment:S"
           or "missing:20-30%" (days bucketed by their own missing fraction)
  n        examples (days, subjects or windows) or, for reconstruction, scored minutes
  method   "linear_probe", "majority", "few_shot_kK", "fine_tune", "features_probe" (the
           same probe on hand-crafted per-day features, lsm2.eval.features), "model",
           an imputation baseline name or "noise_floor"
  level    "day" / "subject" / "window" (discriminative) or "minute" (reconstruction)
  family   "discriminative" or "generative"
Optional: "std" (spread over few-shot repeats), "days" (days in a bucket);
window records: "window_minutes", "min_fraction", "windows_without_tokens".
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Sequence

from etils import epath

from lsm2 import metric_writer
from lsm2 import storage

RECORD_KEYS = ("task", "metric", "value", "split", "masking", "n", "method", "level", "family")
CLASSIFICATION_METRICS = ("auroc", "macro_f1", "balanced_accuracy", "map")
REGRESSION_METRICS = ("mae", "rmse", "pearson_r")
RECONSTRUCTION_METRICS = ("mse", "mae")
# The metric plotted / tabulated for robustness, per task kind.
PRIMARY_METRIC = {"binary": "auroc", "categorical": "macro_f1", "regression": "mae"}
NATURAL = "natural"


class Results:
  """Collects records and skipped evaluations (with the reason) in creation order."""

  def __init__(self):
    self.records: list[dict[str, Any]] = []
    self.skipped: list[tuple[str, str]] = []

  def add(self, *, task: str, metric: str, value: float | None, split: str, masking: str,
          n: int, method: str, level: str, family: str, **extra) -> None:
    if value is not None:
      value = float(value)
      if not math.isfinite(value):
        raise ValueError(f"metric {task}/{metric} ({method}, {masking}) is {value}; undefined "
                         "metrics must be None")
    self.records.append({"task": task, "metric": metric, "value": value, "split": split,
                         "masking": masking, "n": int(n), "method": method, "level": level,
                         "family": family, **extra})

  def add_metrics(self, values: dict[str, Any], names: Sequence[str], **keys) -> None:
    """Adds `values[name]` for each name, with `n` from values["n"] (or ["count"])."""
    n = values["n"] if "n" in values else values["count"]
    for name in names:
      self.add(metric=name, value=values[name], n=n, **keys)

  def skip(self, what: str, reason: str) -> None:
    self.skipped.append((what, reason))

  def select(self, **keys) -> list[dict[str, Any]]:
    return [r for r in self.records if all(r.get(k) == v for k, v in keys.items())]


def write_json(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> epath.Path:
  path = storage.as_path(path)
  path.write_text(json.dumps(list(records), indent=1, allow_nan=False) + "\n")
  return path


def scalar_name(r: dict[str, Any]) -> str:
  """TensorBoard tag of a record, e.g. hypertension/day/linear_probe/auroc[/remove_group:ppg]."""
  parts = [r["task"], r["level"], r["method"], r["metric"]]
  if r["masking"] != NATURAL:
    parts.append(r["masking"])
  return "eval/" + "/".join(parts)


def write_scalars(records: Sequence[dict[str, Any]], workdir: str | os.PathLike, step: int) -> None:
  """Logs every defined metric (TensorBoard events in `workdir`, and console lines)."""
  writer = metric_writer.create_writer(workdir)
  by_task: dict[str, dict[str, float]] = {}
  for r in records:
    if r["value"] is not None:
      by_task.setdefault(r["task"], {})[scalar_name(r)] = r["value"]
  for scalars in by_task.values():  # One console line per task.
    writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()


# ---------------------------------------------------------------------------
# Markdown.


def fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return lines


def _index(records, *keys):
  out = {}
  for r in records:
    out[tuple(r[k] for k in keys)] = r
  return out


def _ordered(values: Iterable[Any]) -> list[Any]:
  return list(dict.fromkeys(values))


def discriminative_tables(records: Sequence[dict[str, Any]]) -> list[str]:
  lines = []
  rec = [r for r in records if r["family"] == "discriminative" and r["masking"] == NATURAL]
  for title, names in (("Classification", CLASSIFICATION_METRICS), ("Regression", REGRESSION_METRICS)):
    rows_keys = _ordered((r["task"], r["level"], r["method"], r["split"]) for r in rec
                         if r["metric"] in names)
    if not rows_keys:
      continue
    idx = _index(rec, "task", "level", "method", "split", "metric")
    rows = []
    for key in rows_keys:
      cells = [idx.get(key + (m,)) for m in names]
      n = next(c["n"] for c in cells if c is not None)
      values = [None if c is None else _with_std(c) for c in cells]
      rows.append([*key[:3], key[3], n, *values])
    lines += [f"### {title}", ""]
    lines += table(["task", "level", "method", "split", "n", *names], rows) + [""]
  return lines


def _with_std(r: dict[str, Any]) -> Any:
  if r.get("std") is None or r["value"] is None:
    return r["value"]
  return f"{r['value']:.3f} ± {r['std']:.3f}"


def generative_tables(records: Sequence[dict[str, Any]], masking: str = NATURAL) -> list[str]:
  rec = [r for r in records if r["family"] == "generative" and r["masking"] == masking]
  if not rec:
    return []
  methods = _ordered(r["method"] for r in rec)
  tasks = _ordered(r["task"] for r in rec)
  idx = _index(rec, "task", "method", "metric")
  lines = []
  for metric in RECONSTRUCTION_METRICS:
    rows = []
    for t in tasks:
      model = idx.get((t, "model", metric))
      n = model["n"] if model else next(r["n"] for r in rec if r["task"] == t)
      rows.append([t, n, *[idx[(t, m, metric)]["value"] if (t, m, metric) in idx else None
                           for m in methods]])
    lines += [f"### Reconstruction {metric.upper()} (normalised units, observed target minutes)", ""]
    lines += table(["task", "minutes", *methods], rows) + [""]
  return lines


def condition_table(records: Sequence[dict[str, Any]], row_keys: Sequence[str],
                    conditions: Sequence[str]) -> list[str]:
  """One row per `row_keys` value, one column per masking condition."""
  idx = _index(records, *row_keys, "masking")
  rows = []
  for key in _ordered(tuple(r[k] for k in row_keys) for r in records):
    rows.append([*key, *[idx[key + (c,)]["value"] if key + (c,) in idx else None
                         for c in conditions]])
  return table([*row_keys, *conditions], rows)


def robustness_tables(records: Sequence[dict[str, Any]], kinds: dict[str, str]) -> list[str]:
  lines = []
  disc = [r for r in records if r["family"] == "discriminative" and r["method"] == "linear_probe"
          and r["metric"] == PRIMARY_METRIC.get(kinds.get(r["task"], ""), "")]
  conditions = _ordered(r["masking"] for r in disc if r["masking"] != NATURAL)
  if conditions:
    lines += ["### Linear probe with data removed (probe refitted on the reduced data)", "",
              "Metric: " + ", ".join(f"{k} {v}" for k, v in PRIMARY_METRIC.items()) + ".", ""]
    lines += condition_table(disc, ("task", "level", "metric"), [NATURAL, *conditions]) + [""]
  gen = [r for r in records if r["family"] == "generative" and r["metric"] == "mse"]
  removal = _ordered(r["masking"] for r in gen if r["masking"].startswith(("remove_", "device:")))
  if removal:
    task = next(r["task"] for r in gen if r["masking"] in removal)
    rows = [r for r in gen if r["task"] == task and (r["masking"] in removal or r["masking"] == NATURAL)]
    lines += [f"### {task} MSE with data removed", ""]
    lines += condition_table(rows, ("method",), [NATURAL, *removal]) + [""]
  buckets = _ordered(r["masking"] for r in gen if r["masking"].startswith("missing:"))
  if buckets:
    task = next(r["task"] for r in gen if r["masking"] in buckets)
    rows = [r for r in gen if r["task"] == task and r["masking"] in buckets]
    days = {r["masking"]: r.get("days") for r in rows}
    lines += [f"### {task} MSE by the day's own missing fraction", "",
              "Days per bucket: " + ", ".join(f"{b[8:]}: {days[b]}" for b in buckets) + ".", ""]
    lines += condition_table(rows, ("method",), buckets) + [""]
  return lines


def markdown(results: Results, *, title: str, header: Sequence[str], kinds: dict[str, str],
             plots: Sequence[str] = ()) -> str:
  lines = [f"# {title}", "", *header, ""]
  disc = discriminative_tables(results.records)
  if disc:
    lines += ["## Discriminative (frozen encoder unless the method says otherwise)", "", *disc]
  gen = generative_tables(results.records)
  if gen:
    lines += ["## Generative", "", *gen]
  rob = robustness_tables(results.records, kinds)
  if rob:
    lines += ["## Robustness", "", *rob]
  if results.skipped:
    lines += ["## Skipped", ""] + [f"- {what}: {why}" for what, why in results.skipped] + [""]
  if plots:
    lines += ["## Plots", ""] + [f"- [{p}]({p})" for p in plots] + [""]
  return "\n".join(lines)

