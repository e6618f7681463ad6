"""Converters on bad or tricky input: ids as text, UTC offsets, errors that write nothing."""
import os
import pathlib

import numpy as np
import pandas as pd
import pytest

from lsm2.data import dataset
from lsm2.data.channels import Channel
from lsm2.data.convert import convert
from lsm2.data.convert import main as convert_main
from lsm2.data.inspect import main as inspect_main


def _snapshot(root: pathlib.Path):
  """Everything under `root` (None if it does not exist): shows that a failed run wrote nothing."""
  if not root.exists():
    return None
  return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
          for p in sorted(root.rglob("*"))}


def _day(subject, start, value, periods=1440):
  ts = pd.date_range(start, periods=periods, freq="min")
  return pd.DataFrame({"subject": subject, "timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"),
                       "steps": float(value)})


def _records(meta):
  return {(r.subject_id, r.day): r for s in meta.splits for r in dataset.iter_records(meta, s)}


def _fails(capsys, args, *messages):
  """convert's CLI exits 2 with a one-line message holding `messages`."""
  assert convert_main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  for m in messages:
    assert m in err, err


@pytest.mark.parametrize("fmt", ["long_csv", "parquet"])
def test_subject_ids_are_text_exactly_as_written(tmp_path, fmt):
  df = pd.concat([_day(s, "2024-01-01", v) for s, v in (("1", 10), ("01", 20), ("001", 30),
                                                       (" 1", 40))], ignore_index=True)
  path = tmp_path / ("t.csv" if fmt == "long_csv" else "t.parquet")
  if fmt == "long_csv":
    df.to_csv(path, index=False)
  else:
    df.to_parquet(path)
  meta, stats = convert(fmt, path, tmp_path / "out", split_fractions=(1.0, 0.0, 0.0))
  recs = _records(meta)
  assert stats.subjects_in == 4 and sorted(meta.subjects["train"]) == [" 1", "001", "01", "1"]
  for subject, value in (("1", 10), ("01", 20), ("001", 30), (" 1", 40)):
    assert np.all(recs[(subject, "2024-01-01")].signals[:, 0] == value)
  assert not any("merged" in n for n in stats.notes)


def test_missing_value_markers_stay_missing_in_channel_columns(tmp_path):
  """Only the id column is read as raw text: `NA` in a channel is still an unobserved minute."""
  df = _day("NA1", "2024-01-01", 4)
  df["steps"] = df["steps"].astype(object)
  df.loc[[0, 1, 2], "steps"] = ["NA", "null", ""]
  df.to_csv(tmp_path / "t.csv", index=False)
  meta, _ = convert("long_csv", tmp_path / "t.csv", tmp_path / "out",
                    split_fractions=(1.0, 0.0, 0.0))
  rec = _records(meta)[("NA1", "2024-01-01")]
  assert not rec.observed[:3].any() and rec.observed[3:].all() and rec.signals[3, 0] == 4


def test_parquet_integer_ids_convert_exactly_and_floats_are_rejected(tmp_path):
  df = pd.concat([_day(s, "2024-01-01", s) for s in (7, 12)], ignore_index=True)
  df.to_parquet(tmp_path / "int.parquet")
  meta, _ = convert("parquet", tmp_path / "int.parquet", tmp_path / "a",
                    split_fractions=(1.0, 0.0, 0.0))
  assert sorted(meta.subjects["train"]) == ["12", "7"]
  assert np.all(_records(meta)[("12", "2024-01-01")].signals[:, 0] == 12)
  df.assign(subject=df["subject"].astype(float)).to_parquet(tmp_path / "float.parquet")
  with pytest.raises(ValueError, match=r"float.parquet: column 'subject' holds float64 values "
                     r"\(e.g. 7.0\); subject ids must be text or integers"):
    convert("parquet", tmp_path / "float.parquet", tmp_path / "b")
  assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("bad, problem", [
    ("", r"no subject id \(an empty cell\)"), ("  ", "subject id '  ' is blank"),
    *[(v, f"subject id '{v}' is a missing-value marker \\(rename the subject if it is a real "
          r"id\)") for v in ("NA", "null", "None", "NaN")]])
