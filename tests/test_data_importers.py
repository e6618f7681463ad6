"""Consumer-device importers (Apple Health, Fitbit Takeout): exact minute values on small exports."""
import datetime
import json
import zipfile

import numpy as np
import pytest

from lsm2.data import channels as channels_lib
from lsm2.data import dataset
from lsm2.data.convert import convert
from lsm2.data.convert import main as convert_main
from lsm2.data.converters import apple_health, device, fitbit_takeout
from lsm2.data.converters.common import DayStats

WATCH = 'sourceName="Ann’s Apple Watch" device="&lt;&lt;HKDevice: 0x2&gt;, name:Apple Watch, ' \
        'manufacturer:Apple Inc., model:Watch, hardware:Watch6,2, software:10.3&gt;"'
PHONE = 'sourceName="Ann’s iPhone" device="&lt;&lt;HKDevice: 0x1&gt;, name:iPhone, ' \
        'manufacturer:Apple Inc., model:iPhone, hardware:iPhone14,2, software:17.3&gt;"'
APP = 'sourceName="Pedometer++"'
HEADER = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE HealthData [
<!-- HealthKit Export Version: 14 -->
<!ELEMENT HealthData (ExportDate,Me,(Record|Correlation|Workout|ActivitySummary|ClinicalRecord|Audiogram|VisionPrescription)*)>
<!ATTLIST HealthData
  locale CDATA #REQUIRED
>
<!ELEMENT ExportDate EMPTY>
<!ATTLIST ExportDate
  value CDATA #REQUIRED
>
<!ELEMENT Me EMPTY>
<!ATTLIST Me
  HKCharacteristicTypeIdentifierDateOfBirth         CDATA #REQUIRED
  HKCharacteristicTypeIdentifierBiologicalSex       CDATA #REQUIRED
>
<!ELEMENT Record ((MetadataEntry|HeartRateVariabilityMetadataList)*)>
<!ATTLIST Record
  type          CDATA #REQUIRED
  unit          CDATA #IMPLIED
  value         CDATA #IMPLIED
  sourceName    CDATA #REQUIRED
  sourceVersion CDATA #IMPLIED
  device        CDATA #IMPLIED
  creationDate  CDATA #IMPLIED
  startDate     CDATA #REQUIRED
  endDate       CDATA #REQUIRED
>
<!-- Note: Any Records that appear as children of a correlation also appear as top-level records in this document. -->
<!ELEMENT Correlation ((MetadataEntry|Record)*)>
<!ATTLIST Correlation
  type          CDATA #REQUIRED
  sourceName    CDATA #REQUIRED
  sourceVersion CDATA #IMPLIED
  device        CDATA #IMPLIED
  creationDate  CDATA #IMPLIED
  startDate     CDATA #REQUIRED
  endDate       CDATA #REQUIRED
>
<!ELEMENT MetadataEntry EMPTY>
<!ATTLIST MetadataEntry
  key   CDATA #REQUIRED
  value CDATA #REQUIRED
>
<!ELEMENT HeartRateVariabilityMetadataList (InstantaneousBeatsPerMinute*)>
<!ELEMENT InstantaneousBeatsPerMinute EMPTY>
<!ATTLIST InstantaneousBeatsPerMinute
  bpm  CDATA #REQUIRED
  time CDATA #REQUIRED
>
]>
<HealthData locale="en_US">
 <ExportDate value="2024-11-20 10:00:00 -0800"/>
 <Me HKCharacteristicTypeIdentifierDateOfBirth="1990-01-01" HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexFemale"/>
