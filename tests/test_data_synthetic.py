"""Synthetic data: determinism, splits, train-only statistics, missingness and label mechanisms."""
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from lsm2.data import dataset, metadata, synthetic
from lsm2.data.channels import DEFAULT_CHANNELS
from lsm2.data import synthesize
from lsm2.data.synthesize import ensure_synthetic_dataset, write_synthetic_dataset

CH = synthetic.CHANNEL_INDEX


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth")
  write_synthetic_dataset(out, subjects=6, days=3, seed=11)
  return out


@pytest.fixture(scope="module")
def population():
  """60 subjects x 4 days, generated in memory."""
  return [synthetic.generate_subject(5, i, 4) for i in range(60)]


def test_generator_is_deterministic_per_seed_and_subject():
  t1, a = synthetic.generate_subject(3, 7, 2)
  t2, b = synthetic.generate_subject(3, 7, 2)
  _, c = synthetic.generate_subject(4, 7, 2)
  assert t1 == t2
  for x, y in zip(a, b):
    assert x.signals.tobytes() == y.signals.tobytes() and np.array_equal(x.observed, y.observed)
    bx, by = x.labels.pop("activity_bouts"), y.labels.pop("activity_bouts")
    assert (x.subject_id, x.day, x.labels) == (y.subject_id, y.day, y.labels)
    assert bx.tobytes() == by.tobytes()
  assert a[0].signals.tobytes() != c[0].signals.tobytes()


def test_written_datasets_are_identical_for_a_seed(synth_dir, tmp_path):
  again = tmp_path / "again"
  write_synthetic_dataset(again, subjects=6, days=3, seed=11)
  for f in sorted(synth_dir.iterdir()):
    assert (again / f.name).read_bytes() == f.read_bytes(), f.name


def test_records_are_well_formed(population):
  lo = np.array([c.valid_min for c in DEFAULT_CHANNELS])
  hi = np.array([c.valid_max for c in DEFAULT_CHANNELS])
  for _, recs in population[:10]:
    for r in recs:
      assert r.signals.shape == (1440, 26) and r.signals.dtype == np.float32
      assert np.all(np.isfinite(r.signals)) and np.all(r.signals[~r.observed] == 0)
      v = np.where(r.observed, r.signals, lo)
      assert np.all(v >= lo) and np.all(np.where(r.observed, r.signals, hi) <= hi)
      assert 0 <= r.labels["activity"] < len(synthetic.ACTIVITY_TYPES)


def test_splits_are_subject_disjoint_and_complete(synth_dir):
  meta = metadata.load_metadata(synth_dir)
  assert set(meta.splits) == {"train", "validation", "test"}
  subjects = {s: set(v) for s, v in meta.subjects.items()}
  assert sum(len(v) for v in subjects.values()) == 6
  assert not (subjects["train"] & subjects["validation"]) and not (subjects["train"] & subjects["test"])
  assert not subjects["validation"] & subjects["test"]
  for split in meta.splits:
    ids = set(dataset.read_split(synth_dir, split, normalize=False)["subject_id"])
    assert ids == subjects[split]
    assert meta.record_counts[split] == 3 * len(ids)


