"""Real-data converters, the non-wear rule, and the inspect CLI."""
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lsm2.data import dataset
from lsm2.data.channels import Channel
from lsm2.data.convert import convert
from lsm2.data.convert import main as convert_main
from lsm2.data.metadata import load_metadata
from lsm2.data.converters.common import NonWearRule
from lsm2.data.synthesize import write_synthetic_dataset


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        timeout=180, check=False)


def test_nonwear_rule():
  rule = NonWearRule(min_run_minutes=120, min_waking_minutes=60)
  x = np.ones(2 * 1440, np.float32)
  x[10 * 60:13 * 60] = 0  # 3 h of zeros at midday: non-wear.
  x[1 * 60:4 * 60] = 0  # 3 h at night: a still sleeper, kept.
  x[15 * 60:16 * 60 + 30] = 0  # 90 min: too short.
  x[22 * 60:1440 + 6 * 60] = 0  # 22:00-06:00, 60 waking minutes: non-wear as a whole.
  x[1440 + 14 * 60:1440 + 17 * 60] = 0
  x[1440 + 15 * 60] = np.nan  # A gap splits the run into two of < 120 min.
  off = rule.mask(x)
  assert off[10 * 60:13 * 60].all() and not off[10 * 60 - 1] and not off[13 * 60]
  assert not off[1 * 60:4 * 60].any()
  assert not off[15 * 60:16 * 60 + 30].any()
  assert off[22 * 60:1440 + 6 * 60].all()
  assert not off[1440 + 14 * 60:1440 + 17 * 60].any()
  # Several channels: a minute is zero when all its recorded channels are 0.
  two = np.stack([x, np.zeros_like(x)], axis=1)
  two[11 * 60 + 30, 1] = 1.0  # A second-channel blip splits the midday run: < 120 minutes each.
  off2 = rule.mask(two)  # The NaN at 15:00 on day 2 is a zero minute now (channel 2 reads 0).
  assert not off2[10 * 60:13 * 60].any() and off2[1440 + 14 * 60:1440 + 17 * 60].all()
  assert np.array_equal(off2[:10 * 60], off[:10 * 60])
  assert np.array_equal(off2[13 * 60:1440 + 14 * 60], off[13 * 60:1440 + 14 * 60])
  with pytest.raises(ValueError, match="waking hours must satisfy"):
    NonWearRule(waking_start_hour=9, waking_end_hour=7)


def _write_fitabase(root, hours):
  """A Fitabase folder: hours = {(day, hour): (steps[60], intensity[60])}, in April 2016."""
  root.mkdir()
  for name, prefix, k in (("minuteStepsWide_merged.csv", "Steps", 0),
                          ("minuteIntensitiesWide_merged.csv", "Intensity", 1)):
    header = "Id,ActivityHour," + ",".join(f"{prefix}{m:02d}" for m in range(60))
    rows = [f"42,4/{day}/2016 {hour}:00," + ",".join(str(int(v)) for v in values[k])
            for (day, hour), values in sorted(hours.items())]
    (root / name).write_text("\n".join([header, *rows]) + "\n")


