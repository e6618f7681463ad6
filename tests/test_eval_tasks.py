"""Generative task masks and robustness transforms."""
import numpy as np
import pytest

from lsm2.eval import tasks

T, C, PT, PC = 1440, 6, 10, 1


def _observed(n=6, seed=0):
  rng = np.random.default_rng(seed)
  obs = rng.random((n, T, C)) < 0.8
  obs[0, : T // 2, :] = False  # half the day off-wrist: 72 x 6 fully missing tokens
  return obs


def _tokens(mask, pt=PT, pc=PC):
  """[n, T, C] -> token grid; asserts the mask is constant inside every patch."""
  n, t, c = mask.shape
  blocks = mask.reshape(n, t // pt, pt, c // pc, pc)
  assert np.all(blocks.all(axis=(2, 4)) == blocks.any(axis=(2, 4))), "mask is not token-aligned"
  return blocks.any(axis=(2, 4))


def test_random_imputation_tops_up_inherited_mask_to_ratio():
  obs = _observed()
  mask = tasks.random_imputation(obs, PT, PC, seed=3)
  tok = _tokens(mask)
  inherited = tasks.inherited_token_mask(obs, PT, PC)
  n_tokens = (T // PT) * (C // PC)
  assert not np.any(tok & inherited)  # only tokens with something observed are hidden
  np.testing.assert_array_equal((tok | inherited).sum(axis=(1, 2)), round(0.8 * n_tokens))
  assert inherited[0].sum() == 72 * C
  # A day whose inherited mask already covers 80% gets no extra target.
  sparse = np.zeros((1, T, C), bool)
  sparse[0, :100] = True
  assert not tasks.random_imputation(sparse, PT, PC, seed=0).any()


def test_suite_random_imputation_tasks_mask_their_named_fraction():
  obs = _observed()
  inherited = tasks.inherited_token_mask(obs, PT, PC)
  n_tokens = (T // PT) * (C // PC)
  suite = dict(tasks.generative_task_suite(C))
  for percent in (30, 50, 80):
    tok = _tokens(suite[f"random_imputation_{percent}"](obs, PT, PC, 3))
    masked = (tok | inherited).sum(axis=(1, 2))
    # Days whose inherited mask already exceeds the ratio get no extra target.
    np.testing.assert_array_equal(
        masked, np.maximum(round(percent / 100 * n_tokens), inherited.sum(axis=(1, 2))),
        err_msg=f"random_imputation_{percent}")


def test_masks_depend_only_on_seed_and_example_id():
  obs = _observed()
  for name, build in tasks.generative_task_suite(C):
    full = build(obs, PT, PC, 11)
    again = build(obs, PT, PC, 11)
    np.testing.assert_array_equal(full, again, err_msg=name)
    part = build(obs[3:], PT, PC, 11, example_ids=np.arange(3, 6))
    np.testing.assert_array_equal(part, full[3:], err_msg=f"{name}: mask depends on batching")
    assert full.shape == obs.shape and full.dtype == bool
    _tokens(full)
  a = tasks.random_imputation(obs, PT, PC, seed=1)
  b = tasks.random_imputation(obs, PT, PC, seed=2)
  assert not np.array_equal(a, b)


def test_temporal_interpolation_is_one_inner_gap():
  obs = _observed(n=20)
  for gap in (10, 30, 180):
    mask = tasks.temporal_interpolation(obs, PT, PC, seed=0, gap_minutes=gap)
    assert np.all(mask.all(axis=2) == mask.any(axis=2))  # all channels together
    hidden = mask[:, :, 0]
    assert np.all(hidden.sum(axis=1) == gap)
    for row in hidden:
      idx = np.flatnonzero(row)
      assert idx[-1] - idx[0] + 1 == gap  # contiguous
      assert idx[0] >= PT and idx[-1] < T - PT  # context on both sides
      assert idx[0] % PT == 0
  gaps = tasks.temporal_interpolation(obs, PT, PC, seed=0, gap_minutes=30)
  starts = np.argmax(gaps[:, :, 0], axis=1)
  assert len(np.unique(starts)) > 5  # random positions
  with pytest.raises(ValueError, match="multiple of patch_time"):
    tasks.temporal_interpolation(obs, PT, PC, seed=0, gap_minutes=15)


def test_temporal_extrapolation_hides_the_end_of_the_day():
  obs = _observed(n=2)
  mask = tasks.temporal_extrapolation(obs, PT, PC, seed=0, gap_minutes=60)
  assert mask[:, T - 60:].all() and not mask[:, : T - 60].any()


def test_signal_imputation_hides_k_whole_channels():
  obs = _observed(n=10)
  mask = tasks.signal_imputation(obs, PT, PC, seed=0, k=2)
  per_channel = mask.any(axis=1)
  assert np.all(per_channel.sum(axis=1) == 2)
  assert np.all(mask.all(axis=1) == per_channel)  # whole day
  assert len({tuple(np.flatnonzero(r)) for r in per_channel}) > 1  # channels vary per example
  with pytest.raises(ValueError, match="below C"):
    tasks.signal_imputation(obs, PT, PC, seed=0, k=C)
  with pytest.raises(ValueError, match="multiple of patch_channels"):
    tasks.signal_imputation(obs, PT, 2, seed=0, k=3)
  two = tasks.signal_imputation(obs, PT, 2, seed=0, k=4)
  _tokens(two, PT, 2)
  assert np.all(two.any(axis=1).sum(axis=1) == 4)


def test_generative_task_suite_names():
  names26 = [n for n, _ in tasks.generative_task_suite(26)]
  assert names26 == (
      ["random_imputation_30", "random_imputation_50", "random_imputation_80"]
      + [f"temporal_interpolation_{g}min" for g in (10, 30, 60, 180)]
      + [f"temporal_extrapolation_{g}min" for g in (10, 30, 60, 180)]
      + [f"signal_imputation_{k}ch" for k in (2, 6, 12, 20)]
      + ["signal_imputation_all_but_one_25ch"])
  names4 = [n for n, _ in tasks.generative_task_suite(4)]
  assert [n for n in names4 if n.startswith("signal")] == [
      "signal_imputation_2ch", "signal_imputation_all_but_one_3ch"]
  names3 = [n for n, _ in tasks.generative_task_suite(3)]
  assert [n for n in names3 if n.startswith("signal")] == ["signal_imputation_all_but_one_2ch"]
  assert not [n for n, _ in tasks.generative_task_suite(1) if n.startswith("signal")]
  obs = np.ones((1, T, 3), bool)
  mask = dict(tasks.generative_task_suite(3))["signal_imputation_all_but_one_2ch"](obs, PT, 1, 0)
  assert mask.any(axis=1).sum() == 2


def test_remove_sensor_group():
  obs = np.ones((2, T, 4), bool)
  groups = ["PPG", "PPG", "ACC", "TEMP"]
  out = tasks.remove_sensor_group(obs, groups, "PPG")
  assert not out[:, :, :2].any() and out[:, :, 2:].all()
  assert obs.all()  # input untouched
  assert tasks.sensor_groups(groups) == ["PPG", "ACC", "TEMP"]
  with pytest.raises(ValueError, match="EDA"):
    tasks.remove_sensor_group(obs, groups, "EDA")
  with pytest.raises(ValueError, match="3 entries"):
    tasks.remove_sensor_group(obs, groups[:3], "PPG")


@pytest.mark.parametrize("segment,start,end", [("night", 0, 360), ("morning", 360, 720),
                                               ("afternoon", 720, 1080), ("evening", 1080, 1440)])
def test_remove_time_segment(segment, start, end):
  obs = np.ones((1, T, 2), bool)
  out = tasks.remove_time_segment(obs, segment)
  removed = ~out[0, :, 0]
  assert removed[start:end].all() and removed.sum() == end - start
  assert obs.all()


def test_missingness_buckets_exact_edges():
  fractions = [0.1, 0.2, 0.25, 0.3, 0.5, 0.79, 0.8, 0.9]
  obs = np.ones((len(fractions), T, 1), bool)
  for i, f in enumerate(fractions):
    obs[i, : round(f * T), 0] = False
  np.testing.assert_array_equal(tasks.missingness_buckets(obs), [-1, 0, 0, 1, 3, 5, 5, -1])
  assert tasks.bucket_labels() == ["20-30%", "30-40%", "40-50%", "50-60%", "60-70%", "70-80%"]
  with pytest.raises(ValueError, match="increasing"):
    tasks.missingness_buckets(obs, edges=(0.5, 0.2))
