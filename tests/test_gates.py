"""The performance gates fail, naming the figure, when a hot path is slowed on purpose."""
import json
import pathlib
import subprocess
import sys

import pytest

GATES = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gates.py"


def _gates(tmp_path, *args):
  out = tmp_path / "gates.json"
  proc = subprocess.run([sys.executable, str(GATES),
                         "--json", str(out), *args], capture_output=True, text=True, timeout=600)
  return proc, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("figure,seconds", [
    ("decode_speed_vs_copy", 0.002),  # 2 ms per record: what protobuf 6 cost, and more.
    ("pipeline_cpu_us_per_record", 0.002),  # CPU time burnt, so the CPU-time figure sees it.
])
def test_a_slowed_hot_path_fails_its_gate(tmp_path, figure, seconds):
  proc, figures = _gates(tmp_path, "--only", figure, "--slow-down", f"{figure}={seconds}")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert list(figures) == [figure] and not figures[figure]["passed"]
  assert f"FAIL {figure}" in proc.stdout and f"failed: {figure}" in proc.stdout


def test_an_unknown_figure_is_refused(tmp_path):
  proc = subprocess.run([sys.executable, str(GATES),
                         "--only", "decode_speed"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "unknown figure 'decode_speed'" in proc.stderr