def test_fitabase_nonwear_masks_zero_runs_in_waking_hours(tmp_path):
  """Zeros at night are sleep; a day of zeros is a tracker off the wrist (default rule)."""
  active = (np.tile([3, 0, 0, 10], 15), np.tile([1, 0, 0, 2], 15))  # Hours start and end moving.
  zeros = (np.zeros(60), np.zeros(60))
  hours = {(12, h): zeros if h < 7 else active for h in range(24)}  # Sleeps until 07:00.
  hours |= {(13, h): zeros for h in range(24)}  # Not worn from midnight ...
  hours |= {(14, h): zeros if h < 7 or h in (13, 14) else active for h in range(24)}
  del hours[(14, 18)]  # ... to 07:00 next day; 2 quiet hours at 13-15; no row for 18:00.
  _write_fitabase(tmp_path / "fit", hours)
  meta, stats = convert("fitabase", tmp_path / "fit", tmp_path / "out",
                        split_fractions=(1.0, 0.0, 0.0))
  assert (stats.days_in, stats.kept, stats.dropped_empty) == (3, 2, 1)  # 04-13 was not worn.
  recs = {r.day: r for r in dataset.iter_records(meta, "train")}
  assert recs["2016-04-12"].observed.all()  # The night's zeros are sleep: kept.
  day = recs["2016-04-14"].observed
  assert not day[:7 * 60].any() and day[7 * 60:18 * 60].all()  # The run from 04-13 is non-wear.
  assert not day[18 * 60:19 * 60].any() and day[19 * 60:].all()  # The missing hour.
  assert meta.source["nonwear_rule"]["min_run_minutes"] == 180
  _, raw = convert("fitabase", tmp_path / "fit", tmp_path / "raw", nonwear=False,
                   split_fractions=(1.0, 0.0, 0.0))
  assert raw.kept == 3 and raw.dropped_empty == 0  # Every recorded zero observed.
  _, strict = convert("fitabase", tmp_path / "fit", tmp_path / "strict",
                      split_fractions=(1.0, 0.0, 0.0),
                      nonwear=NonWearRule(min_run_minutes=120, min_waking_minutes=60,
                                          waking_start_hour=9, waking_end_hour=21))
  assert strict.missing_kept[1] == pytest.approx((7 * 60 + 60 + 120) / 1440)  # + the 2 quiet hours.


def test_convert_cli_nonwear_flags(tmp_path, capsys):
  args = ["--input", str(tmp_path), "--out", str(tmp_path / "out")]
  assert convert_main(["--format", "long_csv", "--nonwear-min-run", "30", *args]) == 2
  assert ("--nonwear-* settings apply to --format actiwatch or fitabase or apple_health or "
          "fitbit_takeout, not long_csv") in capsys.readouterr().err
  assert convert_main(["--format", "fitabase", "--no-nonwear", "--nonwear-min-waking", "5",
                       *args]) == 2
  assert "--no-nonwear contradicts" in capsys.readouterr().err
  assert convert_main(["--format", "actiwatch", "--nonwear-waking-hours", "23", "7", *args]) == 2
  assert "waking hours must satisfy 0 <= start < end <= 24, got 23-7" in capsys.readouterr().err


@pytest.fixture(scope="module")
def actiwatch_dir(tmp_path_factory):
  """A two-subject Depresjon-layout folder with known days, gaps and zero runs."""
  root = tmp_path_factory.mktemp("depresjon")
  rng = np.random.default_rng(0)
  for group, name, start, minutes in (("condition", "condition_1", "2003-05-07 12:00", 3600),
                                      ("control", "control_1", "2003-03-29 00:00", 2880)):
    ts = pd.date_range(start, periods=minutes, freq="min")
    activity = rng.integers(1, 400, len(ts))
    if name == "condition_1":
      day2 = (ts >= "2003-05-08 09:00") & (ts < "2003-05-08 12:00")
      activity[day2] = 0  # Daytime non-wear on 2003-05-08.
    else:
      ts = ts[(ts < "2003-03-30 02:00") | (ts >= "2003-03-30 03:00")]  # A DST hour is absent.
      activity = activity[:len(ts)]
    (root / group).mkdir(exist_ok=True)
    pd.DataFrame({"timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"), "date": ts.strftime("%Y-%m-%d"),
                  "activity": activity}).to_csv(root / group / f"{name}.csv", index=False)
  (root / "scores.csv").write_text(
      "number,days,gender,age,afftype,melanch,inpatient,edu,marriage,work,madrs1,madrs2\n"
      "condition_1,3,2,35-39,2,2,2,6-10,1,2,19,17\n"
      "control_1,2,1,25-29,NA,NA,NA,,NA,NA,NA,NA\n")
  return root


