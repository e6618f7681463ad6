"""Sharded LSM-2 pretraining: one readable loop in named sections.

Data flows one way: shards -> Grain iterator -> global jax.Array batch ->
AIM masks -> model -> masked reconstruction loss -> optax update, with CLU
metrics, TensorBoard events and Orbax checkpoints on the side.
"""
from collections.abc import Mapping
import dataclasses
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any

from clu import periodic_actions
from flax import nnx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from lsm2.data import metadata as metadata_lib
from lsm2.data import pipeline
from lsm2.model import aim
from lsm2.model import config as model_config_lib
from lsm2.model import loss as loss_lib
from lsm2.model import mae
from lsm2.train import checkpoint as checkpoint_lib
from lsm2.train import metrics as metrics_lib
from lsm2.train import sharding as sharding_lib

TrainState = dict[str, Any]  # {"step", "params", "opt_state", "rng"}


# ----------------------------------------------------------------------------
# Configs: ml_collections -> frozen model/masking dataclasses, validated early.
# ----------------------------------------------------------------------------
def model_and_mask_configs(config: ml_collections.ConfigDict, num_channels: int
                           ) -> tuple[model_config_lib.ModelConfig, model_config_lib.MaskConfig]:
  """Frozen hyper-parameter dataclasses from the run config and the dataset's channels."""
  m = config.model
  model_cfg = model_config_lib.get_model_config(
      m.size, num_channels=num_channels, patch_time=m.patch_time,
      patch_channels=m.patch_channels, dtype=m.dtype, matmul_dtype=m.matmul_dtype,
      attention=resolve_attention(m.attention),
      remat=m.remat, observed_in_embedding=m.observed_in_embedding)
  mk = config.masking
  n_time = model_cfg.grid[0]
  n_drop = mk.n_drop if mk.n_drop >= 0 else round(model_cfg.num_tokens * mk.time_bars / n_time)
  mask_cfg = model_config_lib.MaskConfig(
      scheme=mk.scheme, inherited_threshold=mk.inherited_threshold,
      random_ratio=mk.random_ratio, time_bars=mk.time_bars, n_drop=n_drop,
      strategy_weights=tuple((k, float(v)) for k, v in mk.weights.items()))
  return model_cfg, model_config_lib.effective_mask_config(mask_cfg, model_cfg)


def resolve_attention(name: str) -> str:
  """"auto" picks the fastest attention kernel for this backend.

  "blocked" on CPU (under a mesh it runs per device through shard_map, see
  lsm2/model/attention.py), cuDNN's fused kernel on GPU, XLA's elsewhere.
  """
  if name != "auto":
    return name
  if jax.default_backend() == "cpu":
    return "blocked"
  return "cudnn" if jax.default_backend() == "gpu" else "xla"


def validate_config(config: ml_collections.ConfigDict, model_cfg, mask_cfg,
                    mesh: jax.sharding.Mesh) -> None:
  """Fails before any compilation, naming the offending field."""
  model_cfg.validate()
  mask_cfg.validate(model_cfg)
  dp = sharding_lib.data_parallel_size(mesh)
  if config.batch_size <= 0 or config.batch_size % dp:
    raise ValueError(f"config.batch_size={config.batch_size} must be a positive multiple of the "
                     f"data-parallel size {dp} (config.mesh data x fsdp)")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must divide evenly over "
                     f"{jax.process_count()} processes")
  if config.total_steps <= 0:
    raise ValueError(f"config.total_steps={config.total_steps} must be positive")
  for field in ("checkpoint_every", "eval_every", "log_every"):
    if config[field] <= 0:
      raise ValueError(f"config.{field}={config[field]} must be positive")
  if not 0.0 <= config.warmup_fraction < 1.0:
    raise ValueError(f"config.warmup_fraction={config.warmup_fraction} must be in [0, 1)")
  if config.masking.encoder_buckets < 0:
    raise ValueError(f"config.masking.encoder_buckets={config.masking.encoder_buckets} must be >= 0")
  if config.masking.pack_encoder and config.masking.encoder_buckets == 0:
    raise ValueError("config.masking.pack_encoder needs config.masking.encoder_buckets > 0 "
                     "(how many packed encoder lengths to compile)")


