"""Window task pieces on hand-built inputs: window labels, token pooling, the patch-grid check."""
import numpy as np
import pytest

from lsm2.eval import windows


def test_window_labels_take_the_class_of_enough_minutes():
  minutes = np.array([[0, 0, -1, -1, 1, 1, 1, 2],
                      [0, 1, -1, -1, 2, 2, 1, 1],
                      [2, 2, 2, 2, -1, -1, -1, -1]])
  np.testing.assert_array_equal(windows.window_labels(minutes, 4, 0.5, num_classes=3),
                                [[0, 1], [-1, 1], [2, -1]])  # 2 vs 2 minutes: the lower class.
  np.testing.assert_array_equal(windows.window_labels(minutes, 4, 0.75, num_classes=3),
                                [[-1, 1], [-1, -1], [2, -1]])
  np.testing.assert_array_equal(windows.window_labels(minutes, 2, 1.0, num_classes=3),
                                [[0, -1, 1, -1], [-1, -1, 2, 1], [2, 2, -1, -1]])
  with pytest.raises(ValueError, match=r"min_fraction=0.0 must be in \(0, 1\]"):
    windows.window_labels(minutes, 4, 0.0, num_classes=3)
  with pytest.raises(ValueError, match="window of 3 min does not divide the 8-min day"):
    windows.window_labels(minutes, 3, 0.5, num_classes=3)


def test_pool_windows_means_visible_tokens_of_each_time_span():
  """Grid of 4 time x 2 signal tokens (token = time * 2 + signal), windows of 2 time tokens."""
  token = np.arange(8, dtype=np.float32)
  outputs = np.stack([token, -2 * token], axis=-1)[None].repeat(2, axis=0)  # [2 days, 8, d=2]
  visible = np.array([[1, 0, 1, 0, 1, 1, 0, 0],
                      [0, 0, 0, 0, 1, 1, 1, 1]], bool)
  outputs[~visible] = 1e6  # Masked tokens never count, whatever they hold.
  feats, counts = windows.pool_windows(outputs, visible, grid=(4, 2), time_tokens=2)
  # Day 0: window 0 = tokens {0, 2} (time 0-1, signal 0), window 1 = tokens {4, 5} (time 2).
  # Day 1: window 0 has no visible token (feature 0), window 1 = tokens 4..7.
  np.testing.assert_array_equal(counts, [[2, 2], [0, 4]])
  np.testing.assert_array_equal(feats, [[[1.0, -2.0], [4.5, -9.0]], [[0.0, 0.0], [5.5, -11.0]]])
  assert feats.dtype == np.float32
  with pytest.raises(ValueError, match=r"do not fit the grid \(4, 2\) with 3 time tokens"):
    windows.pool_windows(outputs, visible, grid=(4, 2), time_tokens=3)


def test_windows_must_sit_on_the_patch_grid():
  assert windows.tokens_per_window(60, 30, 1440) == 2
  assert windows.tokens_per_window(60, 10, 1440) == 6
  for minutes in (45, 0, 210):  # Off the 30-min patch; nothing; does not divide the day.
    with pytest.raises(ValueError, match=rf"config.windows.minutes={minutes} must be a multiple "
                                         "of the model's patch of 30 min"):
      windows.tokens_per_window(minutes, 30, 1440)
