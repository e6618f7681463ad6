"""Analytic FLOP counts of the LSM-2 MAE, for step-time predictions and MFU.

Matmuls and attention of the static shapes only (norms, softmax and the AIM
gathers are a few percent); a backward pass counts as twice the forward.
"""
from lsm2.model.config import ModelConfig


def transformer_flops(tokens: int, width: int, depth: int, mlp: int) -> float:
  """Forward FLOPs of `depth` blocks over `tokens` tokens (full attention over them)."""
  per_layer = (2 * tokens * width * 3 * width      # qkv
               + 2 * 2 * tokens * tokens * width   # q k^T and p v
               + 2 * tokens * width * width        # output projection
               + 2 * 2 * tokens * width * mlp)     # MLP
  return depth * per_layer


def step_flops(cfg: ModelConfig, n_keep: int, batch: int) -> float:
  """FLOPs of one forward+backward training step with `n_keep` encoder tokens."""
  n = cfg.num_tokens
  patch_in = cfg.patch_size * (2 if cfg.observed_in_embedding else 1)
  forward = (2 * n * patch_in * cfg.enc_width
             + transformer_flops(n_keep, cfg.enc_width, cfg.enc_depth, cfg.enc_mlp)
             + 2 * n_keep * cfg.enc_width * cfg.dec_width
             + transformer_flops(n, cfg.dec_width, cfg.dec_depth, cfg.dec_mlp)
             + 2 * n * cfg.dec_width * cfg.patch_size)
  return 3.0 * batch * forward


def splash_flops(model_cfg: ModelConfig, n_keep: int, batch: int) -> float:
  """FLOPs of the splash kernels in one train step (which XLA's cost analysis cannot see).

  Each attention call computes every tile of its lengths padded to 128: 2 products
  forward, 7 backward (the dq kernel recomputes q k^T and forms dO v^T and dS k; the
  dk/dv kernel q k^T, dO v^T, P^T dO and dS^T q), 2 more when the forward is
  rematerialized.
  """
  pad = lambda n: -(-n // 128) * 128
  products = 9 + (2 if model_cfg.remat != "none" else 0)
  per_example = (model_cfg.enc_depth * 2 * pad(n_keep) ** 2 * model_cfg.enc_width
                 + model_cfg.dec_depth * 2 * pad(model_cfg.num_tokens) ** 2 * model_cfg.dec_width)
  return float(batch * products * per_example)
