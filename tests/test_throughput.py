"""What a run reports about its devices: per-interval throughput, MFU, time split and memory
(perf/ scalars), slow steps, the goodput summary (WORKDIR/goodput.json) and the profiler's
trace of a window of steps."""
import json
import logging
import pathlib
import re
import time
import types

import jax
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

from lsm2 import aot
from lsm2 import chips
from lsm2 import config_files
from lsm2 import storage
from lsm2.data import metadata as metadata_lib
from lsm2.data import pipeline
from lsm2.data import synthesize
from lsm2.model import flops as flops_lib
from lsm2.model.config import get_model_config
from lsm2.train import run_dir
from lsm2.train import throughput
from lsm2.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY = 6, 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("data") / "synth"
  synthesize.write_synthetic_dataset(out, subjects=12, days=2, seed=0,
                                     split_fractions=(0.75, 0.25, 0.0))
  return out


def small_config(data_dir):
  config = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny,aim,runlocal")
  with config.unlocked():
    config.data.dir, config.data.synthesize_subjects = str(data_dir), 0
    # 60-minute x 2-signal tokens (312): a fast compile.
    config.model.patch_time, config.model.patch_channels, config.masking.time_bars = 60, 2, 10
    config.batch_size, config.total_steps, config.log_every = 8, STEPS, LOG_EVERY
    config.checkpoint_every, config.eval_every, config.eval_batches = LOG_EVERY, LOG_EVERY, 1
    # Steps 2-4 make the median, 5 and 6 are judged; 10x: no false alarm on a busy host.
    config.perf.slow_step_warmup, config.perf.slow_step_factor = 1, 10.0
  return config


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def _train(config, workdir):
  """Trains; returns the perf/ scalars per step from the TensorBoard events, and the log
  (its last line: the seconds train_and_evaluate took, by the test's clock)."""
  handler, root = _Lines(), logging.getLogger()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  start = time.time()
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
  handler.lines.append(time.time() - start)
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  scalars = {tag: {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
             for tag in acc.Tags()["tensors"] if tag.startswith("perf/")}
  return scalars, handler.lines


PROFILED = (2, 3)  # The baseline traces these steps.


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("baseline")


@pytest.fixture(scope="module")
def baseline(data_dir, baseline_dir):
  config = small_config(data_dir)
  with config.unlocked():
    config.profile_start_step, config.profile_steps = PROFILED[0], len(PROFILED)
  return _train(config, baseline_dir)


def _slowed(iterator, delay):
  """`iterator` with its next() delayed by delay(n) seconds on the n-th call (1-based); still
  of its Grain class, which the checkpoint's iterator handler looks at."""
  cls, calls = type(iterator), [0]

  class Slowed(cls):
    def __next__(self):
      calls[0] += 1
      time.sleep(delay(calls[0]))
      return cls.__next__(self)
  iterator.__class__ = Slowed
  return iterator


def test_logged_flops_are_the_compiled_steps_and_lsm2_aots(data_dir, baseline):
  """Known answer: the FLOPs the loop logs are those of the compiled step's cost analysis
  (all devices, as lsm2.aot's flops_per_step) and lsm2.model.flops.step_flops (aot's
  model_flops_per_step) for the same config."""
  scalars, _ = baseline
  config = small_config(data_dir)
  channels = len(metadata_lib.load_metadata(config.data.dir).channels)
  devices = jax.devices()
  lowered, setup, _ = aot.lower_train_step(config, devices, channels)
  per_device = lowered.compile().cost_analysis()["flops"]
  n_keep = setup.model_cfg.num_tokens - setup.mask_cfg.n_drop
  model = flops_lib.step_flops(setup.model_cfg, n_keep, config.batch_size)
  assert per_device > 0 and setup.model_cfg.attention != "splash"
  for step in (LOG_EVERY, STEPS):  # Stored as float32 in the events.
    assert scalars["perf/flops_per_step"][step] == pytest.approx(per_device * len(devices),
                                                                 rel=1e-6)
    assert scalars["perf/model_flops_per_step"][step] == pytest.approx(model, rel=1e-6)


def test_splash_kernels_are_added_to_the_cost_analysis():
  """XLA cannot see Pallas kernels: their FLOPs are added per device, as lsm2.aot does."""
  cfg = get_model_config("S", attention="splash")
  compiled = types.SimpleNamespace(cost_analysis=lambda: {"flops": 1e9})
  got = throughput.step_flops(compiled, cfg, 2262, batch_size=8, num_devices=4)
  assert got.compiled == pytest.approx(4e9 + aot.splash_flops(cfg, 2262, 8))
  assert got.model == flops_lib.step_flops(cfg, 2262, 8)


def test_perf_scalars_are_in_tensorboard_and_the_log_line(baseline):
  scalars, lines = baseline
  expected = {"perf/examples_per_s", "perf/tokens_per_s", "perf/visible_tokens_per_s",
              "perf/flops_per_step", "perf/model_flops_per_step",
              "perf/model_tflops_per_device", "perf/compiled_tflops_per_device", "perf/mfu",
              "perf/input_wait_s", "perf/input_wait_fraction", "perf/step_s",
              "perf/checkpoint_s", "perf/eval_s", "perf/host_rss_gib"}
  assert expected <= set(scalars)
  assert all(set(scalars[tag]) == {LOG_EVERY, STEPS} for tag in expected)
  assert "perf/device_gib" not in scalars  # CPU devices report no memory stats.
  tokens = 312  # 24 hours x 13 channel pairs; the visible ones are those kept.
  for step in (LOG_EVERY, STEPS):
    at = {tag: values[step] for tag, values in scalars.items()}
    assert at["perf/tokens_per_s"] == pytest.approx(at["perf/examples_per_s"] * tokens, rel=1e-5)
    assert 0 < at["perf/visible_tokens_per_s"] < at["perf/tokens_per_s"]
    assert 0 < at["perf/mfu"] < 1 and at["perf/step_s"] > 0
    assert 0 < at["perf/host_rss_gib"] < 64
  # The validation and the checkpoint save at step 3 fall in the second interval.
  assert scalars["perf/checkpoint_s"][STEPS] > 0 and scalars["perf/eval_s"][STEPS] > 0
  logged = [line for line in lines if str(line).startswith(f"step {STEPS}/{STEPS}  loss")]
  assert len(logged) == 1
  for part in ("examples (days)/s", "tokens/s", "visible)", "model TFLOP/s/device",
               "of a measured CPU peak", "input wait", "step ", "host "):
    assert part in logged[0], (part, logged[0])


STALLED = 5  # The slowed run's one long input stall.


def test_a_slow_input_pipeline_is_input_wait_not_step_time(data_dir, baseline, tmp_path,
                                                            monkeypatch):
  """A test-only delay in the input moves the input-wait fraction up; the step stays.
  One far longer stall (step STALLED) is the one slow step logged, named an input stall;
  the steady delay of the others is no anomaly."""
  base, base_lines = baseline
  base_step = base["perf/step_s"][STEPS]  # The second interval: compiled, warm.
  delay = 2 * base_step + 0.05
  # The median is about delay + a step, which damps the host's noise: the default factor.
  stall = 5 * (delay + base_step) + 0.3
  make = pipeline.make_train_iterator
  monkeypatch.setattr(pipeline, "make_train_iterator", lambda *a, **k: _slowed(
      make(*a, **k), lambda n: stall if n == STALLED else delay))
  config = small_config(data_dir)
  with config.unlocked():
    config.perf.slow_step_factor = 3.0
  slowed, lines = _train(config, tmp_path / "slow")
  assert slowed["perf/input_wait_s"][STEPS] >= LOG_EVERY * delay
  assert slowed["perf/input_wait_fraction"][STEPS] > 0.5
  assert slowed["perf/input_wait_fraction"][STEPS] > base["perf/input_wait_fraction"][STEPS] + 0.3
  # The step itself stays (STALLED's interval is the second: compare the first's).
  assert slowed["perf/step_s"][LOG_EVERY] < 2 * base["perf/step_s"][LOG_EVERY] + 0.02

  slow = [line for line in lines if isinstance(line, str) and line.startswith("Slow step")]
  assert len(slow) == 1, slow
  match = re.fullmatch(r"Slow step (\d+): ([\d.]+) s, [\d.]+x the running median ([\d.]+) s; "
                       r"it overlapped an input stall \(([\d.]+) s waiting for the batch\)\.",
                       slow[0])
  assert match, slow[0]
  step, took, median, waited = int(match[1]), *map(float, match.group(2, 3, 4))
  assert step == STALLED and waited >= stall and took >= waited and median < took / 3
  assert not any(isinstance(line, str) and line.startswith("Slow step") for line in base_lines)
  assert not (tmp_path / "slow" / "profile").exists()  # profile_steps=0: no trace.
  goodput = json.loads((tmp_path / "slow" / run_dir.GOODPUT_FILE).read_text())
  assert goodput["attempts"][0]["slow_steps"] == 1
  assert goodput["attempts"][0]["input_wait_s"] >= stall + (STEPS - 1) * delay


def test_goodput_parts_add_up_to_the_wall_time(baseline, baseline_dir):
  """goodput.json's one attempt: every part measured (none negative, so none counted
  twice), the parts sum to its wall time, which is the time the run took by the test's
  own clock; the log says so too."""
  _, lines = baseline
  took = lines[-1]
  goodput = json.loads((baseline_dir / run_dir.GOODPUT_FILE).read_text())
  (attempt,) = goodput["attempts"]
  assert attempt["status"] == "finished" and attempt["attempt"] == 1
  assert (attempt["start_step"], attempt["last_step"], attempt["last_saved"]) == (0, STEPS, STEPS)
  assert attempt["repeated_steps"] == 0 and attempt["restart_lost_s"] == 0
  parts = [key for key, _ in throughput.GOODPUT_PARTS]
  for key in ("productive_s", "compile_s", "checkpoint_s", "eval_s", "other_s"):
    assert attempt[key] > 0, (key, attempt)
  assert attempt["input_wait_s"] >= 0
  assert sum(attempt[key] for key in parts) == pytest.approx(attempt["wall_s"], rel=1e-9)
  assert sum(attempt["fractions"].values()) == pytest.approx(1.0)
  assert attempt["wall_s"] == pytest.approx(took, abs=0.5)
  assert attempt["measured_steps"] == STEPS - 1  # The first step is compilation's.
  assert goodput["totals"]["wall_s"] == attempt["wall_s"]
  logged = [line for line in lines if isinstance(line, str) and line.startswith("Goodput")]
  assert len(logged) == 2 and logged[0].startswith("Goodput of attempt 1 (steps 0..6, finished)")
  assert logged[1].startswith("Goodput of all 1 attempt(s), 0 step(s) repeated after restarts")
  assert all("productive steps" in line and "validation" in line for line in logged)


def test_goodput_counts_the_steps_a_restart_repeated():
  """Known answer: attempt 1 reached step 30 (its last record) and was killed; attempt 2
  resumed from the checkpoint of step 20, so 10 steps were computed twice."""
  def attempt(start, last, wall, status):
    return {"status": status, "started": 0.0, "wall_s": wall, "start_step": start,
            "last_step": last, "last_saved": 20, "step_s": 30.0, "measured_steps": 30,
            "compile_s": 5.0, "input_wait_s": 1.0, "checkpoint_s": 2.0, "eval_s": 1.0,
            "slow_steps": 0}
  summary = throughput.goodput_summary([attempt(0, 30, 50.0, "running"),
                                        attempt(20, 40, 30.0, "finished")])
  first, second = summary["attempts"]
  assert first["status"] == "killed" and second["status"] == "finished"
  assert (first["repeated_steps"], first["restart_lost_s"], first["productive_s"]) == (10, 10.0, 20.0)
  assert first["other_s"] == pytest.approx(50.0 - 39.0)
  assert second["repeated_steps"] == 0 and second["productive_s"] == 30.0
  assert summary["totals"]["repeated_steps"] == 10 and summary["totals"]["wall_s"] == 80.0
  assert summary["totals"]["fractions"]["restart_lost_s"] == pytest.approx(10 / 80)


def test_the_goodput_history_round_trips_and_a_damaged_one_is_replaced(tmp_path, caplog):
  """goodput.json is a report: a damaged one costs the earlier attempts' records, with a
  warning naming it, never the run."""
  workdir = storage.as_path(tmp_path)
  assert run_dir.read_attempts(workdir) == []
  entry = {"status": "running", "started": 1.0, "wall_s": 9.0, "start_step": 0, "last_step": 5,
           "last_saved": None, "step_s": 4.0, "measured_steps": 4, "compile_s": 3.0,
           "input_wait_s": 0.5, "checkpoint_s": 0.0, "eval_s": 0.0, "slow_steps": 0}
  summary = throughput.goodput_summary([entry])
  run_dir.write_goodput(workdir, summary)
  assert run_dir.read_attempts(workdir) == summary["attempts"]
  assert throughput.goodput_summary(run_dir.read_attempts(workdir)) == summary
  for damaged in ("{", '{"attempts": 3}', '{"attempts": [{"start_step": "x"}]}'):
    (tmp_path / run_dir.GOODPUT_FILE).write_text(damaged)
    caplog.clear()
    assert run_dir.read_attempts(workdir) == []
    assert f"{tmp_path / run_dir.GOODPUT_FILE} is not a goodput history" in caplog.text


def test_the_profiler_traces_the_requested_steps_only(baseline, baseline_dir):
  """profile_start_step=2, profile_steps=2: one trace under WORKDIR/profile, holding the
  train-step markers of steps 2 and 3 and no other."""
  traces = list((baseline_dir / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1, traces
  data = jax.profiler.ProfileData.from_file(str(traces[0]))
  steps = {dict(event.stats)["step_num"] for plane in data.planes for line in plane.lines
           for event in line.events if event.name == "train"}
  assert steps == set(PROFILED)


@pytest.mark.parametrize("overrides,message", [
    ({"perf.slow_step_factor": 1.0}, "config.perf.slow_step_factor=1.0 must be a finite number > 1"),
    ({"perf.slow_step_warmup": 0}, "config.perf.slow_step_warmup=0 must be >= 1"),
    ({"profile_steps": -1}, "config.profile_steps=-1 must be >= 0"),
    ({"profile_steps": 2, "profile_start_step": 6},
     r"traces steps 6..7: they must lie in 1..config.total_steps=6"),
    ({"profile_steps": 2, "profile_start_step": 0}, r"traces steps 0..1"),
])
def test_perf_and_profile_settings_are_validated(data_dir, tmp_path, overrides, message):
  config = small_config(data_dir)
  with config.unlocked():
    config.update_from_flattened_dict(overrides)
  with pytest.raises(train.errors.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w" / run_dir.GOODPUT_FILE).exists()


def test_peaks_come_from_the_chip_table_or_a_measured_cpu_matmul():
  h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3",
                               process_index=0)
  assert throughput.devices_peak([h100] * 8) == (8 * 989e12, "of the h100-sxm bf16 peak")
  assert throughput.devices_peak([types.SimpleNamespace(
      platform="gpu", device_kind="NVIDIA B300", process_index=0)])[0] is None
  assert chips.CHIPS["TPU v5 lite"].peak_bf16_flops == 197e12
  start = time.perf_counter()
  peak, label = throughput.devices_peak(jax.devices())  # 8 fake devices, one host.
  assert time.perf_counter() - start < 5
  assert 1e8 < peak < 1e14 and label.startswith("of a measured CPU peak")


def test_device_memory_is_the_fullest_devices_where_reported():
  stats = lambda used, peak: types.SimpleNamespace(
      memory_stats=lambda: {"bytes_in_use": used, "peak_bytes_in_use": peak})
  assert throughput.device_memory_bytes([stats(1, 5), stats(3, 4)]) == (3, 5)
  assert throughput.device_memory_bytes(jax.devices()) is None  # CPU.
