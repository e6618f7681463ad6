"""The evaluation driver end to end on a tiny checkpoint, and its parts on real model outputs."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import lsm2
from lsm2 import config_files
from lsm2.data import dataset
from lsm2.data import metadata as metadata_lib
from lsm2.eval import discriminative
from lsm2.eval import fine_tune
from lsm2.eval import generative
from lsm2.eval import metrics as metrics_lib
from lsm2.eval import probe as probe_lib
from lsm2.eval import report
from lsm2.eval import run
from lsm2.eval import tasks as tasks_lib
from lsm2.eval import windows
from tiny_checkpoint import REPO, tiny_pretrained

GEN_TASKS = ("random_imputation_80", "temporal_interpolation_60min", "signal_imputation_2ch")


def eval_config(taskset="synthetic"):
  return config_files.load_config(REPO / "configs" / "eval.py", taskset)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return tiny_pretrained(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def evaluated(pretrained, tmp_path_factory):
  """One full evaluation: cv probes on 12 subjects, few-shot, fine-tuning, 3 generative tasks."""
  workdir, _ = pretrained
  out = tmp_path_factory.mktemp("eval")
  config = eval_config()
  with config.unlocked():
    config.init_from = str(workdir)
    config.probe.labels = ("hypertension", "activity", "age")
    config.probe.steps = 100
    config.probe.protocol.name = "cv"
    config.probe.protocol.folds = 3
    config.few_shot.k = 1
    config.few_shot.repeats = 2
    config.fine_tune.enabled = True
    config.fine_tune.labels = ("hypertension",)
    config.fine_tune.steps = 3
    config.fine_tune.lr = 1e-3  # As in the fine-tuning test: one compilation for both.
    config.fine_tune.batch_size = 8
    config.generative.tasks = GEN_TASKS
    config.robustness.labels = ("hypertension",)
    config.plots.days = 1
  records = run.evaluate(config, out)
  return out, records, config


def _one(records, **keys):
  found = [r for r in records if all(r[k] == v for k, v in keys.items())]
  assert len(found) == 1, (keys, found)
  return found[0]


@pytest.mark.slow  # Shares one full evaluation (~20 s) of the tiny checkpoint.
def test_results_json_records(evaluated, pretrained):
  out, records, _ = evaluated
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk == records and len(records) > 100
  for r in records:
    assert set(report.RECORD_KEYS) <= set(r), r
    assert r["value"] is None or np.isfinite(r["value"])
    assert r["n"] > 0
  _, data = pretrained
  labelled = sum(int((dataset.read_split(data, s)["label/hypertension"] >= 0).sum())
                 for s in ("train", "validation", "test"))
  split = "cv3(train+validation+test)"
  probe = _one(records, task="hypertension", level="day", method="linear_probe", metric="auroc",
               masking="natural")
  assert probe["n"] == labelled == 24 and probe["split"] == split
  assert _one(records, task="hypertension", level="subject", method="linear_probe",
              metric="auroc", masking="natural")["n"] == 12
  # A constant predictor ranks nothing: AUROC exactly 0.5.
  assert _one(records, task="hypertension", level="day", method="majority", metric="auroc")["value"] == 0.5
  few = _one(records, task="hypertension", level="day", method="few_shot_k1", metric="auroc")
  assert few["repeats"] == 2 and few["std"] is not None
  _one(records, task="hypertension", level="day", method="fine_tune", metric="auroc")
  _one(records, task="activity", level="day", method="linear_probe", metric="macro_f1",
       masking="natural")
  assert not [r for r in records if r["task"] == "activity" and r["level"] == "subject"]
  _one(records, task="age", level="subject", method="mean", metric="mae")
  # The hand-crafted feature baseline, on the same examples and folds as the probe.
  features = _one(records, task="hypertension", level="subject", method="features_probe",
                  metric="auroc", masking="natural")
  assert features["n"] == 12 and features["split"] == split
  _one(records, task="age", level="day", method="features_probe", metric="mae")
  for masking in ("remove_group:ppg", "remove_group:temp", "remove_segment:night"):
    _one(records, task="hypertension", level="day", method="linear_probe", metric="auroc",
         masking=masking)
    _one(records, task="random_imputation_80", method="model", metric="mse", masking=masking)
  buckets = [r for r in records if r["masking"].startswith("missing:") and r["method"] == "model"
             and r["metric"] == "mse"]
  assert buckets and sum(r["days"] for r in buckets) <= 2


def _labelled_windows_with_tokens(data, model_cfg):
  """Windows (60 min) with >= 30 minutes of one bout class and a visible token, by hand."""
  count = 0
  for split in ("train", "validation", "test"):
    raw = dataset.read_split(data, split, normalize=False)
    visible = lsm2.api.token_any(raw["observed"], model_cfg).reshape(-1, 24, 2 * 13)
    for day, bouts in enumerate(raw["label/activity_bouts"]):
      for w in range(24):
        minutes = bouts[60 * w:60 * (w + 1)]
        top = np.bincount(minutes[minutes >= 0], minlength=10).max()
        count += int(top >= 30 and visible[day, w].any())
  return count


@pytest.mark.slow  # Shares one full evaluation (~20 s) of the tiny checkpoint.
def test_window_activity_task(evaluated, pretrained):
  out, records, _ = evaluated
  workdir, data = pretrained
  model_cfg = lsm2.load(workdir).model_cfg
  assert (model_cfg.patch_time, model_cfg.grid) == (30, (48, 13))
  probe = _one(records, task="activity_bouts", level="window", method="linear_probe",
               metric="macro_f1", masking="natural")
  assert probe["n"] == _labelled_windows_with_tokens(data, model_cfg) > 10
  assert probe["split"] == "cv3(train+validation+test)" and probe["folds"] == 3
  assert (probe["window_minutes"], probe["min_fraction"]) == (60, 0.5)
  for method in ("linear_probe", "majority"):
    for metric in ("macro_f1", "balanced_accuracy", "auroc", "map"):
      rec = _one(records, task="activity_bouts", level="window", method=method, metric=metric)
      assert rec["n"] == probe["n"]
  assert 0.0 <= probe["value"] <= 1.0
  md = (out / "results.md").read_text()
  assert "| activity_bouts | window | linear_probe |" in md and "60-min windows" in md


def test_window_features_follow_the_token_time_axis(probe_inputs):
  """Observed minutes decide which windows have visible tokens; pooled means are the model's."""
  model, _, pool, _ = probe_inputs
  z, observed = pool.z[:2].copy(), np.zeros_like(pool.observed[:2])
  observed[0, 120:180] = True  # Window 2 of day 0, every channel: 2 time x 13 channel tokens.
  observed[0, 200:210, 0] = True  # One token of window 3 (time token 6, channel token 0).
  observed[1] = pool.observed[1]
  z = np.where(observed, z, 0.0)
  feats, counts = windows.window_features(model, z, observed, time_tokens=2)
  want = np.zeros(24, int)
  want[2], want[3] = 26, 1
  np.testing.assert_array_equal(counts[0], want)
  outputs, visible = model.embed_normalized(z, observed, per_token=True)
  np.testing.assert_allclose(feats[0, 3], outputs[0, 6 * 13], rtol=1e-6)
  # Pooling windows back into the day gives the model's own day embedding.
  day = model.embed_normalized(z, observed)
  for i in range(2):
    np.testing.assert_allclose((feats[i] * counts[i][:, None]).sum(0) / counts[i].sum(), day[i],
                               rtol=1e-4, atol=1e-5)
  assert visible[1].sum() == counts[1].sum()


