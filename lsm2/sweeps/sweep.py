r"""Config sweeps: define them as lists of override dicts, launch one job per point.

A sweep file (configs/sweeps/NAME.py) names its base config and returns the
points, built from `axis`, `product` and `zip_axes` (the big_vision way):

  BASE_CONFIG = "configs/pretrain.py:S,aim"

  def get_sweep():
    return product(axis("config.masking.scheme", ["aim", "lsm1"]),
                   axis("config.model.size", ["tiny", "S", "B"]))

Each point becomes one job of a launcher in launch/, with workdir
ROOT/NAME/POINT (POINT like `scheme=aim,size=S`) and its overrides passed as
`--config.KEY=VALUE`:

  python -m lsm2.sweeps.sweep configs/sweeps/model_size.py --launcher local \
      --workdir-root runs [--dry-run] -- 2 --config.data.dir=/data

Everything after `--` goes to every launcher call (its own settings and
overrides shared by all points). The command works from any directory: a
relative BASE_CONFIG is relative to the repository root, a relative --config to
the current directory, and the launchers get the config as an absolute path
(tpu_vm and gke, whose workers read it from their own checkout: relative to the
repository root). With --eval TASKSET the sweep evaluates each
point's checkpoint instead (configs/eval.py:TASKSET, workdir POINT/eval/TASKSET).
"""
import argparse
import dataclasses
import hashlib
import itertools
import pathlib
import posixpath
import re
import shlex
import subprocess
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from lsm2 import config_files
from lsm2 import errors

Overrides = dict[str, Any]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
EVAL_CONFIG = "configs/eval.py"  # Relative to REPO_ROOT.
LAUNCHERS = {
    "local": "local.sh",
    "tpu_vm": "tpu_vm.sh",
    "slurm": "slurm_gpu.sh",
    "gke": "gke_xpk.sh",
}
# Launchers whose workers read the config from their own copy of the repository,
# so they take it relative to the repository root.
_REMOTE_LAUNCHERS = ("tpu_vm", "gke")
# The launcher flag that names each job, where the launcher has one.
_JOB_NAME_FLAG = {"slurm": "--job-name", "gke": "--workload"}
# Flags the sweep sets per point; launcher arguments must not repeat them.
_RESERVED_FLAGS = ("--config", "--workdir", "--dry-run", *_JOB_NAME_FLAG.values())
_KEY_RE = re.compile(r"config(\.[A-Za-z_][A-Za-z0-9_]*)+")
_NAME_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._+-]")
_K8S_MAX_NAME = 40


def axis(key: str, values: Sequence[Any]) -> list[Overrides]:
  """One point per value of config field `key` (e.g. "config.model.size")."""
  if not _KEY_RE.fullmatch(key):
    raise ValueError(f"sweep key {key!r} must look like 'config.field[.subfield...]'")
  if isinstance(values, (str, bytes)) or not values:
    raise ValueError(f"sweep axis {key!r} needs a non-empty list of values, got {values!r}")
  return [{key: value} for value in values]


def product(*axes: Sequence[Overrides]) -> list[Overrides]:
  """Every combination of the axes' points, the first axis varying slowest."""
  return [_merge(combo) for combo in itertools.product(*axes)]


def zip_axes(*axes: Sequence[Overrides]) -> list[Overrides]:
  """The i-th points of all axes together; the axes must be equally long."""
  lengths = [len(a) for a in axes]
  if len(set(lengths)) > 1:
    raise ValueError(f"zip_axes needs axes of equal length, got lengths {lengths}")
  return [_merge(combo) for combo in zip(*axes)]


def _merge(points: Sequence[Overrides]) -> Overrides:
  merged: Overrides = {}
  for point in points:
    for key, value in point.items():
      if key in merged:
        raise ValueError(f"sweep key {key!r} appears in more than one combined axis")
      merged[key] = value
  return merged


