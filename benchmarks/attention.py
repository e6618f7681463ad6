"""Attention forward+backward speed on this CPU: XLA, lsm2's blocked kernel, PyTorch SDPA.

  python benchmarks/attention.py --json /tmp/attention.json

At B=4, H=6, L=2304, Dh=64 (the defaults) every implementation gets the same key-length
mask: keys past 78% of L are excluded. The blocked kernel also skips the query rows past
that length (q_lengths = kv_lengths, as in AIM's encoder, whose attention-masked rows are
thrown away); XLA and PyTorch compute every row. GFLOP/s use one formula for all,
4*B*H*L*L*Dh*3 per forward+backward (full unmasked attention, as the PyTorch SDPA
reference counts it), so skipped work shows as a higher "effective" rate; the blocked
kernel's rate on the FLOPs it actually computes is reported beside it.

A PyTorch SDPA reference script (not shipped with lsm2) runs in a subprocess of the same
invocation, for a side-by-side ratio on the same machine. It needs torch, which is not a
project dependency (`pip install torch`). Without torch or the script that line is skipped
with a message. Times are medians of --repeats runs.
"""
import argparse
import inspect
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from lsm2.model.blocked_attention import blocked_attention
from timing import run_times

# A PyTorch SDPA timing script (not shipped: pass its path) for same-run ratios.
TORCH_REFERENCE_ENV = "LSM2_TORCH_REFERENCE"


def covered(n: int, block: int, tail: int) -> int:
  """Positions the blocked kernel computes for valid length n: full blocks, then tail blocks."""
  return (n // block) * block + -(-(n % block) // tail) * tail


def computed_flops(n: int, batch: int, heads: int, head_dim: int, tiling: dict) -> float:
  """FLOPs the blocked kernel runs (2 products forward, 5 backward per computed block pair)."""
  rows = covered(n, tiling["block_q"], tiling["tail_q"])
  keys = covered(n, tiling["block_k"], tiling["tail_k"])
  return 7.0 * 2 * batch * heads * rows * keys * head_dim


def run_torch(args) -> dict | None:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print("torch SDPA: skipped, torch is not installed (pip install torch, CPU build)")
    return None
  if not args.torch_reference:
    print(f"torch SDPA: skipped, no reference script (--torch_reference or ${TORCH_REFERENCE_ENV})")
    return None
  if not os.path.isfile(args.torch_reference):
    print(f"torch SDPA: skipped, reference script not found at {args.torch_reference}")
    return None
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "torch.json")
    cmd = [sys.executable, args.torch_reference, "--batch", str(args.batch), "--heads",
           str(args.heads), "--length", str(args.length), "--head-dim", str(args.head_dim),
           "--repeats", str(args.repeats), "--json", path]
    subprocess.run(cmd, check=True)
    with open(path) as f:
      return json.load(f)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--heads", type=int, default=6)
  ap.add_argument("--length", type=int, default=2304)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--keep", type=float, default=0.78, help="valid fraction of keys (and query rows)")
  defaults = {name: p.default for name, p in inspect.signature(blocked_attention).parameters.items()}
  for name in ("block_q", "block_k", "tail_q", "tail_k"):
    ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--torch_reference", default=os.environ.get(TORCH_REFERENCE_ENV, ""),
                  help="path of a PyTorch SDPA timing script taking --batch/--heads/--length/"
                       "--head-dim/--repeats/--json (not shipped)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()

  b, h, l, d = args.batch, args.heads, args.length, args.head_dim
  n = int(args.keep * l)
  flops = 4 * b * h * l * l * d * 3
  q, k, v = (jax.random.normal(key, (b, l, h, d)) for key in jax.random.split(jax.random.PRNGKey(0), 3))
  lengths = jnp.full((b,), n, jnp.int32)
  tiling = {name: getattr(args, name) for name in ("block_q", "block_k", "tail_q", "tail_k")}

  attend = {
      "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                                          implementation="xla"),
      "blocked": lambda q, k, v: blocked_attention(q, k, v, q_lengths=lengths, kv_lengths=lengths,
                                                   **tiling),
  }
  # Same check as the tests, at this size: the valid rows agree.
  outs = {name: jax.jit(f)(q, k, v)[:, :n] for name, f in attend.items()}
  err = float(jnp.max(jnp.abs(outs["xla"] - outs["blocked"])))
  if err > 1e-4:
    raise SystemExit(f"blocked attention differs from XLA by {err} at the valid rows")

  print(f"B={b} H={h} L={l} Dh={d}, {n} valid keys/rows; {flops / 1e9:.1f} GFLOP per fwd+bwd "
        f"(full-attention formula); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        "cores (shared machine: numbers are noisy)")
  result = {}
  for name, f in attend.items():
    step = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
    seconds = statistics.median(run_times(step, (q, k, v), args.repeats))
    result[f"{name}_s"] = seconds
    result[f"gflops_{name}"] = flops / seconds / 1e9
    print(f"{name:8s}: {seconds:.3f} s fwd+bwd, {flops / seconds / 1e9:6.1f} GFLOP/s effective")
  actual = computed_flops(n, b, h, d, tiling)
  result["gflops_blocked_computed"] = actual / result["blocked_s"] / 1e9
  print(f"blocked : {tiling}; {actual / 1e9:.1f} GFLOP actually computed (7 products per "
        f"computed block pair), {result['gflops_blocked_computed']:.1f} GFLOP/s on those")

  if not args.skip_torch and (torch := run_torch(args)) is not None:
    result["gflops_torch_sdpa"] = torch["torch_sdpa_key_length_mask_gflops"]
    result["gflops_torch_sdpa_no_mask"] = torch["torch_sdpa_no_mask_gflops"]
    print(f"blocked / torch SDPA (key-length mask): "
          f"{result['gflops_blocked'] / result['gflops_torch_sdpa']:.2f}x; "
          f"XLA / torch: {result['gflops_xla'] / result['gflops_torch_sdpa']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
