"""Forward+backward step time of the LSM-2 MAE under AIM, attention-only and LSM-1 masking.

At the paper geometry (1440 minutes x 26 signals, 10-minute patches: 3,744
tokens) the three variants differ only in how many tokens the encoder sees:
AIM keeps 3,744 - n_drop = 2,262, attention-only keeps all 3,744 and LSM-1
keeps the 749 unmasked tokens. The script times value_and_grad of the masked
reconstruction loss w.r.t. the parameters (median of several steps), counts
the step's FLOPs analytically (matmuls and attention of the static shapes,
backward = 2x forward) and with XLA's cost analysis, and compares the time
with the FLOP-count prediction at a measured matmul rate.

  python benchmarks/aim_step.py --json /tmp/aim_step.json
  python benchmarks/aim_step.py --full_size --model S --dtype bfloat16 --batch 32   # accelerator
"""
import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm2.model.aim import aim_masks, loss_tokens
from lsm2.model.attention import dot_product_attention
from lsm2.model.config import MaskConfig, ModelConfig, effective_mask_config, get_model_config
from lsm2.model.flops import step_flops
from lsm2.model.loss import reconstruction_loss
from lsm2.model.mae import LSM2MAE
from lsm2.train.encoder_layout import fit_encoder, layout_buckets
from timing import run_times

VARIANTS = ("aim", "attention_only", "lsm1", "aim_buckets", "aim_buckets_bf16", "aim_lsm2",
            "aim_lsm2_f32")
# aim_buckets: AIM's masks, with the encoder cut to the smallest of --buckets
# compiled lengths that holds the batch's visible tokens (exact; see lsm2/train/encoder_layout.py).
# aim_buckets_bf16: the same with bfloat16 matmul operands accumulated in float32
# (ModelConfig.matmul_dtype; parameters and activations stay float32).
# aim_lsm2: everything exact lsm2's training step can skip, with bfloat16 matmuls: the
# encoder packed (visible tokens of the whole batch end to end, `--buckets` packed
# lengths; config.masking.pack_encoder) and the decoder's last block only on the
# tokens the loss reads (always on in training). aim_lsm2_f32: the same in float32.
# CPU-sized default: the paper geometry with a narrow, shallow model (head size 64
# like ViT-S); --full_size --model S gives the paper model.
CPU_OVERRIDES = dict(enc_width=128, enc_depth=2, enc_heads=2, enc_mlp=512,
                     dec_width=128, dec_depth=1, dec_heads=2, dec_mlp=512)


def matmul_rate(dtype, size: int = 1024, repeats: int = 5) -> float:
  """Achieved FLOP/s of a square matmul, the yardstick of the prediction."""
  a = jnp.ones((size, size), dtype)
  return 2 * size**3 / statistics.median(run_times(jax.jit(lambda x: x @ x), (a,), repeats))


