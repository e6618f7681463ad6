"""lsm2.sweeps.collect: every sweep point's results.json into one markdown table and one CSV."""
import csv
import json
import subprocess
import sys

import pytest

from lsm2.eval import report
from lsm2.sweeps import collect


def result(task, metric, value, split="test", masking="none", n=100):
  return {"task": task, "metric": metric, "value": value, "split": split, "masking": masking, "n": n}


@pytest.fixture
def sweep_root(tmp_path):
  """A masking-scheme sweep: two evaluated points, one not yet evaluated, one root-level run."""
  root = tmp_path / "masking_scheme"
  files = {
      "scheme=aim/eval/probe": [result("hypertension", "f1", 0.637),
                                result("imputation", "mse", 0.17, masking="signals2", n=40)],
      "scheme=lsm1/eval/probe": [result("hypertension", "f1", 0.602)],
      "baseline": [result("hypertension", "f1", 0.5)],
  }
  for run, entries in files.items():
    (root / run).mkdir(parents=True)
    (root / run / "results.json").write_text(json.dumps(entries))
  (root / "scheme=dropout_only" / "checkpoints").mkdir(parents=True)
  return root


def test_collect_reads_every_run_with_its_axes(sweep_root):
  results = collect.collect(sweep_root)
  assert [(r.run, r.axes, r.task, r.value, r.masking, r.n) for r in results] == [
      ("baseline", {}, "hypertension", 0.5, "none", 100),
      ("scheme=aim/eval/probe", {"scheme": "aim"}, "hypertension", 0.637, "none", 100),
      ("scheme=aim/eval/probe", {"scheme": "aim"}, "imputation", 0.17, "signals2", 40),
      ("scheme=lsm1/eval/probe", {"scheme": "lsm1"}, "hypertension", 0.602, "none", 100),
  ]


def test_markdown_has_one_row_per_run_and_one_column_per_metric(sweep_root):
  assert collect.markdown(collect.collect(sweep_root)) == (
      "| run | scheme | hypertension f1 (test, none) | imputation mse (test, signals2) |\n"
      "|---|---|---|---|\n"
      "| baseline |  | 0.5 |  |\n"
      "| scheme=aim/eval/probe | aim | 0.637 | 0.17 |\n"
      "| scheme=lsm1/eval/probe | lsm1 | 0.602 |  |\n")


def test_an_undefined_metric_is_na_not_an_error(tmp_path):
  """Evaluation writes null for a metric it cannot define (e.g. Pearson r of a constant)."""
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "results.json").write_text(json.dumps([result("bmi", "pearson_r", None)]))
  results = collect.collect(tmp_path)
  assert [r.value for r in results] == [None]
  assert collect.markdown(results).splitlines()[-1] == "| run | n/a |"
  collect.write_csv(results, tmp_path / "t.csv")
  with (tmp_path / "t.csv").open() as f:
    assert [row["value"] for row in csv.DictReader(f)] == [""]


def test_cli_writes_markdown_and_csv(sweep_root, tmp_path):
  out = tmp_path / "tables" / "masking"
  proc = subprocess.run([sys.executable, "-m", "lsm2.sweeps.collect", str(sweep_root), "--out", str(out)],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "tables" / "masking.md").read_text() == proc.stdout
  assert "3 runs, 4 results" in proc.stderr
  with (tmp_path / "tables" / "masking.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["run", "scheme", "task", "level", "method", "metric", "value", "split",
                           "masking", "n"]
  assert rows[2] == {"run": "scheme=aim/eval/probe", "scheme": "aim", "task": "imputation", "level": "",
                     "method": "", "metric": "mse", "value": "0.17", "split": "test",
                     "masking": "signals2", "n": "40"}


def test_evaluation_results_keep_one_column_per_method_and_level(tmp_path):
  """lsm2.eval reports a task once per method and level: those are distinct columns, not twice."""
  results = report.Results()
  keys = dict(split="test", masking="natural", n=50)
  for method in ("linear_probe", "features_probe"):
    for level in ("day", "subject"):
      results.add(task="hypertension", metric="auroc", value=0.7, method=method, level=level,
                  family="discriminative", **keys)
  for method, mse in (("model", 0.2), ("linear_interp", 0.3)):
    results.add(task="imputation", metric="mse", value=mse, method=method, level="minute",
                family="generative", **keys)
  (tmp_path / "size=S").mkdir()
  report.write_json(results.records, tmp_path / "size=S" / "results.json")
  collected = collect.collect(tmp_path)
  assert len(collected) == 6
  header = collect.markdown(collected).splitlines()[0]
  assert header == ("| run | size | hypertension day linear_probe auroc (test, natural) "
                    "| hypertension subject linear_probe auroc (test, natural) "
                    "| hypertension day features_probe auroc (test, natural) "
                    "| hypertension subject features_probe auroc (test, natural) "
                    "| imputation minute model mse (test, natural) "
                    "| imputation minute linear_interp mse (test, natural) |")
  assert collect.markdown(collected).splitlines()[2].endswith("| 0.2 | 0.3 |")


def test_parse_axes():
  assert collect.parse_axes("data_size/scheme=aim,max_train_subjects=100/eval/probe") == {
      "scheme": "aim", "max_train_subjects": "100"}
  with pytest.raises(ValueError, match="cannot read 'lr' as key=value"):
    collect.parse_axes("size=S,lr")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"task": "x"}), "expected a list of results, got dict"),
    (json.dumps([result("a", "f1", 0.1), {"task": "b", "metric": "f1", "value": 1.0}]),
     "entry 1 lacks split, masking, n"),
    (json.dumps([result("a", "f1", "high")]), "entry 0 value 'high' is not a number"),
    (json.dumps([result("a", "f1", 0.1, n=1.5)]), "entry 0 n 1.5 is not an integer"),
    (json.dumps([result("a", "f1", 0.1), result("a", "f1", 0.2)]),
     "run 'size=S' reports a f1 \\(test, none\\) twice"),
])
def test_malformed_results_name_the_file_and_entry(tmp_path, content, message):
  (tmp_path / "size=S").mkdir()
  (tmp_path / "size=S" / "results.json").write_text(content)
  with pytest.raises(ValueError, match=message) as error:
    collect.collect(tmp_path)
  if "twice" not in message:
    assert str(tmp_path / "size=S" / "results.json") in str(error.value)


def test_empty_or_missing_roots_are_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no results.json"):
    collect.collect(tmp_path)
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    collect.collect(tmp_path / "nowhere")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_result_is_one_error_line_naming_the_run_and_field(tmp_path, capsys, value):
  """JSON readers take NaN and Infinity; lsm2.eval never writes them, so the table refuses them."""
  run = tmp_path / "root" / "scheme=aim" / "eval" / "probe"
  run.mkdir(parents=True)
  entries = [result("hypertension", "f1", 0.6), result("imputation", "mse", 0.0)]
  (run / "results.json").write_text(json.dumps(entries).replace("0.0", value))
  assert collect.main([str(tmp_path / "root"), "--out", str(tmp_path / "t")]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err == (
      f"lsm2: error: {run / 'results.json'}: run 'scheme=aim/eval/probe' entry 1 (imputation mse) "
      f"value {value} is not a finite number: lsm2.eval writes null for a metric it cannot "
      "define, so this file was written or edited by something else\n")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # No table written.