def test_missing_subject_id_is_an_error_naming_file_and_row(tmp_path, bad, problem):
  df = pd.concat([_day("u1", "2024-01-01", 1), _day("u2", "2024-01-01", 2, periods=3)],
                 ignore_index=True)
  df.loc[1441, "subject"] = bad  # Data row 1442 (the header is not a row).
  df.to_csv(tmp_path / "t.csv", index=False)
  with pytest.raises(ValueError, match=rf"t.csv: data row 1442: column 'subject': {problem} "
                     r"\(1 row like this\)"):
    convert("long_csv", tmp_path / "t.csv", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_missing_subject_id_in_parquet(tmp_path):
  df = pd.concat([_day("u1", "2024-01-01", 1), _day("u2", "2024-01-01", 2)], ignore_index=True)
  df["subject"] = df["subject"].astype(object)
  df.loc[5, "subject"] = None
  df.to_parquet(tmp_path / "t.parquet")
  with pytest.raises(ValueError, match=r"t.parquet: data row 6: column 'subject': no subject id"):
    convert("parquet", tmp_path / "t.parquet", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_label_file_subject_ids_are_text(tmp_path):
  df = pd.concat([_day(s, "2024-01-01", 1) for s in ("1", "01")], ignore_index=True)
  df.to_csv(tmp_path / "t.csv", index=False)
  (tmp_path / "labels.csv").write_text("subject,age\n01,30\n1,50\n")
  meta, _ = convert("long_csv", tmp_path / "t.csv", tmp_path / "a",
                    split_fractions=(1.0, 0.0, 0.0),
                    long_options={"labels": [tmp_path / "labels.csv"]})
  recs = _records(meta)
  assert recs[("01", "2024-01-01")].labels["age"] == 30.0
  assert recs[("1", "2024-01-01")].labels["age"] == 50.0
  (tmp_path / "labels.csv").write_text("subject,age\n01,30\nNA,40\n1,50\n")
  with pytest.raises(ValueError, match=r"labels.csv: data row 2: column 'subject': .*'NA'"):
    convert("long_csv", tmp_path / "t.csv", tmp_path / "b",
            long_options={"labels": [tmp_path / "labels.csv"]})
  assert not (tmp_path / "b").exists()


UTC_MINUTE = Channel("utc_minute", "accel", "minute", 0, 1440)


def _dst_table():
  """u1 in New York across both 2024 clock changes, stamped with the offset in effect (ISO 8601)."""
  frames = []
  for day in ("2024-03-10", "2024-11-03"):
    utc = pd.date_range(pd.Timestamp(day, tz="America/New_York"), periods=1440 + 60,
                        freq="min").tz_convert("UTC")
    utc = utc[utc < pd.Timestamp(day, tz="America/New_York") + pd.DateOffset(days=1)]
    local = utc.tz_convert("America/New_York")
    frames.append(pd.DataFrame({
        "subject": "u1", "timestamp": [t.isoformat() for t in local],
        # The UTC minute of the day, so each pass of a repeated hour is recognisable.
        "utc_minute": (utc.hour * 60 + utc.minute).astype(float), "local": local}))
  return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("fmt", ["long_csv", "parquet"])
def test_utc_offsets_that_change_at_dst_are_placed_on_the_local_wall_clock(tmp_path, fmt):
  df = _dst_table()
  path = tmp_path / ("t.csv" if fmt == "long_csv" else "t.parquet")
  if fmt == "long_csv":
    df.drop(columns="local").to_csv(path, index=False)
  else:  # A time-zone-aware column of one named zone.
    df.drop(columns="timestamp").rename(columns={"local": "timestamp"}).to_parquet(path)
  meta, stats = convert(fmt, path, tmp_path / "out", split_fractions=(1.0, 0.0, 0.0),
                        long_options={"declared": [UTC_MINUTE]})
  recs = _records(meta)
  spring = recs[("u1", "2024-03-10")]  # 02:00-02:59 never happens: unobserved.
  assert not spring.observed[120:180].any() and spring.observed[:120].all()
  assert spring.observed[180:].all()
  assert spring.signals[0, 0] == 5 * 60 and spring.signals[180, 0] == 7 * 60  # -05:00, -04:00.
  assert set(recs) == {("u1", "2024-03-10"), ("u1", "2024-11-03")}
  fall = recs[("u1", "2024-11-03")]  # 01:00-01:59 happens twice: the first pass (-04:00) is kept.
  assert fall.observed.all() and fall.signals[0, 0] == 4 * 60
  assert fall.signals[60, 0] == 5 * 60 and fall.signals[119, 0] == 5 * 60 + 59
  assert fall.signals[120, 0] == 7 * 60  # 02:00 -05:00.
  assert "repeated local minutes (clocks going back): 60 rows of a later pass ignored" in (
      "\n".join(stats.notes))
  assert not any("merged" in n for n in stats.notes)


def test_offsets_mixed_with_naive_stamps_are_rejected(tmp_path):
  df = _dst_table().drop(columns="local")
  df.loc[3, "timestamp"] = "2024-03-10 00:03:00"
  df.to_csv(tmp_path / "t.csv", index=False)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  before = _snapshot(tmp_path / "out")
  with pytest.raises(ValueError, match=r"t.csv: column 'timestamp' mixes time stamps with a UTC "
                     r"offset \(e.g. '2024-03-10T00:00:00-05:00'\) and without \(e.g. "
                     r"'2024-03-10 00:03:00'\)"):
    convert("long_csv", tmp_path / "t.csv", tmp_path / "out",
            long_options={"declared": [UTC_MINUTE]})
  assert _snapshot(tmp_path / "out") == before


def test_header_only_actiwatch_file(tmp_path, capsys):
  (tmp_path / "in" / "control").mkdir(parents=True)
  (tmp_path / "in" / "control" / "control_1.csv").write_text(
      "timestamp,date,activity\n2003-03-29 00:00:00,2003-03-29,5\n")
  (tmp_path / "in" / "control" / "control_2.csv").write_text("timestamp,date,activity\n")
  _fails(capsys, ["--format", "actiwatch", "--input", str(tmp_path / "in"),
                  "--out", str(tmp_path / "out")], "control_2.csv: no data rows")
  assert not (tmp_path / "out").exists()


def test_header_only_long_table(tmp_path):
  (tmp_path / "t.csv").write_text("subject,timestamp,steps\n")
  with pytest.raises(ValueError, match="t.csv: no data rows"):
    convert("long_csv", tmp_path / "t.csv", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_duplicate_channel_names(tmp_path, capsys):
  _day("u1", "2024-01-01", 1).to_csv(tmp_path / "t.csv", index=False)
  _fails(capsys, ["--format", "long_csv", "--input", str(tmp_path / "t.csv"),
                  "--out", str(tmp_path / "out"), "--channels", "steps,steps"],
         "--channels names 'steps' more than once")
  _fails(capsys, ["--format", "long_csv", "--input", str(tmp_path / "t.csv"),
                  "--out", str(tmp_path / "out"), "--channels", "steps,"],
         "--channels holds an empty name")
  assert not (tmp_path / "out").exists()


def test_unwritable_out_fails_before_reading_the_input(tmp_path, capsys):
  missing_input = str(tmp_path / "no_such_input.csv")  # Reading it would be a different error.
  (tmp_path / "file").write_text("x")
  _fails(capsys, ["--format", "long_csv", "--input", missing_input, "--out",
                  str(tmp_path / "file")],
         f"--out {tmp_path / 'file'}: exists and is not a directory")
  _fails(capsys, ["--format", "long_csv", "--input", missing_input, "--out",
                  str(tmp_path / "file" / "sub" / "out")],
         f"--out {tmp_path / 'file' / 'sub' / 'out'}: cannot create it: {tmp_path / 'file'} "
         "is not a directory")
  assert (tmp_path / "file").read_text() == "x"
  # An existing dataset without --overwrite: refused before the input is read, left as it was.
  _day("u1", "2024-01-01", 1).to_csv(tmp_path / "t.csv", index=False)
  convert("long_csv", tmp_path / "t.csv", tmp_path / "data", split_fractions=(1.0, 0.0, 0.0))
  before = _snapshot(tmp_path / "data")
  _fails(capsys, ["--format", "long_csv", "--input", missing_input, "--out",
                  str(tmp_path / "data")], f"{tmp_path / 'data'} already holds a dataset")
  assert _snapshot(tmp_path / "data") == before


def test_unwritable_out_permission(tmp_path, monkeypatch):
  """A directory without write permission (simulated: root may write anywhere)."""
  locked = tmp_path / "locked"
  locked.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: (
      False if pathlib.Path(p) == locked and mode & os.W_OK else real_access(p, mode)))
  with pytest.raises(ValueError, match=rf"--out {locked / 'out'}: cannot create it: {locked} "
                     "is not writable"):
    convert("long_csv", tmp_path / "no_such_input.csv", locked / "out")
  with pytest.raises(ValueError, match=rf"--out {locked}: directory is not writable"):
    convert("long_csv", tmp_path / "no_such_input.csv", locked)


def test_inspect_png_with_dollar_in_subject_id(tmp_path, capsys):
  subject = "p$_$1"  # Unescaped, matplotlib reads $_$ as broken mathtext and fails to draw.
  _day(subject, "2024-01-01", 3).to_csv(tmp_path / "t.csv", index=False)
  meta, _ = convert("long_csv", tmp_path / "t.csv", tmp_path / "data",
                    split_fractions=(1.0, 0.0, 0.0))
  assert meta.subjects["train"] == [subject]
  png = tmp_path / "days.png"
  assert inspect_main([str(tmp_path / "data"), "--png", str(png), "--days", "1"]) == 0, (
      capsys.readouterr().err)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fitabase_user_ids_are_text(tmp_path):
  root = tmp_path / "fitabase"
  root.mkdir()
  for name, prefix in (("minuteStepsWide_merged.csv", "Steps"),
                       ("minuteIntensitiesWide_merged.csv", "Intensity")):
    header = "Id,ActivityHour," + ",".join(f"{prefix}{m:02d}" for m in range(60))
    rows = [f"{user},4/12/2016 {hour}:00," + ",".join(["1"] * 60)
            for user in ("042", "42") for hour in range(24)]
    (root / name).write_text("\n".join([header, *rows]) + "\n")
  meta, _ = convert("fitabase", root, tmp_path / "a", split_fractions=(1.0, 0.0, 0.0))
  assert sorted(meta.subjects["train"]) == ["042", "42"]
  steps = root / "minuteStepsWide_merged.csv"
  steps.write_text(steps.read_text().replace("\n42,4/12/2016 3:00,", "\n,4/12/2016 3:00,"))
  with pytest.raises(ValueError, match=r"minuteStepsWide_merged.csv: data row 28: column 'Id': "
                     "no subject id \\(an empty cell\\)"):
    convert("fitabase", root, tmp_path / "b")
  assert not (tmp_path / "b").exists()
