"""Masking-scheme sweep: AIM against LSM-1 and AIM's two ablations.

LSM-2 (AIM) vs the LSM-1 baseline (imputed data, no inherited mask, all masked
tokens dropped) and the dropout-only / attention-mask-only variants of AIM,
all at the paper's ViT-S recipe (docs/method.md).
"""
from lsm2.sweeps.sweep import axis

BASE_CONFIG = "configs/pretrain.py:S,aim"


def get_sweep():
  return axis("config.masking.scheme", ["aim", "lsm1", "dropout_only", "attention_only"])
