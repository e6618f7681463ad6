r"""The paper's comparison, reproduced at CPU scale: AIM vs the LSM-1-style baseline over seeds.

For each dataset (synthetic; Depresjon and Fitabase, converted from the public
datasets in --shared DIR, which lsm2 does not ship) and each seed 0..N-1,
pretrains `configs/pretrain.py:RECIPE,aim` and `configs/pretrain.py:RECIPE,lsm1`
with identical data, steps, batch, patch, learning rate and seed, evaluates
both with `configs/eval.py:DATASET` (probes, few-shot, fine-tuning, generative
tasks with classical baselines, robustness), and reports per metric the mean
over seeds with a 95% bootstrap interval and a paired verdict per task (AIM,
LSM-1, or "tie" when the interval of the paired difference covers 0;
lsm2.eval.intervals). On synthetic data it adds the paper's scaling axes (AIM
only: pretraining steps, training subjects, parameters) and, on every dataset,
the error-versus-missingness curve (random imputation at 30/50/80% masked).
Plots go to OUT/plots/ and are copied beside the docs file (docs/results/ for
docs/results.md), which links them by relative path.

  # The full run: 3 seeds x 2 schemes x 3 datasets at XS, 5,000 steps, plus the scaling
  # runs: ~12 hours of one CPU core (from stage times measured at 2,500 steps: a
  # synthetic XS pretraining ~1,000 s, its evaluation ~1,300-1,650 s). Rerun the same
  # command after an interruption; see below to use more cores.
  python benchmarks/paper_comparison.py --out /tmp/lsm2_paper --shared DIR
  # Smoke run (tiny model, 60 steps; ~15 min for synthetic with scaling on 2 shared cores):
  python benchmarks/paper_comparison.py --out /tmp/q --quick --seeds 2 \
      --datasets synthetic --docs /tmp/q/results.md

Stages are resumable: a finished pretraining (WORKDIR/export) or evaluation
(results.json, scaling.json) under --out is reused, so a rerun only redoes what
is missing. Stage wall times accumulate in OUT/timings.json. A pretraining
uses about one CPU core, so on a machine with more, split the work over
invocations with the same --out and flags that each name other --datasets, with
--scaling '' --docs ''; run the scaling axes once synthetic_aim_s0 has finished
(its full-budget points reuse it), then the plain command, which finds every
stage done and writes the docs.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time
from typing import Any, Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Run as a script from anywhere: import lsm2 from this checkout.

from lsm2.eval import intervals  # pylint: disable=g-import-not-at-top,wrong-import-position

SCHEMES = ("aim", "lsm1")
NAMES = {"aim": "AIM", "lsm1": "LSM-1"}
DATASETS = ("synthetic", "depresjon", "fitabase")
DEFAULT_RECIPE = "XS,cpu"
# Metrics shown per task kind; (name, higher is better).
SHOWN = {
    "binary": (("auroc", True), ("macro_f1", True)),
    "categorical": (("macro_f1", True), ("balanced_accuracy", True)),
    "regression": (("mae", False), ("pearson_r", True)),
}
LOWER_IS_BETTER = ("mae", "mse", "rmse")
FEATURES = "features_probe"  # The probe on hand-crafted per-day features (lsm2.eval.features).
# A paired verdict needs at least this many seeds where both schemes have a value.
MIN_PAIRS = 2
MISSINGNESS_TASKS = ("random_imputation_30", "random_imputation_50", "random_imputation_80")
SCALING_AXES = ("steps", "subjects", "params")
# Scaling metric: generative test MSE of these tasks, with these classical baselines.
SCALING_TASKS = ("random_imputation_80", "temporal_interpolation_60min")
SCALING_BASELINES = ("channel_mean", "linear_interpolation")
# Text after this line in the docs file is hand-written and kept on rewrites.
NOTES_MARKER = "<!-- Notes below are written by hand and kept when the script rewrites this file. -->"

Key = tuple[str, str, str, str, str]  # (task, level, method, metric, masking)


def _config(name: str, arg: str):
  from lsm2 import config_files  # pylint: disable=g-import-not-at-top
  return config_files.load_config(REPO / "configs" / f"{name}.py", arg)


def _patch(text: str) -> tuple[int, int]:
  try:
    time_, channels = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"patch {text!r} must be MINUTESxCHANNELS, e.g. 30x2") from None
  return time_, channels


def _floats(text: str, flag: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v]
  except ValueError:
    raise ValueError(f"{flag}={text!r} must be comma-separated numbers") from None
  if len(values) < 3 or any(not 0 < v <= 1 for v in values):
    raise ValueError(f"{flag}={text!r} must hold at least 3 fractions in (0, 1]")
  return sorted(values)


def recipe_arg(recipe: str, size: str, scheme: str) -> str:
  """`configs/pretrain.py` switches: the recipe's, its size replaced by `size` (if set), + scheme."""
  from lsm2.model import config as model_config  # pylint: disable=g-import-not-at-top
  tokens = [t.strip() for t in recipe.split(",") if t.strip()]
  bad = [t for t in tokens if t in model_config.SCHEMES]
  if bad:
    raise ValueError(f"--recipe={recipe!r} names scheme(s) {bad}; the script pretrains both "
                     f"{SCHEMES} itself")
  if size:
    tokens = [t for t in tokens if t not in model_config.SIZES] + [size]
  return ",".join(tokens + [scheme])


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="working directory for data, runs and evaluations")
  p.add_argument("--datasets", default=",".join(DATASETS))
  p.add_argument("--shared", default=os.environ.get("LSM2_DATASETS", ""),
                 help="directory holding depresjon/ and fitabase/ (default: $LSM2_DATASETS)")
  p.add_argument("--recipe", default=DEFAULT_RECIPE,
                 help="configs/pretrain.py switches without the scheme (the CPU-scale recipe)")
  p.add_argument("--size", default="", help="model size replacing the recipe's")
  p.add_argument("--steps", type=int, default=0, help="pretraining steps (0: the recipe's)")
  p.add_argument("--real_steps", type=int, default=0, help="steps on real data (0: --steps)")
  p.add_argument("--batch_size", type=int, default=0, help="0: the recipe's")
  p.add_argument("--lr", type=float, default=0.0, help="0: the recipe's")
  p.add_argument("--seeds", type=int, default=3, help="pretraining + evaluation seeds 0..N-1")
  p.add_argument("--synthetic_subjects", type=int, default=0, help="0: the recipe's")
  p.add_argument("--synthetic_days", type=int, default=0, help="0: the recipe's")
  p.add_argument("--synthetic_patch", default="", help="minutes x channels per token ('': recipe's)")
  p.add_argument("--real_patch", default="10x1", help="minutes x channels per token")
  p.add_argument("--probe_steps", type=int, default=500)
  p.add_argument("--fine_tune_steps", type=int, default=50, help="0 = no fine-tuning")
  p.add_argument("--fine_tune_lr", type=float, default=1e-3)
  p.add_argument("--max_eval_days", type=int, default=0, help="per split; 0 = all")
  p.add_argument("--scaling", default=",".join(SCALING_AXES),
                 help=f"scaling axes on synthetic data, AIM only, from {SCALING_AXES}; '' = none")
  p.add_argument("--scaling_steps", default="0.25,0.5,1", help="fractions of the recipe's steps")
  p.add_argument("--scaling_subjects", default="0.25,0.5,1",
                 help="fractions of the training subjects")
  p.add_argument("--scaling_sizes", default="tiny,XXS,XS", help="model sizes (parameter axis)")
  p.add_argument("--scaling_seeds", type=int, default=1, help="seeds per scaling point")
  p.add_argument("--docs", default=str(REPO / "docs" / "results.md"), help="'' = do not write")
  p.add_argument("--quick", action="store_true",
                 help="smoke-test sizes: tiny model, 30 subjects, 60 steps, 100 probe steps, "
                      "5 fine-tune steps")
  args = p.parse_args(argv)
  try:
    _resolve(args)
  except ValueError as e:
    p.error(str(e))
  return args


