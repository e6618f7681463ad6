r"""Collects the results.json of every run under a sweep root into one table.

  python -m lsm2.sweeps.collect ROOT --out PREFIX

finds ROOT/**/results.json (each a list of {task, metric, value, split,
masking, n} and, as `lsm2.eval` writes them, method and level; a null value is
a metric the evaluation could not define, shown as n/a; NaN or Infinity, which
lsm2.eval never writes, is refused naming the run and entry) and writes
  PREFIX.csv  one row per result: the run's directory (relative to ROOT), the
              sweep axes read from its `key=value,...` path components, and
              the result's fields;
  PREFIX.md   one row per run, one column per (task, level, method, metric,
              split, masking).
ROOT and PREFIX may be gs:// paths (etils.epath).
"""
import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Sequence

from etils import epath

from lsm2 import errors
from lsm2 import storage

RESULT_FIELDS = ("task", "metric", "value", "split", "masking", "n")
# Written by lsm2.eval (one task has a row per method and level); optional so
# that hand-written result files stay readable.
OPTIONAL_FIELDS = ("level", "method")
CSV_FIELDS = ("task", "level", "method", "metric", "value", "split", "masking", "n")
RESULTS_FILE = "results.json"
# How deep below the root results.json may lie (ROOT/SWEEP/POINT/eval/TASKSET
# is 4 levels below a workdir root). Single-level globs only: recursive ones
# would walk every checkpoint file, which on a bucket costs a request each.
MAX_DEPTH = 6


@dataclasses.dataclass(frozen=True)
class Result:
  """One evaluation number of one run."""
  run: str  # The run's directory relative to the root, "/"-separated.
  axes: dict[str, str]  # Sweep axes parsed from the run's path.
  task: str
  metric: str
  value: float | None  # None: the metric is undefined for that run (null in results.json).
  split: str
  masking: str
  n: int
  level: str = ""
  method: str = ""

  def column(self) -> str:
    name = " ".join(p for p in (self.task, self.level, self.method, self.metric) if p)
    return f"{name} ({self.split}, {self.masking})"


def parse_axes(run: str) -> dict[str, str]:
  """`masking_scheme/scheme=aim,size=S/eval/probe` -> {"scheme": "aim", "size": "S"}."""
  axes = {}
  for part in run.split("/"):
    if "=" not in part:
      continue
    for item in part.split(","):
      key, sep, value = item.partition("=")
      if not sep or not key:
        raise ValueError(f"run directory {run!r}: cannot read {item!r} as key=value")
      axes[key] = value
  return axes


class ResultsFileError(errors.Error, ValueError):
  """A results.json that is not what lsm2.eval writes: the message names the file and entry."""


def read_results(path: epath.Path, run: str) -> list[Result]:
  """Parses one results.json, naming the file and entry on any malformed field."""
  try:
    entries = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ResultsFileError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(entries, list):
    raise ResultsFileError(f"{path}: expected a list of results, got {type(entries).__name__}")
  axes = parse_axes(run)
  results = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict):
      raise ResultsFileError(f"{path}: entry {i} is not an object: {entry!r}")
    missing = [f for f in RESULT_FIELDS if f not in entry]
    if missing:
      raise ResultsFileError(f"{path}: entry {i} lacks {', '.join(missing)}: {entry!r}")
    value, n = entry["value"], entry["n"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise ResultsFileError(f"{path}: entry {i} value {value!r} is not a number")
    if value is not None and not math.isfinite(value):
      raise ResultsFileError(
          f"{path}: run {run!r} entry {i} ({entry['task']} {entry['metric']}) value "
          f"{json.dumps(value)} is not a finite number: lsm2.eval writes null for a metric it "
          "cannot define, so this file was written or edited by something else")
    if isinstance(n, bool) or not isinstance(n, int):
      raise ResultsFileError(f"{path}: entry {i} n {n!r} is not an integer")
    results.append(Result(run=run, axes=axes, task=str(entry["task"]), metric=str(entry["metric"]),
                          value=None if value is None else float(value), split=str(entry["split"]),
                          masking=str(entry["masking"]), n=n,
                          **{f: str(entry[f]) for f in OPTIONAL_FIELDS if entry.get(f) is not None}))
  return results


def collect(root: str | os.PathLike) -> list[Result]:
  """Every result under root, runs in path order; duplicate keys in a run are an error."""
  root = storage.check_reachable(root, "sweep root")
  if not root.is_dir():
    raise FileNotFoundError(f"sweep root {root} is not a directory")
  paths = [p for depth in range(MAX_DEPTH + 1)
           for p in root.glob("/".join(["*"] * depth + [RESULTS_FILE]))]
  results = []
  for path in sorted(paths):
    run = path.parent.relative_to(root).as_posix()
    results.extend(read_results(path, run))
  if not results:
    raise FileNotFoundError(f"no {RESULTS_FILE} with any result under {root}")
  seen = set()
  for r in results:
    key = (r.run, r.column())
    if key in seen:
      raise ValueError(f"run {r.run!r} reports {r.column()} twice")
    seen.add(key)
  return results


def _axis_names(results: Sequence[Result]) -> list[str]:
  return list(dict.fromkeys(k for r in results for k in r.axes))


def write_csv(results: Sequence[Result], path: str | os.PathLike) -> None:
  """The long table: one row per result."""
  axes = _axis_names(results)
  table = io.StringIO(newline="")
  writer = csv.writer(table)
  writer.writerow(["run", *axes, *CSV_FIELDS])
  for r in results:
    writer.writerow([r.run, *(r.axes.get(a, "") for a in axes),
                     r.task, r.level, r.method, r.metric, "" if r.value is None else repr(r.value),
                     r.split, r.masking, r.n])
  storage.as_path(path).write_text(table.getvalue())


def _format(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4g}"


def _row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown(results: Sequence[Result]) -> str:
  """The wide table: one row per run, one column per (task, level, method, metric, split, masking)."""
  axes = _axis_names(results)
  columns = list(dict.fromkeys(r.column() for r in results))
  runs: dict[str, dict[str, Result]] = {}
  for r in results:
    runs.setdefault(r.run, {})[r.column()] = r
  header = ["run", *axes, *columns]
  lines = [_row(header), "|" + "---|" * len(header)]
  for run, by_column in runs.items():
    run_axes = next(iter(by_column.values())).axes
    cells = [run, *(run_axes.get(a, "") for a in axes),
             *(_format(by_column[c].value) if c in by_column else "" for c in columns)]
    lines.append(_row(cells))
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm2.sweeps.collect", description=__doc__.split("\n")[0])
  parser.add_argument("root", help="the sweep root (e.g. runs/masking_scheme)")
  parser.add_argument("--out", required=True, help="writes OUT.md and OUT.csv")
  args = parser.parse_args(argv)
  try:
    results = collect(args.root)
    out = storage.as_path(args.out)
    storage.check_writable(out.parent, "--out")  # Creates a local parent directory.
  except (ValueError, OSError) as e:  # OSError: a missing root, unusable storage.
    print(f"lsm2: error: {e}", file=sys.stderr)
    return 2
  table = markdown(results)
  out.with_name(out.name + ".md").write_text(table)
  write_csv(results, out.with_name(out.name + ".csv"))
  print(table, end="")
  print(f"collect: {len({r.run for r in results})} runs, {len(results)} results -> "
        f"{out}.md, {out}.csv", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
