r"""Training-loss curve of a short run: how fast a small model leaves the channel-mean plateau.

  python benchmarks/learning_curve.py --data /tmp/lsm2_lc_data --lr 3e-3 --head_init small

Synthesizes --subjects x --days synthetic days into --data (if absent), then trains the
MAE on random batches of the train split with AIM masks (the runlocal grid: 30 min x 2
signals, 40% time bars, the paper's random + bars mix) and prints the mean training
loss over every 25 steps. --head_init replaces the decoder head's kernel: "small" (the
model's own normal(0.02)), "zero", or "xavier" (the former default). The optimizer is
AdamW (b1 0.9, b2 0.95, weight decay 1e-4) with 5% linear warm-up and cosine decay.
docs/results.md ("Why learning was slow") explains the numbers.
"""
import argparse
import json
import pathlib
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsm2.data import dataset
from lsm2.data import synthesize
from lsm2.model import aim
from lsm2.model import loss as loss_lib
from lsm2.model import mae
from lsm2.model.config import MaskConfig, effective_mask_config, get_model_config


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="synthetic dataset directory (written if absent)")
  p.add_argument("--subjects", type=int, default=40)
  p.add_argument("--days", type=int, default=4)
  p.add_argument("--size", default="tiny")
  p.add_argument("--width", type=int, default=0, help="> 0: encoder and decoder width")
  p.add_argument("--dec_depth", type=int, default=0, help="> 0: decoder blocks")
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--head_init", choices=("small", "zero", "xavier"), default="small")
  p.add_argument("--fixed_batch", action="store_true", help="one batch and mask every step")
  p.add_argument("--json", default="", help="also write the curve here")
  args = p.parse_args()

  data = pathlib.Path(args.data)
  if not (data / "metadata.json").exists():
    synthesize.write_synthetic_dataset(data, subjects=args.subjects, days=args.days, seed=0)
  days = dataset.read_split(data, "train", normalize=True)
  z_all, obs_all = jnp.asarray(days["signals"]), jnp.asarray(days["observed"])

  overrides = {}
  if args.width:
    overrides.update(enc_width=args.width, dec_width=args.width, enc_mlp=2 * args.width,
                     dec_mlp=2 * args.width)
  if args.dec_depth:
    overrides["dec_depth"] = args.dec_depth
  model_cfg = get_model_config(args.size, num_channels=z_all.shape[-1], patch_time=30,
                               patch_channels=2, attention="blocked", **overrides)
  bars = round(0.4 * model_cfg.grid[0])
  mask_cfg = effective_mask_config(
      MaskConfig(time_bars=bars, n_drop=round(model_cfg.num_tokens * bars / model_cfg.grid[0])),
      model_cfg)
  model = mae.LSM2MAE(model_cfg, rngs=nnx.Rngs(0))
  kernel = model.head.kernel[...]
  if args.head_init == "zero":
    model.head.kernel[...] = jnp.zeros_like(kernel)
  elif args.head_init == "xavier":
    model.head.kernel[...] = nnx.initializers.xavier_uniform()(jax.random.key(0), kernel.shape)
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, int(0.05 * args.steps), args.steps)
  tx = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=1e-4)
  opt = tx.init(params)

  def loss_fn(p, z, observed, masks):
    pred = nnx.merge(graphdef, p)(z, observed, masks, loss_tokens_only=True)
    return loss_lib.reconstruction_loss(pred, z, masks, mask_cfg.strategy_names)[0]

  @jax.jit
  def step(p, opt, z, observed, key):
    masks = aim.aim_masks(observed, key, mask_cfg, model_cfg)
    loss, grads = jax.value_and_grad(loss_fn)(p, z, observed, masks)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  rng = np.random.default_rng(0)
  losses, curve = [], []
  start = time.time()
  for i in range(args.steps):
    if args.fixed_batch:
      idx, key = np.arange(args.batch_size), jax.random.key(0)
    else:
      idx, key = rng.choice(z_all.shape[0], args.batch_size, replace=False), jax.random.key(i)
    params, opt, loss = step(params, opt, z_all[idx], obs_all[idx], key)
    losses.append(float(loss))
    if (i + 1) % 25 == 0 or i == 0:
      curve.append((i + 1, float(np.mean(losses[-25:]))))
      print(f"step {i + 1:5d}  loss (mean of last 25) {curve[-1][1]:.4f}", flush=True)
  print(f"{args.steps} steps in {time.time() - start:.0f} s")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=1))


if __name__ == "__main__":
  main()
