"""Model-size sweep: the paper's scaling study, LSM-2 (AIM) and LSM-1 at 5.8M / 25M / 110M parameters."""
from lsm2.sweeps.sweep import axis, product

BASE_CONFIG = "configs/pretrain.py:S,aim"


def get_sweep():
  return product(
      axis("config.masking.scheme", ["aim", "lsm1"]),
      axis("config.model.size", ["tiny", "S", "B"]),
  )
