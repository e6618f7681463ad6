"""Sharded LSM-2 pretraining: one readable loop in named sections.

Data flows one way: shards -> Grain iterator -> global jax.Array batch ->
AIM masks (laid out for the encoder by encoder_layout.py) -> model -> masked
reconstruction loss -> optax update, with CLU metrics, TensorBoard events and
Orbax checkpoints on the side; at the end the params are exported in the
pretrained-model format (lsm2/pretrained.py).

Sections, top to bottom: configs, optimizer, state, steps, validation, the loop.
"""
from collections.abc import Mapping
import dataclasses
import logging
import math
import signal
import time
from typing import Any

from etils import epath
from flax import nnx
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lsm2 import errors
from lsm2 import metric_writer
from lsm2 import pretrained
from lsm2 import sharding as sharding_lib
from lsm2 import storage
from lsm2.data import metadata as metadata_lib
from lsm2.data import pipeline
from lsm2.data import synthesize
from lsm2.data import synthetic_stream
from lsm2.model import aim
from lsm2.model import config as model_config_lib
from lsm2.model import loss as loss_lib
from lsm2.model import mae
from lsm2.train import checkpoint as checkpoint_lib
from lsm2.train import encoder_layout
from lsm2.train import metrics as metrics_lib
from lsm2.train import preflight
from lsm2.train import run_dir
from lsm2.train import throughput

TrainState = dict[str, Any]  # {"step", "params", "opt_state", "rng"}


# ----------------------------------------------------------------------------
# Configs: ml_collections -> frozen model/masking dataclasses, validated early.
# ----------------------------------------------------------------------------
def model_and_mask_configs(config: ml_collections.ConfigDict, num_channels: int,
                           platform: str | None = None
                           ) -> tuple[model_config_lib.ModelConfig, model_config_lib.MaskConfig]:
  """Frozen hyper-parameter dataclasses from the run config and the dataset's channels.

  `platform` ("cpu", "gpu", "tpu"; default: JAX's default backend) resolves the "auto"
  dtype and attention; lsm2.aot passes the platform it compiles for.
  """
  m = config.model
  dtype = resolve_dtype(m.dtype, platform)
  resized = {name: m[name] for name in model_config_lib.SIZE_FIELDS if m[name] != 0}
  model_cfg = model_config_lib.get_model_config(
      m.size, **resized, num_channels=num_channels, patch_time=m.patch_time,
      patch_channels=m.patch_channels, dtype=dtype, matmul_dtype=m.matmul_dtype,
      attention="xla" if m.attention == "auto" else m.attention,
      remat=m.remat, observed_in_embedding=m.observed_in_embedding)
  if m.attention == "auto":  # The kernel depends on the head dimensions too (cuDNN's).
    model_cfg = dataclasses.replace(model_cfg, attention=resolve_attention(
        "auto", dtype, platform, model_cfg.head_dims)).validate()
  mk = config.masking
  strategies = model_config_lib.STRATEGIES
  unknown = sorted(set(mk.weights.keys()) - set(strategies))
  if unknown:
    raise errors.ConfigError(
        f"config.masking.weights: unknown strategies {unknown}; expected names from "
        f"{strategies}")
  # Weight 0 leaves a strategy out of the mix, so that strategy ids and the
  # per-strategy metrics are those of the strategies actually drawn.
  weights = tuple((name, float(mk.weights[name])) for name in strategies
                  if mk.weights.get(name, 0.0) != 0)
  if not weights:
    raise errors.ConfigError(
        f"config.masking.weights are all 0 ({mk.weights.to_dict()}): give at least "
        "one strategy a positive weight")
  n_time = model_cfg.grid[0]
  # -1: the paper's ratio on any grid (time_bars / n_time of all tokens).
  n_drop = round(model_cfg.num_tokens * mk.time_bars / n_time) if mk.n_drop == -1 else mk.n_drop
  mask_cfg = model_config_lib.MaskConfig(
      scheme=mk.scheme, inherited_threshold=mk.inherited_threshold, strategy_weights=weights,
      random_ratio=mk.random_ratio, time_bars=mk.time_bars,
      interp_gap_minutes=mk.interp_gap_minutes, extrap_gap_minutes=mk.extrap_gap_minutes,
      signal_imputation_k=mk.signal_imputation_k, n_drop=n_drop)
  return model_cfg, model_config_lib.effective_mask_config(mask_cfg, model_cfg)