def test_actiwatch_conversion(actiwatch_dir, tmp_path):
  meta, stats = convert("actiwatch", actiwatch_dir, tmp_path / "out",
                        split_fractions=(0.5, 0.5, 0.0))
  assert stats.subjects_in == 2 and stats.days_in == 3 + 2
  # condition_1: starts at 12:00 (day 1 is 50% missing); control_1: the DST
  # day misses 60 minutes. Nothing is above 0.8 missing: all kept.
  assert stats.kept == 5 and stats.dropped_missing == 0 and stats.dropped_empty == 0
  recs = {(r.subject_id, r.day): r for split in meta.splits
          for r in dataset.iter_records(meta, split)}
  first = recs[("condition_1", "2003-05-07")]
  assert not first.observed[:720].any() and first.observed[720:].all()
  day2 = recs[("condition_1", "2003-05-08")]
  assert not day2.observed[9 * 60:12 * 60].any() and day2.observed[:9 * 60].all()
  dst = recs[("control_1", "2003-03-30")]
  assert not dst.observed[120:180].any() and dst.observed[180:].all()
  assert first.labels["depressed"] == 1 and dst.labels["depressed"] == 0
  assert first.labels["madrs1"] == 19 and math.isnan(dst.labels["madrs1"])
  assert (first.labels["gender"], dst.labels["gender"]) == (1, 0)  # 2 = male, 1 = female.
  assert meta.labels["age"].classes[first.labels["age"]] == "35-39"
  assert meta.source["nonwear_rule"]["min_run_minutes"] == 120
  assert meta.channel_names == ("activity",)


def test_actiwatch_max_missing_drops_partial_days(actiwatch_dir, tmp_path):
  _, stats = convert("actiwatch", actiwatch_dir, tmp_path / "out", max_missing=0.1,
                     split_fractions=(0.5, 0.5, 0.0))
  # Dropped: the half day (50% missing) and the day with 3 h of non-wear (12.5%).
  assert stats.kept == 3 and stats.dropped_missing == 2


def test_actiwatch_bad_input(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "s1.csv").write_text("timestamp,activity\n2003-05-07 12:00,5\n")
  with pytest.raises(ValueError, match=r"s1.csv: timestamp '2003-05-07 12:00' is not"):
    convert("actiwatch", tmp_path / "a", tmp_path / "out")
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "s1.csv").write_text("time,activity\n")
  with pytest.raises(ValueError, match=r"s1.csv: missing columns \['timestamp'\]"):
    convert("actiwatch", tmp_path / "b", tmp_path / "out")
  (tmp_path / "c").mkdir()
  with pytest.raises(ValueError, match="no subject CSV files"):
    convert("actiwatch", tmp_path / "c", tmp_path / "out2")


def _long_table():
  rows = []
  for subject, start in (("u1", "2024-01-01 08:00"), ("u2", "2024-01-03 00:00"),
                         ("u3", "2024-01-03 00:00")):
    ts = pd.date_range(start, periods=1440, freq="min")
    steps = np.arange(1440, dtype=float) % 100
    hr = 60 + np.arange(1440) % 30
    rows.append(pd.DataFrame({"subject": subject, "timestamp": ts, "steps": steps, "hr": hr}))
  df = pd.concat(rows, ignore_index=True)
  df.loc[5, "hr"] = np.nan  # NaN cell: unobserved.
  df = df.drop(index=range(100, 160))  # A gap of an hour for u1.
  extra = df.iloc[[0]].copy()
  extra["timestamp"] += pd.Timedelta(seconds=30)  # Same minute: averaged.
  extra["steps"] = 10.0
  return pd.concat([df, extra], ignore_index=True)


