"""Inference with a packed encoder (lsm2.api) vs every token, on a split's real gaps.

`PretrainedModel` packs each device's share of a batch into the smallest of
`encoder_buckets` compiled lengths that holds its visible tokens (`aim.pack_visible`);
`encoder_buckets=1` runs every token of every day. Evaluation embeds its probe pool
once per robustness condition and reconstructs every generative task, so this is most
of its model time. Both settings run in this process, call for call alternating, and
must give the same outputs.

  python benchmarks/packed_inference.py --workdir RUN [--data DIR] [--days 576] [--buckets 4]

RUN is a training workdir (e.g. from `python -m lsm2.main train --config
configs/pretrain.py:XS,aim,cpu`); the data default to the run's own.
"""
import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Run as a script from anywhere: import lsm2 from this checkout.

import lsm2  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2 import api  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2.data import dataset  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2.data import metadata  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="training workdir (or export/ dir) to load")
  p.add_argument("--data", default="", help="dataset dir (default: the run's data_dir)")
  p.add_argument("--split", default="test")
  p.add_argument("--days", type=int, default=576, help="days read (the XS recipe's test split: 576)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--buckets", type=int, default=4, help="encoder_buckets timed against 1")
  args = p.parse_args()
  models = {b: lsm2.load(args.workdir, encoder_buckets=b) for b in (args.buckets, 1)}
  model = models[1]
  raw = dataset.read_split(args.data or model.config["data_dir"], args.split, normalize=False,
                           limit=args.days)
  observed = raw["observed"]
  z = metadata.normalize(raw["signals"], observed, model.norm_mean, model.norm_std)
  # Random imputation 80%: hide 80% of each day's tokens that hold an observed minute.
  shown = api.token_any(observed, model.model_cfg)
  hidden = shown & (np.random.default_rng(0).random(shown.shape) < 0.8)
  calls = {
      "embed": lambda m: m.embed_normalized(z, observed),
      "reconstruct (80% hidden)": lambda m: m.reconstruct_normalized(z, observed, hidden),
  }
  print(f"{z.shape[0]} days of {args.split}; {shown.mean():.0%} of tokens hold an observed "
        f"minute; batches of {model.padded_size(z.shape[0])}; median of {args.repeats}")
  for name, call in calls.items():
    outs = {b: call(m) for b, m in models.items()}  # Compiles every length used.
    times = {b: [] for b in models}
    for _ in range(args.repeats):
      for b, m in models.items():
        start = time.perf_counter()
        call(m)
        times[b].append(time.perf_counter() - start)
    med = {b: statistics.median(t) for b, t in times.items()}
    b = args.buckets
    diff = float(np.abs(outs[b] - outs[1]).max())
    print(f"{name:26s} buckets {b}: {med[b]:.2f} s  1: {med[1]:.2f} s  ratio {med[1] / med[b]:.2f}x"
          f"  max |diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
  main()