def encoder_buckets(num_buckets: int, n_keep: int) -> tuple[int, ...]:
  """Encoder lengths to compile: evenly spaced up to n_keep (multiples of 16)."""
  if num_buckets <= 1:
    return (n_keep,)
  sizes = {min(n_keep, 16 * math.ceil(n_keep * (i + 1) / num_buckets / 16))
           for i in range(num_buckets)}
  return tuple(sorted(sizes))


# ----------------------------------------------------------------------------
# Optimizer: AdamW + global-norm clipping, linear warm-up then cosine decay.
# ----------------------------------------------------------------------------
def make_optimizer(config: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  warmup = int(config.warmup_fraction * config.total_steps)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=config.total_steps, end_value=0.0)
  # Why the mask: decaying norms, biases and the mask token only pulls them to 0.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(config.optim.grad_clip_norm),
      optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2,
                  weight_decay=config.optim.weight_decay, mask=decay_mask))
  return tx, schedule


# ----------------------------------------------------------------------------
# State: created directly in its sharded layout (never fully on one device).
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static that the jitted functions close over."""
  model_cfg: model_config_lib.ModelConfig
  mask_cfg: model_config_lib.MaskConfig
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  init_fn: Any  # () -> TrainState, jitted with state_shardings as out_shardings.


def _init_model(model_cfg, seed: int):
  with nnx.use_eager_sharding(False):  # Shardings come from jit's out_shardings.
    return mae.LSM2MAE(model_cfg, rngs=nnx.Rngs(seed))


def make_setup(config, model_cfg, mask_cfg, mesh) -> Setup:
  tx, schedule = make_optimizer(config)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: _init_model(model_cfg, 0)))

  def init_fn():
    params = nnx.state(_init_model(model_cfg, config.seed), nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(config.seed + 1)}

  abstract = jax.eval_shape(init_fn)
  shardings = sharding_lib.logical_shardings(abstract, mesh, config.logical_axis_rules)
  return Setup(model_cfg, mask_cfg, graphdef, tx, schedule, mesh, shardings,
               sharding_lib.batch_sharding(mesh), init_fn)


def abstract_state(setup: Setup):
  """Shapes, dtypes and target shardings of the train state (for restore/resharding)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      jax.eval_shape(setup.init_fn), setup.state_shardings)


def create_state(setup: Setup) -> TrainState:
  return jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()


# ----------------------------------------------------------------------------
# Steps: masks, forward/backward, update. Masks are drawn in their own jit so
# the host can pick an encoder-length bucket from the visible-token counts.
# ----------------------------------------------------------------------------
def make_mask_fn(setup: Setup):
  @jax.jit
  def mask_fn(rng, step, observed):
    # Folding the step in makes masks reproducible on resume and independent per step.
    key = jax.random.fold_in(rng, step)
    observed = aim.effective_observed(observed, setup.mask_cfg)  # All True for LSM-1.
    return aim.aim_masks(observed, key, setup.mask_cfg, setup.model_cfg)
  return mask_fn


def _forward_loss(setup: Setup, params, batch, masks, strategy_names):
  """Model reconstruction and the masked MSE (with per-strategy aux)."""
  model = nnx.merge(setup.graphdef, params)
  observed = aim.effective_observed(batch["observed"], setup.mask_cfg)
  # Exact for the loss: the decoder's last block skips the query rows the loss never reads.
  pred = model(batch["signals"], observed, masks, loss_tokens_only=True)
  return loss_lib.reconstruction_loss(pred, batch["signals"], masks, strategy_names)


def _sum_count_outputs(aux, strategy_names) -> dict[str, jax.Array]:
  """Per-strategy (sum of squared errors, minutes) pairs for SumCount metrics."""
  out = {}
  for name in strategy_names:
    out[f"sse_{name}"] = aux[f"loss/{name}"] * aux[f"minutes/{name}"]
    out[f"sse_{name}_count"] = aux[f"minutes/{name}"]
  return out


