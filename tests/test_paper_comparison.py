"""benchmarks/paper_comparison.py: seed aggregation, paired verdicts, tables and flags (no training)."""
import importlib.util
import pathlib
import types

import numpy as np
import pytest

from lsm2.eval import intervals

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "paper_comparison.py"
_SPEC = importlib.util.spec_from_file_location("paper_comparison", _PATH)
pc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(pc)


def _rec(task, value, method="model", metric="mse", masking="natural", level="minute",
         family="generative", **extra):
  return {"task": task, "metric": metric, "value": value, "split": "test", "masking": masking,
          "n": 10, "method": method, "level": level, "family": family, **extra}


def _gen_runs(model_mse, baseline_mse=1.0, task="random_imputation_80"):
  """One run per seed: the model's MSE and a channel_mean baseline."""
  return [[_rec(task, v), _rec(task, baseline_mse, method="channel_mean")] for v in model_mse]


def test_collect_aligns_values_by_seed_and_marks_missing_ones():
  runs = [[_rec("a", 1.0), _rec("b", 2.0)], [_rec("a", 3.0)], [_rec("a", None), _rec("b", 4.0)]]
  got = pc.collect(runs)
  assert got[("a", "minute", "model", "mse", "natural")] == [1.0, 3.0, None]
  assert got[("b", "minute", "model", "mse", "natural")] == [2.0, None, 4.0]


def test_summarize_is_the_bootstrap_interval_of_the_defined_values():
  assert pc.summarize([None, None]) is None
  got = pc.summarize([0.0, None, 1.0])
  assert got == intervals.bootstrap_interval([0.0, 1.0])
  assert (got.mean, got.low, got.high, got.n) == (0.5, 0.0, 1.0, 2)


def test_paired_verdicts_follow_the_interval_of_the_difference():
  aim = [0.50, 0.52, 0.49]
  # Errors: AIM lower on every seed -> AIM; higher-is-better metric -> LSM-1.
  verdict, diff = pc.paired(aim, [a + 0.1 for a in aim], "mse")
  assert verdict == "AIM" and diff.mean == pytest.approx(-0.1) and diff.high < 0
  assert pc.paired(aim, [a + 0.1 for a in aim], "auroc")[0] == "LSM-1"
  # Differences of both signs: the interval covers 0.
  verdict, diff = pc.paired(aim, [0.60, 0.42, 0.54], "mse")
  assert verdict == "tie" and diff.covers(0.0)
  # Pairs need both values; fewer than MIN_PAIRS pairs give no verdict.
  assert pc.paired([0.1, None, 0.3], [0.2, 0.5, None], "mse") == ("n/a", None)
  verdict, diff = pc.paired([0.1, None, 0.3, 0.2], [0.2, 0.5, 0.4, 0.3], "mse")
  assert verdict == "AIM" and diff.n == 3


def test_fmt_interval():
  iv = intervals.Interval(0.8123, 0.8011, 0.8304, 3)
  assert pc.fmt_interval(iv) == "0.812 [0.801, 0.830]"
  assert pc.fmt_interval(iv, seeds=4) == "0.812 [0.801, 0.830] (n=3)"
  assert pc.fmt_interval(intervals.Interval(-0.1, -0.2, 0.05, 3), signed=True) == (
      "-0.100 [-0.200, +0.050]")
  assert pc.fmt_interval(None) == "n/a"


def test_generative_table_rows_and_tally():
  aim = _gen_runs([0.50, 0.52, 0.49], baseline_mse=0.9)
  lsm1 = _gen_runs([0.60, 0.62, 0.59], baseline_mse=0.9)
  tie_aim = _gen_runs([0.50, 0.52, 0.49], task="random_imputation_30")
  tie_lsm1 = _gen_runs([0.60, 0.42, 0.54], task="random_imputation_30")
  aim = [a + b for a, b in zip(aim, tie_aim)]
  lsm1 = [a + b for a, b in zip(lsm1, tie_lsm1)]
  agg = {"aim": pc.collect(aim), "lsm1": pc.collect(lsm1)}
  tally = {}
  lines = pc.generative_table(agg, [r for run in aim for r in run], 3, tally)
  assert tally == {"AIM": 1, "tie": 1}
  row80 = next(line for line in lines if line.startswith("| random_imputation_80 "))
  cells = [c.strip() for c in row80.strip("|").split("|")]
  assert cells[1].startswith("0.503 [") and cells[2].startswith("0.603 [")
  assert cells[3] == "0.900 (channel_mean)" and cells[4].startswith("-0.100 [") and cells[5] == "AIM"


