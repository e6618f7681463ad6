"""Conversion on Apache Beam (DirectRunner) writes the single-process dataset, byte for byte."""
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest

from lsm2 import storage
from lsm2.data import dataset
from lsm2.data.convert import convert
from lsm2.data.convert import main as convert_main
from lsm2.data.writer import ChannelMoments

import gcs_emulator
from test_data_importers import WATCH, _export, _hr, _sleep, _steps

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "lsm2-test"

DIRECT = ["--runner=DirectRunner"]


@pytest.fixture(name="beam")
def _beam():
  # CI installs Beam (the `test` extra); a guard for local runs without it.
  return pytest.importorskip("apache_beam")


@pytest.fixture(autouse=True)
def _scratch_in_pytest_tmp(tmp_path_factory, monkeypatch):
  """Beam's DirectRunner leaves empty `beam-temp*` and `tmp*` directories in the system
  temporary directory on every run; they go under pytest's own instead of /tmp."""
  scratch = str(tmp_path_factory.mktemp("system_tmp"))
  monkeypatch.setenv("TMPDIR", scratch)
  monkeypatch.setattr(tempfile, "tempdir", scratch)


def _files(out):
  """{name: bytes} of every file of a dataset directory."""
  return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _long_csv(path, subjects=7, days=3, seed=0):
  """A long table with gaps, NaN cells, out-of-range values and text ids ('01' is not '1')."""
  rng = np.random.default_rng(seed)
  frames = []
  for k in range(subjects):
    t = pd.date_range(f"2024-01-{1 + k % 3:02d} 00:00", periods=days * 1440, freq="min")
    keep = rng.random(t.size) < rng.uniform(0.3, 0.95)  # Missing minutes.
    steps = rng.poisson(8, t.size).astype(float)
    hr = rng.normal(70 + k, 9, t.size).round(1)
    hr[rng.random(t.size) < 0.02] = np.nan
    hr[rng.random(t.size) < 0.001] = 500.0  # Out of range: masked and counted.
    frames.append(pd.DataFrame({"subject": ["1", "01", "a b", "u3", "u4", "u5", "u6"][k],
                                "timestamp": t[keep], "steps": steps[keep], "hr": hr[keep]}))
  pd.concat(frames).to_csv(path, index=False)
  labels = path.with_name("labels.csv")
  labels.write_text("subject,age,smoker\n1,31,yes\n01,42,no\na b,25,no\nu3,60,yes\n")
  return {"labels": [labels]}


@pytest.mark.usefixtures("beam")
@pytest.mark.parametrize("shards,out_format", [(1, "tfrecord"), (3, "tfrecord"),
                                               (2, "array_record")])
def test_long_csv_through_beam_is_byte_identical(tmp_path, shards, out_format):
  options = _long_csv(tmp_path / "t.csv")
  kwargs = dict(max_missing=0.9, shards=shards, out_format=out_format, long_options=options)
  single, stats = convert("long_csv", tmp_path / "t.csv", tmp_path / "single", **kwargs)
  beam, beam_stats = convert("long_csv", tmp_path / "t.csv", tmp_path / "beam",
                             beam_args=DIRECT, **kwargs)
  assert sum(single.record_counts.values()) >= 15 and set(single.labels) == {"age", "smoker"}
  assert single.sanitized["out_of_range"] > 0
  # Shards, metadata.json (normalisation statistics included) and TFDS's files: the same bytes.
  assert _files(tmp_path / "beam") == _files(tmp_path / "single")
  assert [len(single.splits[s]) for s in ("train", "validation", "test")] == [
      min(shards, single.record_counts[s]) for s in ("train", "validation", "test")]
  assert (beam_stats.days_in, beam_stats.kept, beam_stats.subjects_in, beam_stats.notes) == (
      stats.days_in, stats.kept, stats.subjects_in, stats.notes)
  np.testing.assert_array_equal(beam.norm_mean, single.norm_mean)
  for split in single.splits:  # And the records decode to the same days.
    a = list(dataset.iter_records(single, split))
    b = list(dataset.iter_records(beam, split))
    assert [(r.subject_id, r.day) for r in a] == [(r.subject_id, r.day) for r in b]


