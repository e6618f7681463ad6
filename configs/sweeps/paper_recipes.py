"""Each method with its own published recipe: LSM-2 (AIM) at batch 1024 for
100k steps, LSM-1 at batch 4096 for 50k steps (docs/method.md)."""
from lsm2.sweeps.sweep import axis, zip_axes

BASE_CONFIG = "configs/pretrain.py:S,aim"


def get_sweep():
  return zip_axes(
      axis("config.masking.scheme", ["aim", "lsm1"]),
      axis("config.batch_size", [1024, 4096]),
      axis("config.total_steps", [100_000, 50_000]),
  )
