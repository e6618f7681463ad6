"""Time of the classical imputation baselines (lsm2.eval.baselines) on a test split's worth of days.

Evaluation runs every baseline on every generative task and robustness condition, so
their cost adds up over an evaluation. `--against REV` times the baselines module of
git revision REV in the same run, call for call alternating, and checks that both give
the same imputations.

  python benchmarks/eval_baselines.py --days 576 --against b9c29ba
"""
import argparse
import pathlib
import statistics
import subprocess
import sys
import time
import types

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Run as a script from anywhere: import lsm2 from this checkout.

from lsm2.eval import baselines  # pylint: disable=g-import-not-at-top,wrong-import-position


def module_at(rev: str):
  """lsm2/eval/baselines.py as of git revision `rev`, imported under another name."""
  name = f"{rev}:lsm2/eval/baselines.py"
  source = subprocess.run(["git", "-C", str(REPO), "show", name],
                          check=True, capture_output=True, text=True).stdout
  module = types.ModuleType("baselines_at_rev")
  exec(compile(source, name, "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--days", type=int, default=576, help="examples (the XS recipe's test split: 576)")
  p.add_argument("--channels", type=int, default=26)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--against", default="", help="git revision whose baselines to time alongside")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  shape = (args.days, 1440, args.channels)
  values = rng.normal(size=shape).astype(np.float32)
  observed = rng.random(shape) < 0.5  # ~the synthetic data's missingness
  target = rng.random(shape) < 0.8  # random imputation 80%
  versions = {"current": baselines}
  if args.against:
    versions[args.against] = module_at(args.against)
  print(f"{args.days} days x 1440 min x {args.channels} channels, median of {args.repeats}")
  for name in baselines.BASELINES:
    times = {v: [] for v in versions}
    outs = {v: m.impute(name, values, observed, target) for v, m in versions.items()}  # warm-up
    for _ in range(args.repeats):
      for v, m in versions.items():
        start = time.perf_counter()
        m.impute(name, values, observed, target)
        times[v].append(time.perf_counter() - start)
    medians = {v: statistics.median(t) for v, t in times.items()}
    line = f"{name:22s} " + "  ".join(f"{v} {s:.3f} s" for v, s in medians.items())
    if args.against:
      diff = float(np.abs(outs["current"] - outs[args.against]).max())
      line += f"  ratio {medians[args.against] / medians['current']:.1f}x  max |diff| {diff:.1e}"
    print(line, flush=True)


if __name__ == "__main__":
  main()
