"""Ahead-of-time compilation for TPU slices (`python -m lsm2.aot`), with the real TPU compiler.

libtpu (from the test extra's jax[tpu]) describes a slice and compiles for it on this CPU
host. The compiles run in child processes (`python -m lsm2.aot`, two at a time); this
process stays on JAX_PLATFORMS=cpu and never loads libtpu.

Kept fast on purpose: the runlocal geometry (30-minute x 2-signal tokens, 624 per
example), batch 8 on a 2x2 v5e slice (2 examples per device) for S, and XLA's
execution-time optimization effort at its minimum (JAX_EXEC_TIME_OPTIMIZATION_EFFORT=-1:
the same program, scheduled with less search; the memory figures move by a few percent).
The paper geometry and batch are benchmarks/aot_table.py's (docs/launching.md). One
compile is at the paper geometry: L at 13 examples per device under FSDP, which fits; the
same batch data parallel does not (17.57 GiB, benchmarks/MEASUREMENTS.md), a second L
compile of several CPU minutes that the suite leaves to benchmarks/aot_table.py.
"""
import concurrent.futures
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from lsm2 import aot
from lsm2 import storage

REPO = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"
DATA = ("--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.batch_size=8")
FSDP = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.batch_size=8")
# L at the paper geometry (3,744 tokens), 13 examples per device: with its float32
# parameters and AdamW moments replicated (3.7 GiB per device) the TPU compiler cannot
# fit the step in a v5e's HBM even by rematerializing (12 per device is the first batch
# it cannot fit); with a quarter of them per device (FSDP) it fits, up to 13 per device.
# benchmarks/MEASUREMENTS.md has the figures (`python benchmarks/aot_table.py`).
L_BATCH = "--config.batch_size=52"
CASES = {  # name: (configs/pretrain.py argument, flags); L_fsdp, the slowest, first.
    "L_fsdp": ("L", ("--config.mesh.data=1", "--config.mesh.fsdp=-1", L_BATCH)),
    "S_data": ("S,runlocal", DATA),
    "S_fsdp": ("S,runlocal", FSDP),
    # XLA attention keeps [heads, 3744, 3744] logits per example: 512 examples per device
    # cannot fit, even for the tiny model.
    "tiny_oom": ("tiny", ("--config.batch_size=2048", "--config.model.attention=xla")),
}

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[test]' installs it through jax[tpu])")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  """{case: (exit status, report, output)} of `python -m lsm2.aot`, two at a time (each
  process peaks near 3 GB of RAM, 4 GB for L_fsdp, and one CPU core)."""
  out = tmp_path_factory.mktemp("aot")
  env = {**os.environ, "JAX_EXEC_TIME_OPTIMIZATION_EFFORT": "-1"}

  def run(name):
    arg, flags = CASES[name]
    cmd = [sys.executable, "-m", "lsm2.aot", f"--config={REPO / 'configs' / 'pretrain.py'}:{arg}",
           f"--topology={TOPOLOGY}", *flags, f"--json={out / name}.json"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
                          check=False)
    path = out / f"{name}.json"
    assert path.exists(), (f"{name}: lsm2.aot wrote no report (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return name, (proc.returncode, json.loads(path.read_text()), proc.stdout + proc.stderr)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(pool.map(run, CASES))


@needs_libtpu
@pytest.mark.slow
def test_s_compiles_and_fits_under_data_parallel_and_fsdp(reports):
  for name in ("S_data", "S_fsdp"):
    status, r, output = reports[name]
    assert status == 0, output[-3000:]
    assert r["topology"] == TOPOLOGY and r["devices"] == 4 and r["chip"] == "v5e"
    assert r["hbm_capacity_bytes"] == int(15.75 * 2**30)  # What libtpu lets a program use.
    # The TPU precision policy and kernel: bfloat16 compute, splash attention.
    assert (r["attention"], r["dtype"]) == ("splash", "bfloat16")
    assert r["fits"] and 0 < r["hbm_bytes_per_device"] < r["hbm_capacity_bytes"]
    assert r["flops_per_step"] > 0.5 * r["model_flops_per_step"]  # The step's work is all there.
    assert r["est_step_s"] > 0 and 0 < r["est_mfu"] <= 1
    assert "HBM per device" in output and "fits" in output
  s_data, s_fsdp = reports["S_data"][1], reports["S_fsdp"][1]
  assert s_data["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert s_fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  # S's parameters and AdamW state (12 bytes a parameter) are its step's arguments: FSDP
  # holds a quarter of them per device (L's test shows what that buys at the limit).
  assert s_data["argument_bytes"] > 12 * 25e6 * 0.9  # Replicated state.
  assert s_fsdp["argument_bytes"] < 0.4 * s_data["argument_bytes"]


@needs_libtpu
@pytest.mark.slow
def test_l_fits_a_v5e_slice_with_fsdp(reports):
  """The paper's L at 13 examples per device on v5e:2x2 fits under FSDP, which holds a
  quarter of the parameters and AdamW state per device: less than the 3.7 GiB that the
  replicated state alone would take of each device's 15.75 GiB."""
  status, fsdp, output = reports["L_fsdp"]
  capacity = int(15.75 * 2**30)
  assert (fsdp["model_size"], fsdp["batch_size"], fsdp["topology"]) == ("L", 52, TOPOLOGY)
  assert (fsdp["attention"], fsdp["dtype"], fsdp["hbm_capacity_bytes"]) == ("splash", "bfloat16",
                                                                            capacity)
  assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert status == 0 and fsdp["fits"], output[-3000:]
  assert 0 < fsdp["hbm_bytes_per_device"] < capacity
  params = 328e6
  assert fsdp["argument_bytes"] < 0.3 * 12 * params
  assert "Knobs" not in output and fsdp["est_step_s"] > 0