def make_train_step(setup: Setup, strategy_names: tuple[str, ...]):
  def train_step(state: TrainState, batch: Mapping[str, jax.Array], masks) -> tuple[TrainState, dict]:
    loss_fn = lambda p: _forward_loss(setup, p, batch, masks, strategy_names)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    outputs = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": setup.schedule(state["step"]),
        "inherited_fraction": jnp.mean(masks.inherited.astype(jnp.float32)),
        **_sum_count_outputs(aux, strategy_names),
    }
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": state["rng"]}
    return new_state, outputs

  return jax.jit(train_step, in_shardings=(setup.state_shardings, setup.batch_sharding, None),
                 out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def make_eval_step(setup: Setup, strategy_names: tuple[str, ...]):
  def eval_step(params, batch, masks):
    # Scored on really observed minutes only, whatever the scheme trains on.
    masks = masks.replace(loss_weight=masks.loss_weight * batch["observed"])
    loss, aux = _forward_loss(setup, params, batch, masks, strategy_names)
    return {"sse": loss * aux["minutes/total"], "sse_count": aux["minutes/total"],
            **_sum_count_outputs(aux, strategy_names)}
  return jax.jit(eval_step, in_shardings=(setup.state_shardings["params"], setup.batch_sharding, None))


class StepRunner:
  """Draws masks, picks the encoder bucket and runs the matching compiled step.

  With buckets the encoder only computes as many kept tokens as the batch's
  largest visible count needs (visible tokens come first, so the cut tail is
  only attention-masked tokens whose outputs are discarded: exact). With
  `pack_groups` the buckets are packed lengths instead: the visible tokens of
  each group of examples (one group per data-parallel shard) are laid end to
  end, so per-token layers follow the batch's total, not its largest, visible
  count (`aim.pack_visible`; exact too). One compilation per bucket;
  `compiled_lengths` records which were used.
  """

  def __init__(self, setup: Setup, step_fn, buckets: tuple[int, ...] | None, pack_groups: int = 0):
    self.mask_fn = make_mask_fn(setup)
    self.step_fn = step_fn
    self.buckets = buckets
    self.pack_groups = pack_groups
    self.compiled_lengths: set[int] = set()

  def masks(self, rng, step, observed):
    masks = self.mask_fn(rng, step, observed)
    if self.buckets is None:
      return masks
    masks, length = fit_encoder(masks, self.buckets, self.pack_groups)
    self.compiled_lengths.add(length)
    return masks


def layout_buckets(num_buckets: int, n_keep: int, batch_size: int, pack_groups: int
                   ) -> tuple[int, ...] | None:
  """Encoder lengths to compile (None: the fixed split). Packed lengths range up to every
  kept token of a group's examples."""
  if num_buckets <= 0:
    return None
  return encoder_buckets(num_buckets, n_keep * batch_size // pack_groups if pack_groups else n_keep)


def fit_encoder(masks: aim.AimMasks, buckets: tuple[int, ...], pack_groups: int = 0
                ) -> tuple[aim.AimMasks, int]:
  """Masks cut (or, with `pack_groups`, packed) to the smallest bucket that holds the
  batch's visible tokens (largest count per example, or total per group), and that length."""
  visible = masks.visible_len
  if pack_groups:
    visible = visible.reshape(pack_groups, -1).sum(axis=1)
  longest = int(jax.device_get(jnp.max(visible)))
  length = next(b for b in buckets if b >= longest)
  if pack_groups:
    return aim.pack_visible(masks, length, pack_groups), length
  return aim.truncate_kept(masks, length), length


def make_runner(config: ml_collections.ConfigDict, setup: Setup, step_fn) -> StepRunner:
  """The encoder layout the config asks for: fixed split, buckets, or packed buckets."""
  n_keep = setup.model_cfg.num_tokens - setup.mask_cfg.n_drop
  pack_groups = sharding_lib.data_parallel_size(setup.mesh) if config.masking.pack_encoder else 0
  buckets = layout_buckets(config.masking.encoder_buckets, n_keep, config.batch_size, pack_groups)
  layout = ("fixed split" if buckets is None else
            f"packed encoder, {pack_groups} group(s), lengths {buckets}" if pack_groups else
            f"encoder buckets {buckets}")
  logging.info("Encoder layout: %s (n_keep %d).", layout, n_keep)
  return StepRunner(setup, step_fn, buckets, pack_groups)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
class _Preemption:
  """SIGTERM sets a flag; the loop checkpoints and exits cleanly at the next step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def should_stop(self, step: int, sync_every: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    # Every process must agree, or the collective save would hang; agreeing
    # costs a collective, so it only happens every `sync_every` steps.
    if step % sync_every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: pathlib.Path
                     ) -> ml_collections.ConfigDict:
  """An empty config.data.dir means WORKDIR/data (the demo's self-contained layout)."""
  if config.data.dir:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.dir = str(workdir / "data")
  return config.lock()


def _maybe_synthesize(config) -> None:
  """The demo/runlocal path: write a small synthetic dataset if data.dir has none.

  Process 0 alone decides and writes; every process waits at the same barrier,
  so they agree even when the directory appears while they check.
  """
  if config.data.synthesize_subjects <= 0:
    return
  data_dir = pathlib.Path(config.data.dir)
  if jax.process_index() == 0 and not (data_dir / "metadata.json").exists():
    from lsm2.data import synthesize  # pylint: disable=g-import-not-at-top
    logging.info("No dataset at %s: synthesizing %d subjects x %d days.", data_dir,
                 config.data.synthesize_subjects, config.data.synthesize_days)
    synthesize.write_synthetic_dataset(
        data_dir, subjects=config.data.synthesize_subjects, days=config.data.synthesize_days,
        seed=config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("lsm2_synthesize")


def evaluate(setup, eval_step, runner, params, config, strategy_names, step) -> dict[str, float]:
  """Validation reconstruction MSE per strategy, on observed minutes only."""
  it = pipeline.make_train_iterator(
      config.data.dir, config.data.val_split, global_batch_size=config.batch_size,
      seed=config.seed, shuffle=False, num_epochs=1)
  collection = metrics_lib.eval_metrics_collection(strategy_names)
  acc = collection.empty()
  eval_rng = jax.random.PRNGKey(config.seed + 2)  # Same masks at every evaluation.
  n = 0
  for local in it:
    if n >= config.eval_batches:
      break
    batch = pipeline.to_global_batch(local, setup.batch_sharding)
    masks = runner.masks(eval_rng, n, batch["observed"])
    acc = acc.merge(collection.single_from_model_output(**eval_step(params, batch, masks)))
    n += 1
  if n == 0:
    logging.warning("Validation split %r has fewer than batch_size=%d records: skipped at step %d.",
                    config.data.val_split, config.batch_size, step)
    return {}
  return metrics_lib.finite_scalars(acc.compute(), prefix="val/")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Pretrains per `config`, resuming from `workdir` if it holds checkpoints.

  Returns the last logged training metrics (for tests and sweeps).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = resolve_data_dir(config, workdir)
  _maybe_synthesize(config)

  # --- Data and configs -----------------------------------------------------
  meta = metadata_lib.load_metadata(config.data.dir)
  model_cfg, mask_cfg = model_and_mask_configs(config, num_channels=len(meta.channels))
  mesh = sharding_lib.make_mesh(config.mesh)
  validate_config(config, model_cfg, mask_cfg, mesh)
  strategy_names = mask_cfg.strategy_names
  make_iterator = lambda seed: pipeline.make_train_iterator(
      config.data.dir, config.data.train_split, global_batch_size=config.batch_size,
      seed=seed, shuffle=True, worker_count=config.data.worker_count,
      max_subjects=config.data.max_train_subjects or None)
  train_iter = make_iterator(config.seed)

  # --- State: restore or initialise ------------------------------------------
  setup = make_setup(config, model_cfg, mask_cfg, mesh)
  description = export_description(config, model_cfg, mask_cfg, meta)
  checkpoint_lib.write_description(workdir, description)  # Lets eval restore mid-run steps.
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=config.checkpoint_every,
                                     keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(abstract_state(setup), train_iter)
  if restored is None:
    state = create_state(setup)
    logging.info("Initialised a new %s model (%s parameters).", config.model.size,
                 f"{sum(x.size for x in jax.tree.leaves(state['params'])):,}")
  else:
    step, state, data_restored = restored
    logging.info("Resumed from %s at step %d.", ckpt.directory, step)
    if not data_restored:  # Another process count wrote it: a fresh, step-dependent order.
      train_iter = make_iterator(config.seed + step)
  start_step = int(jax.device_get(state["step"]))

  # --- Compiled functions ------------------------------------------------------
  runner = make_runner(config, setup, make_train_step(setup, strategy_names))
  eval_step = make_eval_step(setup, strategy_names)
  train_collection = metrics_lib.train_metrics_collection(strategy_names)

  # --- Metrics, progress, preemption -----------------------------------------
  writer = metrics_lib.create_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                           every_steps=config.log_every)]
  if config.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=config.profile_steps))
  preemption = _Preemption()
  acc = train_collection.empty()
  last = {}
  t0, logged_step = time.time(), start_step

  with sharding_lib.mesh_context(mesh, config.logical_axis_rules):
    for step in range(start_step + 1, config.total_steps + 1):
      # Train.
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = pipeline.to_global_batch(next(train_iter), setup.batch_sharding)
        masks = runner.masks(state["rng"], state["step"], batch["observed"])
        state, outputs = runner.step_fn(state, batch, masks)
      acc = acc.merge(train_collection.single_from_model_output(**outputs))
      for hook in hooks:
        hook(step)

      # Log.
      if step % config.log_every == 0 or step == config.total_steps:
        last = metrics_lib.finite_scalars(acc.compute(), prefix="train/")
        writer.write_scalars(step, last)
        rate = (step - logged_step) / max(time.time() - t0, 1e-9)
        eta = (config.total_steps - step) / max(rate, 1e-9)
        logging.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %s", step, config.total_steps,
                     last.get("train/loss", float("nan")), rate, _hms(eta))
        acc, t0, logged_step = train_collection.empty(), time.time(), step

      # Validate.
      if step % config.eval_every == 0 or step == config.total_steps:
        val = evaluate(setup, eval_step, runner, state["params"], config, strategy_names, step)
        if val:
          writer.write_scalars(step, val)
          logging.info("step %d  validation %s", step,
                       "  ".join(f"{k}={v:.4f}" for k, v in sorted(val.items())))
          last.update(val)

      # Checkpoint (async), or save and stop on preemption.
      stop = preemption.should_stop(step, config.log_every)
      ckpt.maybe_save(step, state, train_iter, force=stop or step == config.total_steps)
      if stop:
        logging.warning("Preempted at step %d: checkpoint saved, exiting.", step)
        break

  ckpt.wait()
  ckpt.close()
  writer.flush()
  if not preemption.requested:
    checkpoint_lib.export_params(workdir, state["params"], description)
  return last