def test_normalization_statistics_come_from_train_only(synth_dir):
  meta = metadata.load_metadata(synth_dir)

  def stats(splits):
    sig = np.concatenate([dataset.read_split(synth_dir, s, normalize=False)["signals"]
                          for s in splits]).reshape(-1, 26).astype(np.float64)
    obs = np.concatenate([dataset.read_split(synth_dir, s, normalize=False)["observed"]
                          for s in splits]).reshape(-1, 26)
    return (np.array([sig[obs[:, c], c].mean() for c in range(26)]),
            np.array([sig[obs[:, c], c].std() for c in range(26)]))

  mean, std = stats(["train"])
  np.testing.assert_allclose(meta.norm_mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(meta.norm_std, std, rtol=1e-4, atol=1e-6)
  all_mean, _ = stats(["train", "validation", "test"])
  assert not np.allclose(meta.norm_mean, all_mean, rtol=1e-4, atol=1e-5)


def test_metadata_carries_known_noise_and_labels(synth_dir):
  meta = metadata.load_metadata(synth_dir)
  np.testing.assert_allclose(meta.noise_std, synthetic.NOISE_STD_VECTOR)
  assert meta.channel_names == tuple(c.name for c in DEFAULT_CHANNELS)
  kinds = {n: (s.kind, s.level) for n, s in meta.labels.items()}
  assert kinds["hypertension"] == ("binary", "subject") and kinds["anxiety"] == ("binary", "subject")
  assert kinds["age"] == ("regression", "subject") and kinds["bmi"] == ("regression", "subject")
  assert kinds["activity"] == ("categorical", "day")
  assert kinds["activity_bouts"] == ("categorical", "minute")
  assert len(meta.labels["activity"].classes) >= 8
  assert meta.labels["activity_bouts"].classes == meta.labels["activity"].classes
  bouts = dataset.read_split(synth_dir, "train")["label/activity_bouts"]
  assert bouts.shape == (meta.record_counts["train"], 1440)
  assert (bouts == -1).mean() > 0.8 and (bouts >= 0).any(axis=1).all()


def test_missingness_is_natural_and_spread(population):
  fractions = np.array([r.missing_fraction for _, recs in population for r in recs])
  p10, p50, p90 = np.percentile(fractions, [10, 50, 90])
  assert 0.05 <= p10 <= 0.3 and 0.35 <= p50 <= 0.7 and 0.7 <= p90 <= 0.97
  # Not at random: missingness follows the subject's wear habit...
  compliance = np.array([t.compliance for t, recs in population for _ in recs])
  assert np.corrcoef(compliance, fractions)[0, 1] < -0.4
  obs = np.stack([r.observed for _, recs in population for r in recs])
  # ...HRV is only valid where enough beats are good (the reference's rule)...
  hrv = CH["rmssd_percentile_0595"]
  good = np.stack([r.signals[:, CH["hrv_percent_good"]] for _, recs in population for r in recs])
  both = obs[:, :, hrv] & obs[:, :, CH["hrv_percent_good"]]
  assert np.all(good[both] >= synthetic.HRV_MIN_PERCENT_GOOD) and both.any()
  # ...EDA only with skin contact...
  contact = np.stack([r.signals[:, CH["leads_contact_counts"]] for _, recs in population
                      for r in recs])
  eda = obs[:, :, CH["eda_level_real"]]
  assert np.all(contact[eda] >= synthetic.EDA_MIN_CONTACT) and eda.any()
  # ...and PPG drops out in motion more than at rest.
  steps = np.stack([r.signals[:, CH["steps"]] for _, recs in population for r in recs])
  worn = obs[:, :, CH["steps"]]
  moving, still = worn & (steps > 60), worn & (steps < 5)
  assert (1 - obs[:, :, CH["hr"]][moving].mean()) > 2 * (1 - obs[:, :, CH["hr"]][still].mean())


def _masked_mean(recs, channel, minutes):
  vals = []
  for r in recs:
    o = r.observed[minutes, channel]
    if o.sum() > 30:
      vals.append(r.signals[minutes, channel][o].mean())
  return np.mean(vals) if vals else np.nan


def test_labels_have_their_mechanisms(population):
  night, day = slice(60, 300), slice(600, 1200)
  hr, eda = CH["hr"], CH["eda_level_real"]
  dip = {0: [], 1: []}
  eda_level = {0: [], 1: []}
  for traits, recs in population:
    ratio = _masked_mean(recs, hr, night) / _masked_mean(recs, hr, day)
    if np.isfinite(ratio):
      dip[int(traits.hypertension)].append(ratio)
    eda_level[int(traits.anxiety)].append(_masked_mean(recs, eda, day))
  # Hypertension: a smaller nocturnal HR dip (night/day HR ratio closer to 1).
  assert np.nanmean(dip[1]) > np.nanmean(dip[0]) + 0.03
  # Anxiety: higher daytime EDA.
  assert np.nanmean(eda_level[1]) > 1.2 * np.nanmean(eda_level[0])
  # Activity: HR and steps rise in exercise bouts; sleep lowers HR.
  hr_by_state = {"bout": [], "rest": []}
  for traits, recs in population[:20]:
    for r in recs:
      o = r.observed[:, hr]
      moving = r.signals[:, CH["jerk_auto"]] > 2.5
      hr_by_state["bout"] += list(r.signals[o & moving, hr])
      hr_by_state["rest"] += list(r.signals[o & ~moving, hr])
  assert np.mean(hr_by_state["bout"]) > np.mean(hr_by_state["rest"]) + 15
  # HRV moves inversely to HR.
  pairs = [(r.signals[:, hr], r.signals[:, CH["rmssd_percentile_0595"]],
            r.observed[:, hr] & r.observed[:, CH["rmssd_percentile_0595"]])
           for _, recs in population[:20] for r in recs]
  x = np.concatenate([p[0][p[2]] for p in pairs])
  y = np.concatenate([p[1][p[2]] for p in pairs])
  assert np.corrcoef(x, y)[0, 1] < -0.3
  # The day label is the day's dominant bout type: >= 8 types all occur.
  days = [r.labels["activity"] for _, recs in population for r in recs]
  assert len(set(days)) >= 8


def test_minute_activity_labels_match_the_day_label_and_the_signals(population):
  """`activity_bouts` marks the bout minutes: their dominant class is the day's `activity`."""
  steps, jerk = CH["steps"], CH["jerk_auto"]
  by_class = {k: [] for k in ("running", "walking", "cycling")}
  rest_steps = []
  for _, recs in population:
    for r in recs:
      bouts = r.labels["activity_bouts"]
      assert bouts.shape == (1440,) and bouts.dtype == np.int64
      assert bouts.min() >= -1 and bouts.max() < len(synthetic.ACTIVITY_TYPES)
      labelled = bouts[bouts >= 0]
      if labelled.size:
        assert np.bincount(labelled).argmax() == r.labels["activity"]
      else:
        assert r.labels["activity"] == -1
      seen = r.observed[:, steps]
      for name in by_class:
        inside = seen & (bouts == synthetic.ACTIVITY_TYPES.index(name))
        by_class[name] += list(r.signals[inside, steps])
      # Unlabelled, still minutes (no bout, no light walking: jerk at its rest level).
      still = seen & (bouts == -1) & (r.signals[:, jerk] < 0.6)
      rest_steps += list(r.signals[still, steps])
  rest = np.mean(rest_steps)
  assert np.mean(by_class["running"]) > np.mean(by_class["walking"]) > rest + 60
  assert np.mean(by_class["cycling"]) < np.mean(by_class["walking"]) - 60  # Few steps on a bike.
  assert min(len(v) for v in by_class.values()) > 100


def test_cli_writes_a_dataset(tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run([sys.executable, "-m", "lsm2.data.synthesize", "--out", str(out),
                         "--subjects", "3", "--days", "1", "--seed", "2", "--format",
                         "array_record", "--shards", "1"], capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "subject-days/s" in proc.stdout
  meta = metadata.load_metadata(out)
  assert meta.format == "array_record" and sum(meta.record_counts.values()) == 3
  again = subprocess.run([sys.executable, "-m", "lsm2.data.synthesize", "--out", str(out),
                          "--subjects", "3", "--days", "1", "--seed", "2"], capture_output=True,
                         text=True, timeout=120, check=False)
  assert again.returncode == 2 and "already holds a dataset" in again.stderr


def test_cli_to_a_missing_bucket_is_one_error_line_naming_it(tmp_path, capsys):
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  (tmp_path / "gcs").mkdir()
  with gcs_emulator.serving(tmp_path / "gcs", "lsm2-test") as gcs:
    code = synthesize.main(["--out", "gs://lsm2-no-such-bucket/data", "--subjects", "4",
                            "--days", "1", "--seed", "0"])
    assert gcs.objects("lsm2-test") == []
  out, err = capsys.readouterr()
  assert code == 2 and out == ""
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "lsm2: error: --out gs://lsm2-no-such-bucket/data: bucket gs://lsm2-no-such-bucket does "
      "not exist"), err


def test_runs_synthesize_their_data_only_where_there_is_none(tmp_path):
  """config.data.synthesize_subjects > 0 writes a dataset into an empty data.dir, once."""
  config = ml_collections.ConfigDict({"seed": 4, "data": {
      "dir": str(tmp_path / "data"), "synthesize_subjects": 0, "synthesize_days": 1}})
  ensure_synthetic_dataset(config)  # 0 subjects: the run brings its own data.
  assert not (tmp_path / "data").exists()
  config.data.synthesize_subjects = 3
  ensure_synthetic_dataset(config)
  meta = metadata.load_metadata(tmp_path / "data")
  assert sum(meta.record_counts.values()) == 3 and meta.source["seed"] == 4
  written = (tmp_path / "data" / metadata.METADATA_FILE).stat().st_mtime_ns
  config.data.synthesize_subjects = 5
  ensure_synthetic_dataset(config)  # A dataset is there: kept as it is.
  assert (tmp_path / "data" / metadata.METADATA_FILE).stat().st_mtime_ns == written
  assert sum(metadata.load_metadata(tmp_path / "data").record_counts.values()) == 3