@needs_libtpu
@pytest.mark.slow
def test_a_step_that_does_not_fit_exits_1_naming_the_knobs(reports):
  status, r, output = reports["tiny_oom"]
  assert status == 1
  assert not r["fits"] and r["hbm_bytes_per_device"] > r["hbm_capacity_bytes"]
  assert "RESOURCE_EXHAUSTED" in r["compiler_error"]
  assert r["est_step_s"] is None and r["flops_per_step"] is None
  assert "does not fit in 15.75 GiB per device" in output
  for knob in ("--config.batch_size (now 2048, 512 per device)", "--config.model.remat",
               "--config.mesh.fsdp=-1", "--config.model.attention=splash"):
    assert knob in output


@needs_libtpu
def test_the_test_process_never_loads_libtpu():
  """The CPU suite runs with libtpu installed: JAX stays on the CPU and never maps it."""
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.default_backend() == "cpu"
  maps = pathlib.Path("/proc/self/maps")
  if not maps.exists():
    pytest.skip("no /proc/self/maps on this OS")
  assert "libtpu" not in maps.read_text()


class _Device:
  def __init__(self, kind, coords):
    self.device_kind, self.coords = kind, coords


def test_device_specs():
  """One JAX device per chip; the usable HBM is the compiler's limit, below the nominal."""
  v5e = [_Device("TPU v5 lite", (x, y, 0)) for x in range(2) for y in range(2)]
  spec = aot.device_spec(v5e)
  assert spec == aot.CHIPS["TPU v5 lite"] and spec.capacity_bytes == int(15.75 * 2**30)
  v4 = [_Device("TPU v4", (x, y, 0)) for x in range(2) for y in range(2) for _ in range(2)]
  with pytest.raises(ValueError, match="one device per TensorCore"):
    aot.device_spec(v4)
  with pytest.raises(ValueError, match="no chip spec for device kind 'TPU v9'"):
    aot.device_spec([_Device("TPU v9", (0, 0, 0))])


def test_splash_flops_count_every_padded_tile():
  from lsm2.model.config import get_model_config  # pylint: disable=g-import-not-at-top
  cfg = get_model_config("S")  # 3,744 tokens, 2,262 kept: padded to 3,840 and 2,304.
  per_example = 12 * 2 * 2304**2 * 384 + 4 * 2 * 3840**2 * 256
  assert aot.splash_flops(cfg, 2262, 8) == 8 * 9 * per_example


@pytest.mark.slow  # Two interpreter starts (~15 s each alone), in parallel.
def test_unusable_arguments_are_one_error_line_before_any_compile(tmp_path):
  """An empty --topology (libtpu's default would be a TPU v2) and a --json that cannot be
  written are refused up front, as one `lsm2: error:` line, not a traceback after the compile."""
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  config = f"--config={REPO / 'configs' / 'pretrain.py'}:tiny,runlocal"
  cases = {
      "--topology=": "--topology='' is empty: name the TPU slice, expected e.g. 'v5e:2x2'",
      f"--json={blocker}/r.json": f"--json={blocker}/r.json: its directory {blocker}: cannot "
                                  "write to it",
  }

  def run(arg):
    topology = [] if arg.startswith("--topology") else [f"--topology={TOPOLOGY}"]
    return subprocess.run([sys.executable, "-m", "lsm2.aot", config, *topology, arg], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = dict(zip(cases, pool.map(run, cases)))
  for arg, proc in results.items():
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lsm2: error: ")]
    assert len(errors) == 1 and cases[arg] in errors[0], proc.stderr[-3000:]
  assert list(tmp_path.iterdir()) == [blocker]


def test_an_existing_directory_is_not_a_json_path(tmp_path):
  with pytest.raises(storage.StorageError, match=f"--json={tmp_path} is a directory"):
    aot.check_json_path(str(tmp_path))
