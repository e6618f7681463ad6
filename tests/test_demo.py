"""The README demo (lsm2.demo): synthesize WORKDIR/data, pretrain, evaluate into WORKDIR/eval."""
import json
import pathlib
import re

import pytest

from lsm2 import config_files
from lsm2 import demo
from lsm2 import pretrained
from lsm2.data import metadata

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # Pretrains (4 steps) and evaluates a tiny model: 1-2 min on CPU.
def test_demo_synthesizes_pretrains_and_evaluates(tmp_path, capsys):
  pretrain = config_files.load_config(REPO / "configs" / "demo.py")
  assert pretrain.data.dir == "" and pretrain.data.synthesize_subjects > 0
  with pretrain.unlocked():
    pretrain.data.synthesize_subjects = 12
    pretrain.data.synthesize_days = 2
    pretrain.total_steps = 4
    pretrain.checkpoint_every = 2
    pretrain.eval_every = 4
    pretrain.log_every = 2
  evaluation = config_files.load_config(REPO / "configs" / "eval.py", "synthetic")
  with evaluation.unlocked():
    evaluation.probe.labels = ("hypertension", "age")
    evaluation.probe.steps = 20
    evaluation.few_shot.k = 1
    evaluation.few_shot.repeats = 1
    evaluation.windows.enabled = False
    evaluation.generative.tasks = ("random_imputation_80",)
    evaluation.robustness.enabled = False
    evaluation.plots.enabled = False

  records = demo.demo(pretrain, str(tmp_path), evaluation)

  # The data was synthesized into WORKDIR/data, and pretraining read it.
  meta = metadata.load_metadata(tmp_path / "data")
  assert sum(meta.record_counts.values()) == 24 and meta.source["seed"] == pretrain.seed
  assert pretrained.read_description(tmp_path / "export")["data_dir"] == str(tmp_path / "data")
  # The evaluation restored WORKDIR's export and wrote its results into WORKDIR/eval.
  out = tmp_path / "eval"
  assert json.loads((out / "results.json").read_text()) == records
  assert json.loads((out / "eval_config.json").read_text())["init_from"] == str(tmp_path)
  assert "checkpoint: `" + str(tmp_path) + "` (step 4;" in (out / "results.md").read_text()
  assert any(r["task"] == "random_imputation_80" and r["method"] == "model" for r in records)
  assert any(r["task"] == "age" and r["method"] == "linear_probe" for r in records)
  printed = capsys.readouterr().out
  assert f"Demo finished. Results: {out / 'results.md'}" in printed
  assert re.search(r"^Time: synthesize \d+ s, pretrain \d+ s, evaluate \d+ s; \d+ s in all\.$",
                   printed, re.M), printed


def test_summary_names_the_best_and_worst_task_against_the_best_baseline():
  def rec(task, method, value, masking="natural"):
    return dict(task=task, method=method, value=value, metric="mse", masking=masking,
                family="generative", level="minute", split="test", n=10)
  records = [
      rec("a", "model", 0.5), rec("a", "channel_mean", 1.0), rec("a", "linear_interpolation", 2.0),
      rec("b", "model", 0.9), rec("b", "channel_mean", 1.0), rec("b", "linear_interpolation", 0.3),
      rec("c", "model", 0.8), rec("c", "locf", 1.0), rec("c", "noise_floor", 0.01),
      rec("a", "model", 9.0, masking="remove_group:ppg"),
      dict(rec("d", "linear_probe", 0.9), metric="auroc", family="discriminative"),
  ]
  lines = demo.summary(records)
  assert len(lines) == 3
  assert "beats the best classical baseline on 2 of 3 generative tasks" in lines[0]
  assert lines[1].startswith("Best: a: model MSE 0.500 vs 1.000 (channel_mean), 0.50x")
  assert lines[2].startswith("Worst: b: model MSE 0.900 vs 0.300 (linear_interpolation), 3.00x")
