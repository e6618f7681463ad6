"""Apple Health importer: records/s and peak memory on a generated export.

  python benchmarks/importers.py [--size-mb 1024] [--no-zip] [--dir DIR] [--json PATH]

Writes an export.xml in Apple's schema (the DTD header; an Apple Watch and an
iPhone; per day heart rate every 2 minutes while worn with its metadata
entry, watch steps and active energy per minute, phone steps per 5 minutes,
basal energy, HRV records with their beat-to-beat lists, night-time
respiratory rate and sleep stages; UTC offsets of America/Los_Angeles with its
daylight-saving changes), streamed to disk until it reaches --size-mb. Then
imports it in a fresh process (apple_health.parse_export and the timeline:
what `convert --format apple_health` runs per export) and reports records/s
and that process's peak RSS. The same is done for an export over the same days
with a quarter of the records, and (unless --no-zip) for the big export as a
zip, streamed from the archive. Memory follows the days an export covers, not
its size: the two exports over the same days should peak alike.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
import zoneinfo

REPO = pathlib.Path(__file__).resolve().parents[1]
WATCH = ('sourceName="Ann’s Apple Watch" sourceVersion="10.3" device="&lt;&lt;HKDevice: '
         '0x280a2d4f0&gt;, name:Apple Watch, manufacturer:Apple Inc., model:Watch, '
         'hardware:Watch6,2, software:10.3&gt;"')
PHONE = ('sourceName="Ann’s iPhone" sourceVersion="17.3" device="&lt;&lt;HKDevice: '
         '0x280a2d6c0&gt;, name:iPhone, manufacturer:Apple Inc., model:iPhone, '
         'hardware:iPhone14,2, software:17.3&gt;"')
DTD = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE HealthData [
<!-- HealthKit Export Version: 14 -->
<!ELEMENT HealthData (ExportDate,Me,(Record|Correlation|Workout|ActivitySummary)*)>
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
 <ExportDate value="2025-01-01 09:00:00 -0800"/>
 <Me HKCharacteristicTypeIdentifierDateOfBirth="1990-01-01"/>
"""
HK = "HKQuantityTypeIdentifier"
TZ = zoneinfo.ZoneInfo("America/Los_Angeles")


def _stamp(day: datetime.date, minute: int, second: int = 0) -> str:
  t = datetime.datetime(day.year, day.month, day.day, tzinfo=TZ) + datetime.timedelta(
      minutes=minute, seconds=second)
  return t.strftime("%Y-%m-%d %H:%M:%S %z")


def _record(typ, source, start, end, value, unit, children=""):
  head = (f' <Record type="{typ}" {source} unit="{unit}" creationDate="{end}" startDate="{start}" '
          f'endDate="{end}" value="{value}"')
  return f"{head}>\n{children} </Record>\n" if children else f"{head}/>\n"


def day_records(day: datetime.date, k: int) -> list[str]:
  """One day's records in the type-grouped order of a real export (k varies the values)."""
  out = []
  for m in range(7 * 60, 23 * 60, 2):
    meta = '  <MetadataEntry key="HKMetadataKeyHeartRateMotionContext" value="0"/>\n'
    out.append(_record(f"{HK}HeartRate", WATCH, _stamp(day, m, 17), _stamp(day, m, 17),
                       60 + (m + k) % 40, "count/min", meta))
  for m in range(8 * 60, 13 * 60):
    out.append(_record(f"{HK}StepCount", WATCH, _stamp(day, m), _stamp(day, m + 1),
                       (m * 7 + k) % 120, "count"))
  for m in range(8 * 60, 20 * 60, 5):
    out.append(_record(f"{HK}StepCount", PHONE, _stamp(day, m), _stamp(day, m + 5),
                       (m * 3 + k) % 400, "count"))
  for m in range(7 * 60, 23 * 60):
    out.append(_record(f"{HK}ActiveEnergyBurned", WATCH, _stamp(day, m), _stamp(day, m + 1),
                       round(0.1 + ((m + k) % 50) / 10, 3), "kcal"))
  for m in range(0, 24 * 60, 15):
    out.append(_record(f"{HK}BasalEnergyBurned", WATCH, _stamp(day, m), _stamp(day, m + 15),
                       16.2, "kcal"))
  for m in range(9 * 60, 21 * 60, 150):
    beats = "".join(f'   <InstantaneousBeatsPerMinute bpm="{62 + b % 9}" time="{b}:00.00 AM"/>\n'
                    for b in range(60))
    out.append(_record(f"{HK}HeartRateVariabilitySDNN", WATCH, _stamp(day, m), _stamp(day, m + 1),
                       35 + k % 20, "ms", f"  <HeartRateVariabilityMetadataList>\n{beats}"
                       "  </HeartRateVariabilityMetadataList>\n"))
  for m in range(60, 6 * 60, 12):
    out.append(_record(f"{HK}RespiratoryRate", WATCH, _stamp(day, m), _stamp(day, m + 1),
                       14 + k % 3, "count/min"))
  for i, stage in enumerate(("AsleepCore", "AsleepDeep", "AsleepCore", "AsleepREM") * 2):
    out.append(f' <Record type="HKCategoryTypeIdentifierSleepAnalysis" {WATCH} '
               f'startDate="{_stamp(day, 30 + 40 * i)}" endDate="{_stamp(day, 70 + 40 * i)}" '
               f'value="HKCategoryValueSleepAnalysis{stage}"/>\n')
  return out