def _resolve(args: argparse.Namespace) -> None:
  """Fills recipe defaults, applies --quick, validates every list-valued flag."""
  from lsm2.model import config as model_config  # pylint: disable=g-import-not-at-top
  if args.quick:
    args.size = args.size or "tiny"
    args.synthetic_subjects, args.steps, args.probe_steps = 30, 60, 100
    args.fine_tune_steps = min(args.fine_tune_steps, 5)
  recipe = _config("pretrain", recipe_arg(args.recipe, args.size, "aim"))
  args.size = recipe.model.size
  args.steps = args.steps or recipe.total_steps
  args.batch_size = args.batch_size or recipe.batch_size
  args.lr = args.lr or recipe.lr
  args.synthetic_subjects = args.synthetic_subjects or recipe.data.synthesize_subjects or 200
  args.synthetic_days = args.synthetic_days or recipe.data.synthesize_days or 4
  args.synthetic_patch = (args.synthetic_patch
                          or f"{recipe.model.patch_time}x{recipe.model.patch_channels}")
  _patch(args.synthetic_patch), _patch(args.real_patch)  # pylint: disable=expression-not-assigned
  if args.seeds < 1 or args.scaling_seeds < 1:
    raise ValueError(f"--seeds={args.seeds} and --scaling_seeds={args.scaling_seeds} must be >= 1")
  args.datasets = [d for d in args.datasets.split(",") if d]
  bad = [d for d in args.datasets if d not in DATASETS]
  if bad:
    raise ValueError(f"unknown dataset(s) {bad}; choose from {DATASETS}")
  args.scaling = [a for a in args.scaling.split(",") if a]
  bad = [a for a in args.scaling if a not in SCALING_AXES]
  if bad:
    raise ValueError(f"--scaling: unknown axes {bad}; choose from {SCALING_AXES}")
  args.scaling_steps = _floats(args.scaling_steps, "--scaling_steps")
  args.scaling_subjects = _floats(args.scaling_subjects, "--scaling_subjects")
  args.scaling_sizes = [s for s in args.scaling_sizes.split(",") if s]
  bad = [s for s in args.scaling_sizes if s not in model_config.SIZES]
  if bad or len(args.scaling_sizes) < 3:
    raise ValueError(f"--scaling_sizes={args.scaling_sizes} must name at least 3 sizes of "
                     f"{model_config.SIZES}")