def resolve_dtype(name: str, platform: str | None = None) -> str:
  """"auto" is the precision policy (model_config_lib.auto_dtype): bfloat16 compute on TPU
  and GPU, float32 on CPU; parameters, optimizer state and loss stay float32."""
  if name != "auto":
    return name
  return model_config_lib.auto_dtype(platform or jax.default_backend())


def resolve_attention(name: str, dtype: str, platform: str | None = None,
                      head_dims=()) -> str:
  """"auto" picks the fastest attention kernel for this platform, compute dtype and head
  dimensions (model_config_lib.auto_attention): "blocked" on CPU (under a mesh it runs per
  device through shard_map, see lsm2/model/attention.py), Pallas splash on TPU, cuDNN's
  fused kernel on GPU when computing in bfloat16 (it rejects float32) with head dimensions
  it takes (multiples of 8, at most 128), XLA's otherwise."""
  if name != "auto":
    return name
  return model_config_lib.auto_attention(platform or jax.default_backend(), dtype, head_dims)


def validate_config(config: ml_collections.ConfigDict, model_cfg, mask_cfg,
                    mesh: jax.sharding.Mesh) -> None:
  """Fails before any compilation, naming the offending field."""
  model_cfg.validate()
  mask_cfg.validate(model_cfg)
  dp = sharding_lib.data_parallel_size(mesh)
  if config.batch_size <= 0 or config.batch_size % dp:
    raise errors.ConfigError(
        f"config.batch_size={config.batch_size} must be a positive multiple of the "
        f"data-parallel size {dp} (config.mesh data x fsdp)")
  if config.batch_size % jax.process_count():
    raise errors.ConfigError(f"config.batch_size={config.batch_size} must divide evenly over "
                     f"{jax.process_count()} processes")
  if config.total_steps <= 0:
    raise errors.ConfigError(f"config.total_steps={config.total_steps} must be positive")
  if not 0 <= config.seed < 2**31:  # Grain's shuffle seeds and the PRNG keys derive from it.
    raise errors.ConfigError(f"config.seed={config.seed} must be in [0, 2**31)")
  if config.keep_checkpoints < 1:
    raise errors.ConfigError(
        f"config.keep_checkpoints={config.keep_checkpoints} must be >= 1: with none kept, "
        "the preemption and final checkpoints would be deleted as soon as they are written")
  _validate_optimizer(config)
  for field in ("checkpoint_every", "eval_every", "log_every"):
    if config[field] <= 0:
      raise errors.ConfigError(f"config.{field}={config[field]} must be positive")
  _check_preemption_exit_code(config)
  if config.lease_timeout_s <= 0:
    raise errors.ConfigError(f"config.lease_timeout_s={config.lease_timeout_s} must be positive")
  if not 0.0 <= config.warmup_fraction < 1.0:
    raise errors.ConfigError(f"config.warmup_fraction={config.warmup_fraction} must be in [0, 1)")
  if config.data.source not in pipeline.TRAIN_SOURCES:
    raise errors.ConfigError(f"config.data.source={config.data.source!r} must be one of "
                             f"{pipeline.TRAIN_SOURCES}")
  if config.data.source == "synthetic_stream" and config.data.max_train_subjects:
    raise errors.ConfigError(
        f"config.data.max_train_subjects={config.data.max_train_subjects} needs "
        "config.data.source='files': the synthetic stream has no fixed set of subjects")
  if config.masking.encoder_buckets < 0:
    raise errors.ConfigError(
        f"config.masking.encoder_buckets={config.masking.encoder_buckets} must be >= 0")
  if config.masking.pack_encoder and config.masking.encoder_buckets == 0:
    raise errors.ConfigError("config.masking.pack_encoder needs config.masking.encoder_buckets > 0 "
                     "(how many packed encoder lengths to compile)")
  _validate_perf(config)