def write_export(path: pathlib.Path, *, size_mb: float = 0, days: int = 0, thin: int = 1
                 ) -> tuple[int, int]:
  """Writes days from 2022-01-01 until `size_mb` MB (or `days` days); every `thin`-th record.

  Returns (days, records).
  """
  start = datetime.date(2022, 1, 1)
  n_days = n_records = 0
  with open(path, "w", encoding="utf-8") as f:
    f.write(DTD)
    while (days and n_days < days) or (size_mb and f.tell() < size_mb * 1e6):
      lines = day_records(start + datetime.timedelta(days=n_days), n_days)[::thin]
      f.write("".join(lines))
      n_days += 1
      n_records += len(lines)
    f.write("</HealthData>\n")
  return n_days, n_records


def child(path: str) -> None:
  """Runs in a fresh process: one import, its time and this process's peak RSS as JSON."""
  from lsm2.data.converters import apple_health  # pylint: disable=g-import-not-at-top
  from lsm2.data.converters.common import DayStats  # pylint: disable=g-import-not-at-top
  base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t0 = time.perf_counter()
  export = apple_health.parse_export(pathlib.Path(path), pathlib.Path(path).name)
  t1 = time.perf_counter()
  tl = export.timeline("bench", apple_health.WEAR, DayStats())
  t2 = time.perf_counter()
  print(json.dumps({"records": export.records, "parse_s": t1 - t0, "timeline_s": t2 - t1,
                    "days": tl.num_days, "baseline_rss_mb": base_kb / 1024,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_import(path: pathlib.Path) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True,
                       text=True, check=True, cwd=REPO)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result["bytes"] = path.stat().st_size
  result["records_per_s"] = result["records"] / (result["parse_s"] + result["timeline_s"])
  return result


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size-mb", type=float, default=1024, help="size of the big export (MB)")
  p.add_argument("--no-zip", action="store_true", help="skip the zip measurement")
  p.add_argument("--dir", help="where to write the exports (default: a temporary directory)")
  p.add_argument("--json", help="write the numbers here")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    child(args.child)
    return
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    tmp = pathlib.Path(tmp)
    results = {}
    t0 = time.perf_counter()
    days, records = write_export(tmp / "export.xml", size_mb=args.size_mb)
    print(f"generated {days} days, {records} records, "
          f"{(tmp / 'export.xml').stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s")
    results["big"] = run_import(tmp / "export.xml")
    write_export(tmp / "thin.xml", days=days, thin=4)
    results["thin"] = run_import(tmp / "thin.xml")
    if not args.no_zip:
      with zipfile.ZipFile(tmp / "export.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.write(tmp / "export.xml", "apple_health_export/export.xml")
      (tmp / "export.xml").unlink()
      results["big_zip"] = run_import(tmp / "export.zip")
  for name, r in results.items():
    print(f"{name}: {r['bytes'] / 1e6:.0f} MB, {r['records']} records over {r['days']} days: "
          f"{r['records_per_s']:,.0f} records/s (parse {r['parse_s']:.1f} s, timeline "
          f"{r['timeline_s']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB "
          f"(after imports {r['baseline_rss_mb']:.0f} MB)")
  if args.json:
    flat = {f"{name}_{k}": v for name, r in results.items() for k, v in r.items()}
    pathlib.Path(args.json).write_text(json.dumps(flat, indent=1) + "\n")


if __name__ == "__main__":
  main()
