"""Named-channel inputs: DataFrames and dicts placed at a model's channels by name."""
import logging

import numpy as np
import pandas as pd
import pytest

import lsm2
from lsm2 import errors
from lsm2.data import channels as channels_lib
from lsm2.data import dataset
from lsm2.data import named
from tiny_checkpoint import tiny_pretrained

DAYS = ["2024-01-01", "2024-01-02", "2024-01-04"]  # A gap day without data gets no row.
# Input column -> model channel: exact names, a registry alias, an Apple identifier, any case.
COLUMNS = {"heart_rate": "hr", "HKQuantityTypeIdentifierStepCount": "steps",
           "Wrist Temperatures": "wrist_temperatures", "eda_level_real": "eda_level_real"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  workdir, data = tiny_pretrained(tmp_path_factory.getbasetemp())
  model = lsm2.load(workdir)
  raw = dataset.read_split(data, "train", normalize=False, limit=len(DAYS))
  return model, raw["signals"], raw["observed"]


def _frame(signals, observed, model, extra=None):
  """The DAYS as a minute DataFrame with the COLUMNS (NaN where unobserved), plus `extra` columns."""
  index = pd.DatetimeIndex(np.concatenate([
      np.datetime64(d, "m") + np.arange(1440) for d in DAYS]))
  cols = {}
  for name, channel in COLUMNS.items():
    c = model.channel_names.index(channel)
    cols[name] = np.where(observed[..., c], signals[..., c], np.nan).reshape(-1)
  cols.update(extra or {})
  return pd.DataFrame(cols, index=index)


def _array_path(signals, observed, model, seed=0):
  """The same layout as arrays: only the COLUMNS' channels observed, junk everywhere else."""
  used = np.isin(model.channel_names, list(COLUMNS.values()))
  junk = np.random.default_rng(seed).normal(0, 1e3, signals.shape).astype(np.float32)
  keep = observed & used
  return np.where(keep, signals, junk), keep


def test_dataframe_embedding_equals_the_array_path(setup, caplog):
  model, signals, observed = setup
  df = _frame(signals, observed, model, extra={
      "blood_glucose": np.ones(len(DAYS) * 1440), "active_energy": np.ones(len(DAYS) * 1440)})
  with caplog.at_level(logging.WARNING):
    out = model.embed(df)
  assert isinstance(out, pd.DataFrame) and out.shape == (len(DAYS), model.model_cfg.enc_width)
  assert [d.date().isoformat() for d in out.index] == DAYS
  arrays, keep = _array_path(signals, observed, model)
  np.testing.assert_array_equal(out.to_numpy(), model.embed(arrays, keep))
  # Absent channels are masked: other junk there changes nothing.
  arrays2, keep2 = _array_path(signals, observed, model, seed=1)
  np.testing.assert_array_equal(model.embed(arrays2, keep2), out.to_numpy())
  report = model.last_channel_report
  assert report.used == COLUMNS
  assert report.ignored == {
      "blood_glucose": "unknown channel name (not in the registry or its aliases)",
      "active_energy": "registry channel 'active_energy', not a channel of this model"}
  assert set(report.unobserved) == set(model.channel_names) - set(COLUMNS.values())
  assert "blood_glucose (unknown channel name" in caplog.text
  assert model.match_channels(df.columns).used == COLUMNS


def test_dict_input_and_named_reconstruct(setup):
  model, signals, observed = setup
  arrays, keep = _array_path(signals, observed, model)
  data = {name: np.where(observed[..., model.channel_names.index(c)],
                         signals[..., model.channel_names.index(c)], np.nan)
          for name, c in COLUMNS.items()}
  np.testing.assert_array_equal(model.embed(data), model.embed(arrays, keep))
  one_day = model.embed({n: v[1] for n, v in data.items()})
  np.testing.assert_allclose(one_day, model.embed(arrays[1], keep[1]), rtol=1e-5, atol=1e-6)

  filled = model.reconstruct(data)
  expected = model.reconstruct(arrays, keep)
  assert set(filled) == set(model.channel_names)
  for i, c in enumerate(model.channel_names):
    np.testing.assert_array_equal(filled[c], expected[..., i])
  frame = model.reconstruct(_frame(signals, observed, model))
  assert list(frame.columns) == list(model.channel_names) and len(frame) == len(DAYS) * 1440
  assert frame.index[1440] == pd.Timestamp("2024-01-02 00:00")
  np.testing.assert_array_equal(frame.to_numpy().reshape(expected.shape), expected)

  hr = model.channel_names.index("hr")
  mask = observed[..., hr] & (np.arange(1440) % 3 == 0)
  hidden = model.reconstruct(data, mask={"heart_rate": mask})
  full_mask = np.zeros_like(keep)
  full_mask[..., hr] = mask
  np.testing.assert_array_equal(hidden["hr"], model.reconstruct(arrays, keep, full_mask)[..., hr])


def test_names_that_collide_or_fit_nothing_are_errors(setup):
  model, _, _ = setup
  day = np.zeros(1440)
  with pytest.raises(ValueError, match="inputs 'hr' and 'Heart Rate' both name model channel 'hr'"):
    model.embed({"hr": day, "Heart Rate": day})
  with pytest.raises(ValueError, match="no input names a channel of this model"):
    model.embed({"glucose": day})
  with pytest.raises(ValueError, match="pass observed=None"):
    model.embed({"hr": day}, np.ones((1440, 1), bool))


def test_dataframe_placement_by_wall_clock():
  channels = tuple(channels_lib.get_channel(n) for n in ("hr", "steps"))
  index = pd.DatetimeIndex(["2024-03-10 01:59:20", "2024-03-10 01:59:50", "2024-03-10 03:00:10"],
                           tz="America/Los_Angeles")
  df = pd.DataFrame({"bpm": [60.0, 70.0, 80.0], "note": ["a", "b", "c"]}, index=index)
  placed = named.place(df, channels)
  assert placed.report.days == ("2024-03-10",) and placed.report.unobserved == ("steps",)
  assert placed.report.ignored == {"note": "unknown channel name (not in the registry or its aliases)"}
  hr = placed.signals[0, :, 0]
  assert hr[119] == 65.0 and hr[180] == 80.0 and np.isfinite(hr).sum() == 2
  assert not placed.observed[..., 1].any()
  with pytest.raises(ValueError, match="needs a DatetimeIndex"):
    named.place(df.reset_index(drop=True), channels)
  with pytest.raises(ValueError, match="column 'bpm' holds non-numeric value 'x'"):
    named.place(df.assign(bpm=["x", "1", "2"]), channels)


def test_values_outside_the_valid_range_are_unobserved_and_counted(setup, caplog):
  """hr 1e6 or -50 (valid 25..220 bpm) is masked as pretraining data masks it, with a warning."""
  model, signals, observed = setup
  hr = model.channel_names.index("hr")
  valid = model.config["channels"][hr]
  assert (valid["valid_min"], valid["valid_max"]) == (25.0, 220.0)
  day = np.where(observed[0, :, hr], signals[0, :, hr], np.nan)
  at = np.flatnonzero(np.isfinite(day))[:2]
  bad = day.copy()
  bad[at] = [1e6, -50.0]
  masked = day.copy()
  masked[at] = np.nan
  with caplog.at_level(logging.WARNING):
    out = model.embed({"heart_rate": bad})
  np.testing.assert_array_equal(out, model.embed({"heart_rate": masked}))
  assert model.last_channel_report.out_of_range == {}  # Of the last call, the NaN one.
  model.embed({"heart_rate": bad})
  assert model.last_channel_report.out_of_range == {"heart_rate": 2}
  assert "valid range (unobserved, masked): heart_rate 2 (of hr)" in caplog.text
  filled = model.reconstruct({"heart_rate": bad})["hr"]
  assert not np.isin(filled[at], [1e6, -50.0]).any()  # Filled in, not passed through.


def test_an_out_of_range_reading_is_dropped_before_its_minute_is_averaged():
  channels = tuple(channels_lib.get_channel(n) for n in ("hr", "steps"))
  index = pd.DatetimeIndex(["2024-01-01 08:00:10", "2024-01-01 08:00:40", "2024-01-01 08:01:00",
                            "2024-01-01 08:02:00"])
  df = pd.DataFrame({"hr": [60.0, 1e6, -50.0, 70.0], "steps": [10.0, 10.0, 301.0, np.inf]},
                    index=index)
  placed = named.place(df, channels)
  assert placed.report.out_of_range == {"hr": 2, "steps": 1}  # inf is unobserved, not counted.
  np.testing.assert_array_equal(placed.signals[0, 480:483, 0], [60.0, np.nan, 70.0])
  np.testing.assert_array_equal(placed.observed[0, 480:483, 1], [True, False, False])
  assert df["hr"].tolist() == [60.0, 1e6, -50.0, 70.0]  # The caller's frame is untouched.


@pytest.mark.parametrize("freq, spacing", [("D", "1 days 00:00:00"), ("h", "0 days 01:00:00"),
                                           ("2min", "0 days 00:02:00")])
def test_a_frame_coarser_than_minutes_is_refused_naming_the_spacing(freq, spacing):
  channels = (channels_lib.get_channel("steps"),)
  daily = pd.DataFrame({"steps": [100.0, 120.0, 90.0]},
                       index=pd.date_range("2024-01-01", periods=3, freq=freq))
  with pytest.raises(named.NamedInputError,
                     match=rf"rows are at least {spacing} apart \(e\.g\. 2024-01-01 00:00:00 and ") as e:
    named.place(daily, channels)
  assert isinstance(e.value, errors.Error)
  # Sparse minute readings stated as minutes (the message's way out) are placed as they are.
  placed = named.place(daily.resample("min").mean(), channels)
  assert np.count_nonzero(placed.observed) == 3
