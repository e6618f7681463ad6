"""Releases (lsm2.release, `python -m lsm2.export --release`): the model card says what the run
recorded, lsm2.load reads a release (local and on a bucket) as it reads the run, and a release
whose files differ from its manifest is refused naming the file.

One release per module, of a copy of the tiny run with a small evaluation in WORKDIR/eval,
with the StableHLO format only (the formats themselves are tests/test_export.py's).
"""
import hashlib
import json
import re
import shutil

from absl import flags
import numpy as np
import pytest

import lsm2
from lsm2 import config_files
from lsm2 import errors
from lsm2 import export
from lsm2 import release
from lsm2 import storage
from lsm2.data import dataset
from lsm2.eval import run as eval_run
from tiny_checkpoint import REPO, tiny_pretrained

import gcs_emulator

BUCKET = "lsm2-release-test"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return tiny_pretrained(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def run(pretrained, tmp_path_factory):
  """(workdir copy with WORKDIR/eval, data dir, eval records): the evaluation of its step."""
  workdir, data = pretrained
  copy = tmp_path_factory.mktemp("run") / "workdir"
  shutil.copytree(workdir, copy)  # WORKDIR/eval goes into a copy: the tiny run is shared.
  config = config_files.load_config(REPO / "configs" / "eval.py", "synthetic")
  with config.unlocked():
    config.init_from = str(copy)
    config.probe.labels = ("hypertension",)
    config.probe.levels = ("subject",)
    config.probe.steps = 20
    config.probe.protocol.name = "cv"
    config.probe.protocol.folds = 3  # Records with a spread over the folds.
    config.few_shot.k = 0
    config.windows.enabled = False
    config.generative.enabled = False
    config.robustness.enabled = False
    config.plots.enabled = False
  records = eval_run.evaluate(config, copy / "eval")
  return copy, data, records


@pytest.fixture(scope="module")
def released(run, tmp_path_factory):
  """(release dir, the run's model, days with gaps, the run's embeddings of them)."""
  workdir, data, _ = run
  model = lsm2.load(workdir)
  out = tmp_path_factory.mktemp("releases") / "release"
  release.write(model, str(workdir), str(out), ("stablehlo",),
                lambda built: export.export(str(workdir), built, ("stablehlo",), model=model))
  raw = dataset.read_split(data, "train", normalize=False, limit=3)
  signals = np.where(raw["observed"], raw["signals"], np.nan)
  return out, model, signals, model.embed(signals)


@pytest.fixture
def copy(released, tmp_path):
  """A copy of the release to tamper with."""
  target = tmp_path / "release"
  shutil.copytree(released[0], target)
  return target


# ----------------------------------------------------------------------------
# The model card.
# ----------------------------------------------------------------------------
def _table(card: str, header: str) -> list[list[str]]:
  """The rows (cells) of the markdown table whose header row starts with `header`."""
  lines = card.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip("|").split("|")])
  return rows


