"""A PyTorch LSM-2 training step at the paper geometry, for side-by-side step-time ratios.

Step times taken on different machines, or on one machine under different loads, do
not compare. This script computes the same step the way a PyTorch reimplementation of
the paper's model does, so that `benchmarks/aim_step.py` and `benchmarks/train_step.py`
can be compared with it in one session (benchmarks/MEASUREMENTS.md): ViT-S encoder (384 wide, 12 layers, 6 heads) over
the paper's fixed split of 2,262 kept tokens with a key-padding mask, decoder (256, 4, 8)
over all 3,744 tokens with full attention, masked MSE, AdamW; float32, fused SDPA, no
dropout. It needs PyTorch (`pip install torch`; not a project dependency).

  python benchmarks/torch_reference_step.py --batch 4 --steps 3
"""
import argparse
import json
import math
import resource
import statistics
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def sincos_2d(n_time: int, n_signal: int, width: int) -> torch.Tensor:
  quarter = width // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
  t, s = np.meshgrid(np.arange(n_time), np.arange(n_signal), indexing="ij")
  axis = lambda p: np.concatenate([np.sin(p[:, None] * omega), np.cos(p[:, None] * omega)], 1)
  return torch.tensor(np.concatenate([axis(t.ravel()), axis(s.ravel())], 1), dtype=torch.float32)


class Block(nn.Module):
  def __init__(self, width: int, heads: int, hidden: int):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
    self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
    self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

  def forward(self, x, key_mask=None):
    b, n, w = x.shape
    q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    x = x + self.proj(y.transpose(1, 2).reshape(b, n, w))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class MAE(nn.Module):
  def __init__(self, n_time=144, n_signal=26, patch=10):
    super().__init__()
    self.embed = nn.Linear(patch, 384)
    self.encoder = nn.ModuleList([Block(384, 6, 1536) for _ in range(12)])
    self.enc_norm = nn.LayerNorm(384, eps=1e-6)
    self.to_dec = nn.Linear(384, 256)
    self.mask_token = nn.Parameter(torch.zeros(256))
    self.decoder = nn.ModuleList([Block(256, 8, 1024) for _ in range(4)])
    self.dec_norm = nn.LayerNorm(256, eps=1e-6)
    self.head = nn.Linear(256, patch)
    self.register_buffer("pos_enc", sincos_2d(n_time, n_signal, 384))
    self.register_buffer("pos_dec", sincos_2d(n_time, n_signal, 256))

  def forward(self, patches, keep_idx, visible_len, masked):
    b, n, _ = patches.shape
    x = self.embed(patches) + self.pos_enc
    x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
    key_mask = (torch.arange(keep_idx.shape[1]) < visible_len[:, None])[:, None, None, :]
    for block in self.encoder:
      x = block(x, key_mask)
    y = self.to_dec(self.enc_norm(x))
    grid = torch.zeros(b, n, y.shape[-1]).scatter(1, keep_idx[..., None].expand(-1, -1, y.shape[-1]), y)
    grid = torch.where(masked[..., None], self.mask_token, grid) + self.pos_dec
    for block in self.decoder:
      grid = block(grid)
    return self.head(self.dec_norm(grid))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  n, n_keep, n_visible = 3744, 3744 - 1482, 749  # paper split: 80% masked, 1,482 dropped
  model = MAE()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
  patches = torch.randn(a.batch, n, 10)
  order = torch.stack([torch.randperm(n) for _ in range(a.batch)])
  masked = torch.ones(a.batch, n, dtype=torch.bool).scatter(1, order[:, :n_visible], False)
  keep_idx, visible_len = order[:, :n_keep], torch.full((a.batch,), n_visible)
  times = []
  for _ in range(a.steps + 1):
    start = time.perf_counter()
    pred = model(patches, keep_idx, visible_len, masked)
    loss = ((pred - patches) ** 2).mean(-1)[masked].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - start)
  assert math.isfinite(loss.item())
  step_s = statistics.median(times[1:])  # the first step warms up the allocator
  out = {"torch_step_s": step_s, "torch_times": times[1:], "batch": a.batch,
         "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
         "torch_version": torch.__version__}
  print(f"PyTorch LSM-2 step, B={a.batch}, fixed split ({n_keep} encoder tokens, {n} decoder tokens): "
        f"{step_s:.2f} s median of {a.steps} ({', '.join(f'{t:.2f}' for t in times[1:])}); "
        f"peak RSS {out['peak_rss_gib']:.2f} GiB")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