def _validate_perf(config: ml_collections.ConfigDict) -> None:
  """The step-time anomaly threshold and the profiled window (lsm2/train/throughput.py)."""
  factor, warmup = config.perf.slow_step_factor, config.perf.slow_step_warmup
  if not (math.isfinite(factor) and factor > 1):
    raise errors.ConfigError(f"config.perf.slow_step_factor={factor} must be a finite number "
                             "> 1 (a step slower than that many running medians is logged)")
  if warmup < 1:
    raise errors.ConfigError(f"config.perf.slow_step_warmup={warmup} must be >= 1: the first "
                             "step of every start compiles")
  if config.profile_steps < 0:
    raise errors.ConfigError(f"config.profile_steps={config.profile_steps} must be >= 0")
  last = config.profile_start_step + config.profile_steps - 1
  if config.profile_steps and not 1 <= config.profile_start_step <= last <= config.total_steps:
    raise errors.ConfigError(
        f"config.profile_start_step={config.profile_start_step} with config.profile_steps="
        f"{config.profile_steps} traces steps {config.profile_start_step}..{last}: they must "
        f"lie in 1..config.total_steps={config.total_steps}")


# ----------------------------------------------------------------------------
# Optimizer: AdamW + global-norm clipping, linear warm-up then cosine decay.
# ----------------------------------------------------------------------------
def _validate_optimizer(config: ml_collections.ConfigDict) -> None:
  """Settings with which AdamW diverges or does nothing are refused, naming the field."""
  checks = (
      ("lr", config.lr, math.isfinite(config.lr) and config.lr > 0, "a finite number > 0"),
      ("optim.b1", config.optim.b1, 0 <= config.optim.b1 < 1, "in [0, 1)"),
      ("optim.b2", config.optim.b2, 0 <= config.optim.b2 < 1, "in [0, 1)"),
      ("optim.weight_decay", config.optim.weight_decay,
       math.isfinite(config.optim.weight_decay) and config.optim.weight_decay >= 0,
       "a finite number >= 0"),
      ("optim.grad_clip_norm", config.optim.grad_clip_norm,
       math.isfinite(config.optim.grad_clip_norm) and config.optim.grad_clip_norm > 0,
       "a finite number > 0"),
  )
  for field, value, ok, allowed in checks:
    if not ok:
      raise errors.ConfigError(f"config.{field}={value} must be {allowed}")


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
# the host can lay out the encoder from the visible-token counts
# (encoder_layout.MaskLayout) before the step runs.
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
    grad_norm = optax.global_norm(grads)
    outputs = {
        "loss": loss,
        "grad_norm": grad_norm,
        # Whether this step and the state it leaves are finite (Diverged).
        "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                   & jnp.isfinite(optax.global_norm(params))),
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


# ----------------------------------------------------------------------------
# Validation: reconstruction error on held-out subjects, the same masks each time.
# ----------------------------------------------------------------------------
def validation_losses(setup: Setup, eval_step, layout: encoder_layout.MaskLayout, params,
                      config: ml_collections.ConfigDict, step: int) -> dict[str, float]:
  """Validation reconstruction MSE per strategy, on observed minutes only ({} if no batch)."""
  it = pipeline.make_eval_iterator(config.data.dir, config.data.val_split,
                                   global_batch_size=config.batch_size)
  collection = metrics_lib.eval_metrics_collection(setup.mask_cfg.strategy_names)
  acc = collection.empty()
  eval_rng = jax.random.PRNGKey(config.seed + 2)  # Same masks at every evaluation.
  n = 0
  for local in it:
    if n >= config.eval_batches:
      break
    batch = pipeline.to_global_batch(local, setup.batch_sharding)
    masks = layout.draw(eval_rng, n, batch["observed"])
    acc = acc.merge(collection.single_from_model_output(**eval_step(params, batch, masks)))
    n += 1
  if n == 0:
    logging.warning("Validation split %r has fewer than batch_size=%d records: skipped at step %d.",
                    config.data.val_split, config.batch_size, step)
    return {}
  return metrics_lib.finite_scalars(acc.compute(), prefix="val/")


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
class Preempted(SystemExit):
  """Raised on SIGTERM once the preemption checkpoint is saved, or at once during start-up
  (`step` None: before training, nothing of this start to save); the interpreter exits
  with config.preemption_exit_code (default 75, EX_TEMPFAIL), which launchers and
  requeue loops read as "resume me", unlike 0 (finished) and 1 (failed)."""

  def __init__(self, step: int | None, exit_code: int):
    super().__init__(exit_code)
    self.step = step


class Diverged(errors.Error, RuntimeError):
  """A non-finite loss, gradient or parameter: training stopped before saving or
  exporting it; the newest checkpoint is from before. `python -m lsm2.main`
  exits with EXIT_CODE (not 1, a plain failure, nor the preemption status)."""

  EXIT_CODE = 3

  def __init__(self, step: int, config: ml_collections.ConfigDict, last_saved: int | None):
    kept = (f"the newest checkpoint, step {last_saved}, is from before it" if last_saved is not None else
            "no checkpoint was saved")
    super().__init__(
        f"training diverged at step {step} (a non-finite loss, gradient norm or parameter): "
        f"{kept}, and nothing was exported. Lower config.lr (now {config.lr}) or "
        f"config.optim.grad_clip_norm (now {config.optim.grad_clip_norm}) and start again in "
        "a new workdir")
    self.step = step


class _Preemption:
  """Whether to stop before the end: Orbax's preemption sync point, or SIGTERM.

  With a JAX distributed runtime (every multi-process job, and one process
  started with --distributed=on), JAX's preemption sync manager receives the
  SIGTERM of any process and the checkpoint manager's reached_preemption(step)
  turns True at the same step on all of them (it must be asked every step).
  A plain single process has no sync manager, so reached_preemption is always
  False there: it catches SIGTERM itself, from the first instruction of
  train_and_evaluate. During start-up (before the loop: storage checks, lease,
  restore, pre-flight compile) there is no new state to save, so the handler
  raises Preempted at once and every `finally` releases what it holds (the lease);
  in the loop it only sets `requested`, and the loop saves and stops; from
  hold() on (the clean-up) it only sets `requested`, so the clean-up runs to its end.
  """

  def __init__(self, exit_code: int):
    self.exit_code = exit_code
    self.requested = False
    self.restored_step: int | None = None  # The checkpoint this start resumed from.
    self._restore_known = False
    self._ckpt: checkpoint_lib.Checkpointer | None = None
    self._starting = True
    self._own_handler = not jax.distributed.is_initialized()
    if self._own_handler:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def restored(self, step: int | None) -> None:
    """Records the checkpoint step this start resumed from (None: a fresh start)."""
    self.restored_step, self._restore_known = step, True

  def start_loop(self, ckpt: checkpoint_lib.Checkpointer) -> None:
    """From here a SIGTERM saves a checkpoint and stops at the next step."""
    self._ckpt, self._starting = ckpt, False

  def hold(self) -> None:
    """From here a SIGTERM no longer interrupts (the clean-up must finish)."""
    self._starting = False

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True
    if not self._starting:
      logging.warning("SIGTERM received: saving a checkpoint and exiting.")
      return
    self._starting = False  # A second SIGTERM must not interrupt the unwinding.
    if not self._restore_known:
      kept = "this start wrote no checkpoint; rerun the same command to start (or resume)"
    elif self.restored_step is None:
      kept = "no checkpoint was written yet; rerun the same command to start"
    else:
      kept = (f"the newest checkpoint is still step {self.restored_step}; rerun the same "
              "command to resume from it")
    logging.warning("SIGTERM during start-up, before training: stopping with status %d (%s).",
                    self.exit_code, kept)
    raise Preempted(None, self.exit_code)

  def should_stop(self, step: int) -> bool:
    if not self._own_handler:
      self.requested = self.requested or self._ckpt.reached_preemption(step)
    return self.requested

  def close(self) -> None:
    if self._own_handler:
      signal.signal(signal.SIGTERM, self._previous)


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: epath.Path
                     ) -> ml_collections.ConfigDict:
  """An empty config.data.dir means WORKDIR/data (the demo's self-contained layout)."""
  if config.data.dir:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.dir = str(workdir / "data")
  return config.lock()