@pytest.mark.slow  # Shares one full evaluation (~20 s) of the tiny checkpoint.
def test_generative_errors_match_a_hand_computation(evaluated, pretrained):
  """The channel-mean baseline and the noise floor, recomputed from the raw test split."""
  out, records, _ = evaluated
  workdir, data = pretrained
  desc = json.loads((workdir / "export" / "lsm2.json").read_text())
  raw = dataset.read_split(data, "test", normalize=False)
  obs = raw["observed"]
  z = metadata_lib.normalize(raw["signals"], obs, desc["norm_mean"], desc["norm_std"])
  target = tasks_lib.random_imputation(obs, 30, 2, seed=0, example_ids=np.arange(len(z)))
  visible = obs & ~target
  mean = (z * visible).sum(1, keepdims=True) / np.maximum(visible.sum(1, keepdims=True), 1)
  scored = target & obs
  err = (np.broadcast_to(mean, z.shape) - z)[scored]
  rec = _one(records, task="random_imputation_80", method="channel_mean", metric="mse",
             masking="natural")
  assert rec["n"] == scored.sum() and rec["split"] == "test"
  np.testing.assert_allclose(rec["value"], np.mean(err.astype(np.float64) ** 2), rtol=1e-4)
  noise = np.asarray(metadata_lib.load_metadata(data).noise_std) / np.asarray(desc["norm_std"])
  floor = (scored.sum((0, 1)) * noise ** 2).sum() / scored.sum()
  np.testing.assert_allclose(
      _one(records, task="random_imputation_80", method="noise_floor", metric="mse",
           masking="natural")["value"], floor, rtol=1e-5)
  for task in GEN_TASKS:
    model = _one(records, task=task, method="model", metric="mse", masking="natural")
    assert model["value"] > 0 and model["n"] > 0


