r"""The README's demo: pretrain a tiny model, then evaluate it downstream.

  python -m lsm2.main --config=configs/demo.py --workdir=/tmp/lsm2_demo

The pretraining config (configs/demo.py) leaves data.dir empty, so the data is
WORKDIR/data, and asks for synthetic subjects: pretraining writes them there
when no dataset is present (lsm2.train.train.synthesize_if_asked).
The evaluation (configs/eval.py:synthetic) restores WORKDIR and writes
WORKDIR/eval.
"""
import time
from typing import Any, Sequence

import ml_collections

from lsm2 import storage
from lsm2.eval import report
from lsm2.eval import run as eval_run
from lsm2.train import train


def demo(pretrain_config: ml_collections.ConfigDict, workdir: str,
         eval_config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Synthesizes data (if WORKDIR/data has none), pretrains per `pretrain_config` into
  `workdir`, evaluates it into WORKDIR/eval, and prints the time each stage took."""
  seconds = {}
  start = time.perf_counter()
  # Synthesized here rather than inside training, so that its time is its own.
  train.synthesize_if_asked(pretrain_config, storage.as_path(workdir))
  seconds["synthesize"] = time.perf_counter() - start
  train.train_and_evaluate(pretrain_config, workdir)
  seconds["pretrain"] = time.perf_counter() - start - sum(seconds.values())
  config = ml_collections.ConfigDict(eval_config.to_dict())
  config.init_from = str(workdir)
  out = storage.as_path(workdir) / "eval"
  records = eval_run.evaluate(config, out)
  seconds["evaluate"] = time.perf_counter() - start - sum(seconds.values())
  print("\n" + "\n".join(summary(records)))
  print(f"\nDemo finished. Results: {out / 'results.md'} and {out / 'results.json'}; "
        f"plots: {out}/*.png; TensorBoard: tensorboard --logdir {workdir}")
  print("Time: " + ", ".join(f"{stage} {s:.0f} s" for stage, s in seconds.items())
        + f"; {sum(seconds.values()):.0f} s in all.")
  return records


BASELINES = ("channel_mean", "locf", "linear_interpolation")


def generative_mse(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """{task: {method: MSE}} of the generative tasks on the natural gaps."""
  mse = {}
  for r in records:
    if (r["family"] == "generative" and r["metric"] == "mse" and r["masking"] == report.NATURAL
        and r["value"] is not None):
      mse.setdefault(r["task"], {})[r["method"]] = r["value"]
  return mse


def summary(records: Sequence[dict[str, Any]]) -> list[str]:
  """Three lines: on how many generative tasks the model's MSE beats the best classical
  baseline, and the tasks where it does best and worst against it (model / baseline MSE)."""
  rows = []
  for task, by_method in generative_mse(records).items():
    baselines = {m: v for m, v in by_method.items() if m in BASELINES}
    if "model" in by_method and baselines:
      best = min(baselines, key=baselines.get)
      rows.append((by_method["model"] / baselines[best], task, by_method["model"], best,
                   baselines[best]))
  if not rows:
    return ["No generative task was scored: nothing to compare with the classical baselines."]
  rows.sort()
  wins = sum(r[0] < 1 for r in rows)
  line = lambda what, r: (f"{what}: {r[1]}: model MSE {r[2]:.3f} vs {r[4]:.3f} ({r[3]}), "
                          f"{r[0]:.2f}x the best baseline")
  return [f"Reconstruction (MSE, normalised units): the model beats the best classical baseline "
          f"on {wins} of {len(rows)} generative tasks.",
          line("Best", rows[0]), line("Worst", rows[-1])]