def export_description(config, model_cfg, mask_cfg, meta) -> dict[str, Any]:
  """What downstream code needs besides weights: configs, channels, normalisation."""
  return {
      "model": dataclasses.asdict(model_cfg),
      "masking": dataclasses.asdict(mask_cfg),
      "model_size": config.model.size,
      "channels": [dataclasses.asdict(c) for c in meta.channels],
      "norm_mean": np.asarray(meta.norm_mean).tolist(),
      "norm_std": np.asarray(meta.norm_std).tolist(),
      "data_dir": str(config.data.dir),
      "run_config": json.loads(config.to_json_best_effort()),
  }


def load_pretrained(path: str | pathlib.Path, step: int | None = None
                    ) -> tuple[mae.LSM2MAE, dict[str, Any]]:
  """A model with pretrained parameters, and its description (configs, channels, stats).

  `path` is a training workdir (its export/ when `step` is None and training
  finished, else the checkpoint at `step` or the latest) or an export/
  directory. Parameters are replicated over all devices of this job, whatever
  the process and device count of the job that wrote them.
  """
  path = pathlib.Path(path)
  description = checkpoint_lib.read_description(path)
  model_cfg = model_config_lib.ModelConfig(**description["model"])
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: _init_model(model_cfg, 0)))
  replicated = sharding_lib.replicated(sharding_lib.make_mesh({"data": -1}))
  abstract_params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_params)
  export = path if (path / checkpoint_lib.EXPORT_PARAMS).exists() else path / checkpoint_lib.EXPORT_DIR
  if step is None and (export / checkpoint_lib.EXPORT_PARAMS).exists():
    params = checkpoint_lib.restore_params(export / checkpoint_lib.EXPORT_PARAMS, abstract_params)
  else:
    step, params = checkpoint_lib.restore_checkpoint_params(path, abstract_params, step)
  return nnx.merge(graphdef, params), description


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