def test_card_numbers_are_the_runs_files(run, released):
  workdir, data, records = run
  card = (released[0] / release.CARD).read_text()
  record = json.loads((workdir / "run.json").read_text())
  meta = json.loads((data / "metadata.json").read_text())
  description = json.loads((workdir / "export" / "lsm2.json").read_text())

  splits = {row[0]: row[1:] for row in _table(card, "| split |")}
  assert splits == {s: [str(len(meta["subjects"][s])), str(days)]
                    for s, days in record["dataset"]["record_counts"].items()}
  missing = meta["missingness"]
  assert f"missing minutes: {100 * missing['overall_fraction']:.1f}% over all splits" in card
  train = missing["per_split"]["train"]
  assert (f"mean {100 * train['mean_day_fraction']:.1f}%, p10 "
          f"{100 * train['day_fraction_percentiles']['p10']:.1f}%") in card
  channels = _table(card, "| # | channel |")
  assert [row[1] for row in channels] == [c["name"] for c in description["channels"]]
  assert [row[3] for row in channels] == [c["unit"] for c in description["channels"]]
  assert [float(row[5].rstrip("%")) for row in channels] == pytest.approx(
      [100 * (1 - missing["per_channel_fraction"][c["name"]]) for c in description["channels"]],
      abs=0.051)
  fields = dict(_table(card, "| field | value |"))
  assert fields["step"] == "10" == str(released[1].step)
  assert fields["total steps"] == str(description["run_config"]["total_steps"])
  assert fields["batch size"] == str(record["config"]["batch_size"])

  natural = [r for r in records if r["masking"] == "natural"]
  rows = _table(card, "| task | level |")
  assert len(rows) == len(natural) > 0
  for row, r in zip(rows, natural):
    assert row[:4] == [r["task"], r["level"], r["method"], r["metric"]]
    assert (row[4] == "n/a") if r["value"] is None else float(row[4]) == pytest.approx(
        r["value"], rel=1e-3)
    assert row[6:] == [r["split"], str(r["n"])]
  spread = [(row, r) for row, r in zip(rows, natural) if r.get("std") is not None]
  assert spread, "the 3-fold probes record a spread"
  for row, r in spread:
    assert float(re.match(r"± (\S+) \(std over 3 folds\)", row[5])[1]) == pytest.approx(
        r["std"], rel=1e-3)
  assert (json.loads((released[0] / "evaluation" / "results.json").read_text())
          == json.loads((workdir / "eval" / "results.json").read_text()))


def test_a_synthetic_model_says_so_in_the_cards_first_line(released):
  first = (released[0] / release.CARD).read_text().splitlines()[0]
  assert first.startswith("**Trained on synthetic data only**")
  assert "Not a medical device" in (released[0] / release.CARD).read_text()


def test_a_real_data_card_has_no_synthetic_line_and_no_evaluation_says_so(released):
  description = json.loads((released[0] / "model" / "lsm2.json").read_text())
  card = release.model_card({**description, "data_dir": ""}, {
      "step": 3, "source": "x", "lsm2_version": "0", "created": "today", "formats": []},
      None, {})
  assert card.splitlines()[0].startswith("# Model card")
  assert "subjects, missingness and channel coverage are not recorded" in card
  assert "No evaluation of step 3 was found" in card
  assert "| 0 | hr | ppg | bpm | 25.0 to 220.0 | not recorded |" in card


def test_a_stream_trained_card_names_the_stream_not_a_split(released, tmp_path):
  description = json.loads((released[0] / "model" / "lsm2.json").read_text())
  info = {"step": 3, "source": "x", "lsm2_version": "0", "created": "today", "formats": []}
  for source, want, not_want in (("files", "trained on split `train`", "synthetic_stream"),
                                 ("synthetic_stream", "(data.source=synthetic_stream)",
                                  "trained on split")):
    (tmp_path / "run.json").write_text(json.dumps(
        {"config": {"data.source": source, "data.train_split": "train"}}))
    card = release.model_card(description, info, tmp_path, {})
    assert want in card and not_want not in card, source


# ----------------------------------------------------------------------------
# Loading a release.
# ----------------------------------------------------------------------------
def test_the_manifest_lists_every_file_with_its_hash(released):
  out = released[0]
  listed = json.loads((out / release.MANIFEST).read_text())["files"]
  files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  assert sorted(listed) == [f for f in files if f != release.MANIFEST]
  assert {"MODEL_CARD.md", "release.json", "model/lsm2.json", "stablehlo/embed.bin",
          "lsm2_export.json", "evaluation/results.json"} <= set(listed)
  for name, entry in listed.items():
    data = (out / name).read_bytes()
    assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_load_a_release_gives_the_runs_embeddings(released):
  out, model, signals, want = released
  loaded = lsm2.load(out)
  assert loaded.step == model.step and loaded.channel_names == model.channel_names
  np.testing.assert_array_equal(loaded.embed(signals), want)
  with pytest.raises(FileNotFoundError, match="is the release of step 10; it holds no step 5"):
    lsm2.load(out, step=5)