# ----------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------
def prepare_data(dataset: str, args) -> pathlib.Path:
  """The dataset, written once with seed 0: seeds vary the models, not the data."""
  out = pathlib.Path(args.out) / "data" / dataset
  if (out / "metadata.json").exists():
    return out
  if dataset == "synthetic":
    from lsm2.data import synthesize  # pylint: disable=g-import-not-at-top
    synthesize.write_synthetic_dataset(out, subjects=args.synthetic_subjects,
                                       days=args.synthetic_days, seed=0)
  else:
    from lsm2.data import convert  # pylint: disable=g-import-not-at-top
    source = pathlib.Path(args.shared) / dataset
    if not source.is_dir():
      raise FileNotFoundError(f"{source} not found: pass --shared DIR (or set $LSM2_DATASETS) to "
                              "the folder holding the real datasets, or leave them out with "
                              "--datasets=synthetic")
    fmt = "actiwatch" if dataset == "depresjon" else "fitabase"
    convert.convert(fmt, source, out, seed=0)
  return out


def pretrain_config(dataset: str, scheme: str, data_dir: pathlib.Path, args, *, seed: int,
                    size: str = "", steps: int = 0, max_subjects: int = 0):
  config = _config("pretrain", recipe_arg(args.recipe, size or args.size, scheme))
  synthetic = dataset == "synthetic"
  patch_time, patch_channels = _patch(args.synthetic_patch if synthetic else args.real_patch)
  n_time = 1440 // patch_time
  with config.unlocked():
    config.seed = seed
    config.data.dir = str(data_dir)
    config.data.synthesize_subjects = 0
    config.data.max_train_subjects = max_subjects
    config.model.patch_time = patch_time
    config.model.patch_channels = patch_channels
    config.masking.time_bars = round(0.4 * n_time)  # The paper's 40% of the day.
    _fit_signal_imputation(config, data_dir)
    config.total_steps = steps or (args.steps if synthetic else (args.real_steps or args.steps))
    config.batch_size = args.batch_size
    config.lr = args.lr
    config.checkpoint_every = config.total_steps
    config.eval_every = config.total_steps
    config.log_every = max(1, config.total_steps // 10)
  return config


def _fit_signal_imputation(config, data_dir: pathlib.Path) -> None:
  """Signal imputation hides at most all channels but one token; none when there is one token.

  The recipe's k (6 channels) assumes the synthetic 26; Depresjon has 1 channel and
  Fitabase 2.
  """
  from lsm2.data import metadata  # pylint: disable=g-import-not-at-top
  if not config.masking.weights.get("signal_imputation", 0.0):
    return
  channels = metadata.load_metadata(data_dir).num_channels
  most = channels - config.model.patch_channels
  if most < 1:
    config.masking.weights.signal_imputation = 0.0
  else:
    config.masking.signal_imputation_k = min(config.masking.signal_imputation_k, most)


def eval_config(dataset: str, workdir: pathlib.Path, args, seed: int):
  config = _config("eval", dataset)
  with config.unlocked():
    config.init_from = str(workdir)
    config.seed = seed
    config.probe.steps = args.probe_steps
    config.data.max_days = args.max_eval_days
    config.fine_tune.enabled = args.fine_tune_steps > 0
    config.fine_tune.steps = max(args.fine_tune_steps, 1)
    config.fine_tune.lr = args.fine_tune_lr
  return config


class StageTimes(dict):
  """Stage wall times in seconds, saved to `path` after every stage so that reruns keep them.

  Invocations running side by side on one --out each add their stages to what the file
  holds then (read, merge and replace under a lock), so none drops another's.
  """

  def __init__(self, path: pathlib.Path):
    super().__init__(json.loads(path.read_text()) if path.exists() else {})
    self.path = path

  def __setitem__(self, name: str, seconds: float) -> None:
    with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      self.update(json.loads(self.path.read_text()) if self.path.exists() else {})
      super().__setitem__(name, seconds)
      tmp = self.path.with_name(self.path.name + ".tmp")
      tmp.write_text(json.dumps(self, indent=1) + "\n")
      os.replace(tmp, self.path)


def _pretrain(config, workdir: pathlib.Path, timings: dict, name: str) -> None:
  if (workdir / "export" / "lsm2.json").exists():
    return
  from lsm2.train import train  # pylint: disable=g-import-not-at-top
  start = time.time()
  train.train_and_evaluate(config, str(workdir))
  timings[name] = time.time() - start


def run_seeds(dataset: str, args, timings: dict) -> dict[str, list[list[dict[str, Any]]]]:
  """Result records per scheme, one list per seed (seed i at index i)."""
  from lsm2.eval import run  # pylint: disable=g-import-not-at-top
  data_dir = prepare_data(dataset, args)
  out: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in SCHEMES}
  for seed in range(args.seeds):
    for scheme in SCHEMES:
      name = f"{dataset}_{scheme}_s{seed}"
      workdir = pathlib.Path(args.out) / "runs" / name
      _pretrain(pretrain_config(dataset, scheme, data_dir, args, seed=seed), workdir, timings,
                f"{name}/pretrain")
      results = pathlib.Path(args.out) / "eval" / name
      if not (results / "results.json").exists():
        start = time.time()
        run.evaluate(eval_config(dataset, workdir, args, seed), results)
        timings[f"{name}/evaluate"] = time.time() - start
      out[scheme].append(json.loads((results / "results.json").read_text()))
  return out


