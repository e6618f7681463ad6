"""Mask-ratio sweep for AIM: the share of all tokens that the random strategy's
union with the inherited mask covers (paper default 0.8)."""
from lsm2.sweeps.sweep import axis

BASE_CONFIG = "configs/pretrain.py:S,aim"


def get_sweep():
  return axis("config.masking.random_ratio", [0.5, 0.6, 0.7, 0.8, 0.9])