def flatten(overrides: Mapping[str, Any]) -> Overrides:
  """Dict values become one override per leaf: {"config.mesh": {"data": 4}} -> config.mesh.data."""
  flat: Overrides = {}
  for key, value in overrides.items():
    if isinstance(value, Mapping):
      for sub_key, sub_value in flatten({f"{key}.{k}": v for k, v in value.items()}).items():
        flat[sub_key] = sub_value
    else:
      if not _KEY_RE.fullmatch(key):
        raise ValueError(f"sweep key {key!r} must look like 'config.field[.subfield...]'")
      flat[key] = value
  return flat


def format_value(value: Any) -> str:
  """The value as ml_collections' config flags parse it back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  raise TypeError(f"cannot pass {value!r} ({type(value).__name__}) as a config override")


def _label_value(value: Any) -> str:
  if isinstance(value, float):
    text = f"{value:g}"
  elif isinstance(value, (tuple, list)):
    text = "+".join(_label_value(v) for v in value)
  else:
    text = format_value(value)
  return _NAME_UNSAFE_RE.sub("_", text)


@dataclasses.dataclass(frozen=True)
class Point:
  """One job of a sweep: a readable name and its flattened config overrides."""
  name: str
  overrides: Mapping[str, Any]

  def flags(self) -> list[str]:
    return [f"--{key}={format_value(value)}" for key, value in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep file, expanded: name (the file's stem), base config, points."""
  name: str
  base_config: str
  points: tuple[Point, ...]


def name_points(points: Sequence[Mapping[str, Any]]) -> tuple[Point, ...]:
  """Names each point `label=value,...` from its overrides; labels are the
  fields' last names unless two swept fields share one. Names must be unique."""
  flat = [flatten(p) for p in points]
  keys = list(dict.fromkeys(k for p in flat for k in p))
  last = [k.rsplit(".", 1)[1] for k in keys]
  label = {k: (short if last.count(short) == 1 else k.removeprefix("config."))
           for k, short in zip(keys, last)}
  named = []
  for overrides in flat:
    name = ",".join(f"{label[k]}={_label_value(v)}" for k, v in overrides.items()) or "base"
    named.append(Point(name=name, overrides=overrides))
  seen: dict[str, int] = {}
  for i, point in enumerate(named):
    if point.name in seen:
      raise ValueError(f"sweep points {seen[point.name]} and {i} are both named "
                       f"{point.name!r}: every point needs distinct override values")
    seen[point.name] = i
  return tuple(named)


class SweepFileError(errors.Error, ValueError):
  """A sweep file that does not give a sweep: the message names the file and what is wrong."""


def _line_in(e: BaseException, path: pathlib.Path) -> str:
  """' line N': where in the sweep file `e` was raised (its innermost frame there), or ''."""
  if isinstance(e, SyntaxError) and e.lineno:
    return f" line {e.lineno}"
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
           if pathlib.Path(f.filename) == path]
  return f" line {lines[-1]}" if lines else ""