def synthetic_batch(cfg: ModelConfig, batch: int, seed: int = 0):
  """Roughly half-missing days: an off-wrist block, scattered gaps, a dead channel."""
  rng = np.random.default_rng(seed)
  obs = rng.random((batch, cfg.time_steps, cfg.num_channels)) > 0.15
  for i in range(batch):
    start = rng.integers(0, cfg.time_steps // 2)
    obs[i, start:start + int(0.4 * cfg.time_steps)] = False
    obs[i, :, rng.integers(cfg.num_channels)] = False
  signals = rng.normal(size=obs.shape).astype(np.float32)
  return jnp.asarray(signals), jnp.asarray(obs)


def breakdown(cfg, model, masks, steps: int, last_q_lengths=None) -> dict[str, float]:
  """Forward+backward seconds of each part of the step, timed alone at the step's shapes.

  The encoder and decoder stacks run on random inputs of their real shapes (encoder:
  the bucket length with the batch's visible lengths, or packed rows with packed masks;
  decoder: every token, full attention, the last block on `last_q_lengths` query rows
  if given); their attention
  cores are timed alone and times their depth, and what the stacks spend besides
  attention is dense layers, norms and activations.
  """
  b, key = masks.keep_idx.shape[0], jax.random.key(1)
  parts = {}
  packing = None if masks.pack_idx is None else (masks.pack_idx, masks.unpack_idx)
  for part, n, lengths, last_q, pack in (
      ("encoder", masks.n_keep, masks.visible_len, None, packing),
      ("decoder", cfg.num_tokens, None, last_q_lengths, None)):
    width, depth, heads = (getattr(cfg, f"{part[:3]}_{k}") for k in ("width", "depth", "heads"))
    stack = getattr(model, part)
    x = jax.random.normal(key, (b, n, width) if pack is None else (*pack[0].shape, width))
    graphdef, params = nnx.split(stack)
    stack_loss = lambda p, x, gd=graphdef, n=lengths, lq=last_q, pk=pack: jnp.sum(
        nnx.merge(gd, p)(x, n, lq, pk) ** 2)
    total = statistics.median(run_times(jax.jit(jax.grad(stack_loss, argnums=(0, 1))), (params, x),
                                        steps))
    q = jax.random.normal(key, (b, n, heads, width // heads), jnp.float32)
    core = lambda q, n=lengths, lq=lengths: jnp.sum(dot_product_attention(
        q, q * 0.5, q * 0.25, q_lengths=lq, kv_lengths=n, implementation=cfg.attention,
        matmul_dtype=cfg.matmul_dtype) ** 2)
    attention = (depth if last_q is None else depth - 1) * statistics.median(
        run_times(jax.jit(jax.grad(core)), (q,), steps))
    if last_q is not None:
      last = lambda q, lq=last_q: core(q, lq=lq)
      attention += statistics.median(run_times(jax.jit(jax.grad(last)), (q,), steps))
    parts[f"{part}_attention_s"] = attention
    parts[f"{part}_dense_s"] = total - attention
  return parts


def run_variant(cfg, mask_cfg, signals, observed, steps, buckets: int = 0, lsm2: bool = False,
                with_breakdown: bool = False):
  """One variant's step; `lsm2`: packed encoder (buckets of the batch's total visible count)
  and the decoder's last block on the loss tokens only."""
  model = LSM2MAE(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  masks = aim_masks(observed, jax.random.key(0), mask_cfg, cfg)
  visible = np.asarray(masks.visible_len)
  if buckets:
    groups = 1 if lsm2 else 0  # One packing group: one device.
    lengths = layout_buckets(buckets, masks.n_keep, len(visible), groups)
    masks, _ = fit_encoder(masks, lengths, groups)
  encoder_rows = (masks.keep_idx if masks.pack_idx is None else masks.pack_idx).size

  def loss_fn(params):
    pred = nnx.merge(graphdef, params)(signals, observed, masks, loss_tokens_only=lsm2)
    return reconstruction_loss(pred, signals, masks, mask_cfg.strategy_names)[0]

  step = jax.jit(jax.value_and_grad(loss_fn))
  start = time.perf_counter()
  compiled = step.lower(params).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  times = run_times(compiled, (params,), steps)
  if with_breakdown:
    last_q = loss_tokens(masks, cfg).sum(axis=1, dtype=jnp.int32) if lsm2 else None
    parts = breakdown(cfg, nnx.merge(graphdef, params), masks, steps, last_q_lengths=last_q)
    parts["rest_s"] = statistics.median(times) - sum(parts.values())
  return dict(step_s=statistics.median(times), times=times, compile_s=compile_s,
              breakdown=parts if with_breakdown else None,
              xla_flops=float(cost.get("flops", float("nan"))) if cost else float("nan"),
              n_keep=masks.n_keep, encoder_rows=encoder_rows, mean_visible=float(visible.mean()))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="S", help="named size (tiny, S, B, L)")
  parser.add_argument("--full_size", action="store_true",
                      help=f"use the named size as is (default overrides it with {CPU_OVERRIDES})")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--attention", default="xla")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--buckets", type=int, default=8,
                      help="encoder lengths compiled for the aim_buckets variants")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time encoder/decoder attention and dense parts alone")
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--one_variant", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.one_variant:
    return run_isolated(args)

  overrides = {} if args.full_size else dict(CPU_OVERRIDES)
  cfg = get_model_config(args.model, dtype=args.dtype, attention=args.attention,
                         remat=args.remat, **overrides)
  signals, observed = synthetic_batch(cfg, args.batch)
  rate = matmul_rate(jnp.dtype(args.dtype))
  print(f"backend={jax.default_backend()} devices={jax.device_count()} model={args.model} "
        f"{dataclasses.asdict(cfg)}")
  print(f"tokens={cfg.num_tokens} batch={args.batch} observed={float(observed.mean()):.2f} "
        f"matmul rate={rate / 1e9:.1f} GFLOP/s ({args.dtype})")
  results = {"config": dataclasses.asdict(cfg), "batch": args.batch, "steps": args.steps,
             "matmul_gflops": rate / 1e9}
  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      raise ValueError(f"--variants: unknown variant {variant!r}; expected {VARIANTS}")
    lsm2 = variant.startswith("aim_lsm2")
    buckets = variant.startswith("aim_buckets") or lsm2
    scheme = "aim" if buckets else variant
    mask_cfg = effective_mask_config(MaskConfig(scheme=scheme), cfg)
    bf16 = variant.endswith("bf16") or variant == "aim_lsm2"
    variant_cfg = dataclasses.replace(cfg, matmul_dtype="bfloat16") if bf16 else cfg
    r = run_variant(variant_cfg, mask_cfg, signals, observed, args.steps,
                    buckets=args.buckets if buckets else 0, lsm2=lsm2,
                    with_breakdown=args.breakdown)
    flops = step_flops(cfg, r["n_keep"], args.batch)
    predicted = flops / rate
    print(f"{variant:15s} matmul={variant_cfg.matmul_dtype} n_keep={r['n_keep']:5d} "
          f"encoder_rows={r['encoder_rows']:6d} "
          f"visible={r['mean_visible']:7.1f} "
          f"step={r['step_s']:.3f}s (steps {', '.join(f'{t:.3f}' for t in r['times'])}) "
          f"compile={r['compile_s']:.1f}s flops={flops / 1e9:.1f}G (xla {r['xla_flops'] / 1e9:.1f}G) "
          f"predicted={predicted:.3f}s measured/predicted={r['step_s'] / predicted:.2f}")
    results.update({f"step_s_{variant}": r["step_s"], f"flops_{variant}": flops,
                    f"xla_flops_{variant}": r["xla_flops"], f"n_keep_{variant}": r["n_keep"],
                    f"encoder_rows_{variant}": r["encoder_rows"],
                    f"time_over_flop_prediction_{variant}": r["step_s"] / predicted})
    if r["breakdown"]:
      print(f"{'':15s} " + "  ".join(f"{k}={v:.2f}" for k, v in r["breakdown"].items()))
      results[f"breakdown_{variant}"] = r["breakdown"]
  results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"peak RSS {results['peak_rss_gib']:.2f} GiB", flush=True)
  print(json.dumps(results))


def run_isolated(args):
  """Each variant in its own process, so that its peak memory is its own."""
  results = {}
  for variant in args.variants.split(","):
    flags = ("full_size", "breakdown")
    passed = {k: v for k, v in vars(args).items()
              if k not in ("json", "one_variant", "variants", *flags)}
    cmd = [sys.executable, __file__, "--one_variant", f"--variants={variant}",
           *(f"--{k}={v}" for k, v in passed.items()), *(f"--{f}" for f in flags if vars(args)[f])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
      sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    print("\n".join(lines[:-1]), flush=True)
    child = json.loads(lines[-1])
    child[f"peak_rss_gib_{variant}"] = child.pop("peak_rss_gib")
    results.update(child)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
