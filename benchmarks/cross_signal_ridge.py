r"""How much of a hidden signal pair the other signals explain: a ridge-regression ceiling check.

  python benchmarks/cross_signal_ridge.py --data /tmp/xs/data [--train_days 600]

For each token column of the CPU recipe's grid (signals 2k and 2k+1, hidden for the
whole day as in the `signal_imputation_2ch` task), fits a ridge regression per minute
from the other 24 signals (their value and observed flag at that minute, their means
over centred 15- and 61-minute windows, the time of day) on training days, and scores
it on the test split's observed minutes against the channel mean (0 in normalised
units). It is not a baseline of the evaluation: it says how far below the channel mean
cross-signal structure alone can take signal imputation on this data, which the model
should approach. docs/results.md quotes it.
"""
import argparse

import numpy as np

from lsm2.data import dataset

WINDOWS = (15, 61)  # Minutes of the centred window means.


def _window_mean(values, weights, k):
  """Centred k-minute means of `values` over minutes with weight 1, and whether any."""
  def box(v):
    c = np.concatenate([np.zeros_like(v[:, :1]), np.cumsum(v, 1)], 1)
    t = np.arange(v.shape[1])
    return c[:, np.clip(t + k // 2 + 1, 0, v.shape[1])] - c[:, np.clip(t - k // 2, 0, v.shape[1])]
  num, den = box(values), box(weights)
  return num / np.maximum(den, 1e-3), (den > 0).astype(np.float32)


def channel_features(z, observed):
  """[days, minutes, signals, 2 + 2 * len(WINDOWS)]: each signal's value and observed flag
  at the minute and its window means; computed once per split, selected per hidden pair."""
  obs = observed.astype(np.float32)
  vals = np.where(observed, z, 0.0).astype(np.float32)
  parts = [vals, obs]
  for k in WINDOWS:
    parts.extend(_window_mean(vals, obs, k))
  return np.stack(parts, -1)


def features(per_channel, hidden):
  """[days * minutes, F] regressors from every signal not in `hidden`, the time of day
  and a bias."""
  keep = [c for c in range(per_channel.shape[2]) if c not in hidden]
  n, t = per_channel.shape[:2]
  angle = np.arange(t) / t * 2 * np.pi
  tod = np.stack([np.sin(angle), np.cos(angle), np.sin(2 * angle), np.cos(2 * angle)], -1)
  out = np.concatenate([per_channel[:, :, keep].reshape(n, t, -1),
                        np.broadcast_to(tod, (n, t, tod.shape[-1])),
                        np.ones((n, t, 1), np.float32)], -1)
  return out.reshape(n * t, -1)


def score_pair(train, test, hidden, l2=1.0):
  """[(signal, squared error, squared error of the channel mean, minutes)] for each hidden
  signal: the ridge fit on `train`'s observed minutes, scored on `test`'s. Both splits
  hold "signals", "observed" and their "per_channel" (`channel_features`)."""
  x_train = features(train["per_channel"], hidden)
  x_test = features(test["per_channel"], hidden)
  out = []
  for c in hidden:
    fit = train["observed"][:, :, c].reshape(-1)
    a, y = x_train[fit], train["signals"][:, :, c].reshape(-1)[fit]
    w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ y)
    score = test["observed"][:, :, c].reshape(-1)
    truth = test["signals"][:, :, c].reshape(-1)[score]
    out.append((c, float(np.square(x_test[score] @ w - truth).sum()),
                float(np.square(truth).sum()), int(score.sum())))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="dataset directory (train and test splits)")
  p.add_argument("--train_days", type=int, default=600, help="training days to fit on")
  p.add_argument("--l2", type=float, default=1.0)
  args = p.parse_args()
  train = dataset.read_split(args.data, "train", normalize=True, limit=args.train_days)
  test = dataset.read_split(args.data, "test", normalize=True)
  for split in (train, test):
    split["per_channel"] = channel_features(split["signals"], split["observed"])
  err_sum = base_sum = count = 0.0
  for first in range(0, train["signals"].shape[-1] - 1, 2):
    for c, err, base, n in score_pair(train, test, (first, first + 1), args.l2):
      err_sum, base_sum, count = err_sum + err, base_sum + base, count + n
      print(f"signal {c:2d}: ridge MSE {err / n:.3f}, channel mean {base / n:.3f}")
  print(f"all signals: ridge MSE {err_sum / count:.3f}, channel mean {base_sum / count:.3f}, "
        f"ratio {err_sum / base_sum:.2f} ({len(test['signals'])} test days)")


if __name__ == "__main__":
  main()
