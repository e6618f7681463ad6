r"""The paper's comparison, reproduced small: AIM vs the LSM-1-style baseline, same budget.

For each dataset (synthetic; Depresjon and Fitabase, converted from the public
datasets in --shared DIR, which lsm2 does not ship), pretrains `configs/pretrain.py:SIZE,aim,runlocal` and
`configs/pretrain.py:SIZE,lsm1,runlocal` with identical data, steps, batch,
patch, learning rate and seed, evaluates both with `configs/eval.py:DATASET`
(probes, few-shot, fine-tuning, generative tasks with classical baselines,
robustness) and writes side-by-side tables to docs/results.md.

  python benchmarks/paper_comparison.py --out /tmp/lsm2_paper            # ~45 min on a shared 2-core CPU
  python benchmarks/paper_comparison.py --out /tmp/q --quick              # smoke run, minutes
  python benchmarks/paper_comparison.py --out gs://... --size S --steps 100000 --batch_size 1024 \
      --synthetic_subjects 10000 --synthetic_patch 10x1                   # accelerator scale

Stages are resumable: a finished pretraining (WORKDIR/export) or evaluation
(results.json) under --out is reused, so a rerun only redoes what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEMES = ("aim", "lsm1")
DATASETS = ("synthetic", "depresjon", "fitabase")
# Metrics shown per task kind; (name, higher is better).
SHOWN = {
    "binary": (("auroc", True), ("macro_f1", True)),
    "categorical": (("macro_f1", True), ("balanced_accuracy", True)),
    "regression": (("mae", False), ("pearson_r", True)),
}
TIE_ABS = 0.02  # Metrics in [0, 1]: |AIM - LSM-1| below this is a tie.
TIE_REL = 0.02  # Errors (MAE, MSE): relative difference below this is a tie.
# Text after this line in the docs file is hand-written and kept on rewrites.
NOTES_MARKER = "<!-- Notes below are written by hand and kept when the script rewrites this file. -->"


def _config(name: str, arg: str):
  from lsm2 import config_files  # pylint: disable=g-import-not-at-top
  return config_files.load_config(REPO / "configs" / f"{name}.py", arg)


def _patch(text: str) -> tuple[int, int]:
  time_, channels = (int(v) for v in text.lower().split("x"))
  return time_, channels


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="working directory for data, runs and evaluations")
  p.add_argument("--datasets", default=",".join(DATASETS))
  p.add_argument("--shared", default=os.environ.get("LSM2_DATASETS", ""),
                 help="directory holding depresjon/ and fitabase/ (default: $LSM2_DATASETS)")
  p.add_argument("--size", default="tiny", help="model size of configs/pretrain.py")
  p.add_argument("--steps", type=int, default=2000, help="pretraining steps (each scheme)")
  p.add_argument("--real_steps", type=int, default=0, help="steps on real data (0: --steps)")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--synthetic_subjects", type=int, default=200)
  p.add_argument("--synthetic_days", type=int, default=4)
  p.add_argument("--synthetic_patch", default="30x2", help="minutes x channels per token")
  p.add_argument("--real_patch", default="10x1", help="minutes x channels per token")
  p.add_argument("--probe_steps", type=int, default=500)
  p.add_argument("--fine_tune_steps", type=int, default=50, help="0 = no fine-tuning")
  p.add_argument("--fine_tune_lr", type=float, default=1e-3)
  p.add_argument("--max_eval_days", type=int, default=0, help="per split; 0 = all")
  p.add_argument("--docs", default=str(REPO / "docs" / "results.md"), help="'' = do not write")
  p.add_argument("--quick", action="store_true",
                 help="smoke-test sizes: 30 subjects, 60 steps, 100 probe steps, 5 fine-tune steps")
  args = p.parse_args(argv)
  if args.quick:
    args.synthetic_subjects, args.steps, args.probe_steps = 30, 60, 100
    args.fine_tune_steps = min(args.fine_tune_steps, 5)
  args.datasets = [d for d in args.datasets.split(",") if d]
  bad = [d for d in args.datasets if d not in DATASETS]
  if bad:
    p.error(f"unknown dataset(s) {bad}; choose from {DATASETS}")
  return args


# ----------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------
def prepare_data(dataset: str, args) -> pathlib.Path:
  out = pathlib.Path(args.out) / "data" / dataset
  if (out / "metadata.json").exists():
    return out
  if dataset == "synthetic":
    from lsm2.data import synthesize  # pylint: disable=g-import-not-at-top
    synthesize.write_synthetic_dataset(out, subjects=args.synthetic_subjects,
                                       days=args.synthetic_days, seed=args.seed)
  else:
    from lsm2.data import convert  # pylint: disable=g-import-not-at-top
    source = pathlib.Path(args.shared) / dataset
    if not source.is_dir():
      raise FileNotFoundError(f"{source} not found: pass --shared DIR (or set $LSM2_DATASETS) to "
                              "the folder holding the real datasets, or leave them out with "
                              "--datasets=synthetic")
    fmt = "actiwatch" if dataset == "depresjon" else "fitabase"
    convert.convert(fmt, source, out, seed=args.seed)
  return out


def pretrain_config(dataset: str, scheme: str, data_dir: pathlib.Path, args):
  config = _config("pretrain", f"{args.size},{scheme},runlocal")
  patch_time, patch_channels = _patch(args.synthetic_patch if dataset == "synthetic" else args.real_patch)
  n_time = 1440 // patch_time
  with config.unlocked():
    config.seed = args.seed
    config.data.dir = str(data_dir)
    config.data.synthesize_subjects = 0
    config.model.patch_time = patch_time
    config.model.patch_channels = patch_channels
    config.masking.time_bars = round(0.4 * n_time)  # The paper's 40% of the day.
    config.total_steps = args.steps if dataset == "synthetic" else (args.real_steps or args.steps)
    config.batch_size = args.batch_size
    config.lr = args.lr
    config.checkpoint_every = config.total_steps
    config.eval_every = config.total_steps
    config.log_every = max(1, config.total_steps // 10)
  return config


def eval_config(dataset: str, workdir: pathlib.Path, args):
  config = _config("eval", dataset)
  with config.unlocked():
    config.init_from = str(workdir)
    config.seed = args.seed
    config.probe.steps = args.probe_steps
    config.data.max_days = args.max_eval_days
    config.fine_tune.enabled = args.fine_tune_steps > 0
    config.fine_tune.steps = max(args.fine_tune_steps, 1)
    config.fine_tune.lr = args.fine_tune_lr
  return config


def run_pair(dataset: str, args, timings: dict) -> dict[str, list[dict[str, Any]]]:
  from lsm2.eval import run  # pylint: disable=g-import-not-at-top
  from lsm2.train import train  # pylint: disable=g-import-not-at-top
  data_dir = prepare_data(dataset, args)
  out: dict[str, list[dict[str, Any]]] = {}
  for scheme in SCHEMES:
    workdir = pathlib.Path(args.out) / "runs" / f"{dataset}_{scheme}"
    if not (workdir / "export" / "lsm2.json").exists():
      start = time.time()
      train.train_and_evaluate(pretrain_config(dataset, scheme, data_dir, args), str(workdir))
      timings[f"{dataset}/{scheme}/pretrain"] = time.time() - start
    results = pathlib.Path(args.out) / "eval" / f"{dataset}_{scheme}"
    if not (results / "results.json").exists():
      start = time.time()
      run.evaluate(eval_config(dataset, workdir, args), results)
      timings[f"{dataset}/{scheme}/evaluate"] = time.time() - start
    out[scheme] = json.loads((results / "results.json").read_text())
  return out


# ----------------------------------------------------------------------------
# Side-by-side report.
# ----------------------------------------------------------------------------
def _index(records):
  return {(r["task"], r["level"], r["method"], r["metric"], r["masking"]): r for r in records}


def verdict(aim: float | None, lsm1: float | None, higher_is_better: bool, metric: str) -> str:
  if aim is None or lsm1 is None:
    return "n/a"
  diff = aim - lsm1
  if metric in ("mae", "mse", "rmse"):
    tie = abs(diff) <= TIE_REL * max(abs(aim), abs(lsm1), 1e-12)
  else:
    tie = abs(diff) < TIE_ABS
  if tie:
    return "tie"
  return "AIM" if (diff > 0) == higher_is_better else "LSM-1"


def _fmt(r: dict | None) -> str:
  if r is None or r["value"] is None:
    return "n/a"
  if r.get("std") is not None:
    return f"{r['value']:.3f} ± {r['std']:.3f}"
  return f"{r['value']:.3f}"


def _v(r):
  return None if r is None else r["value"]


def discriminative_table(pair, kinds: dict[str, str], tally: dict) -> list[str]:
  aim, lsm1 = _index(pair["aim"]), _index(pair["lsm1"])
  keys = list(dict.fromkeys((r["task"], r["level"]) for r in pair["aim"]
                            if r["family"] == "discriminative" and r["masking"] == "natural"))
  methods = list(dict.fromkeys(r["method"] for r in pair["aim"] if r["family"] == "discriminative"
                               and r["method"] not in ("majority", "mean")))
  lines = ["| task | level | method | metric | AIM | LSM-1 | chance | better |", "|---|---|---|---|---|---|---|---|"]
  for task, level in keys:
    for method in methods:
      for metric, higher in SHOWN[kinds[task]]:
        key = (task, level, method, metric, "natural")
        if key not in aim and key not in lsm1:
          continue
        chance = aim.get((task, level, "majority" if kinds[task] != "regression" else "mean", metric,
                          "natural"))
        v = verdict(_v(aim.get(key)), _v(lsm1.get(key)), higher, metric)
        tally[v] = tally.get(v, 0) + 1
        lines.append(f"| {task} | {level} | {method} | {metric} | {_fmt(aim.get(key))} | "
                     f"{_fmt(lsm1.get(key))} | {_fmt(chance)} | {v} |")
  splits = sorted({r["split"] for r in pair["aim"] if r["family"] == "discriminative"})
  return lines + ["", f"Scored on: {', '.join(f'`{s}`' for s in splits)}."]


def generative_table(pair, tally: dict) -> list[str]:
  aim, lsm1 = _index(pair["aim"]), _index(pair["lsm1"])
  tasks = list(dict.fromkeys(r["task"] for r in pair["aim"] if r["family"] == "generative"))
  baselines = [m for m in dict.fromkeys(r["method"] for r in pair["aim"] if r["family"] == "generative")
               if m not in ("model", "noise_floor")]
  has_floor = any(r["method"] == "noise_floor" for r in pair["aim"])
  header = "| task | AIM MSE | LSM-1 MSE | best baseline | " + ("noise floor | " if has_floor else "") + "better |"
  lines = [header, "|" + "---|" * (5 + has_floor)]
  for task in tasks:
    key = (task, "minute", "model", "mse", "natural")
    if key not in aim:
      continue
    base = [(aim[(task, "minute", b, "mse", "natural")]["value"], b) for b in baselines
            if (task, "minute", b, "mse", "natural") in aim]
    best = min(base) if base else None
    v = verdict(_v(aim.get(key)), _v(lsm1.get(key)), False, "mse")
    tally[v] = tally.get(v, 0) + 1
    floor = aim.get((task, "minute", "noise_floor", "mse", "natural"))
    lines.append(f"| {task} | {_fmt(aim.get(key))} | {_fmt(lsm1.get(key))} | "
                 + (f"{best[0]:.3f} ({best[1]}) | " if best else "n/a | ")
                 + (f"{_fmt(floor)} | " if has_floor else "") + f"{v} |")
  return lines


def robustness_table(pair, kinds: dict[str, str]) -> list[str]:
  """Cells "AIM / LSM-1": the probe's main metric and the generative task's MSE per removal."""
  aim, lsm1 = _index(pair["aim"]), _index(pair["lsm1"])
  conditions = list(dict.fromkeys(r["masking"] for r in pair["aim"] if r["masking"] != "natural"))
  removal = [c for c in conditions if c.startswith("remove_")]
  lines = []

  def cell(key):
    values = [_v(aim.get(key)), _v(lsm1.get(key))]
    return " / ".join("n/a" if v is None else f"{v:.3f}" for v in values)

  if removal:
    head = ["task", "level", "metric", "natural", *removal]
    lines += ["Cells: AIM / LSM-1.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = list(dict.fromkeys((r["task"], r["level"]) for r in pair["aim"]
                              if r["family"] == "discriminative" and r["masking"] in removal))
    for task, level in rows:
      metric = SHOWN[kinds[task]][0][0]
      lines.append(f"| {task} | {level} | {metric} | " + " | ".join(
          cell((task, level, "linear_probe", metric, c)) for c in ["natural", *removal]) + " |")
    gen = list(dict.fromkeys(r["task"] for r in pair["aim"] if r["family"] == "generative"
                             and r["masking"] in removal))
    for task in gen:
      lines.append(f"| {task} | minute | mse | " + " | ".join(
          cell((task, "minute", "model", "mse", c)) for c in ["natural", *removal]) + " |")
    lines.append("")
  buckets = [c for c in conditions if c.startswith("missing:")]
  gen_task = next((r["task"] for r in pair["aim"] if r["masking"] in buckets), None)
  if gen_task:
    lines += [f"{gen_task} MSE by the day's own missing fraction:", "",
              "| bucket | days | AIM | LSM-1 | best baseline |", "|---|---|---|---|---|"]
    for b in buckets:
      a = aim.get((gen_task, "minute", "model", "mse", b))
      base = [r for r in pair["aim"] if r["task"] == gen_task and r["masking"] == b
              and r["metric"] == "mse" and r["method"] != "model" and r["value"] is not None]
      best = min(base, key=lambda r: r["value"]) if base else None
      lines.append(f"| {b[8:]} | {a['days'] if a else 'n/a'} | {_fmt(a)} | "
                   f"{_fmt(lsm1.get((gen_task, 'minute', 'model', 'mse', b)))} | "
                   + (f"{best['value']:.3f} ({best['method']})" if best else "n/a") + " |")
    lines.append("")
  return lines


def write_docs(path: pathlib.Path, args, pairs, kinds, timings, elapsed: float, argv) -> str:
  lines = [
      "# Results: AIM vs the LSM-1-style baseline, reproduced small",
      "",
      "Produced by `benchmarks/paper_comparison.py`; every number below comes from the run",
      "described here. The paper pretrains a ~25M-parameter ViT on 1.6M days on TPUs; this run",
      f"pretrains a `{args.size}` model for {args.steps} steps on a CPU. The comparison is the",
      "point (same data, steps, batch, patch, learning rate, seed for both schemes), not the",
      "absolute numbers, which say little about the method at scale.",
      "",
      "## How to reproduce",
      "",
      "```",
      "python benchmarks/paper_comparison.py " + " ".join(argv),
      "```",
      "",
      f"- model `{args.size}`, batch {args.batch_size}, {args.steps} steps (real data: "
      f"{args.real_steps or args.steps}), LR {args.lr}, seed {args.seed}; patch "
      f"{args.synthetic_patch} (synthetic) / {args.real_patch} (real), minutes x channels;",
      f"- synthetic data: {args.synthetic_subjects} subjects x {args.synthetic_days} days "
      "(subject-disjoint 80/10/10 splits); real data converted with `lsm2.data.convert` "
      "(default non-wear rule, days with > 80% missing dropped);",
      f"- evaluation: `configs/eval.py:DATASET` with probe steps {args.probe_steps}, fine-tuning "
      f"{args.fine_tune_steps} steps at LR {args.fine_tune_lr}, eval days per split "
      f"{args.max_eval_days or 'all'};",
      f"- verdicts: a difference below {TIE_ABS} (scores in [0, 1]) or {100 * TIE_REL:.0f}% "
      "(errors) is a tie; nothing here is a significance test;",
      f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other work); "
      f"stage wall times: {', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items())} "
      f"({sum(timings.values()) / 60:.1f} min in all; this invocation {elapsed / 60:.1f} min).",
      "",
  ]
  tallies = {}
  for dataset, pair in pairs.items():
    disc: dict[str, int] = {}
    gen: dict[str, int] = {}
    lines += [f"## {dataset}", "", "### Discriminative (linear probe on the frozen encoder unless "
              "the method says otherwise; chance = majority class / mean predictor)", ""]
    lines += discriminative_table(pair, kinds[dataset], disc)
    lines += ["", "### Generative (MSE on normalised values, observed target minutes only)", ""]
    lines += generative_table(pair, gen)
    rob = robustness_table(pair, kinds[dataset])
    if rob:
      lines += ["", "### Robustness (data removed at probe fitting and scoring)", "", *rob]
    lines += [f"Per-run details: `{args.out}/eval/{dataset}_aim/results.md` and "
              f"`{args.out}/eval/{dataset}_lsm1/results.md`.", ""]
    tallies[(dataset, "discriminative")] = disc
    tallies[(dataset, "generative")] = gen
  lines += ["## Summary: where AIM wins, ties and loses", "",
            "Rows of the tables above, counted (same tie rule):", "",
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
  # Stage times survive reruns that reuse finished stages.
  timings_file = pathlib.Path(args.out) / "timings.json"
  timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.exists() else {}
  pairs, kinds = {}, {}
  for dataset in args.datasets:
    print(f"== {dataset}", flush=True)
    pairs[dataset] = run_pair(dataset, args, timings)
    timings_file.write_text(json.dumps(timings, indent=1))
    from lsm2.data import metadata  # pylint: disable=g-import-not-at-top
    meta = metadata.load_metadata(pathlib.Path(args.out) / "data" / dataset)
    kinds[dataset] = {n: s.kind for n, s in meta.labels.items()}
  text = write_docs(pathlib.Path(args.docs) if args.docs else None, args, pairs, kinds, timings,
                    time.time() - start, argv)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