def generative_scores(workdir: pathlib.Path, data_dir: pathlib.Path, out: pathlib.Path, *,
                      seed: int, max_days: int) -> dict[str, Any]:
  """Test MSE of SCALING_TASKS (model and SCALING_BASELINES) and the parameter count; cached."""
  if (out / "scaling.json").exists():
    return json.loads((out / "scaling.json").read_text())
  import jax  # pylint: disable=g-import-not-at-top
  from lsm2 import api  # pylint: disable=g-import-not-at-top
  from lsm2.eval import generative, report, run  # pylint: disable=g-import-not-at-top
  model = api.load(str(workdir))
  test = run.SplitReader(model, str(data_dir), max_days).read("test")
  results = report.Results()
  generative.run(results, model, test["z"], test["observed"],
                 generative.select_tasks(model.model_cfg, SCALING_TASKS), split="test", seed=seed,
                 baseline_names=SCALING_BASELINES, noise=None)
  scores = {"params": int(sum(x.size for x in jax.tree.leaves(model.params))),
            "records": results.records}
  out.mkdir(parents=True, exist_ok=True)
  (out / "scaling.json").write_text(json.dumps(scores, indent=1) + "\n")
  return scores


def scaling_points(axis: str, args, n_train: int) -> list[tuple[str, float, dict[str, Any]]]:
  """(point name, x value, pretrain_config overrides) per point of one axis."""
  if axis == "steps":
    steps = sorted({max(1, round(f * args.steps)) for f in args.scaling_steps})
    return [(f"steps{s}", s, {"steps": s}) for s in steps]
  if axis == "subjects":
    counts = sorted({max(1, round(f * n_train)) for f in args.scaling_subjects})
    return [(f"subjects{c}", c, {"max_subjects": 0 if c == n_train else c}) for c in counts]
  return [(f"size{s}", float("nan"), {"size": s}) for s in args.scaling_sizes]


def run_scaling(args, timings: dict) -> dict[str, list[dict[str, Any]]]:
  """Per axis, one entry per point: x, the seeds' scaling.json scores. AIM on synthetic data."""
  from lsm2.data import metadata  # pylint: disable=g-import-not-at-top
  data_dir = prepare_data("synthetic", args)
  meta = metadata.load_metadata(data_dir)
  if "train" not in meta.subjects:
    raise ValueError(f"{data_dir}/metadata.json lists no train subjects: the subject axis needs them")
  n_train = len(meta.subjects["train"])
  out: dict[str, list[dict[str, Any]]] = {}
  for axis in args.scaling:
    out[axis] = []
    for name, x, overrides in scaling_points(axis, args, n_train):
      scores = []
      for seed in range(args.scaling_seeds):
        config = pretrain_config("synthetic", "aim", data_dir, args, seed=seed, **overrides)
        same_as_main = (seed < args.seeds and config.total_steps == args.steps
                        and config.model.size == args.size and not config.data.max_train_subjects)
        # The full-budget point is the main comparison's AIM run: reused, not retrained.
        run_name = f"synthetic_aim_s{seed}" if same_as_main else f"scaling/{name}_s{seed}"
        workdir = pathlib.Path(args.out) / "runs" / run_name
        _pretrain(config, workdir, timings, f"{run_name}/pretrain")
        start = time.time()
        cached = (pathlib.Path(args.out) / "eval" / "scaling" / f"{name}_s{seed}" / "scaling.json")
        had = cached.exists()
        scores.append(generative_scores(workdir, data_dir, cached.parent, seed=seed,
                                        max_days=args.max_eval_days))
        if not had:
          timings[f"scaling/{name}_s{seed}/evaluate"] = time.time() - start
      if axis == "params":
        x = scores[0]["params"]
      out[axis].append({"point": name, "x": x, "scores": scores})
  return out


# ----------------------------------------------------------------------------
# Aggregation over seeds (pure functions: tests/test_paper_comparison.py).
# ----------------------------------------------------------------------------
def record_key(r: dict[str, Any]) -> Key:
  return (r["task"], r["level"], r["method"], r["metric"], r["masking"])


def collect(runs: Sequence[Sequence[dict[str, Any]]]) -> dict[Key, list[float | None]]:
  """Per record key, its value in each run (in run order); None where a run lacks it or it is undefined."""
  indexed = [{record_key(r): r["value"] for r in records} for records in runs]
  keys = dict.fromkeys(k for index in indexed for k in index)
  return {k: [index.get(k) for index in indexed] for k in keys}


