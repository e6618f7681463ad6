"""Per-interval throughput, MFU, time split and memory of the training loop (perf/ scalars)."""
import logging
import pathlib
import time
import types

import jax
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

from lsm2 import aot
from lsm2 import chips
from lsm2 import config_files
from lsm2.data import metadata as metadata_lib
from lsm2.data import pipeline
from lsm2.data import synthesize
from lsm2.model import flops as flops_lib
from lsm2.model.config import get_model_config
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
  return config


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def _train(config, workdir):
  """Trains; returns the perf/ scalars per step from the TensorBoard events, and the log."""
  handler, root = _Lines(), logging.getLogger()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  scalars = {tag: {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
             for tag in acc.Tags()["tensors"] if tag.startswith("perf/")}
  return scalars, handler.lines


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
  return _train(small_config(data_dir), tmp_path_factory.mktemp("baseline"))


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
  logged = [line for line in lines if line.startswith(f"step {STEPS}/{STEPS}  loss")]
  assert len(logged) == 1
  for part in ("examples (days)/s", "tokens/s", "visible)", "model TFLOP/s/device",
               "of a measured CPU peak", "input wait", "step ", "host "):
    assert part in logged[0], (part, logged[0])


def test_a_slow_input_pipeline_is_input_wait_not_step_time(data_dir, baseline, tmp_path,
                                                            monkeypatch):
  """A test-only delay in the input moves the input-wait fraction up; the step stays."""
  base, _ = baseline
  base_step = base["perf/step_s"][STEPS]  # The second interval: compiled, warm.
  delay = 2 * base_step + 0.05
  to_global_batch = pipeline.to_global_batch

  def slow(*args, **kwargs):
    time.sleep(delay)
    return to_global_batch(*args, **kwargs)
  monkeypatch.setattr(pipeline, "to_global_batch", slow)
  slowed, _ = _train(small_config(data_dir), tmp_path / "slow")
  assert slowed["perf/input_wait_s"][STEPS] >= LOG_EVERY * delay
  assert slowed["perf/input_wait_fraction"][STEPS] > 0.5
  assert slowed["perf/input_wait_fraction"][STEPS] > base["perf/input_wait_fraction"][STEPS] + 0.3
  assert slowed["perf/step_s"][STEPS] < 2 * base_step + 0.02


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