def test_generative_run_records_every_task_and_returns_only_the_kept_outputs(pretrained):
  """Outputs hold a [n, T, C] prediction per method: only the ones used later are kept."""
  workdir, data = pretrained
  model = lsm2.load(str(workdir))
  test = run.SplitReader(model, str(data), 4).read("test")
  results = report.Results()
  outputs = generative.run(
      results, model, test["z"], test["observed"],
      generative.select_tasks(model.model_cfg, GEN_TASKS), split="test", seed=0,
      baseline_names=("channel_mean",), noise=None, keep=("signal_imputation_2ch", "other"))
  assert list(outputs) == ["signal_imputation_2ch"]
  assert outputs["signal_imputation_2ch"].predictions["model"].shape == test["z"].shape
  assert {(r["task"], r["method"]) for r in results.records if r["metric"] == "mse"} == {
      (task, method) for task in GEN_TASKS for method in ("model", "channel_mean")}


@pytest.mark.slow  # Shares one full evaluation (~20 s) of the tiny checkpoint.
def test_markdown_plots_and_tensorboard(evaluated):
  out, _, _ = evaluated
  md = (out / "results.md").read_text()
  for heading in ("### Classification", "### Regression", "### Reconstruction MSE",
                  "## Robustness", "remove_segment:night", "few_shot_k1", "fine_tune",
                  "noise_floor", "linear_interpolation", "majority"):
    assert heading in md, heading
  for name in ("robustness_hypertension.png", "robustness_generative.png",
               "error_by_missingness.png", "reconstruction_random_imputation_80_0.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  assert list(out.glob("events.out.tfevents.*"))
  assert json.loads((out / "eval_config.json").read_text())["init_from"]


def test_mismatched_dataset_names_both_sides(pretrained, tmp_path):
  workdir, data = pretrained
  other = tmp_path / "renamed"
  shutil.copytree(data, other)
  meta = json.loads((other / "metadata.json").read_text())
  meta["channels"][0]["name"] = "heart_rate"
  (other / "metadata.json").write_text(json.dumps(meta))
  config = eval_config()
  with config.unlocked():
    config.init_from = str(workdir)
    config.data.dir = str(other)
  with pytest.raises(ValueError, match=rf"checkpoint {workdir}.*26 channels \['hr'.*"
                                       rf"dataset {other} has 26 channels \['heart_rate'"):
    run.evaluate(config, tmp_path / "out")
  with config.unlocked():
    config.init_from = ""
  with pytest.raises(ValueError, match="config.init_from is required"):
    run.evaluate(config, tmp_path / "out")


def test_bad_task_names_fail_before_any_evaluation(pretrained, tmp_path):
  workdir, _ = pretrained
  for field, value, message in (
      ("robustness.labels", ("blood_type",), r"config.robustness.labels: \['blood_type'\] not in"),
      ("generative.tasks", ("temporal_interpolation_10min",),
       r"\['temporal_interpolation_10min'\] not in the suite .* patch 30 min"),
      ("generative.baselines", ("kalman",), r"unknown \['kalman'\]")):
    config = _with_init(eval_config())
    with config.unlocked():
      config.init_from = str(workdir)
      section, name = field.split(".")
      config[section][name] = value
    with pytest.raises(ValueError, match=message):
      run.evaluate(config, tmp_path / field)
    assert not (tmp_path / field / "results.json").exists()


@pytest.fixture(scope="module")
def probe_inputs(pretrained):
  workdir, data = pretrained
  model = lsm2.load(workdir)
  config = eval_config()
  reader = run.SplitReader(model, str(data), 0)
  pool = reader.pool(("train", "validation", "test"), ["hypertension"])
  return model, config, pool, model.embed_normalized(pool.z, pool.observed)


def test_few_shot_is_subject_disjoint_and_seeded(probe_inputs, monkeypatch):
  model, config, pool, emb = probe_inputs
  del model
  calls = []
  original = probe_lib.few_shot_indices

  def spy(labels, subject_ids, k, seed, exclude_subjects=()):
    chosen = original(labels, subject_ids, k, seed, exclude_subjects=exclude_subjects)
    calls.append((np.asarray(subject_ids)[chosen], np.asarray(exclude_subjects), seed))
    return chosen

  monkeypatch.setattr(probe_lib, "few_shot_indices", spy)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.probe.protocol.name = "cv"
    config.probe.protocol.folds = 3
    config.probe.steps = 50
    config.few_shot.k = 2
    config.few_shot.repeats = 2
  tasks = discriminative.tasks_for({"hypertension": metadata_lib.LabelSpec(
      "hypertension", "binary", "subject", ("no", "yes"))}, ["hypertension"], ("day",))
  first, second = report.Results(), report.Results()
  discriminative.run(first, pool, emb, tasks, config)
  discriminative.run(second, pool, emb, tasks, config)
  assert len(calls) == 2 * 2 * 3  # runs x repeats x folds
  for chosen_subjects, test_subjects, _ in calls:
    assert len(test_subjects) and not set(chosen_subjects) & set(test_subjects)
  assert {seed for _, _, seed in calls} == {0, 1}
  few = [r for r in first.records if r["method"] == "few_shot_k2"]
  assert few and few == [r for r in second.records if r["method"] == "few_shot_k2"]


def test_fine_tune_learns_and_leaves_the_pretrained_weights_alone(probe_inputs):
  model, _, pool, emb = probe_inputs
  y = pool.labels["hypertension"]
  before = model.embed_normalized(pool.z, pool.observed)
  tuned = fine_tune.fine_tune(model, pool.z, pool.observed, y, kind="binary", num_classes=2,
                              steps=8, lr=1e-3, batch_size=8, seed=0)
  assert tuned.losses.shape == (8,) and np.all(np.isfinite(tuned.losses))
  np.testing.assert_array_equal(model.embed_normalized(pool.z, pool.observed), before)
  np.testing.assert_array_equal(before, emb)
  p = tuned.predict(pool.z, pool.observed)
  assert p.shape == y.shape and np.all((p > 0) & (p < 1))
  # The untrained head predicts 0.5 (cross-entropy ln 2); training lowers the training loss.
  ce = -np.mean(np.where(y == 1, np.log(p), np.log(1 - p)))
  assert ce < np.log(2)
  assert not np.allclose(tuned.model.embed_normalized(pool.z, pool.observed, params=tuned.params),
                         before)


def test_subject_kfold_is_disjoint_complete_and_stratified():
  subjects = np.repeat(np.arange(10), 3)
  labels = np.repeat(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]), 3)
  folds = probe_lib.subject_kfold(subjects, 2, seed=4, stratify=labels)
  seen = np.concatenate([test for _, test in folds])
  assert sorted(seen) == list(range(30))
  for train, test in folds:
    assert not set(subjects[train]) & set(subjects[test])
    assert sorted(np.unique(labels[test], return_counts=True)[1] // 3) in ([2, 3],)
  again = probe_lib.subject_kfold(subjects, 2, seed=4, stratify=labels)
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
  with pytest.raises(ValueError, match="k=11"):
    probe_lib.subject_kfold(subjects, 11, seed=0)


def test_minute_labels_go_to_the_window_task_only(pretrained):
  _, data = pretrained
  meta = metadata_lib.load_metadata(data)
  assert meta.labels["activity_bouts"].level == "minute"
  assert "activity_bouts" not in run._labels((), meta, "probe.labels")
  with pytest.raises(ValueError, match=r"config.probe.labels: \['activity_bouts'\] are "
                                       "minute-level labels"):
    run._labels(("hypertension", "activity_bouts"), meta, "probe.labels")
  config = eval_config()
  results = report.Results()
  assert run._window_labels(config, meta, results) == ["activity_bouts"] and not results.skipped
  with config.unlocked():
    config.windows.labels = ()
  assert run._window_labels(config, meta, results) == ["activity_bouts"]
  with config.unlocked():
    config.windows.labels = ("steps_per_minute", "activity_bouts")
  assert run._window_labels(config, meta, results) == ["activity_bouts"]
  assert results.skipped == [("steps_per_minute (windows)",
                              f"dataset {data} has no label 'steps_per_minute' (its labels: "
                              f"{sorted(meta.labels)})")]
  with config.unlocked():
    config.windows.labels = ("activity",)
  with pytest.raises(ValueError, match="config.windows.labels: 'activity' is a day-level label"):
    run._window_labels(config, meta, results)
  with config.unlocked():
    config.windows.enabled = False
  assert run._window_labels(config, meta, results) == []


def test_eval_config_task_sets():
  for taskset in ("synthetic", "depresjon", "fitabase"):
    config = eval_config(taskset)
    assert config.mode == "evaluate" and config.probe.labels
    assert config.windows.labels == (("activity_bouts",) if taskset == "synthetic" else ())
    with pytest.raises(ValueError, match="config.init_from is required"):
      run.validate_config(config)
    run.validate_config(_with_init(config))
  config = _with_init(eval_config())
  with config.unlocked():
    config.probe.protocol.test_split = "train"
  with pytest.raises(ValueError, match="fit_split and test_split are both 'train'"):
    run.validate_config(config)
  config = _with_init(eval_config())
  with config.unlocked():
    config.windows.min_fraction = 1.5
  with pytest.raises(ValueError, match=r"config.windows.min_fraction=1.5 must be in \(0, 1\]"):
    run.validate_config(config)
  with pytest.raises(ValueError, match="unknown task set 'nope'"):
    eval_config("nope")


def _with_init(config):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.init_from = "somewhere"
  return config



def test_task_suite_keeps_only_token_aligned_gaps():
  names = [n for n, _ in tasks_lib.generative_task_suite(26, 2, patch_time=30)]
  assert "temporal_interpolation_30min" in names and "temporal_extrapolation_180min" in names
  assert not [n for n in names if n.endswith("_10min")]
  assert len([n for n, _ in tasks_lib.generative_task_suite(26, 2, patch_time=10)]) == len(names) + 2


def test_pearson_r_of_a_constant_prediction_is_undefined():
  """x - mean(x) of a constant float array is not exactly 0; r must still be None, not ~0."""
  y = np.random.default_rng(0).normal(size=80)
  assert metrics_lib.pearson_r(y, np.full(80, 0.1 + 0.2)) is None
  assert metrics_lib.regression_metrics(y, np.full(80, 3.3))["pearson_r"] is None


@pytest.mark.slow  # One interpreter start of `python -m lsm2.main`.
def test_a_missing_step_is_one_error_line_naming_it(pretrained, tmp_path):
  workdir, _ = pretrained  # Checkpoints at steps 5 and 10.
  result = subprocess.run(
      [sys.executable, "-m", "lsm2.main", f"--config={REPO}/configs/eval.py:synthetic",
       f"--workdir={tmp_path / 'eval'}", f"--config.init_from={workdir}", "--config.step=7"],
      cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("lsm2: error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert errors[0].startswith(f"lsm2: error: config.init_from={workdir}, config.step=7: ")
  assert "step 7" in errors[0], errors[0]
