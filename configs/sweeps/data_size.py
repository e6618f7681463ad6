"""Pretraining data-size sweep: LSM-2 (AIM) and LSM-1 on 100 / 1k / 10k subjects and all of them.

The paper's subsets by participants hold 2,308 / 26,268 / 282,244 days;
max_train_subjects = 0 trains on every subject.
"""
from lsm2.sweeps.sweep import axis, product

BASE_CONFIG = "configs/pretrain.py:S,aim"


def get_sweep():
  return product(
      axis("config.masking.scheme", ["aim", "lsm1"]),
      axis("config.data.max_train_subjects", [100, 1_000, 10_000, 0]),
  )