@pytest.mark.parametrize("fmt", ["long_csv", "parquet"])
def test_long_table_conversion(tmp_path, fmt):
  df = _long_table()
  path = tmp_path / ("t.csv" if fmt == "long_csv" else "t.parquet")
  if fmt == "long_csv":
    df.to_csv(path, index=False)
  else:
    df.to_parquet(path)
  meta, stats = convert(fmt, path, tmp_path / "out", max_missing=0.9)
  assert meta.channel_names == ("steps", "hr") and meta.labels == {}
  assert stats.subjects_in == 3 and stats.days_in == 4 and stats.kept == 4
  recs = {(r.subject_id, r.day): r for s in meta.splits for r in dataset.iter_records(meta, s)}
  u1 = recs[("u1", "2024-01-01")]
  assert not u1.observed[:480].any()  # Before the recording began.
  assert u1.observed[480:580, 0].all() and not u1.observed[580:640].any()  # The dropped hour.
  assert not u1.observed[485, 1] and u1.observed[485, 0]  # The NaN heart rate.
  assert u1.signals[480, 0] == 5.0  # (0 + 10) / 2: rows in one minute are averaged.
  assert recs[("u2", "2024-01-03")].observed.all()


def test_long_table_channel_declarations_and_errors(tmp_path):
  df = _long_table().rename(columns={"hr": "spo2"})
  path = tmp_path / "t.csv"
  df.to_csv(path, index=False)
  with pytest.raises(ValueError, match=r"t.csv: unknown channel 'spo2'"):
    convert("long_csv", path, tmp_path / "a")
  meta, _ = convert("long_csv", path, tmp_path / "b",
                    long_options={"declared": [Channel("spo2", "ppg", "%", 50, 100)]})
  assert meta.channels[1].name == "spo2" and meta.channels[1].unit == "%"
  df["steps"] = df["steps"].astype(object)
  df.loc[3, "steps"] = "lots"
  df.to_csv(path, index=False)
  with pytest.raises(ValueError, match="column 'steps' holds non-numeric value 'lots'"):
    convert("long_csv", path, tmp_path / "c", long_options={"channels": ["steps"]})
  df = _long_table()
  df["timestamp"] = df["timestamp"].astype(str)
  df.loc[7, "timestamp"] = "yesterday"
  df.to_csv(path, index=False)
  with pytest.raises(ValueError, match="cannot parse timestamp 'yesterday'"):
    convert("long_csv", path, tmp_path / "d")


def _labeled_long_table(tmp_path):
  """The long table as CSV, a subject label CSV and a day label Parquet file."""
  _long_table().to_csv(tmp_path / "t.csv", index=False)
  pd.DataFrame({"subject": ["u1", "u2", "u9"], "age": [34, 51.5, 40],
                "group": ["case", "control", "case"], "site": ["B", "A", "C"],
                "score": [2, 1, 1]}).to_csv(tmp_path / "subjects.csv", index=False)
  pd.DataFrame({"subject": ["u1", "u2", "u1"], "date": ["2024-01-01", "2024-01-03", "2024-02-01"],
                "mood": [3.5, 1.0, 2.0]}).to_parquet(tmp_path / "days.parquet")
  return {"labels": [tmp_path / "subjects.csv", tmp_path / "days.parquet"]}


def test_long_table_labels(tmp_path):
  options = _labeled_long_table(tmp_path) | {"label_kinds": {"score": "categorical"}}
  meta, stats = convert("long_csv", tmp_path / "t.csv", tmp_path / "out", max_missing=0.9,
                        long_options=options)
  specs = {n: (s.kind, s.level, s.classes) for n, s in meta.labels.items()}
  assert specs == {"age": ("regression", "subject", ()),
                   "group": ("binary", "subject", ("case", "control")),
                   "site": ("categorical", "subject", ("A", "B", "C")),
                   "score": ("categorical", "subject", ("1", "2")),  # Overridden; numeric order.
                   "mood": ("regression", "day", ())}
  recs = {(r.subject_id, r.day): r.labels for s in meta.splits
          for r in dataset.iter_records(meta, s)}
  assert recs[("u1", "2024-01-01")] == {"age": 34.0, "group": 0, "site": 1, "score": 1,
                                        "mood": 3.5}
  assert math.isnan(recs[("u1", "2024-01-02")]["mood"])  # No row for that day.
  assert recs[("u2", "2024-01-03")]["mood"] == 1.0 and recs[("u2", "2024-01-03")]["age"] == 51.5
  u3 = recs[("u3", "2024-01-03")]  # In the data, not in the label files: all missing.
  assert (u3["group"], u3["site"], u3["score"]) == (-1, -1, -1)
  assert math.isnan(u3["age"]) and math.isnan(u3["mood"])
  notes = "\n".join(stats.notes)
  assert "subjects.csv: 1 subjects not in the data, ignored: ['u9']" in notes
  assert "subjects.csv: 1 data subjects without a row (labels missing): ['u3']" in notes
  assert "days.parquet: 1 subject-day rows outside the subject's recorded days" in notes
  assert meta.source["label_files"] == [str(f) for f in options["labels"]]