def summarize(values: Sequence[float | None]) -> intervals.Interval | None:
  """Mean and 95% bootstrap interval over the defined values; None when none is defined."""
  defined = [v for v in values if v is not None]
  return intervals.bootstrap_interval(defined) if defined else None


def paired(aim: Sequence[float | None], lsm1: Sequence[float | None], metric: str
           ) -> tuple[str, intervals.Interval | None]:
  """Verdict "AIM" / "LSM-1" / "tie" and the interval of mean(AIM - LSM-1) over shared seeds.

  "n/a" (and None) with fewer than MIN_PAIRS seeds where both are defined: one
  difference has no spread, so it cannot tell a win from noise.
  """
  pairs = [(a, b) for a, b in zip(aim, lsm1) if a is not None and b is not None]
  if len(pairs) < MIN_PAIRS:
    return "n/a", None
  a, b = np.array(pairs, np.float64).T
  return intervals.paired_verdict(a, b, lower_is_better=metric in LOWER_IS_BETTER,
                                  names=(NAMES["aim"], NAMES["lsm1"]))


def fmt_interval(iv: intervals.Interval | None, seeds: int = 0, signed: bool = False) -> str:
  """"0.812 [0.801, 0.830]"; "(n=2)" appended when fewer values than `seeds` were defined."""
  if iv is None:
    return "n/a"
  f = "{:+.3f}" if signed else "{:.3f}"
  text = f"{f.format(iv.mean)} [{f.format(iv.low)}, {f.format(iv.high)}]"
  return text + (f" (n={iv.n})" if seeds and iv.n < seeds else "")


def _mean(values: Sequence[float | None] | None) -> float | None:
  defined = [v for v in values or () if v is not None]
  return float(np.mean(defined)) if defined else None