def load_sweep(path: str | pathlib.Path) -> Sweep:
  """Imports a sweep file and expands its `get_sweep()`.

  Whatever keeps the file from giving a sweep (a syntax error, an exception in
  its code, points that are not override dicts) is a SweepFileError naming the
  file and line: the file is the user's code, so its faults are not lsm2 bugs.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"sweep file {path} does not exist")
  try:
    module = config_files.load_module(path)
  except Exception as e:  # pylint: disable=broad-except
    raise SweepFileError(f"sweep file {path}{_line_in(e, path)}: {type(e).__name__}: {e}") from None
  for attr in ("BASE_CONFIG", "get_sweep"):
    if not hasattr(module, attr):
      raise SweepFileError(f"sweep file {path} does not define {attr}")
  if not isinstance(module.BASE_CONFIG, str) or not module.BASE_CONFIG:
    raise SweepFileError(f"sweep file {path}: BASE_CONFIG must name a config such as "
                         f"'configs/pretrain.py:S,aim', got {module.BASE_CONFIG!r}")
  try:
    points = module.get_sweep()
  except Exception as e:  # pylint: disable=broad-except
    raise SweepFileError(f"sweep file {path}{_line_in(e, path)}: get_sweep() raised "
                         f"{type(e).__name__}: {e}") from None
  if (not isinstance(points, (list, tuple)) or not points
      or not all(isinstance(p, Mapping) for p in points)):
    raise SweepFileError(f"sweep file {path}: get_sweep() must return a non-empty list of "
                         f"override dicts (built with axis, product, zip_axes), got {points!r:.200}")
  try:
    named = name_points(points)
  except ValueError as e:
    raise SweepFileError(f"sweep file {path}: {e}") from None
  return Sweep(name=path.stem, base_config=module.BASE_CONFIG, points=named)


def eval_tasksets() -> tuple[str, ...]:
  """The task sets of configs/eval.py (its TASKSETS), the values --eval accepts."""
  return tuple(config_files.load_module(REPO_ROOT / EVAL_CONFIG).TASKSETS)


def k8s_name(*parts: str) -> str:
  """A valid Kubernetes/xpk workload name (a-z, 0-9, '-', <= 40 chars) from parts."""
  text = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
  text = text if text[:1].isalpha() else f"w-{text}"
  if len(text) > _K8S_MAX_NAME:
    digest = hashlib.sha1(text.encode()).hexdigest()[:6]
    text = f"{text[:_K8S_MAX_NAME - 7].rstrip('-')}-{digest}"
  return text


def launcher_config(config: str, base: str | pathlib.Path, launcher: str) -> str:
  """`config` (PATH[:ARG]) as `launcher` takes it, PATH resolved against `base` when relative.

  The local and Slurm launchers get an absolute path, so the sweep works from
  any directory; tpu_vm and gke get it relative to the repository root, where
  their workers find it in their own checkout.
  """
  path, sep, arg = config.partition(":")
  resolved = (pathlib.Path(base) / path).resolve()
  if not resolved.is_file():
    raise FileNotFoundError(f"config file {path!r} ({resolved}) does not exist")
  if launcher not in _REMOTE_LAUNCHERS:
    return f"{resolved}{sep}{arg}"
  if not resolved.is_relative_to(REPO_ROOT):
    raise ValueError(f"config {path!r} ({resolved}) is outside the repository {REPO_ROOT}: the "
                     f"{launcher} workers read their config from their own copy of the repository")
  return f"{resolved.relative_to(REPO_ROOT).as_posix()}{sep}{arg}"


@dataclasses.dataclass(frozen=True)
class Job:
  """The launcher call of one point."""
  point: Point
  workdir: str
  argv: tuple[str, ...]


def jobs(sweep: Sweep, launcher: str, workdir_root: str, launcher_args: Sequence[str] = (),
         config: str | None = None, eval_taskset: str | None = None,
         dry_run: bool = False) -> list[Job]:
  """One launcher command line per sweep point.

  Args:
    sweep: the expanded sweep.
    launcher: one of LAUNCHERS.
    workdir_root: points run in workdir_root/sweep.name/point.name.
    launcher_args: given to every launcher call before the sweep's own flags;
      whatever follows a `--` in them stays after `--` (flags for lsm2.main).
    config: replaces the sweep's BASE_CONFIG (e.g. with `runlocal` added);
      a relative path is relative to the current directory (the sweep's
      BASE_CONFIG: to the repository root).
    eval_taskset: evaluate each point's checkpoint with configs/eval.py:TASKSET.
    dry_run: ask the launchers for their dry run.
  """
  if launcher not in LAUNCHERS:
    raise ValueError(f"unknown launcher {launcher!r}; expected one of {sorted(LAUNCHERS)}")
  if eval_taskset is not None:
    tasksets = eval_tasksets()
    if eval_taskset not in tasksets:
      raise ValueError(f"--eval {eval_taskset!r} is not a task set of {EVAL_CONFIG}: it takes "
                       f"one of {', '.join(tasksets)}")
  launcher_args = list(launcher_args)
  split = launcher_args.index("--") if "--" in launcher_args else len(launcher_args)
  settings, main_flags = launcher_args[:split], launcher_args[split:]
  for arg in settings:
    if arg.split("=", 1)[0] in _RESERVED_FLAGS:
      raise ValueError(f"launcher argument {arg!r} is set by the sweep itself, per point")
  script = REPO_ROOT / "launch" / LAUNCHERS[launcher]
  if not script.is_file():
    raise FileNotFoundError(f"launcher {script} not found: run sweeps from a checkout of the repository")
  if eval_taskset is not None:
    cfg = launcher_config(f"{EVAL_CONFIG}:{eval_taskset}", REPO_ROOT, launcher)
  elif config is not None:
    cfg = launcher_config(config, pathlib.Path.cwd(), launcher)
  else:
    try:
      cfg = launcher_config(sweep.base_config, REPO_ROOT, launcher)
    except (FileNotFoundError, ValueError) as e:
      raise type(e)(f"BASE_CONFIG of sweep {sweep.name} (relative to the repository root): {e}") from None
  result, job_names = [], []
  for point in sweep.points:
    train_workdir = posixpath.join(workdir_root, sweep.name, point.name)
    if eval_taskset is None:
      workdir, overrides, suffix = train_workdir, point.flags(), []
    else:
      workdir = posixpath.join(train_workdir, "eval", eval_taskset)
      overrides = [f"--config.init_from={train_workdir}"]
      suffix = ["eval", eval_taskset]
    argv = ["bash", str(script), *settings, "--config", cfg, "--workdir", workdir, *overrides]
    if launcher in _JOB_NAME_FLAG:
      parts = [sweep.name, point.name, *suffix]
      job_names.append(k8s_name("lsm2", *parts) if launcher == "gke" else "/".join(parts))
      argv += [_JOB_NAME_FLAG[launcher], job_names[-1]]
    argv += [*(["--dry-run"] if dry_run else []), *main_flags]
    result.append(Job(point=point, workdir=workdir, argv=tuple(argv)))
  if len(set(job_names)) != len(job_names):
    raise ValueError(f"sweep points map to the same {launcher} job name: {job_names}")
  return result


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(
      prog="python -m lsm2.sweeps.sweep", allow_abbrev=False,
      description="Launches one job per point of a sweep file; arguments after `--` go to every launcher call.")
  parser.add_argument("sweep_file", help="configs/sweeps/NAME.py")
  parser.add_argument("--launcher", required=True, choices=sorted(LAUNCHERS))
  parser.add_argument("--workdir-root", default="runs",
                      help="points run in ROOT/SWEEP/POINT (a gs:// path for tpu_vm and gke); default runs")
  parser.add_argument("--config", help="replaces the sweep file's BASE_CONFIG, PATH[:ARG]")
  parser.add_argument("--eval", metavar="TASKSET",
                      help="evaluate every point's checkpoint with configs/eval.py:TASKSET instead of training")
  parser.add_argument("--only", metavar="POINT", action="append",
                      help="launch only this point, e.g. scheme=aim (repeatable)")
  parser.add_argument("--dry-run", action="store_true",
                      help="print each launcher command and the launcher's own dry run; run nothing")
  return parser.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Sequence[str]) -> int:
  args, launcher_args = _parse(argv)
  try:
    sweep = load_sweep(args.sweep_file)
    all_jobs = jobs(sweep, args.launcher, args.workdir_root, launcher_args, args.config, args.eval,
                    args.dry_run)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"lsm2: error: {e}", file=sys.stderr)
    return 2
  names = [j.point.name for j in all_jobs]
  unknown = sorted(set(args.only or ()) - set(names))
  if unknown:
    print(f"lsm2: error: --only {', '.join(unknown)}: not a point of {sweep.name} "
          f"(its points: {', '.join(names)})", file=sys.stderr)
    return 2
  selected = [j for j in all_jobs if not args.only or j.point.name in args.only]
  failed = []
  for i, job in enumerate(selected, 1):
    print(f"# [{i}/{len(selected)}] {sweep.name}/{job.point.name} -> {job.workdir}", flush=True)
    print(shlex.join(job.argv), flush=True)
    status = subprocess.call(job.argv)
    if status:
      if args.dry_run:  # The launcher refused its arguments: so will every point.
        return status
      print(f"sweep: point {job.point.name} failed with status {status}", file=sys.stderr)
      failed.append(job.point.name)
  if failed:
    print(f"sweep: {len(failed)} of {len(selected)} points failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