@pytest.mark.parametrize("edit, kinds, match", [
    ({"subjects": lambda t: t.iloc[[0, 0, 1]]}, {},
     r"subjects.csv: subject \('u1',\) has more than one row"),
    ({"subjects": lambda t: t.rename(columns={"age": "hr"})}, {},
     "subjects.csv: label column 'hr' has the name of a channel"),
    ({"subjects": lambda t: t.assign(subject=["x1", "x2", "x3"])}, {},
     r"subjects.csv: none of its 3 subjects is in the data"),
    ({}, {"site": "binary"}, r"label column 'site' is binary but has 3 distinct"),
    ({}, {"group": "regression"},
     "label column 'group' is regression but holds non-numeric value 'case'"),
    ({"subjects": lambda t: t.rename(columns={"age": "mood"})}, {},
     r"label column 'mood' is also in"),
    ({}, {"weight": "regression"}, r"--label-kind names \['weight'\]"),
    ({"days": lambda t: t.assign(date=["2024-01-01", "soon", "2024-01-02"])}, {},
     "days.parquet: column 'date': cannot parse date 'soon'"),
    ({"days": lambda t: t.iloc[[0, 0]]}, {},
     r"days.parquet: subject-day \('u1', '2024-01-01'\) has more than one row"),
])
def test_long_table_label_errors(tmp_path, edit, kinds, match):
  options = _labeled_long_table(tmp_path) | {"label_kinds": kinds}
  if "subjects" in edit:
    edit["subjects"](pd.read_csv(tmp_path / "subjects.csv")).to_csv(tmp_path / "subjects.csv",
                                                                  index=False)
  if "days" in edit:
    edit["days"](pd.read_parquet(tmp_path / "days.parquet")).to_parquet(tmp_path / "days.parquet")
  with pytest.raises(ValueError, match=match):
    convert("long_csv", tmp_path / "t.csv", tmp_path / "out", max_missing=0.9,
            long_options=options)
  assert not (tmp_path / "out").exists()  # Nothing written.


def test_convert_cli_labels(tmp_path, capsys):
  _labeled_long_table(tmp_path)
  args = ["--input", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out"),
          "--max-missing", "0.9", "--labels", str(tmp_path / "subjects.csv")]
  assert convert_main(["--format", "long_csv", *args, "--label-kind", "age=categorical"]) == 0
  assert "1 subjects not in the data" in capsys.readouterr().out
  assert load_metadata(tmp_path / "out").labels["age"].classes == ("34", "40", "51.5")
  assert convert_main(["--format", "actiwatch", *args]) == 2
  assert "--labels applies to --format long_csv or parquet, not actiwatch" in (
      capsys.readouterr().err)
  assert convert_main(["--format", "long_csv", *args, "--label-kind", "age"]) == 2
  assert "--label-kind 'age': expected NAME=KIND" in capsys.readouterr().err


