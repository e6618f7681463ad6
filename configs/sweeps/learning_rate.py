"""Peak learning-rate sweep around the paper's 5e-3, at each model size."""
from lsm2.sweeps.sweep import axis, product

BASE_CONFIG = "configs/pretrain.py:S,aim"


def get_sweep():
  return product(
      axis("config.model.size", ["tiny", "S", "B"]),
      axis("config.lr", [1e-3, 2e-3, 5e-3, 1e-2]),
  )
