"""Device-subset robustness: the same model probed on the channels of a named device profile."""
import numpy as np
import pytest

from lsm2 import config_files
from lsm2.data import channels as channels_lib
from lsm2.eval import robustness
from lsm2.eval import run
from tiny_checkpoint import REPO, tiny_pretrained

NAMES = tuple(c.name for c in channels_lib.DEFAULT_CHANNELS)
GROUPS = tuple(c.group for c in channels_lib.DEFAULT_CHANNELS)


def test_device_profile_keeps_only_its_channels():
  conds, notes = robustness.conditions(GROUPS, groups=False, segments=False, channel_names=NAMES,
                                       device_profiles=("apple_watch_basic", "actiwatch"))
  assert [name for name, _ in conds] == ["device:apple_watch_basic(hr+steps)"]
  assert notes == ["device subset actiwatch (activity): the model's channels "
                   f"{list(NAMES)} include none of them"]
  observed = np.random.default_rng(0).random((2, 1440, len(NAMES))) < 0.7
  reduced = conds[0][1](observed)
  kept = [NAMES.index("hr"), NAMES.index("steps")]
  np.testing.assert_array_equal(reduced[..., kept], observed[..., kept])
  assert not np.delete(reduced, kept, axis=2).any()
  # Model channels match profiles by alias too; a profile holding every channel is skipped.
  conds, notes = robustness.conditions(("ppg", "accel", "other"), groups=False, segments=False,
                                       channel_names=("heart_rate", "StepCount", "glucose"),
                                       device_profiles=("apple_watch_basic", "phone"))
  assert [name for name, _ in conds] == ["device:apple_watch_basic(heart_rate+StepCount)",
                                         "device:phone(StepCount)"]
  _, notes = robustness.conditions(("ppg", "accel"), groups=False, segments=False,
                                   channel_names=("hr", "steps"), device_profiles=("apple_watch",))
  assert "include all of them" in notes[0]


def _config(workdir):
  config = config_files.load_config(REPO / "configs" / "eval.py", "synthetic")
  with config.unlocked():
    config.init_from = str(workdir)
    config.probe.labels = ("hypertension",)
    config.probe.levels = ("day",)
    config.probe.steps = 20
    config.few_shot.k = 0
    config.windows.enabled = False
    config.generative.enabled = False
    config.robustness.sensor_groups = False
    config.robustness.time_segments = False
    config.robustness.missingness_buckets = False
    # Random imputation to 80% has nothing left to hide when 2 of 26 channels are observed.
    config.robustness.generative_task = "temporal_interpolation_60min"
    config.plots.enabled = False
  return config


def test_unknown_profile_fails_before_anything_runs(tmp_path):
  config = _config(tmp_path / "nowhere")
  with config.unlocked():
    config.robustness.device_profiles = ("pebble",)
  with pytest.raises(ValueError, match="config.robustness.device_profiles: unknown device "
                                       "profile 'pebble'; known profiles: apple_watch_basic"):
    run.validate_config(config)


@pytest.mark.slow  # One small evaluation of the tiny checkpoint.
def test_evaluation_reports_the_device_subset(tmp_path_factory):
  workdir, _ = tiny_pretrained(tmp_path_factory.getbasetemp())
  out = tmp_path_factory.mktemp("device_eval")
  records = run.evaluate(_config(workdir), out)
  device = "device:apple_watch_basic(hr+steps)"
  probe = {r["masking"]: r for r in records if r["task"] == "hypertension"
           and r["method"] == "linear_probe" and r["metric"] == "auroc"}
  assert set(probe) == {"natural", device}
  assert probe[device]["n"] == probe["natural"]["n"]
  mse = [r for r in records if r["task"] == "temporal_interpolation_60min" and r["masking"] == device
         and r["method"] == "model" and r["metric"] == "mse"]
  assert len(mse) == 1 and np.isfinite(mse[0]["value"])
  assert device in (out / "results.md").read_text()
