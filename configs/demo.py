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
                                    "tiny,aim,runlocal")
  with config.unlocked():
    config.mode = "demo"
    config.data.dir = ""  # Empty: WORKDIR/data.
    config.data.synthesize_subjects = 40
    config.data.synthesize_days = 4
    config.total_steps = 300
    config.masking.encoder_buckets = 4
  return config