def test_discriminative_table_uses_the_metric_direction_and_chance():
  def runs(values):
    return [[_rec("hypertension", v, method="linear_probe", metric="auroc", level="day",
                  family="discriminative"),
             _rec("hypertension", 0.5, method="majority", metric="auroc", level="day",
                  family="discriminative"),
             _rec("hypertension", 0.6, method="linear_probe", metric="macro_f1", level="day",
                  family="discriminative"),
             _rec("hypertension", 0.75, method="features_probe", metric="auroc", level="day",
                  family="discriminative")] for v in values]
  aim, lsm1 = runs([0.70, 0.72, 0.71]), runs([0.80, 0.82, 0.81])
  agg = {"aim": pc.collect(aim), "lsm1": pc.collect(lsm1)}
  tally = {}
  lines = pc.discriminative_table(agg, [r for run in aim for r in run], {"hypertension": "binary"},
                                  3, tally)
  auroc = next(line for line in lines if "| auroc |" in line)
  assert auroc.endswith("| LSM-1 |") and "| 0.500 | 0.750 |" in auroc
  # The features probe does not depend on the encoder: a column, never a row with a verdict.
  assert not [line for line in lines if "| features_probe |" in line]
  # Equal macro-F1 on every seed: the difference interval is [0, 0], a tie.
  assert next(line for line in lines if "| macro_f1 |" in line).endswith("| tie |")
  assert tally == {"LSM-1": 1, "tie": 1}


def test_missingness_rows_order_ratios_and_carry_baselines():
  aim, lsm1 = [], []
  for seed in range(2):
    aim.append([_rec(f"random_imputation_{p}", p / 100 + seed * 0.01) for p in (80, 30, 50)]
               + [_rec(f"random_imputation_{p}", 1.0, method="locf") for p in (30, 50, 80)])
    lsm1.append([_rec(f"random_imputation_{p}", p / 100 + 0.2) for p in (30, 50, 80)])
  rows = pc.missingness_rows({"aim": pc.collect(aim), "lsm1": pc.collect(lsm1)}, 2)
  assert [r["ratio"] for r in rows] == [30, 50, 80]
  assert rows[0]["aim"].mean == pytest.approx(0.305) and rows[0]["verdict"] == "AIM"
  assert rows[2]["baselines"]["locf"].mean == 1.0
  table = pc.missingness_table(rows)
  assert table[0] == "| masked | AIM MSE | LSM-1 MSE | locf | better |"
  assert table[2].startswith("| 30% | 0.305 [0.300, 0.310] | 0.500 [0.500, 0.500] | 1.000")


def test_scaling_rows_and_plots(tmp_path):
  def scores(mse):
    return {"params": 1000, "records": [
        _rec(t, mse, method=m) for t in pc.SCALING_TASKS for m in ("model", *pc.SCALING_BASELINES)]}
  points = [{"point": "steps15", "x": 15, "scores": [scores(0.9), scores(0.7)]},
            {"point": "steps60", "x": 60, "scores": [scores(0.5)]}]
  rows = pc.scaling_rows(points)
  cell = rows[0]["cells"][(pc.SCALING_TASKS[0], "model")]
  assert (cell.mean, cell.n) == (pytest.approx(0.8), 2)
  table = pc.scaling_table("steps", rows)
  assert table[3].startswith("| 60 | steps60 | 0.500 [0.500, 0.500] |")
  png = pc.plot_scaling("steps", rows, tmp_path / "plots" / "scaling_steps.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_is_copied_beside_the_docs_and_linked_relatively(tmp_path):
  plot = tmp_path / "out" / "plots" / "x.png"
  plot.parent.mkdir(parents=True)
  plot.write_bytes(b"png")
  docs = tmp_path / "docs" / "results.md"
  assert pc._figure(plot, docs, "alt") == ["![alt](results/x.png)", ""]
  assert (tmp_path / "docs" / "results" / "x.png").read_bytes() == b"png"
  assert pc._figure(plot, None, "alt") == []


def test_scaling_points_cover_each_axis(tmp_path):
  args = pc.parse_args(["--out", str(tmp_path), "--quick"])
  assert [p[1] for p in pc.scaling_points("steps", args, 24)] == [15, 30, 60]
  subjects = pc.scaling_points("subjects", args, 24)
  assert [(x, o["max_subjects"]) for _, x, o in subjects] == [(6, 6), (12, 12), (24, 0)]
  assert [o["size"] for _, _, o in pc.scaling_points("params", args, 24)] == ["tiny", "XXS", "XS"]


def test_flags_default_to_the_cpu_recipe(tmp_path, monkeypatch):
  from lsm2.data import metadata
  monkeypatch.setattr(metadata, "load_metadata", lambda _: types.SimpleNamespace(num_channels=26))
  args = pc.parse_args(["--out", str(tmp_path)])
  assert (args.size, args.steps, args.batch_size, args.lr) == ("XS", 5000, 8, 3e-3)
  assert (args.seeds, args.synthetic_subjects, args.synthetic_days) == (3, 1920, 3)
  assert args.synthetic_patch == "30x2" and args.scaling == list(pc.SCALING_AXES)
  over = pc.parse_args(["--out", str(tmp_path), "--size", "tiny", "--steps", "7", "--seeds", "2"])
  assert (over.size, over.steps, over.seeds) == ("tiny", 7, 2)
  assert pc.recipe_arg("XS,cpu", "tiny", "lsm1") == "cpu,tiny,lsm1"
  config = pc.pretrain_config("synthetic", "lsm1", tmp_path, over, seed=1, max_subjects=5)
  assert (config.model.size, config.masking.scheme, config.seed, config.total_steps,
          config.data.max_train_subjects, config.masking.encoder_buckets) == (
              "tiny", "lsm1", 1, 7, 5, 4)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds=0"),
    (["--scaling", "steps,depth"], "unknown axes"),
    (["--scaling_steps", "0.5,1"], "at least 3 fractions"),
    (["--scaling_sizes", "tiny,XS,huge"], "--scaling_sizes"),
    (["--datasets", "mnist"], "unknown dataset"),
    (["--recipe", "XS,cpu,aim"], "names scheme"),
])
def test_bad_flags_name_the_problem(tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit):
    pc.parse_args(["--out", str(tmp_path), *argv])
  assert message in capsys.readouterr().err