def synthesize_if_asked(config: ml_collections.ConfigDict, workdir: epath.Path
                        ) -> ml_collections.ConfigDict:
  """`config` with data.dir resolved (resolve_data_dir), after writing synthetic data there
  if the config asks for it (data.synthesize_subjects > 0) and data.dir holds no dataset.

  Synthetic data goes only into WORKDIR/data, the directory an empty config.data.dir
  names, and only while it is missing or empty: a data.dir that is set but holds no
  dataset (a misspelt path) is an error at load_data_metadata, never filled with
  synthetic data and trained on.
  """
  resolved = resolve_data_dir(config, workdir)
  if config.data.synthesize_subjects <= 0 or config.data.dir:
    return resolved
  data_dir = storage.as_path(resolved.data.dir)
  foreign = (jax.process_index() == 0 and data_dir.is_dir()
             and not (data_dir / metadata_lib.METADATA_FILE).exists()
             # Hidden entries are a dataset writer's own (the staging of a killed write).
             and any(not p.name.startswith(".") for p in data_dir.iterdir()))
  if jax.process_count() > 1:  # Process 0 looked; all stop, none waits at the synthesis.
    foreign = bool(multihost_utils.broadcast_one_to_all(np.int32(foreign)))
  if foreign:
    raise errors.ConfigError(
        f"{data_dir} holds files but no dataset ({metadata_lib.METADATA_FILE}): synthetic data "
        "(config.data.synthesize_subjects) is written only into a missing or empty "
        "WORKDIR/data. Move those files away, or pass a dataset as --config.data.dir.")
  synthesize.ensure_synthetic_dataset(resolved)
  return resolved