@pytest.mark.parametrize("tamper, named", [
    ("byte", "the content of stablehlo/embed.bin differs"),
    ("delete", "model/lsm2.json is missing"),
    ("add", "notes.txt is not listed in manifest.json"),
])
def test_a_changed_release_is_refused_naming_the_file(copy, tamper, named):
  if tamper == "byte":
    path = copy / "stablehlo" / "embed.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
  elif tamper == "delete":
    (copy / "model" / "lsm2.json").unlink()
  else:
    (copy / "notes.txt").write_text("unlisted")
  with pytest.raises(release.ReleaseError, match=re.escape(named)) as error:
    lsm2.load(copy)
  assert isinstance(error.value, errors.Error) and "Nothing was loaded" in str(error.value)


def test_docs_check_without_lsm2(released, copy, monkeypatch):
  """docs/export.md's check with the standard library alone passes on the release, fails on a
  changed one."""
  text = (REPO / "docs" / "export.md").read_text()
  code = text.split("tested: tests/test_release.py::test_docs_check_without_lsm2")[1]
  code = code.split("```python\n")[1].split("```")[0]
  monkeypatch.chdir(released[0])
  exec(code, {})  # pylint: disable=exec-used
  (copy / "notes.txt").write_text("unlisted")
  monkeypatch.chdir(copy)
  with pytest.raises(AssertionError, match="notes.txt"):
    exec(code, {})  # pylint: disable=exec-used


def test_a_manifest_name_leading_outside_is_refused(copy):
  manifest = json.loads((copy / release.MANIFEST).read_text())
  manifest["files"]["../secret"] = {"bytes": 1, "sha256": "0" * 64}
  (copy / release.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(storage.StorageError, match=r"'\.\./secret' leads outside"):
    lsm2.load(copy)


def test_a_release_is_written_only_into_an_empty_directory(released, tmp_path):
  (tmp_path / "old.txt").write_text("")
  with pytest.raises(storage.StorageError, match="is not empty"):
    release.write(released[1], "x", str(tmp_path), (), lambda built: None)
  assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]  # No staging directory left.


def _cli(*args: str) -> None:
  """python -m lsm2.export ARGS, run in this process (a fresh one costs ~20 s)."""
  argv = flags.FLAGS(["lsm2.export", *args])
  try:
    export.main(argv)
  finally:
    flags.FLAGS.unparse_flags()


def test_release_round_trip_on_a_bucket(released, tmp_path, capsys):
  """The command writes the release to the emulator's bucket; lsm2.load reads it from there."""
  out, model, signals, want = released
  url = f"gs://{BUCKET}/models/release"
  with gcs_emulator.serving(tmp_path, BUCKET) as gcs:
    source = json.loads((out / release.INFO).read_text())["source"]
    _cli(f"--from={source}", f"--out={url}", "--release", "--format=stablehlo")
    digest = re.search(r"publish it beside the release\): ([0-9a-f]{64})",
                       capsys.readouterr().out)[1]
    objects = {n[len("models/release/"):] for n in gcs.objects(BUCKET, "models/release/")}
    listed = json.loads(storage.as_path(f"{url}/{release.MANIFEST}").read_text())["files"]
    assert objects == set(listed) | {release.MANIFEST}
    assert hashlib.sha256(storage.as_path(f"{url}/{release.MANIFEST}").read_bytes()
                          ).hexdigest() == digest
    loaded = lsm2.load(url)
    assert loaded.step == model.step
    np.testing.assert_array_equal(loaded.embed(signals), want)
    storage.as_path(f"{url}/extra.bin").write_bytes(b"x")
    with pytest.raises(release.ReleaseError, match="extra.bin is not listed"):
      lsm2.load(url)
    with pytest.raises(SystemExit):  # The same command again: the bucket path is not empty.
      _cli(f"--from={source}", f"--out={url}", "--release", "--format=stablehlo")
    assert capsys.readouterr().err.strip() == (
        f"lsm2: error: --out={url} is not empty: a release is written to a new or empty "
        "directory (delete it or choose another)")
