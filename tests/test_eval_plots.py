"""Each plot helper writes a valid, non-empty PNG."""
import numpy as np
import pytest
from matplotlib import image as mpl_image

from lsm2.eval import plots, tasks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE)
  img = mpl_image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  assert img[..., :3].std() > 0.01  # something was drawn, not a blank canvas


def test_metric_by_condition_bar_chart(tmp_path):
  results = {"AIM": {"none": 0.64, "PPG": 0.55, "night": None},
             "LSM-1": {"none": 0.60, "PPG": 0.50, "night": 0.58}}
  out = plots.plot_metric_by_condition(results, tmp_path / "sub" / "groups.png", metric_name="F1",
                                       title="removed")
  assert out == tmp_path / "sub" / "groups.png"
  _check_png(out)
  with pytest.raises(ValueError, match="empty"):
    plots.plot_metric_by_condition({}, tmp_path / "x.png", metric_name="F1")


def test_error_by_missingness_line_plot(tmp_path):
  names = tasks.bucket_labels()
  series = {"AIM": [0.2, 0.22, 0.25, 0.3, None, 0.4], "linear": [0.5] * 6}
  out = plots.plot_error_by_missingness(names, series, tmp_path / "miss.png",
                                        counts=[5, 6, 7, 8, 0, 2])
  _check_png(out)
  with pytest.raises(ValueError, match="6 buckets"):
    plots.plot_error_by_missingness(names, {"AIM": [0.1]}, tmp_path / "bad.png")


def test_reconstructed_day(tmp_path):
  rng = np.random.default_rng(0)
  t, c = 1440, 5
  values = np.sin(np.linspace(0, 6, t))[:, None] + rng.normal(size=(t, c)) * 0.1
  observed = rng.random((t, c)) < 0.8
  target = tasks.temporal_interpolation(observed[None], 10, 1, seed=0, gap_minutes=180)[0]
  values = np.where(observed, values, np.nan)  # unobserved values may be NaN
  predicted = np.nan_to_num(values) + 0.05
  out = plots.plot_reconstructed_day(values, observed, target, predicted, tmp_path / "day.png",
                                     channel_names=[f"ch{i}" for i in range(c)],
                                     line_channels=(0, 3))
  _check_png(out)
  with pytest.raises(ValueError, match="channel_names"):
    plots.plot_reconstructed_day(values, observed, target, predicted, tmp_path / "bad.png",
                                 channel_names=["a"])