def test_convert_cli_prints_summary_and_fails_clearly(actiwatch_dir, tmp_path):
  ok = _run("lsm2.data.convert", "--format", "actiwatch", "--input", str(actiwatch_dir),
            "--out", str(tmp_path / "out"), "--split-fractions", "0.5", "0.5", "0")
  assert ok.returncode == 0, ok.stderr
  assert "subjects: 2 read" in ok.stdout and "5 kept" in ok.stdout and "non-wear" in ok.stdout
  bad = _run("lsm2.data.convert", "--format", "fitabase", "--input", str(actiwatch_dir),
             "--out", str(tmp_path / "out2"))
  assert bad.returncode == 2 and "minuteStepsWide_merged.csv not found" in bad.stderr


def test_inspect_cli(tmp_path):
  data = tmp_path / "data"
  write_synthetic_dataset(data, subjects=3, days=2, seed=0, shards=1)
  proc = _run("lsm2.data.inspect", str(data), "--json", str(tmp_path / "s.json"),
              "--png", str(tmp_path / "days.png"), "--days", "2")
  assert proc.returncode == 0, proc.stderr
  assert "per-day missing fraction histogram" in proc.stdout and "label activity" in proc.stdout
  summary = json.loads((tmp_path / "s.json").read_text())
  assert summary["records"] == {"train": 2, "validation": 2, "test": 2}
  assert set(summary["missing_fraction_per_day"]) == {"p10", "p50", "p90"}
  assert summary["channels"][0] == "hr" and len(summary["channels"]) == 26
  z = dataset.read_split(data, "train", normalize=False)
  assert summary["missing_fraction_per_day"]["p50"] == pytest.approx(
      np.median(1 - np.concatenate([dataset.read_split(data, s, normalize=False)["observed"]
                                    for s in ("train", "validation", "test")]).mean((1, 2))))
  assert len(z["signals"]) == 2
  assert (tmp_path / "days.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  shard = next(data.glob("train-*.tfrecord"))
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 2] ^= 1
  shard.write_bytes(bytes(raw))
  bad = _run("lsm2.data.inspect", str(data))
  assert bad.returncode == 2 and f"{shard.name}: record" in bad.stderr and "checksum" in bad.stderr


def test_depresjon_counts(shared_datasets, tmp_path):
  meta, stats = convert("actiwatch", shared_datasets / "depresjon", tmp_path / "out")
  assert stats.subjects_in == 55 and stats.days_in == 1144
  # 70 calendar days are all zeros (non-wear) and 68 more are over 80% missing.
  assert (stats.kept, stats.dropped_empty, stats.dropped_missing) == (1006, 70, 68)
  assert sum(meta.record_counts.values()) == 1006
  assert sum(len(v) for v in meta.subjects.values()) == 55
  depressed = set()
  for split in meta.splits:
    z = dataset.read_split(tmp_path / "out", split, normalize=False)
    depressed |= set(z["subject_id"][z["label/depressed"] == 1])
    assert np.all(np.isnan(z["label/madrs1"][z["label/depressed"] == 0]))
  assert len(depressed) == 23


def test_fitabase_counts(shared_datasets, tmp_path):
  meta, stats = convert("fitabase", shared_datasets / "fitabase", tmp_path / "out")
  assert stats.subjects_in == 33 and stats.days_in == 919
  # Non-wear (default rule): 75 calendar days have no worn minute; 32 more are over 80% missing.
  assert (stats.kept, stats.dropped_empty, stats.dropped_missing) == (812, 75, 32)
  assert np.percentile(stats.missing_kept, 90) == pytest.approx(0.481, abs=1e-3)
  assert meta.channel_names == ("steps", "intensity")
  bmi_users, asleep_days = set(), 0
  for split in meta.splits:
    z = dataset.read_split(tmp_path / "out", split, normalize=False, )
    bmi_users |= set(z["subject_id"][~np.isnan(z["label/bmi"])])
    asleep_days += int(np.sum(~np.isnan(z["label/minutes_asleep"])))
  assert len(bmi_users) == 8 and asleep_days == 394