def _apple_dir(root):
  """Three Apple Health exports (a subject each) of 2-3 days: heart rate, steps and sleep."""
  root.mkdir()
  for k, name in enumerate(("ann", "bob", "cy")):
    records = []
    for day in range(5 + k, 8 + k if k else 7):
      t = lambda hm, d=day: f"2024-03-{d:02d} {hm}:00 -0800"  # noqa: E731
      records += [_hr(WATCH, t(f"{h:02d}:{m:02d}"), 55 + h + k) for h in range(24)
                  for m in (0, 15, 30, 45)]
      records += [_steps(WATCH, t(f"{h:02d}:05"), t(f"{h:02d}:09"), 10 * h + k) for h in range(8, 20)]
      records.append(_sleep(WATCH, t("01:00"), t("03:30"), "AsleepCore"))
    (root / f"{name}.xml").write_text(_export(records))
  return root


@pytest.mark.usefixtures("beam")
def test_device_exports_through_beam_are_byte_identical(tmp_path):
  """Exports are read in parallel; channels no export records are left out in both paths."""
  inp = _apple_dir(tmp_path / "exports")
  kwargs = dict(max_missing=1.0, split_fractions=(1 / 3, 1 / 3, 1 / 3), shards=2)
  single, stats = convert("apple_health", inp, tmp_path / "single", **kwargs)
  _, beam_stats = convert("apple_health", inp, tmp_path / "beam", beam_args=DIRECT, **kwargs)
  assert single.channel_names == ("hr", "steps")  # No active energy: left out.
  assert sum(single.record_counts.values()) == 8 and "sleep_stage" in single.labels
  assert _files(tmp_path / "beam") == _files(tmp_path / "single")
  assert beam_stats.notes == stats.notes


@pytest.mark.usefixtures("beam")
def test_cli_beam_flag_and_pipeline_options(tmp_path, capsys):
  _long_csv(tmp_path / "t.csv", subjects=4, days=2)
  base = ["--format", "long_csv", "--input", str(tmp_path / "t.csv"), "--max-missing", "0.9"]
  assert convert_main(base + ["--out", str(tmp_path / "single")]) == 0
  assert convert_main(base + ["--out", str(tmp_path / "beam"), "--beam", "--runner",
                              "DirectRunner", "--direct_num_workers=1"]) == 0
  assert "splits (subject-disjoint)" in capsys.readouterr().out
  assert _files(tmp_path / "beam") == _files(tmp_path / "single")
  with pytest.raises(SystemExit):  # Pipeline options without --beam are a usage error.
    convert_main(base + ["--out", str(tmp_path / "x"), "--runner=DirectRunner"])
  assert "Beam pipeline options need --beam" in capsys.readouterr().err
  assert convert_main(base + ["--out", str(tmp_path / "y"), "--beam",
                              "--runner=DataflowRunner"]) == 2
  assert "--runner=DataflowRunner needs --temp_location" in capsys.readouterr().err
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _error(fmt, inp, out, **kwargs):
  with pytest.raises(ValueError) as e:
    convert(fmt, inp, out, **kwargs)
  return str(e.value)


