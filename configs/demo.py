r"""The README's demo: a laptop-CPU run in under 5 minutes, nothing to download.

  python -m lsm2.main --config=configs/demo.py --workdir=/tmp/lsm2_demo

Synthesizes a small wearable dataset into WORKDIR/data (if absent), pretrains a
tiny AIM model on it, then evaluates the pretrained encoder downstream.
"""
import pathlib

import ml_collections

from lsm2 import config_files


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  # The sibling pretrain.py, by path, so the demo works from any directory.
  config = config_files.load_config(pathlib.Path(__file__).with_name("pretrain.py"),
                                    "tiny,aim,cpu")
  with config.unlocked():
    config.mode = "demo"
    config.data.dir = ""  # Empty: WORKDIR/data.
    # The CPU recipe, shortened. People, not steps, are what a small model is short of
    # (docs/results.md): 400 x 2 days beat 100 x 2 on every generative task in the same
    # 2,500 steps, and synthesis stays a few seconds.
    config.data.synthesize_subjects = 400
    config.data.synthesize_days = 2
    # 1,500 steps at LR 5e-3 keep the model below the channel mean on every generative
    # task and below linear interpolation on signal imputation (as 2,500 at 3e-3 did;
    # 1,000 did not), and the whole demo within ~3.5 minutes on a 2-core CPU
    # (benchmarks/MEASUREMENTS.md, "The demo in under 5 minutes").
    config.total_steps = 1500
    config.lr = 5e-3
    # The fixed split: at tiny's size, encoder buckets and packing save less per step
    # than their extra compilations and gathers cost (82 ms vs 118-123 ms per step).
    config.masking.encoder_buckets = 0
    config.eval_every = 500
    config.checkpoint_every = 500
  return config