def test_stage_times_are_saved_after_every_stage_and_reloaded(tmp_path):
  path = tmp_path / "timings.json"
  times = pc.StageTimes(path)
  times["synthetic_aim_s0/pretrain"] = 12.5
  assert pc.StageTimes(path) == {"synthetic_aim_s0/pretrain": 12.5}
  again = pc.StageTimes(path)
  again["synthetic_aim_s0/evaluate"] = 3.0
  assert list(pc.StageTimes(path)) == ["synthetic_aim_s0/pretrain", "synthetic_aim_s0/evaluate"]


def test_stage_times_of_invocations_side_by_side_are_all_kept(tmp_path):
  path = tmp_path / "timings.json"
  first, second = pc.StageTimes(path), pc.StageTimes(path)  # Both start before either writes.
  first["synthetic_aim_s0/pretrain"] = 1.0
  second["fitabase_aim_s0/pretrain"] = 2.0
  first["synthetic_aim_s0/evaluate"] = 3.0
  assert pc.StageTimes(path) == {"synthetic_aim_s0/pretrain": 1.0,
                                 "fitabase_aim_s0/pretrain": 2.0,
                                 "synthetic_aim_s0/evaluate": 3.0}


@pytest.mark.parametrize("channels, weight, k", [(26, 0.1, 6), (2, 0.1, 1), (1, 0.0, 6)])
def test_signal_imputation_fits_the_datasets_channels(tmp_path, monkeypatch, channels, weight, k):
  from lsm2.data import metadata
  monkeypatch.setattr(metadata, "load_metadata",
                      lambda _: types.SimpleNamespace(num_channels=channels))
  args = pc.parse_args(["--out", str(tmp_path)])
  config = pc.pretrain_config("depresjon", "aim", tmp_path, args, seed=0)
  assert config.model.patch_channels == 1  # --real_patch 10x1
  assert (config.masking.weights.signal_imputation, config.masking.signal_imputation_k) == (
      weight, k)


def test_write_docs_keeps_the_notes_and_links_only_copied_plots(tmp_path):
  docs = tmp_path / "docs" / "results.md"
  docs.parent.mkdir()
  docs.write_text("old numbers\n" + pc.NOTES_MARKER + "\nhand-written notes\n")
  out = tmp_path / "out"
  argv = ["--out", str(out), "--seeds", "2", "--docs", str(docs), "--scaling", ""]
  args = pc.parse_args(argv)

  def seed_runs(offset):
    return [[_rec(f"random_imputation_{p}", p / 100 + offset + s / 100) for p in (30, 50, 80)]
            + [_rec("random_imputation_80", 0.9, method="channel_mean")]
            + [_rec("hypertension", 0.7 + offset, method="linear_probe", metric="auroc",
                    level="day", family="discriminative")] for s in range(2)]

  runs = {"synthetic": {"aim": seed_runs(0.0), "lsm1": seed_runs(0.1)}}
  scores = {"params": 5000, "records": [_rec(t, 0.5, method=m) for t in pc.SCALING_TASKS
                                        for m in ("model", *pc.SCALING_BASELINES)]}
  scaling = {"steps": [{"point": f"steps{n}", "x": n, "scores": [scores]} for n in (15, 30, 60)]}
  text = pc.write_docs(docs, args, runs, {"synthetic": {"hypertension": "binary"}}, scaling,
                       {"synthetic_aim_s0/pretrain": 90.0}, 120.0, argv)
  written = docs.read_text()
  assert written.startswith(text) and written.endswith(pc.NOTES_MARKER + "\nhand-written notes\n")
  assert "old numbers" not in written
  # The command as typed, quoting included: every number traces back to it.
  assert f"python benchmarks/paper_comparison.py --out {out} --seeds 2 --docs {docs} --scaling ''" in text
  assert "wall time 0.03 h summed over stages" in text
  assert "| 80% | 0.805 [0.800, 0.810] | 0.905 [0.900, 0.910] | 0.900 [0.900, 0.900] | AIM |" in text
  assert "| hypertension | day | linear_probe | auroc |" in text
  assert "| synthetic | generative | 3 | 0 | 0 | 0 |" in text
  for name in ("missingness_synthetic.png", "scaling_steps.png"):
    assert f"](results/{name})" in text
    assert (docs.parent / "results" / name).is_file() and (out / "plots" / name).is_file()