def load_data_metadata(config: ml_collections.ConfigDict):
  """The metadata of config.data.dir; a directory that is not a dataset is a ConfigError."""
  try:
    return metadata_lib.load_metadata(config.data.dir)
  except metadata_lib.MetadataError as e:
    hint = ("" if config.data.synthesize_subjects <= 0 else
            " Synthetic data (config.data.synthesize_subjects) is written only into WORKDIR/data, "
            "when config.data.dir is left empty.")
    raise errors.ConfigError(f"config.data.dir={config.data.dir}: {e}.{hint}") from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Pretrains per `config`, resuming from `workdir` if it holds checkpoints.

  Returns the last logged training metrics (for tests and sweeps).
  """
  _check_preemption_exit_code(config)
  started = time.time()  # This attempt's wall time (WORKDIR/goodput.json) starts here.
  # From here a SIGTERM exits with the preemption status, whatever the run is doing.
  preemption = _Preemption(config.preemption_exit_code)
  try:
    # Storage that cannot be used (no bucket, no credentials, a URL that lost a
    # slash) stops the run here, naming the path and the reason.
    workdir = storage.check_writable(workdir, "--workdir")
    storage.check_reachable(resolve_data_dir(config, workdir).data.dir, "config.data.dir")
    config = synthesize_if_asked(config, workdir)  # The demo/runlocal data, if asked for.

    # --- Data and configs -----------------------------------------------------
    meta = load_data_metadata(config)
    model_cfg, mask_cfg = model_and_mask_configs(config, num_channels=len(meta.channels))
    mesh = sharding_lib.make_mesh(config.mesh)
    validate_config(config, model_cfg, mask_cfg, mesh)

    # --- The workdir: owned by one run, written by one process -----------------
    record = run_dir.run_record(config, meta)
    run_dir.check_record(workdir, record)  # Another run's workdir: refused before any write.
    lease = run_dir.Lease(workdir, timeout_s=config.lease_timeout_s)
    try:
      lease.acquire()  # Inside: a SIGTERM just after its write still releases the lease.
      return _train(config, workdir, meta, model_cfg, mask_cfg, mesh, record, lease, preemption,
                    started)
    finally:
      preemption.hold()
      lease.release()
  finally:
    preemption.close()


def _check_preemption_exit_code(config: ml_collections.ConfigDict) -> None:
  if not 2 <= config.preemption_exit_code <= 255:
    raise errors.ConfigError(
        f"config.preemption_exit_code={config.preemption_exit_code} must be in "
        "[2, 255]: 0 means finished and 1 failed")


def _init_from(config: ml_collections.ConfigDict, setup: Setup, state: TrainState, meta
               ) -> tuple[TrainState, int | str]:
  """`state` with the parameters of run config.init_from (fine-tuning), and their step."""
  source = config.init_from
  try:
    description = pretrained.read_description(source)
  except (FileNotFoundError, ValueError) as e:  # Missing, or not JSON.
    raise errors.ConfigError(f"config.init_from={source}: {e}") from None
  if [c["name"] for c in description["channels"]] != list(meta.channel_names):
    raise errors.ConfigError(f"config.init_from={source} was pretrained on channels "
                     f"{[c['name'] for c in description['channels']]}, but dataset "
                     f"{config.data.dir} has {list(meta.channel_names)}; fine-tune on data with "
                     "the same channels in the same order")
  abstract = abstract_state(setup)["params"]
  try:
    export = pretrained.find_export(source)
    if export is not None:
      step = "export"
      params = pretrained.restore_params(export / pretrained.EXPORT_PARAMS, abstract)
    else:
      step, params = pretrained.restore_checkpoint_params(source, abstract)
  except pretrained.CheckpointMismatchError as e:
    raise pretrained.CheckpointMismatchError(
        f"config.init_from={source}: {e} Fine-tuning needs the same model size, patch and "
        "channel count.") from None
  return {**state, "params": params}, step


def make_train_iterator(config: ml_collections.ConfigDict, seed: int) -> grain.DatasetIterator:
  """This process's training batches from config.data.source (the files or the stream)."""
  if config.data.source == "synthetic_stream":
    try:
      return pipeline.make_synthetic_stream_iterator(
          config.data.dir, global_batch_size=config.batch_size, seed=seed,
          worker_count=config.data.worker_count)
    except synthetic_stream.NotPairableError as e:
      raise errors.ConfigError(f"config.data.source='synthetic_stream': {e}") from None
  return pipeline.make_train_iterator(
      config.data.dir, config.data.train_split, global_batch_size=config.batch_size,
      seed=seed, shuffle=True, worker_count=config.data.worker_count,
      max_subjects=config.data.max_train_subjects or None)