@pytest.mark.usefixtures("beam")
@pytest.mark.parametrize("fmt", ["long_csv", "apple_health"])
def test_bad_input_through_beam_fails_like_single_and_writes_nothing(tmp_path, fmt):
  if fmt == "long_csv":
    inp = tmp_path / "t.csv"
    _long_csv(inp, subjects=3, days=1)
    inp.write_text(inp.read_text().replace(",8.0,", ",eight,", 1))
    expected = f"{inp}: column 'steps' holds non-numeric value 'eight'"
  else:  # One export among three is not well-formed XML: its parallel read fails.
    inp = _apple_dir(tmp_path / "exports")
    (inp / "bob.xml").write_text((inp / "bob.xml").read_text().replace("<Record", "<Record <", 1))
    expected = "bob.xml"
  single = _error(fmt, inp, tmp_path / "single", max_missing=1.0)
  before = sorted(p.name for p in tmp_path.iterdir())
  beam = _error(fmt, inp, tmp_path / "beam", max_missing=1.0, beam_args=DIRECT)
  assert beam == single and expected in beam
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # No --out, no staging left.
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("x")
  _error(fmt, inp, tmp_path / "full", max_missing=1.0, beam_args=DIRECT)
  assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


@pytest.mark.usefixtures("beam")
def test_no_kept_day_fails_like_single(tmp_path):
  _long_csv(tmp_path / "t.csv", subjects=3, days=1)
  single = _error("long_csv", tmp_path / "t.csv", tmp_path / "a", max_missing=0.0)
  beam = _error("long_csv", tmp_path / "t.csv", tmp_path / "b", max_missing=0.0,
                beam_args=[])  # No flags: Beam's default runner, the DirectRunner.
  assert beam == single and "no day passed the filters" in beam
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_convert_without_beam_installed_says_how_to_install(tmp_path, monkeypatch, capsys):
  _long_csv(tmp_path / "t.csv", subjects=3, days=1)
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # `import apache_beam` fails.
  assert convert_main(["--format", "long_csv", "--input", str(tmp_path / "t.csv"), "--out",
                       str(tmp_path / "out"), "--beam"]) == 2
  assert "pip install apache-beam" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("beam")
def test_worker_processes_write_the_same_bytes(tmp_path):
  """Two SDK worker processes: every step is pickled across processes, as on a cluster.

  The Beam run has a process of its own: the multi-process runner leaves gRPC
  threads behind, which must not share the test process with later tests.
  """
  options = _long_csv(tmp_path / "t.csv", subjects=4, days=2)
  kwargs = dict(max_missing=0.9, shards=2, long_options=options)
  convert("long_csv", tmp_path / "t.csv", tmp_path / "single", **kwargs)
  code = ("import pathlib, sys; from lsm2.data.convert import convert; "
          "csv, out, labels = map(pathlib.Path, sys.argv[1:]); "
          "convert('long_csv', csv, out, max_missing=0.9, shards=2, "
          "long_options={'labels': [labels]}, beam_args=["
          "'--direct_num_workers=2', '--direct_running_mode=multi_processing'])")
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.csv"), str(tmp_path / "beam"),
                  str(options["labels"][0])], check=True, timeout=600,
                 env={**os.environ, "PYTHONPATH": str(REPO)})
  assert _files(tmp_path / "beam") == _files(tmp_path / "single")


@pytest.fixture(name="gcs", scope="module")
def _gcs(tmp_path_factory):
  """A GCS emulator with bucket BUCKET (tests/gcs_emulator.py); this process points at it."""
  with gcs_emulator.serving(tmp_path_factory.mktemp("gcs"), BUCKET) as emulator:
    yield emulator


def _upload(local, url):
  for f in [local] if local.is_file() else sorted(local.rglob("*")):
    if f.is_file():
      target = url if f == local else f"{url}/{f.relative_to(local).as_posix()}"
      storage.as_path(target).write_bytes(f.read_bytes())