def discriminative_table(agg: dict[str, dict[Key, list]], records: Sequence[dict],
                         kinds: dict[str, str], seeds: int, tally: dict) -> list[str]:
  aim, lsm1 = agg["aim"], agg["lsm1"]
  disc = [r for r in records if r["family"] == "discriminative"]
  keys = list(dict.fromkeys((r["task"], r["level"]) for r in disc if r["masking"] == "natural"))
  # Chance and the hand-crafted features do not depend on the encoder: columns, not rows.
  methods = list(dict.fromkeys(r["method"] for r in disc
                               if r["method"] not in ("majority", "mean", FEATURES)))
  lines = ["| task | level | method | metric | AIM | LSM-1 | chance | features | AIM − LSM-1 | better |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for task, level in keys:
    chance_method = "mean" if kinds[task] == "regression" else "majority"
    for method in methods:
      for metric, _ in SHOWN[kinds[task]]:
        key = (task, level, method, metric, "natural")
        if key not in aim and key not in lsm1:
          continue
        v, diff = paired(aim.get(key, []), lsm1.get(key, []), metric)
        tally[v] = tally.get(v, 0) + 1
        chance = _mean(aim.get((task, level, chance_method, metric, "natural")))
        features = _mean(aim.get((task, level, FEATURES, metric, "natural")))
        lines.append(f"| {task} | {level} | {method} | {metric} | "
                     f"{fmt_interval(summarize(aim.get(key, [])), seeds)} | "
                     f"{fmt_interval(summarize(lsm1.get(key, [])), seeds)} | "
                     f"{'n/a' if chance is None else f'{chance:.3f}'} | "
                     f"{'n/a' if features is None else f'{features:.3f}'} | "
                     f"{fmt_interval(diff, signed=True)} | {v} |")
  splits = sorted({r["split"] for r in disc})
  return lines + ["", f"Scored on: {', '.join(f'`{s}`' for s in splits)}."]


def best_baseline(agg_aim: dict[Key, list], task: str, masking: str = "natural"
                  ) -> tuple[str, float] | None:
  """(name, mean MSE) of the classical baseline with the lowest mean MSE over seeds."""
  means = [(m, _mean(v)) for (t, lv, m, metric, mk), v in agg_aim.items()
           if t == task and lv == "minute" and metric == "mse" and mk == masking
           and m not in ("model", "noise_floor")]
  means = [(m, v) for m, v in means if v is not None]
  return min(means, key=lambda mv: mv[1]) if means else None


def generative_table(agg: dict[str, dict[Key, list]], records: Sequence[dict], seeds: int,
                     tally: dict) -> list[str]:
  aim, lsm1 = agg["aim"], agg["lsm1"]
  tasks = list(dict.fromkeys(r["task"] for r in records if r["family"] == "generative"))
  has_floor = any(r["method"] == "noise_floor" for r in records)
  lines = ["| task | AIM MSE | LSM-1 MSE | best baseline | " + ("noise floor | " if has_floor else "")
           + "AIM − LSM-1 | better |", "|" + "---|" * (6 + has_floor)]
  for task in tasks:
    key = (task, "minute", "model", "mse", "natural")
    if key not in aim:
      continue
    v, diff = paired(aim.get(key, []), lsm1.get(key, []), "mse")
    tally[v] = tally.get(v, 0) + 1
    best = best_baseline(aim, task)
    floor = _mean(aim.get((task, "minute", "noise_floor", "mse", "natural")))
    lines.append(f"| {task} | {fmt_interval(summarize(aim[key]), seeds)} | "
                 f"{fmt_interval(summarize(lsm1.get(key, [])), seeds)} | "
                 + (f"{best[1]:.3f} ({best[0]}) | " if best else "n/a | ")
                 + (f"{'n/a' if floor is None else f'{floor:.3f}'} | " if has_floor else "")
                 + f"{fmt_interval(diff, signed=True)} | {v} |")
  return lines


def robustness_table(agg: dict[str, dict[Key, list]], records: Sequence[dict],
                     kinds: dict[str, str]) -> list[str]:
  """Cells "AIM / LSM-1", means over seeds: the probe's main metric and the generative MSE."""
  aim, lsm1 = agg["aim"], agg["lsm1"]
  conditions = list(dict.fromkeys(r["masking"] for r in records if r["masking"] != "natural"))
  removal = [c for c in conditions if c.startswith("remove_")]
  lines: list[str] = []

  def cell(key):
    values = [_mean(aim.get(key)), _mean(lsm1.get(key))]
    return " / ".join("n/a" if v is None else f"{v:.3f}" for v in values)

  if removal:
    head = ["task", "level", "metric", "natural", *removal]
    lines += ["Cells: AIM / LSM-1, means over seeds.", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    rows = list(dict.fromkeys((r["task"], r["level"]) for r in records
                              if r["family"] == "discriminative" and r["masking"] in removal))
    for task, level in rows:
      metric = SHOWN[kinds[task]][0][0]
      lines.append(f"| {task} | {level} | {metric} | " + " | ".join(
          cell((task, level, "linear_probe", metric, c)) for c in ["natural", *removal]) + " |")
    gen = list(dict.fromkeys(r["task"] for r in records if r["family"] == "generative"
                             and r["masking"] in removal))
    for task in gen:
      lines.append(f"| {task} | minute | mse | " + " | ".join(
          cell((task, "minute", "model", "mse", c)) for c in ["natural", *removal]) + " |")
    lines.append("")
  buckets = [c for c in conditions if c.startswith("missing:")]
  gen_task = next((r["task"] for r in records if r["masking"] in buckets), None)
  if gen_task:
    days = {r["masking"]: r.get("days") for r in records if r["masking"] in buckets}
    lines += [f"{gen_task} MSE by the day's own missing fraction (means over seeds):", "",
              "| bucket | days | AIM / LSM-1 | best baseline |", "|---|---|---|---|"]
    for b in buckets:
      best = best_baseline(aim, gen_task, b)
      model = cell((gen_task, "minute", "model", "mse", b))
      lines.append(f"| {b[8:]} | {days.get(b) or 'n/a'} | {model} | "
                   + (f"{best[1]:.3f} ({best[0]})" if best else "n/a") + " |")
    lines.append("")
  return lines


def missingness_rows(agg: dict[str, dict[Key, list]], seeds: int) -> list[dict[str, Any]]:
  """Per random-imputation task present: ratio, AIM / LSM-1 intervals, verdict, baseline intervals."""
  rows = []
  for task in MISSINGNESS_TASKS:
    key = (task, "minute", "model", "mse", "natural")
    if key not in agg["aim"]:
      continue
    verdict, diff = paired(agg["aim"][key], agg["lsm1"].get(key, []), "mse")
    baselines = {m: summarize(v) for (t, lv, m, metric, mk), v in agg["aim"].items()
                 if t == task and metric == "mse" and mk == "natural"
                 and m not in ("model", "noise_floor")}
    rows.append({"task": task, "ratio": int(task.rsplit("_", 1)[1]), "seeds": seeds,
                 "aim": summarize(agg["aim"][key]), "lsm1": summarize(agg["lsm1"].get(key, [])),
                 "diff": diff, "verdict": verdict, "baselines": baselines})
  return rows


def missingness_table(rows: list[dict[str, Any]]) -> list[str]:
  names = list(dict.fromkeys(b for r in rows for b in r["baselines"]))
  lines = ["| masked | AIM MSE | LSM-1 MSE | " + " | ".join(names) + (" | " if names else "")
           + "better |", "|" + "---|" * (4 + len(names))]
  for r in rows:
    lines.append(f"| {r['ratio']}% | {fmt_interval(r['aim'], r['seeds'])} | "
                 f"{fmt_interval(r['lsm1'], r['seeds'])} | "
                 + "".join(f"{fmt_interval(r['baselines'].get(b), r['seeds'])} | " for b in names)
                 + f"{r['verdict']} |")
  return lines


def scaling_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per point: x and, per task and method, the MSE interval over the scaling seeds."""
  rows = []
  for p in points:
    agg = collect([s["records"] for s in p["scores"]])
    cells = {}
    for task in SCALING_TASKS:
      for method in ("model", *SCALING_BASELINES):
        cells[(task, method)] = summarize(agg.get((task, "minute", method, "mse", "natural"), []))
    rows.append({"point": p["point"], "x": p["x"], "cells": cells})
  return rows


def scaling_table(axis: str, rows: list[dict[str, Any]]) -> list[str]:
  label = {"steps": "steps", "subjects": "train subjects", "params": "parameters"}[axis]
  head = [label, "point"] + [f"{t} {m}" for t in SCALING_TASKS for m in ("model", *SCALING_BASELINES)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append(f"| {int(r['x']):,} | {r['point']} | " + " | ".join(
        fmt_interval(r["cells"][(t, m)]) for t in SCALING_TASKS for m in ("model", *SCALING_BASELINES))
        + " |")
  return lines


# ----------------------------------------------------------------------------
# Plots (matplotlib's Agg renderer via Figure, no pyplot state).
# ----------------------------------------------------------------------------
def _errorbar(ax, xs, ivs, label, **kw):
  pts = [(x, iv) for x, iv in zip(xs, ivs) if iv is not None]
  if not pts:
    return
  x = np.array([p[0] for p in pts], np.float64)
  mean = np.array([p[1].mean for p in pts])
  err = np.array([[p[1].mean - p[1].low for p in pts], [p[1].high - p[1].mean for p in pts]])
  ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=label, **kw)


def plot_scaling(axis: str, rows: list[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import NullFormatter  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(4.5 * len(SCALING_TASKS), 3.4))
  xs = [r["x"] for r in rows]
  for i, task in enumerate(SCALING_TASKS):
    ax = fig.add_subplot(1, len(SCALING_TASKS), i + 1)
    _errorbar(ax, xs, [r["cells"][(task, "model")] for r in rows], "AIM (model)")
    for b in SCALING_BASELINES:
      _errorbar(ax, xs, [r["cells"][(task, b)] for r in rows], b, linestyle="--", alpha=0.7)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel({"steps": "pretraining steps", "subjects": "training subjects",
                   "params": "parameters"}[axis])
    ax.set_ylabel("test MSE")
    ax.set_title(task, fontsize=9)
    ax.legend(fontsize=7)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
  return path


def plot_missingness(dataset: str, rows: list[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5, 3.6))
  ax = fig.add_subplot(1, 1, 1)
  xs = [r["ratio"] for r in rows]
  _errorbar(ax, xs, [r["aim"] for r in rows], "AIM")
  _errorbar(ax, xs, [r["lsm1"] for r in rows], "LSM-1")
  for b in dict.fromkeys(b for r in rows for b in r["baselines"]):
    _errorbar(ax, xs, [r["baselines"].get(b) for r in rows], b, linestyle="--", alpha=0.7)
  ax.set_xlabel("tokens masked (%)")
  ax.set_ylabel("random imputation test MSE")
  ax.set_title(f"{dataset}: error vs missingness", fontsize=9)
  ax.legend(fontsize=7)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
  return path


# ----------------------------------------------------------------------------
# The docs file.
# ----------------------------------------------------------------------------
def _figure(plot: pathlib.Path, docs: pathlib.Path | None, alt: str) -> list[str]:
  """Copies the plot beside the docs file (DOCS_DIR/results/) and links it relatively."""
  if docs is None:
    return []
  target = docs.parent / docs.stem / plot.name
  target.parent.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(plot, target)
  return [f"![{alt}]({docs.stem}/{plot.name})", ""]


def write_docs(path: pathlib.Path | None, args, runs, kinds, scaling, timings, elapsed: float,
               argv) -> str:
  plots = pathlib.Path(args.out) / "plots"
  wall = sum(timings.values())
  lines = [
      "# Results: AIM vs the LSM-1-style baseline, reproduced at CPU scale",
      "",
      "Produced by `benchmarks/paper_comparison.py`; every number below comes from the run",
      "described here. The paper pretrains a ~25M-parameter ViT on 1.6M days on TPUs; this run",
      f"pretrains a `{args.size}` model for {args.steps} steps per seed on a CPU. The comparison",
      "is the point (same data, steps, batch, patch, learning rate and seed for both schemes),",
      "not the absolute numbers, which say little about the method at scale.",
      "",
      "## How to reproduce",
      "",
      "```",
      "python benchmarks/paper_comparison.py " + shlex.join(argv),
      "```",
      "",
      f"- recipe `configs/pretrain.py:{recipe_arg(args.recipe, args.size, 'SCHEME')}`: model "
      f"`{args.size}`, batch {args.batch_size}, {args.steps} steps (real data: "
      f"{args.real_steps or args.steps}), LR {args.lr}; patch {args.synthetic_patch} (synthetic) / "
      f"{args.real_patch} (real), minutes x channels;",
      f"- seeds 0..{args.seeds - 1} per scheme: each seed pretrains and evaluates both schemes "
      "(model init, masking draws, probe init and evaluation masks); the data are the same "
      "for every seed;",
      f"- synthetic data: {args.synthetic_subjects} subjects x {args.synthetic_days} days "
      "(subject-disjoint 80/10/10 splits); real data converted with `lsm2.data.convert` "
      "(default non-wear rule, days with > 80% missing dropped); on real data signal "
      "imputation hides at most all channel tokens but one (out of the mix with one channel "
      "token: Depresjon);",
      f"- evaluation: `configs/eval.py:DATASET` with probe steps {args.probe_steps}, fine-tuning "
      f"{args.fine_tune_steps} steps at LR {args.fine_tune_lr}, eval days per split "
      f"{args.max_eval_days or 'all'};",
      "- intervals: `mean [low, high]` is the mean over seeds and its 95% percentile-bootstrap "
      "interval over seeds (`lsm2.eval.intervals`, 10,000 resamples; test examples are not "
      "resampled); `(n=k)` marks metrics defined in only k seeds. With few seeds the interval "
      "is narrow by construction and says little;",
      f"- verdicts: the interval of the paired difference AIM − LSM-1 over seeds; \"tie\" when "
      f"it covers 0, \"n/a\" with fewer than {MIN_PAIRS} seeds where both are defined. "
      "Nothing here corrects for the many comparisons;",
      f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other work); "
      f"wall time {wall / 3600:.2f} h summed over stages ({elapsed / 60:.1f} min in the "
      "invocation that wrote this file; finished stages of earlier invocations are reused). "
      "Stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ".",
      "",
  ]
  tallies = {}
  for dataset, per_scheme in runs.items():
    agg = {s: collect(per_scheme[s]) for s in SCHEMES}
    records = [r for seed_records in per_scheme["aim"] for r in seed_records]
    disc: dict[str, int] = {}
    gen: dict[str, int] = {}
    lines += [f"## {dataset}", "", "### Discriminative (linear probe on the frozen encoder unless "
              "the method says otherwise; chance = majority class / mean predictor, features = "
              "the same probe on hand-crafted per-day features, means over seeds)", ""]
    lines += discriminative_table(agg, records, kinds[dataset], args.seeds, disc)
    lines += ["", "### Generative (MSE on normalised values, observed target minutes only; "
              "baselines and noise floor: means over seeds)", ""]
    lines += generative_table(agg, records, args.seeds, gen)
    rows = missingness_rows(agg, args.seeds)
    if rows:
      lines += ["", "### Error versus missingness (random imputation)", ""]
      lines += missingness_table(rows) + [""]
      lines += _figure(plot_missingness(dataset, rows, plots / f"missingness_{dataset}.png"),
                       path, f"{dataset}: random imputation MSE at 30/50/80% masked")
    rob = robustness_table(agg, records, kinds[dataset])
    if rob:
      lines += ["", "### Robustness (data removed at probe fitting and scoring)", "", *rob]
    lines += [f"Per-run details: `eval/{dataset}_SCHEME_sSEED/results.md` under `--out`.", ""]
    tallies[(dataset, "discriminative")] = disc
    tallies[(dataset, "generative")] = gen
  if scaling:
    lines += ["## Scaling at CPU scale (AIM, synthetic data)", "",
              f"Test MSE of {', '.join(SCALING_TASKS)} against pretraining steps (each point a "
              "run with that budget and its own schedule), training subjects "
              "(`config.data.max_train_subjects`) and model size (`configs/pretrain.py` sizes "
              f"{', '.join(args.scaling_sizes)}), everything else as the recipe; seeds "
              f"0..{args.scaling_seeds - 1} per point (with one seed the interval is a point). "
              "The full-budget point reuses the comparison's AIM run.", ""]
    for axis, points in scaling.items():
      rows = scaling_rows(points)
      lines += [f"### {axis}", ""] + scaling_table(axis, rows) + [""]
      lines += _figure(plot_scaling(axis, rows, plots / f"scaling_{axis}.png"), path,
                       f"test MSE against {axis}")
  lines += ["## Summary: where AIM wins, ties and loses", "",
            "Rows of the tables above, counted (same paired rule):", "",
            "| dataset | tables | AIM better | tie | LSM-1 better | n/a |", "|---|---|---|---|---|---|"]
  for (dataset, family), t in tallies.items():
    lines.append(f"| {dataset} | {family} | {t.get('AIM', 0)} | {t.get('tie', 0)} | "
                 f"{t.get('LSM-1', 0)} | {t.get('n/a', 0)} |")
  text = "\n".join(lines) + "\n"
  if path:
    notes = ""
    if path.exists() and NOTES_MARKER in path.read_text():
      notes = path.read_text().split(NOTES_MARKER, 1)[1]
    path.write_text(text + "\n" + NOTES_MARKER + notes)
  return text


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  start = time.time()
  pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
  # Stage times survive reruns that reuse finished stages.
  timings = StageTimes(pathlib.Path(args.out) / "timings.json")
  runs, kinds = {}, {}
  from lsm2.data import metadata  # pylint: disable=g-import-not-at-top
  for dataset in args.datasets:
    print(f"== {dataset}", flush=True)
    runs[dataset] = run_seeds(dataset, args, timings)
    meta = metadata.load_metadata(pathlib.Path(args.out) / "data" / dataset)
    kinds[dataset] = {n: s.kind for n, s in meta.labels.items()}
  scaling = {}
  if args.scaling:
    print("== scaling", flush=True)
    scaling = run_scaling(args, timings)
  text = write_docs(pathlib.Path(args.docs) if args.docs else None, args, runs, kinds, scaling,
                    timings, time.time() - start, argv)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