def _train(config: ml_collections.ConfigDict, workdir, meta, model_cfg, mask_cfg, mesh,
           record: dict[str, Any], lease: run_dir.Lease, preemption: _Preemption,
           started: float) -> dict[str, float]:
  """Restores or initialises the state, trains, checkpoints and exports, holding `lease`."""
  strategy_names = mask_cfg.strategy_names
  train_iter = make_train_iterator(config, config.seed)

  # --- Compiled functions and the pre-flight check ----------------------------
  setup = make_setup(config, model_cfg, mask_cfg, mesh)
  train_step = make_train_step(setup, strategy_names)
  eval_step = make_eval_step(setup, strategy_names)
  layout = encoder_layout.make_mask_layout(config, make_mask_fn(setup), model_cfg, mask_cfg, mesh)
  # A step that cannot fit stops here, from abstract shapes, with the figure and the knobs
  # to turn: before any state is allocated and before run.json, lsm2.json or checkpoints/
  # are written, so the workdir is as it was and the next try with a knob turned starts.
  # The first step reuses this compilation, and its cost analysis gives the FLOPs per step.
  compile_start = time.perf_counter()
  compiled = preflight.check_train_step(config, setup, train_step, layout.mask_fn,
                                        abstract_state(setup))
  compile_s = time.perf_counter() - compile_start
  perf = throughput.Throughput.for_run(
      compiled, model_cfg, mask_cfg, config.batch_size, mesh.devices.flat,
      slow_step_factor=config.perf.slow_step_factor,
      slow_step_warmup=config.perf.slow_step_warmup)
  perf.compile_s += compile_s

  # --- State: restore or initialise ------------------------------------------
  if jax.process_index() == 0:
    pretrained.recover_export(workdir)  # A kill during the last export: finish or undo it.
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=config.checkpoint_every,
                                     keep=config.keep_checkpoints,
                                     checksums=config.checkpoint_checksums)
  # Unreadable steps fall back (moved aside); another model's checkpoint raises.
  restored = ckpt.restore_latest(abstract_state(setup), train_iter)
  preemption.restored(None if restored is None else restored[0])
  if restored is None:
    state = create_state(setup)
    if config.init_from:
      state, from_step = _init_from(config, setup, state, meta)
      record = {**record, "init_from_step": from_step}
      logging.info("Initialised the parameters from %s (%s).", config.init_from, from_step)
    logging.info("Initialised a new %s model (%s parameters).", config.model.size,
                 f"{sum(x.size for x in jax.tree.leaves(state['params'])):,}")
  else:
    step, state, data_restored = restored
    if step > config.total_steps:
      # Training would stop at once and export step `step`'s parameters labelled total_steps.
      ckpt.close()
      raise errors.ConfigError(
          f"config.total_steps={config.total_steps} is below step {step}, the newest checkpoint "
          f"in {ckpt.directory}: this run has already trained past it. Nothing was written. To "
          f"go on with this run, pass --config.total_steps={step} or more; to train "
          f"{config.total_steps} steps, pass a new --workdir.")
    logging.info("Resumed from %s at step %d.", ckpt.directory, step)
    if not data_restored:  # Another process count wrote it: a fresh, step-dependent order.
      train_iter = make_train_iterator(config, config.seed + step)
  start_step = int(jax.device_get(state["step"]))
  # Only now, with this run's state in hand, does it claim the workdir (run.json
  # on a fresh start or a workdir from before run.json) and describe it (lsm2.json
  # lets evaluation restore mid-run steps).
  if restored is None or not (workdir / run_dir.RUN_FILE).exists():
    run_dir.write_record(workdir, record)
  description = pretrained.export_description(config, model_cfg, mask_cfg, meta)
  pretrained.write_description(workdir, description)

  train_collection = metrics_lib.train_metrics_collection(strategy_names)

  # --- Metrics, progress, preemption -----------------------------------------
  writer = metric_writer.create_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  progress = metrics_lib.Progress(config.total_steps)  # Steps/s and the ETA, per log line.
  trace = None
  if config.profile_steps > 0 and jax.process_index() == 0:
    if config.profile_start_step > start_step:
      trace = throughput.StepTrace(workdir / "profile", config.profile_start_step,
                                   config.profile_steps)
    else:
      logging.info("Not profiling: steps %d.. (config.profile_start_step) were trained by an "
                   "earlier start.", config.profile_start_step)
  # The run's attempts (WORKDIR/goodput.json): this one is recorded every log interval,
  # so a kill leaves its last step, and when it ends.
  previous_attempts = run_dir.read_attempts(workdir)

  def record_attempt(step: int, status: str) -> dict[str, Any]:
    entry = throughput.attempt_entry(perf, started=started, start_step=start_step,
                                     last_step=step, status=status)
    summary = throughput.goodput_summary([*previous_attempts, entry])
    run_dir.write_goodput(workdir, summary)
    return summary

  preemption.start_loop(ckpt)
  preempted_at = diverged_at = None
  finite = []  # (step, device bool) since the last check: read only where it must be.
  acc = train_collection.empty()
  last = {}
  step = start_step
  perf.start_loop(start_step)  # Per log interval: throughput, MFU, time split, memory.

  with sharding_lib.mesh_context(mesh, config.logical_axis_rules):
    for step in range(start_step + 1, config.total_steps + 1):
      # Train.
      if trace:
        with perf.profiling():
          trace.before_step(step, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        with perf.waiting_for_input():
          batch = pipeline.to_global_batch(next(train_iter), setup.batch_sharding)
        masks = layout.draw(state["rng"], state["step"], batch["observed"])
        state, outputs = train_step(state, batch, masks)
      if trace:
        with perf.profiling():
          trace.after_step(step, state)
      done = outputs.pop("finite")
      finite.append((step, done))
      acc = acc.merge(train_collection.single_from_model_output(**outputs))
      stop = preemption.should_stop(step)

      # Diverged? Checked before anything is logged or saved (one host read of the flags).
      if (stop or step % config.log_every == 0 or step % config.checkpoint_every == 0
          or step == config.total_steps):
        flags = jax.device_get([f for _, f in finite])
        bad = [s for (s, _), ok in zip(finite, flags) if not ok]
        finite = []
        if bad:
          diverged_at = bad[0]
          break

      # Log.
      if step % config.log_every == 0 or step == config.total_steps:
        scalars = perf.report(step)  # Just after the flags' read: the steps have finished.
        rate, eta = progress.report(step)
        last = metrics_lib.finite_scalars(acc.compute(), prefix="train/")
        writer.write_scalars(step, {**last, **scalars, **rate})
        logging.info("step %d/%d  loss %.4f  |  %s%s", step, config.total_steps,
                     last.get("train/loss", float("nan")), perf.summary(scalars),
                     f"  |  {eta}" if eta else "")
        acc = train_collection.empty()
        record_attempt(step, "running")

      # Validate.
      if step % config.eval_every == 0 or step == config.total_steps:
        with perf.evaluating(step):
          val = validation_losses(setup, eval_step, layout, state["params"], config, step)
        if val:
          writer.write_scalars(step, val)
          logging.info("step %d  validation %s", step,
                       "  ".join(f"{k}={v:.4f}" for k, v in sorted(val.items())))
          last.update(val)

      # Checkpoint (async), or save and stop on preemption.
      lease.check()  # Another process took the workdir over: stop before writing.
      with perf.checkpointing():
        if ckpt.maybe_save(step, state, train_iter, force=stop or step == config.total_steps):
          perf.saved(step)
      perf.end_step(step, done)  # Step time and slow steps, timed off the loop (throughput.py).
      if stop:
        preempted_at = step
        break

  if trace:
    trace.stop(state)
  with perf.checkpointing():  # The rest of the last async write blocks here.
    ckpt.wait()
  last_saved = ckpt.manager.latest_step()
  ckpt.close()
  writer.flush()
  if diverged_at is not None:
    for line in throughput.format_goodput(record_attempt(step, "diverged")):
      logging.warning("%s", line)
    raise Diverged(diverged_at, config, last_saved)
  if preempted_at is not None:
    for line in throughput.format_goodput(record_attempt(step, "preempted")):
      logging.warning("%s", line)
    logging.warning("Preempted at step %d: checkpoint saved, exiting with status %d (resume by "
                    "running the same command again).", preempted_at, config.preemption_exit_code)
    raise Preempted(preempted_at, config.preemption_exit_code)
  lease.check()
  pretrained.export_params(workdir, state["params"], description)
  for line in throughput.format_goodput(record_attempt(step, "finished")):
    logging.info("%s", line)
  return last