@pytest.mark.slow
@pytest.mark.usefixtures("beam")
def test_bucket_input_and_output(gcs, tmp_path):
  """Workers read gs:// inputs through a local copy; the dataset equals the local conversion."""
  options = _long_csv(tmp_path / "t.csv", subjects=4, days=2)
  _upload(tmp_path / "t.csv", f"gs://{BUCKET}/in/t.csv")
  single, _ = convert("long_csv", tmp_path / "t.csv", tmp_path / "single", max_missing=0.9,
                      long_options=options)
  remote, _ = convert("long_csv", f"gs://{BUCKET}/in/t.csv", f"gs://{BUCKET}/out",
                      max_missing=0.9, long_options=options, beam_args=DIRECT)
  assert remote.source["input"] == f"gs://{BUCKET}/in/t.csv"
  written = {n.rpartition("/")[2]: storage.as_path(f"gs://{BUCKET}/{n}").read_bytes()
             for n in gcs.objects(BUCKET, "out/") if not n.endswith("/")}  # Not the folder.
  local = _files(tmp_path / "single")
  meta = [json.loads(d.pop("metadata.json")) for d in (written, local)]
  assert written == local  # Shards and TFDS files.
  for m in meta:
    m["source"].pop("input")
  assert meta[0] == meta[1]

  inp = _apple_dir(tmp_path / "exports")
  _upload(inp, f"gs://{BUCKET}/exports")
  (inp / "notes.txt").write_text("not an export")  # Skipped by name, as locally.
  _upload(inp / "notes.txt", f"gs://{BUCKET}/exports/notes.txt")
  kwargs = dict(max_missing=1.0, split_fractions=(1 / 3, 1 / 3, 1 / 3))
  convert("apple_health", inp, tmp_path / "apple", **kwargs)
  convert("apple_health", f"gs://{BUCKET}/exports", tmp_path / "apple_beam", beam_args=DIRECT,
          **kwargs)
  meta = [json.loads(_files(tmp_path / d).pop("metadata.json")) for d in ("apple", "apple_beam")]
  assert _files(tmp_path / "apple_beam").keys() == _files(tmp_path / "apple").keys()
  assert all(_files(tmp_path / "apple_beam")[k] == v for k, v in _files(tmp_path / "apple").items()
             if k != "metadata.json")
  for m in meta:
    m["source"].pop("input")
  assert meta[0] == meta[1]

  text = (tmp_path / "t.csv").read_text().replace(",8.0,", ",eight,", 1)
  storage.as_path(f"gs://{BUCKET}/bad/t.csv").write_text(text)
  with pytest.raises(ValueError, match=rf"^gs://{BUCKET}/bad/t.csv: column 'steps' holds "
                     "non-numeric value 'eight'$"):
    convert("long_csv", f"gs://{BUCKET}/bad/t.csv", tmp_path / "bad", beam_args=DIRECT)
  with pytest.raises(ValueError, match=rf"--input gs://{BUCKET}/none does not exist"):
    convert("apple_health", f"gs://{BUCKET}/none", tmp_path / "bad", beam_args=DIRECT)
  assert not (tmp_path / "bad").exists()


def test_channel_moments_are_exact_and_order_free():
  """The statistics Beam merges in any order: the same bits in every order, and accurate."""
  rng = np.random.default_rng(0)
  days = [(rng.normal(1e4, 1.0, (1440, 2)) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
          for _ in range(12)]
  observed = [rng.random((1440, 2)) < 0.7 for _ in days]
  signals = [np.where(o, x, 0.0).astype(np.float32) for x, o in zip(days, observed)]
  forward = ChannelMoments(2)
  for x, o in zip(signals, observed):
    forward.add(x, o)
  halves = [ChannelMoments(2), ChannelMoments(2)]
  for k in reversed(range(len(days))):
    halves[k % 2].add(signals[k], observed[k])
  merged = halves[1].merge(halves[0])
  assert (merged.n, merged.s1, merged.s2) == (forward.n, forward.s1, forward.s2)
  mean, std = forward.mean_std()
  np.testing.assert_array_equal(merged.mean_std()[0], mean)
  for c in range(2):
    values = np.concatenate([x[o[:, c], c] for x, o in zip(signals, observed)]).astype(np.float64)
    exact_mean = math.fsum(values) / values.size
    assert abs(mean[c] - exact_mean) <= 1e-15 * abs(exact_mean)
    np.testing.assert_allclose(std[c], np.sqrt(np.mean((values - exact_mean) ** 2)), rtol=1e-9)