"""
HK = "HKQuantityTypeIdentifier"
SLEEP = "HKCategoryTypeIdentifierSleepAnalysis"


def _rec(typ, source, start, end, value, unit=None, children=""):
  unit = f' unit="{unit}"' if unit else ""
  value = "" if value is None else f' value="{value}"'
  head = (f' <Record type="{typ}" {source}{unit} creationDate="{end}" startDate="{start}" '
          f'endDate="{end}"{value}')
  return f"{head}>\n{children}</Record>\n" if children else f"{head}/>\n"


def _hr(source, t, bpm, end=None):
  meta = '  <MetadataEntry key="HKMetadataKeyHeartRateMotionContext" value="0"/>\n'
  return _rec(f"{HK}HeartRate", source, t, end or t, bpm, "count/min", meta)


def _steps(source, start, end, n):
  return _rec(f"{HK}StepCount", source, start, end, n, "count")


def _sleep(source, start, end, stage):
  return _rec(SLEEP, source, start, end, f"HKCategoryValueSleepAnalysis{stage}")


def _export(records):
  return HEADER + "".join(records) + "</HealthData>\n"


def _day_values(tl, day, channel_names=None):
  """{'HH:MM': {channel: value rounded to 4 decimals}} of the observed minutes of ISO `day`."""
  names = channel_names or [c.name for c in apple_health.CHANNELS]
  d = (datetime.date.fromisoformat(day) - tl.start).days
  out = {}
  for m in range(1440):
    row = tl.values[d * 1440 + m]
    obs = {n: round(float(v), 4) for n, v in zip(names, row) if np.isfinite(v)}
    if obs:
      out[f"{m // 60:02d}:{m % 60:02d}"] = obs
  return out


def _day_labels(tl, day):
  d = (datetime.date.fromisoformat(day) - tl.start).days
  lab = tl.minute_labels["sleep_stage"][d * 1440:(d + 1) * 1440]
  return {f"{m // 60:02d}:{m % 60:02d}": device.SLEEP_STAGES[lab[m]] for m in np.flatnonzero(lab >= 0)}


def _load_apple(path, **kwargs):
  stats = DayStats()
  timelines, labels = apple_health.load(path, stats, **kwargs)
  return timelines, labels, stats


# --------------------------------------------------------------------------- Apple Health


def test_apple_sources_spreading_and_wear(tmp_path):
  """2024-03-09 (-0800): counts split, rates averaged, one source per minute, wear from HR gaps."""
  t = lambda hm, s="00": f"2024-03-09 {hm}:{s} -0800"  # noqa: E731
  records = [
      _hr(WATCH, t("10:00", "10"), 60), _hr(WATCH, t("10:00", "40"), 70), _hr(WATCH, t("10:04"), 80),
      _hr(WATCH, t("10:10", "30"), 100, end=t("10:12", "30")),  # Interval rate: 3 minutes.
      _hr(WATCH, t("10:40"), 90), _hr(WATCH, t("10:50"), 95),  # 28-min gap, then a 10-min gap.
      _steps(PHONE, t("10:00"), t("10:03"), 90),  # 30 per minute ...
      _steps(WATCH, t("10:01", "30"), t("10:02", "30"), 20),  # ... but the watch wins at 10:01-10:02.
      _steps(APP, t("10:20"), t("10:21"), 40),  # Not worn, but a sample: observed.
      _steps(PHONE, t("10:40"), t("10:42"), 60), _steps(APP, t("10:40"), t("10:42"), 1000),
      _rec(f"{HK}ActiveEnergyBurned", WATCH, t("10:00"), t("10:00", "30"), 2, "kcal"),
      _rec(f"{HK}ActiveEnergyBurned", WATCH, t("10:01"), t("10:02"), 4.184, "kJ"),
      _rec(f"{HK}HeartRateVariabilitySDNN", WATCH, t("10:05"), t("10:06"), 40, "ms"),
      _rec(f"{HK}RespiratoryRate", WATCH, t("10:07", "10"), t("10:07", "10"), 15, "count/min"),
  ]
  path = tmp_path / "export.xml"
  path.write_text(_export(records))
  (tl,), labels, stats = _load_apple(path)
  assert tl.subject_id == "export" and set(labels) == {"sleep_stage"}
  got = _day_values(tl, "2024-03-09")
  worn0 = {"steps": 0.0, "active_energy": 0.0}
  want = {
      "10:00": {"hr": 65.0, "steps": 30.0, "active_energy": 2.0},
      "10:01": {"steps": 10.0, "active_energy": 1.0},
      "10:02": {"steps": 10.0, "active_energy": 0.0},
      "10:03": dict(worn0), "10:04": {"hr": 80.0, **worn0},
      "10:05": {"hrv_sdnn": 40.0, **worn0}, "10:06": dict(worn0),
      "10:07": {"respiratory_rate": 15.0, **worn0}, "10:08": dict(worn0), "10:09": dict(worn0),
      "10:10": {"hr": 100.0, **worn0}, "10:11": {"hr": 100.0, **worn0},
      "10:12": {"hr": 100.0, **worn0},
      "10:20": {"steps": 40.0},
      "10:40": {"hr": 90.0, "steps": 30.0, "active_energy": 0.0},
      "10:41": {"steps": 30.0, "active_energy": 0.0},
      **{f"10:{m}": dict(worn0) for m in range(42, 50)},
      "10:50": {"hr": 95.0, **worn0},
  }
  assert got == want
  assert tl.num_days == 1 and "sleep_stage" not in tl.minute_labels  # No sleep records.
  notes = "\n".join(stats.notes)
  assert "sources by priority: Ann’s Apple Watch (watch), Ann’s iPhone (iphone), Pedometer++ (other)" in notes


def test_apple_source_priority_flag_overrides_the_default_order(tmp_path):
  t = lambda hm: f"2024-03-09 {hm}:00 -0800"  # noqa: E731
  path = tmp_path / "export.xml"
  path.write_text(_export([_steps(PHONE, t("10:00"), t("10:01"), 50),
                           _steps(WATCH, t("10:00"), t("10:01"), 40)]))
  (default,), _, _ = _load_apple(path, rule=None)
  (phone_first,), _, _ = _load_apple(path, rule=None, source_priority=["Ann’s iPhone"])
  assert _day_values(default, "2024-03-09") == {"10:00": {"steps": 40.0}}
  assert _day_values(phone_first, "2024-03-09") == {"10:00": {"steps": 50.0}}


def test_apple_spring_forward_keeps_real_durations_and_sleep_stages(tmp_path):
  """2024-03-10 02:00 PST -> 03:00 PDT: a sample across the change covers 10 real minutes."""
  records = [
      _hr(WATCH, "2024-03-10 01:50:00 -0800", 55), _hr(WATCH, "2024-03-10 03:10:00 -0700", 58),
      _steps(WATCH, "2024-03-10 01:55:00 -0800", "2024-03-10 03:05:00 -0700", 100),
      _sleep(PHONE, "2024-03-10 00:30:00 -0800", "2024-03-10 01:10:00 -0800", "InBed"),
      _sleep(WATCH, "2024-03-10 01:00:00 -0800", "2024-03-10 04:00:00 -0700", "InBed"),
      _sleep(WATCH, "2024-03-10 01:30:00 -0800", "2024-03-10 03:30:00 -0700", "AsleepCore"),
      _sleep(WATCH, "2024-03-10 03:30:00 -0700", "2024-03-10 03:45:00 -0700", "AsleepDeep"),
  ]
  path = tmp_path / "export.xml"
  path.write_text(_export(records))
  (tl,), _, _ = _load_apple(path)
  got = _day_values(tl, "2024-03-10")
  want = {"01:50": {"hr": 55.0, "steps": 0.0}}  # No active energy recorded: never 0.
  want |= {f"01:{m}": {"steps": 0.0} for m in range(51, 55)}
  want |= {f"01:{m}": {"steps": 10.0} for m in range(55, 60)}
  want |= {f"03:0{m}": {"steps": 10.0} for m in range(5)}
  want |= {f"03:0{m}": {"steps": 0.0} for m in range(5, 10)}
  want["03:10"] = {"hr": 58.0, "steps": 0.0}
  assert got == want  # 02:00-02:59 does not exist that day: unobserved.
  labels = _day_labels(tl, "2024-03-10")
  want_labels = {f"00:{m}": "in_bed" for m in range(30, 60)}
  want_labels |= {f"01:{m:02d}": "in_bed" for m in range(30)}
  want_labels |= {f"01:{m}": "light" for m in range(30, 60)}
  want_labels |= {f"03:{m:02d}": "light" for m in range(30)}
  want_labels |= {f"03:{m}": "deep" for m in range(30, 45)}
  want_labels |= {f"03:{m}": "in_bed" for m in range(45, 60)}
  assert labels == want_labels


def test_apple_fall_back_keeps_the_first_pass(tmp_path):
  """2024-11-03 01:00-01:59 happens twice (-0700, then -0800): the first pass wins, gaps fill in."""
  records = [
      _hr(WATCH, "2024-11-03 01:30:00 -0700", 60), _hr(WATCH, "2024-11-03 01:50:00 -0700", 70),
      _hr(WATCH, "2024-11-03 01:05:00 -0800", 75), _hr(WATCH, "2024-11-03 01:30:00 -0800", 90),
      _steps(WATCH, "2024-11-03 01:58:00 -0700", "2024-11-03 01:02:00 -0800", 40),
  ]
  path = tmp_path / "export.xml"
  path.write_text(_export(records))
  (tl,), _, _ = _load_apple(path)
  got = _day_values(tl, "2024-11-03")
  zero = {"steps": 0.0}  # No active energy recorded: never 0.
  want = {f"01:{m}": dict(zero) for m in range(30, 58)}  # First pass 08:30-08:57 UTC, worn.
  want["01:30"] = {"hr": 60.0, **zero}  # Not the second pass's 90.
  want["01:50"] = {"hr": 70.0, **zero}
  want["01:58"] = want["01:59"] = {"steps": 10.0}
  want["01:00"] = want["01:01"] = {"steps": 10.0}  # Second pass, 09:00Z.
  want |= {f"01:0{m}": dict(zero) for m in range(2, 5)}
  want["01:05"] = {"hr": 75.0, **zero}
  assert got == want


def test_apple_malformed_records_are_reported_with_line_numbers(tmp_path):
  t = lambda hm: f"2024-03-09 {hm}:00 -0800"  # noqa: E731
  good = _steps(WATCH, t("10:00"), t("10:01"), 12)
  bad = [
      _steps(WATCH, "2024-03-09T10:00:00Z", t("10:01"), 5),
      _steps(WATCH, t("10:05"), t("10:06"), "many"),
      _rec(f"{HK}StepCount", WATCH, t("10:05"), t("10:06"), 5, "km"),
      _steps(WATCH, t("10:06"), t("10:05"), 5),
      _sleep(WATCH, t("10:00"), t("10:30"), "Dozing"),
      _rec(f"{HK}StepCount", 'sourceVersion="1"', t("10:05"), t("10:06"), 5, "count"),
  ]
  nested = (' <Correlation type="HKCorrelationTypeIdentifierBloodPressure" ' + WATCH
            + f' startDate="{t("10:00")}" endDate="{t("10:00")}">\n  '
            + _steps(WATCH, t("10:00"), t("10:01"), 999) + " </Correlation>\n")
  daily = _steps(PHONE, "2024-03-09 00:00:00 -0800", "2024-03-09 23:59:00 -0800", 8000)
  text = _export([good, *bad, nested, daily])
  path = tmp_path / "export.xml"
  path.write_text(text)
  (tl,), _, stats = _load_apple(path, rule=None)
  assert _day_values(tl, "2024-03-09") == {"10:00": {"steps": 12.0}}
  lines = text.splitlines()
  where = {i + 1 for i, line in enumerate(lines) if "10:05" in line or "T10:00" in line
           or "Dozing" in line}
  notes = "\n".join(stats.notes)
  assert "export.xml: malformed records: 6 skipped:" in notes
  for expected in ("startDate '2024-03-09T10:00:00Z' is not 'YYYY-MM-DD HH:MM:SS +HHMM'",
                   "value 'many' is not a non-negative number", "unit 'km' is not one of ['count']",
                   "is before startDate", "'HKCategoryValueSleepAnalysisDozing' is not a sleep "
                   "analysis value", "missing attribute 'sourceName'"):
    assert expected in notes
  reported = {int(line.split("line ")[1].split(":")[0]) for line in stats.notes
              if line.startswith("  line ")}
  assert reported == where | {i + 1 for i, line in enumerate(lines) if 'sourceVersion="1"' in line}
  assert "samples longer than 60 minutes (sleep: 24 h) skipped: {'HKQuantityTypeIdentifierStepCount': 1}" in notes
  broken = tmp_path / "broken.xml"
  broken.write_text(text.replace("</HealthData>", "<Record"))
  with pytest.raises(ValueError, match=r"broken.xml: line \d+, column \d+: not well-formed XML"):
    _load_apple(broken)


def test_apple_zip_directory_and_convert(tmp_path):
  """A zip streams like the XML; a directory of exports is several subjects with disjoint splits."""
  def day_of_steps(day, n):
    t = lambda hm: f"2024-03-{day} {hm}:00 -0800"  # noqa: E731
    return [_hr(WATCH, t(f"{h:02d}:00"), 60 + h) for h in range(24)] + [
        _steps(WATCH, t("12:00"), t("12:01"), n),
        _sleep(WATCH, t("01:00"), t("02:00"), "AsleepREM")]
  one = tmp_path / "one.xml"
  one.write_text(_export(day_of_steps("05", 42)))
  archive = tmp_path / "export.zip"
  with zipfile.ZipFile(archive, "w") as z:
    z.write(one, "apple_health_export/export.xml")
    z.writestr("apple_health_export/export_cda.xml", "<ClinicalDocument/>")
  (from_xml,), _, _ = _load_apple(one)
  (from_zip,), _, _ = _load_apple(archive)
  np.testing.assert_array_equal(from_xml.values, from_zip.values)
  assert from_zip.subject_id == "export"

  meta, stats = convert("apple_health", archive, tmp_path / "single", max_missing=1.0)
  assert meta.record_counts == {"train": 1, "validation": 0, "test": 0}
  assert [c.name for c in meta.channels] == ["hr", "steps"]
  assert ("channels the input never records, left out: ['active_energy', 'hrv_sdnn', "
          "'respiratory_rate']") in stats.notes
  (rec,) = dataset.iter_records(meta, "train")
  assert rec.day == "2024-03-05" and rec.signals[12 * 60, 1] == 42 and rec.observed[12 * 60, 1]
  stages = rec.labels["sleep_stage"]
  assert np.all(stages[60:120] == device.SLEEP_STAGES.index("rem"))
  assert np.all(stages[:60] == -1) and np.all(stages[120:] == -1)

  many = tmp_path / "many"
  (many / "carol" / "apple_health_export").mkdir(parents=True)
  (many / "carol" / "apple_health_export" / "export.xml").write_text(
      _export(day_of_steps("07", 9)))
  (many / "bob.xml").write_text(_export(day_of_steps("06", 7)))
  with zipfile.ZipFile(many / "ann.zip", "w") as z:
    z.write(one, "apple_health_export/export.xml")
  (many / "notes.txt").write_text("not an export")
  meta, _ = convert("apple_health", many, tmp_path / "multi", max_missing=1.0,
                    split_fractions=(1 / 3, 1 / 3, 1 / 3))
  assert sorted(s for v in meta.subjects.values() for s in v) == ["ann", "bob", "carol"]
  assert all(len(v) == 1 for v in meta.subjects.values())


def test_convert_cli_device_flags(tmp_path, capsys):
  path = tmp_path / "export.xml"
  path.write_text(_export([_hr(WATCH, "2024-03-09 10:00:00 -0800", 60),
                           _steps(WATCH, "2024-03-09 10:00:00 -0800",
                                  "2024-03-09 10:01:00 -0800", 5)]))
  base = ["--format", "apple_health", "--input", str(path), "--max-missing", "1"]
  assert convert_main(base + ["--out", str(tmp_path / "a"), "--nonwear-max-gap", "5",
                              "--source-priority", "Ann’s iPhone"]) == 0
  assert convert_main(base + ["--out", str(tmp_path / "b"), "--nonwear-min-run", "5"]) == 2
  assert "['--nonwear-min-run'] do not apply to --format apple_health" in capsys.readouterr().err
  assert convert_main(base + ["--out", str(tmp_path / "c"), "--timezone", "UTC"]) == 2
  assert "--timezone applies to --format fitbit_takeout" in capsys.readouterr().err


# --------------------------------------------------------------------------- Fitbit Takeout


def _intraday(entries):
  return json.dumps([{"dateTime": t, "value": v} for t, v in entries])


def _takeout(root, profile=True):
  data = root / "Takeout" / "Fitbit" / "Global Export Data"
  data.mkdir(parents=True)
  (data / "heart_rate-2024-03-10.json").write_text(json.dumps([
      {"dateTime": "03/10/24 09:58:10", "value": {"bpm": 60, "confidence": 3}},
      {"dateTime": "03/10/24 09:58:40", "value": {"bpm": 64, "confidence": 3}},
      {"dateTime": "03/10/24 10:01:05", "value": {"bpm": 70, "confidence": 2}},
      {"dateTime": "03/10/24 10:02:00"}]))  # Malformed: no value.
  (data / "steps-2024-03-01.json").write_text(_intraday([
      ("03/10/24 09:57:00", "0"), ("03/10/24 09:58:00", "5"), ("03/10/24 09:59:00", "0"),
      ("03/10/24 10:00:00", "7"), ("03/10/24 10:05:00", "12"), ("bad", "3")]))
  (data / "steps-2024-03-10.json").write_text(_intraday([("03/10/24 09:58:00", "9")]))
  (data / "calories-2024-03-01.json").write_text(_intraday([
      ("03/10/24 09:57:00", "1.1"), ("03/10/24 09:58:00", "2.5"), ("03/10/24 10:05:00", "3.0"),
      ("03/10/24 10:06:00", "1.2")]))
  (data / "sleep-2024-03-09.json").write_text(json.dumps([
      {"logId": 1, "dateOfSleep": "2024-03-10", "startTime": "2024-03-09T23:00:00.000",
       "endTime": "2024-03-09T23:06:00.000", "type": "stages", "mainSleep": True,
       "levels": {"data": [
           {"dateTime": "2024-03-09T23:00:00.000", "level": "wake", "seconds": 120},
           {"dateTime": "2024-03-09T23:02:00.000", "level": "light", "seconds": 150},
           {"dateTime": "2024-03-09T23:04:30.000", "level": "deep", "seconds": 90}],
           "shortData": [{"dateTime": "2024-03-09T23:03:00.000", "level": "wake", "seconds": 60}]}},
      {"logId": 2, "dateOfSleep": "2024-03-10", "startTime": "2024-03-10T04:00:00.000",
       "type": "classic", "levels": {"data": [
           {"dateTime": "2024-03-10T04:00:00.000", "level": "restless", "seconds": 60},
           {"dateTime": "2024-03-10T04:01:00.000", "level": "asleep", "seconds": 60},
           {"dateTime": "2024-03-10T04:02:00.000", "level": "snoring", "seconds": 60}]}}]))
  if profile:
    (root / "Takeout" / "Fitbit" / "Your Profile").mkdir()
    (root / "Takeout" / "Fitbit" / "Your Profile" / "Profile.csv").write_text(
        "id,full_name,timezone\nABC123,Ann,America/Los_Angeles\n")
  return root


def _load_fitbit(path, **kwargs):
  stats = DayStats()
  timelines, labels = fitbit_takeout.load(path, stats, **kwargs)
  return timelines, labels, stats


FITBIT_NAMES = [c.name for c in fitbit_takeout.CHANNELS]


def test_fitbit_takeout_minutes_timezone_wear_and_sleep(tmp_path):
  (tl,), labels, stats = _load_fitbit(_takeout(tmp_path / "ann"))
  assert tl.subject_id == "ann" and set(labels) == {"sleep_stage"}
  got = _day_values(tl, "2024-03-10", FITBIT_NAMES)
  # UTC 09:58 is 01:58 PST; UTC 10:00 is 03:00 PDT. Worn (heart rate) 09:58-10:01 UTC.
  assert got == {
      "01:58": {"hr": 62.0, "steps": 5.0, "total_energy": 2.5},  # steps-2024-03-01 wins over -10.
      "01:59": {"steps": 0.0},  # Worn: the recorded zero is observed ...
      "03:00": {"steps": 7.0},
      "03:01": {"hr": 70.0},
      "03:05": {"steps": 12.0, "total_energy": 3.0},  # ... and steps > 0 prove the tracker carried.
  }  # 01:57 (zero steps, 1.1 kcal) and 03:06 (1.2 kcal) are not worn: unobserved.
  assert _day_labels(tl, "2024-03-09") == {"23:00": "awake", "23:01": "awake", "23:02": "light",
                                           "23:03": "awake", "23:04": "deep", "23:05": "deep"}
  assert _day_labels(tl, "2024-03-10") == {"04:00": "awake", "04:01": "asleep"}
  notes = "\n".join(stats.notes)
  assert "ann: malformed entries: 3 skipped:" in notes
  assert "heart_rate-2024-03-10.json entry 3: expected" in notes
  assert "steps-2024-03-01.json entry 5: dateTime 'bad'" in notes
  assert "sleep-2024-03-09.json log 1 levels.data[2]" in notes and "'snoring'" in notes
  assert "time zone America/Los_Angeles" in notes


def test_fitbit_takeout_timezone_flag_zip_and_errors(tmp_path):
  root = _takeout(tmp_path / "raw", profile=False)
  with pytest.raises(ValueError, match="no Profile.csv with a timezone column; pass --timezone"):
    _load_fitbit(root)
  with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
    _load_fitbit(root, timezone="Mars/Olympus")
  (tl,), _, _ = _load_fitbit(root, timezone="UTC", rule=None)
  got = _day_values(tl, "2024-03-10", FITBIT_NAMES)
  assert got["09:57"] == {"steps": 0.0, "total_energy": 1.1}  # No rule: as recorded.
  assert got["09:58"] == {"hr": 62.0, "steps": 5.0, "total_energy": 2.5}
  archive = tmp_path / "takeout-20240401.zip"
  with zipfile.ZipFile(archive, "w") as z:
    for p in sorted(root.rglob("*.json")):
      z.write(p, p.relative_to(root).as_posix())
  (from_zip,), _, _ = _load_fitbit(archive, timezone="UTC", rule=None)
  np.testing.assert_array_equal(from_zip.values, tl.values)
  (root / "Takeout" / "Fitbit" / "Global Export Data" / "steps-2024-03-10.json").write_text("[{")
  with pytest.raises(ValueError, match=r"steps-2024-03-10.json: line 1, column 3: not valid JSON"):
    _load_fitbit(root, timezone="UTC")


def test_fitbit_takeout_directory_of_exports_converts(tmp_path):
  many = tmp_path / "many"
  for name in ("ann", "bob", "cy"):
    _takeout(many / name)
  meta, _ = convert("fitbit_takeout", many, tmp_path / "out", max_missing=1.0,
                    split_fractions=(1 / 3, 1 / 3, 1 / 3))
  assert [c.name for c in meta.channels] == FITBIT_NAMES
  assert sorted(s for v in meta.subjects.values() for s in v) == ["ann", "bob", "cy"]
  assert meta.labels["sleep_stage"].classes == device.SLEEP_STAGES


# --------------------------------------------------------------------------- Single-type exports
# Each importer writes only what the input records: a channel it never records is left out
# (device exports) or unobserved everywhere (tables naming it), and a recorded channel's
# minutes without a value are unobserved, never 0.


def _apple_single(tmp_path, kind):
  t = lambda m: f"2024-03-09 {m // 60:02d}:{m % 60:02d}:00 -0800"  # noqa: E731
  records = {  # Heart rate every 10 minutes: worn all day by the 20-minute rule.
      "hr": [_hr(WATCH, t(m), 60 + m % 7) for m in range(0, 1440, 10)],
      "steps": [_steps(PHONE, t(m), t(m + 1), n) for m, n in ((600, 5), (601, 0), (720, 9))],
      "active_energy": [_rec(f"{HK}ActiveEnergyBurned", WATCH, t(m), t(m + 1), 2, "kcal")
                        for m in (600, 610)],
  }[kind]
  (tmp_path / "export.xml").write_text(_export(records))
  return tmp_path / "export.xml", {}


def _fitbit_single(tmp_path, kind):
  data = tmp_path / "ann" / "Takeout" / "Fitbit" / "Global Export Data"
  data.mkdir(parents=True)
  file, entries = {
      "hr": ("heart_rate", [{"dateTime": f"03/10/24 10:0{m}:10", "value": {"bpm": 60,
                                                                          "confidence": 3}}
                            for m in (0, 1, 5)]),
      "steps": ("steps", [{"dateTime": f"03/10/24 10:0{m}:00", "value": v}
                          for m, v in ((0, "5"), (1, "0"), (2, "7"))]),
      "total_energy": ("calories", [{"dateTime": "03/10/24 10:00:00", "value": "1.1"}]),
  }[kind]
  (data / f"{file}-2024-03-10.json").write_text(json.dumps(entries))
  return tmp_path / "ann", {"device_options": {"timezone": "UTC"}}


SINGLE_TYPE = [  # (format, channel, the minutes it records, those recorded as 0)
    ("apple_health", "hr", 144, 0), ("apple_health", "steps", 3, 1),
    ("apple_health", "active_energy", 2, 0),
    ("fitbit_takeout", "hr", 3, 0), ("fitbit_takeout", "steps", 3, 1),
    ("fitbit_takeout", "total_energy", 1, 0)]


def _observed(meta):
  """{channel: (observed minutes, minutes observed as 0)} over every split."""
  observed = zeros = 0
  for split, n in meta.record_counts.items():
    for rec in dataset.iter_records(meta, split) if n else ():
      observed = observed + rec.observed.sum(axis=0)
      zeros = zeros + (rec.observed & (rec.signals == 0)).sum(axis=0)
  return {c.name: (int(o), int(z)) for c, o, z in zip(meta.channels, observed, zeros)}


@pytest.mark.parametrize("fmt,channel,minutes,recorded_zeros", SINGLE_TYPE)
def test_single_type_exports_hold_only_what_was_recorded(tmp_path, fmt, channel, minutes,
                                                         recorded_zeros):
  """An export of one record type converts to that one channel, observed at its recorded
  minutes alone (an Apple export of heart rate only once had steps and active energy
  observed as 0 all day); the channels it never records are noted as left out."""
  make = _apple_single if fmt == "apple_health" else _fitbit_single
  path, kwargs = make(tmp_path, channel)
  meta, stats = convert(fmt, path, tmp_path / "out", max_missing=1.0, **kwargs)
  assert _observed(meta) == {channel: (minutes, recorded_zeros)}
  (note,) = [n for n in stats.notes if n.startswith("channels the input never records")]
  assert repr(channel) not in note


def test_table_importers_leave_unrecorded_minutes_unobserved(tmp_path):
  """Fitabase with steps for two hours and intensity for one, a long table with a part-empty
  column: the minutes a channel lacks are unobserved, never 0. A channel recorded nowhere is
  refused by name (its normalization is undefined), not filled."""
  root = tmp_path / "fitabase"
  root.mkdir()
  def wide(prefix, hours):
    rows = "".join(f"1503960366,4/13/2016 {h}:00:00 AM," + ",".join(
        str(m % 3 + 1) for m in range(60)) + "\n" for h in hours)
    return "Id,ActivityHour," + ",".join(f"{prefix}{m:02d}" for m in range(60)) + "\n" + rows
  (root / "minuteStepsWide_merged.csv").write_text(wide("Steps", (1, 2)))
  (root / "minuteIntensitiesWide_merged.csv").write_text(wide("Intensity", (2,)))
  one_split = {"max_missing": 1.0, "split_fractions": (1.0, 0.0, 0.0)}
  meta, _ = convert("fitabase", root, tmp_path / "fitabase_out", **one_split)
  assert _observed(meta) == {"steps": (120, 0), "intensity": (60, 0)}

  table = tmp_path / "t.csv"
  table.write_text("subject,timestamp,hr,steps,activity\n" + "".join(
      f"ann,2024-03-10 10:0{m}:00,{60 + m},{'' if m % 2 else m + 1},\n" for m in range(4)))
  meta, _ = convert("long_csv", table, tmp_path / "long_out",
                    long_options={"channels": ["hr", "steps"]}, **one_split)
  assert _observed(meta) == {"hr": (4, 0), "steps": (2, 0)}
  with pytest.raises(ValueError, match=r"channels \['activity'\] have no observed minute"):
    convert("long_csv", table, tmp_path / "activity_out", **one_split)


# --------------------------------------------------------------------------- Shared pieces


def test_heart_rate_wear_rule_fills_short_gaps_only():
  hr = np.zeros(60, bool)
  hr[[5, 10, 40, 41]] = True
  worn = device.HeartRateWearRule(max_gap_minutes=5).mask(hr)
  assert np.array_equal(np.flatnonzero(worn), [5, 6, 7, 8, 9, 10, 40, 41])


def test_registry_names_aliases_and_profiles():
  assert set(channels_lib.DESCRIPTIONS) == set(channels_lib.KNOWN_CHANNELS)
  for alias, name in channels_lib.ALIASES.items():
    assert name in channels_lib.KNOWN_CHANNELS and alias not in channels_lib.KNOWN_CHANNELS
  assert channels_lib.resolve_name("Heart Rate") == "hr"
  assert channels_lib.resolve_name("HKQuantityTypeIdentifierStepCount") == "steps"
  assert channels_lib.resolve_name("HR") == "hr"
  assert channels_lib.resolve_name("blood_glucose") is None
  for typ, q in apple_health.QUANTITIES.items():
    assert channels_lib.resolve_name(typ) == q.channel
  assert apple_health.CHANNELS == channels_lib.APPLE_HEALTH_CHANNELS
  for profile, names in channels_lib.DEVICE_PROFILES.items():
    assert all(n in channels_lib.KNOWN_CHANNELS for n in names), profile
  with pytest.raises(ValueError, match="unknown device profile 'pebble'"):
    channels_lib.profile_channels("pebble")
