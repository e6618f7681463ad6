r"""The README's demo: a laptop-CPU run in a few minutes, nothing to download.

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
    config.total_steps = 2500
    config.eval_every = 500
    config.checkpoint_every = 500
  return config
