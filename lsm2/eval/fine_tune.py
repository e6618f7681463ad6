"""Full fine-tuning: the encoder and a linear head trained together on a labelled day-level task.

The head sits on the inference embedding (mean over visible encoder tokens,
inherited tokens attention-masked, nothing dropped), exactly what the linear
probe sees, so the two are directly comparable. Loss: balanced (logit-adjusted)
cross-entropy or squared error on standardised targets; AdamW with gradient
clipping; fixed-size, seeded minibatches, so one compilation serves all steps.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lsm2.api import PretrainedModel
from lsm2.eval import discriminative
from lsm2.eval import report


@dataclasses.dataclass(frozen=True)
class FineTuned:
  """Fine-tuned weights, head and the loss per step; `predict` mirrors `probe.Probe.predict`."""
  model: PretrainedModel
  kind: str
  params: Any
  head: dict[str, np.ndarray]
  target_mean: float
  target_scale: float
  losses: np.ndarray

  def predict(self, z: np.ndarray, observed: np.ndarray) -> np.ndarray:
    emb = self.model.embed_normalized(z, observed, params=self.params)
    logits = emb @ self.head["w"] + self.head["b"]
    if self.kind == "binary":
      return 1.0 / (1.0 + np.exp(-logits[:, 0]))
    if self.kind == "categorical":
      e = np.exp(logits - logits.max(axis=1, keepdims=True))
      return e / e.sum(axis=1, keepdims=True)
    return logits[:, 0] * self.target_scale + self.target_mean


@functools.lru_cache(maxsize=8)
def _compiled(graphdef, mask_cfg, kind: str, lr: float, weight_decay: float):
  """(jitted optimizer init, jitted train step), cached so repeated fits (folds) reuse them."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=weight_decay))

  def loss_fn(train, signals, observed, y, offset):
    net = nnx.merge(graphdef, train["model"])
    z = net.embed(signals, observed, mask_cfg=mask_cfg) @ train["head"]["w"] + train["head"]["b"]
    z = z + offset
    if kind == "binary":
      return optax.sigmoid_binary_cross_entropy(z[:, 0], y).mean()
    if kind == "categorical":
      return optax.softmax_cross_entropy_with_integer_labels(z, y.astype(jnp.int32)).mean()
    return jnp.mean((z[:, 0] - y) ** 2)

  @jax.jit
  def step(train, opt_state, signals, observed, y, offset):
    loss, grads = jax.value_and_grad(loss_fn)(train, signals, observed, y, offset)
    updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, loss

  return jax.jit(tx.init), step


def fine_tune(model: PretrainedModel, z: np.ndarray, observed: np.ndarray, y: np.ndarray, *,
              kind: str, num_classes: int | None, steps: int, lr: float, batch_size: int,
              seed: int, class_balanced: bool = True, weight_decay: float = 1e-4) -> FineTuned:
  """Fine-tunes a copy of `model`'s weights (the original stays untouched)."""
  if steps < 1 or lr <= 0:
    raise ValueError(f"fine-tuning needs steps >= 1 and lr > 0, got {steps}, {lr}")
  width = num_classes if kind == "categorical" else 1
  y = np.asarray(y, np.float32)
  target_mean, target_scale = 0.0, 1.0
  offset = np.zeros(width, np.float32)
  if kind == "regression":
    target_mean, target_scale = float(y.mean()), float(y.std()) or 1.0
    y = (y - target_mean) / target_scale
  elif class_balanced:
    counts = np.bincount(y.astype(np.int64), minlength=2 if kind == "binary" else num_classes)
    prior = np.maximum(counts, 0.5) / counts.sum()
    offset = (np.log(prior[1] / prior[0])[None] if kind == "binary" else np.log(prior)).astype(np.float32)
  init, step = _compiled(model.graphdef, model.mask_cfg, kind, float(lr), float(weight_decay))
  d = model.model_cfg.enc_width
  train = {"model": jax.tree.map(jnp.copy, model.params),
           "head": model.replicate({"w": np.zeros((d, width), np.float32),
                                    "b": np.zeros((width,), np.float32)})}
  offset = model.replicate(offset)
  opt_state = model.replicate(init(train))  # Committed like the params: one compilation.
  size = model.padded_size(batch_size)
  batches = np.random.default_rng(seed).integers(0, z.shape[0], size=(steps, size))
  losses = []
  with model.mesh_context():
    for idx in batches:
      signals, obs, yb = model.shard(z[idx], observed[idx], y[idx])
      train, opt_state, loss = step(train, opt_state, signals, obs, yb, offset)
      losses.append(loss)
  losses = np.asarray(jax.device_get(losses), np.float64)
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"fine-tuning loss became NaN/inf (kind={kind}, lr={lr})")
  head = {k: np.asarray(v, np.float64) for k, v in jax.device_get(train["head"]).items()}
  return FineTuned(model, kind, train["model"], head, target_mean, target_scale, losses)


def run(results: report.Results, model: PretrainedModel, pool: discriminative.Pool,
        built: dict[tuple[str, str], discriminative.Examples],
        tasks: list[discriminative.Task], config: ml_collections.ConfigDict) -> None:
  """Fine-tunes per fold on the day-level tasks and records the out-of-fold metrics."""
  cfg = config.fine_tune
  for task in tasks:
    ex = built.get((task.name, "day"))
    if task.level != "day" or ex is None:
      continue
    rows = np.concatenate(ex.rows)  # Day level: one pool row per example.

    def predict(train, test, task=task, rows=rows, ex=ex):
      tuned = fine_tune(model, pool.z[rows[train]], pool.observed[rows[train]], ex.y[train],
                        kind=task.kind, num_classes=task.num_classes, steps=cfg.steps, lr=cfg.lr,
                        batch_size=cfg.batch_size, seed=config.seed)
      return tuned.predict(pool.z[rows[test]], pool.observed[rows[test]])

    discriminative.add_fold_metrics(
        results, discriminative.fold_metrics(ex, task, predict),
        discriminative.metric_names(task), task=task.name,
        split=ex.split_name, masking=report.NATURAL, method="fine_tune", level="day",
        family="discriminative")
