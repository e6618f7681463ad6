"""The pretrained-model format: what training writes and inference reads.

Layout under a training workdir:
  lsm2.json                       the description: model + masking config, dataset
                                  channels and normalisation statistics, run config
  checkpoints/<step>/state/       training state; its "params" are read from here
  export/params/                  model parameters only (no optimizer state)
  export/lsm2.json                the description again, beside the exported params
  export.tmp/, export.old/        only while a new export is swapped in (export_params)

This module reads (and writes) exactly that, with Orbax alone: inference and
evaluation restore models without the trainer, its input pipeline or its
optimizer. Training checkpoints themselves (with optimizer and data-iterator
state) are written by lsm2/train/checkpoint.py.
"""
from collections.abc import Callable, Iterable
import dataclasses
import json
import logging
import os
from typing import Any, TypeVar

from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from lsm2 import sharding as sharding_lib
from lsm2 import storage
from lsm2.model import config as model_config_lib
from lsm2.model import mae

DESCRIPTION_FILE = "lsm2.json"
CHECKPOINTS_DIR = "checkpoints"
STATE = "state"  # The train-state item of each checkpoint step.
EXPORT_DIR = "export"
EXPORT_PARAMS = "params"
# An export is written to EXPORT_TMP, then swapped in with two renames (the
# previous export goes to EXPORT_OLD meanwhile); see export_params.
EXPORT_TMP = "export.tmp"
EXPORT_OLD = "export.old"


# ----------------------------------------------------------------------------
# The description file: everything downstream code needs besides weights.
# ----------------------------------------------------------------------------
def export_description(config, model_cfg: model_config_lib.ModelConfig,
                       mask_cfg: model_config_lib.MaskConfig, meta) -> dict[str, Any]:
  """The description of a run: its run `config`, frozen configs and dataset `meta`."""
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


def write_description(directory: str | os.PathLike, description: dict[str, Any]) -> None:
  """Writes DIRECTORY/lsm2.json atomically (process 0 only)."""
  if jax.process_index() == 0:
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(path / DESCRIPTION_FILE,
                              json.dumps(description, indent=1, sort_keys=True))


def read_description(directory: str | os.PathLike) -> dict[str, Any]:
  path = storage.as_path(directory) / DESCRIPTION_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path}: no lsm2 description here; expected a training workdir "
                            f"or its {EXPORT_DIR}/ directory.")
  return json.loads(path.read_text())


def mask_config_from_description(masking: dict[str, Any]) -> model_config_lib.MaskConfig:
  """The MaskConfig stored in a description (JSON lists back to tuples)."""
  fields = dict(masking)
  fields["strategy_weights"] = tuple((str(n), float(w)) for n, w in fields["strategy_weights"])
  return model_config_lib.MaskConfig(**fields)


# ----------------------------------------------------------------------------
# Restoring the newest readable step: unreadable data falls back, a mismatch raises.
# ----------------------------------------------------------------------------
T = TypeVar("T")


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose arrays do not fit the model being restored."""


class CheckpointUnreadableError(OSError):
  """No step that was asked for could be read (truncated or missing files)."""


def _flat(tree: Any) -> dict[str, Any]:
  """{"params/encoder/.../kernel/value": leaf}: checkpoint metadata and targets keyed alike."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_fits(saved: Any, target: Any, where: str, *, exact: bool = True, hint: str = "") -> None:
  """Raises CheckpointMismatchError, naming the arrays, unless `target` fits `saved`.

  `saved` is Orbax's metadata tree of a checkpoint (read without any array data),
  `target` a tree of jax.ShapeDtypeStruct. Every target array must be in the
  checkpoint with its shape and dtype; with `exact` (a whole train state) the
  checkpoint must hold nothing else. `hint` ends the message: what to do instead.
  """
  saved, target = _flat(saved), _flat(target)
  problems = [f"{k} is not in the checkpoint" for k in target if k not in saved]
  for k in (k for k in target if k in saved):
    have, want = saved[k], target[k]
    have_dtype = getattr(have, "dtype", None)
    if (tuple(getattr(have, "shape", ())) != tuple(want.shape)
        or (have_dtype is not None and np.dtype(have_dtype) != np.dtype(want.dtype))):
      problems.append(f"{k} is {have_dtype}{list(getattr(have, 'shape', ()))} in the checkpoint, "
                      f"{np.dtype(want.dtype)}{list(want.shape)} in this model")
  if exact:
    problems += [f"{k} is only in the checkpoint" for k in saved if k not in target]
  if problems:
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise CheckpointMismatchError(
        f"{where} does not fit this model: {'; '.join(problems[:5])}{more}. It was written "
        f"with another model config; nothing was restored, moved or deleted.{hint and ' ' + hint}")


def restore_newest(steps: Iterable[int], restore: Callable[[int], T], where: str,
                   on_unreadable: Callable[[int, str], None] | None = None
                   ) -> tuple[int, T] | None:
  """(step, restore(step)) for the newest of `steps` that can be read; None without steps.

  Training (lsm2/train/checkpoint.py), lsm2.load and evaluation all restore
  through this. A CheckpointMismatchError (check_fits, inside `restore`)
  propagates: a readable checkpoint of another model must stop the caller, never
  make it fall back to an older step or a new model. Any other error means
  unreadable data (truncated or missing files): it is logged as a warning with
  the step and the reason and the previous step is tried. Once an older step
  has been read, `on_unreadable(step, reason)` is called for each newer one
  (training moves them aside); when no step can be read, nothing is handed to
  it and CheckpointUnreadableError lists every step's reason.
  """
  unreadable = []
  for step in sorted(steps, reverse=True):
    try:
      restored = restore(step)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = f"{type(e).__name__}: {str(e)[:400]}"
      logging.warning("CHECKPOINT UNREADABLE: step %d in %s could not be restored (%s); "
                      "falling back to the previous step.", step, where, reason)
      unreadable.append((step, reason))
      continue
    for bad, reason in unreadable:
      if on_unreadable is not None:
        on_unreadable(bad, reason)
    if unreadable:
      logging.warning("Restored step %d of %s instead of the unreadable step(s) %s.", step, where,
                      [s for s, _ in unreadable])
    return step, restored
  if unreadable:
    raise CheckpointUnreadableError(
        f"no checkpoint step in {where} could be read: "
        + "; ".join(f"step {s}: {r}" for s, r in unreadable)
        + ". Nothing was moved or deleted. If the files are damaged, move the steps aside "
        "(or start a fresh run with a new --workdir).")
  return None


# ----------------------------------------------------------------------------
# Parameters: exported, or read-only from a training checkpoint.
# ----------------------------------------------------------------------------
def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINTS_DIR


def _sync(name: str) -> None:
  """All processes of a multi-process job wait here for each other."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def export_params(workdir: str | os.PathLike, params: Any, description: dict[str, Any]
                  ) -> epath.Path:
  """Writes model params (no optimizer state) and the description to WORKDIR/export.

  An earlier export stays loadable throughout: the new one is written to
  EXPORT_TMP (its description last, which marks it complete), then the old one
  is renamed to EXPORT_OLD, EXPORT_TMP to EXPORT_DIR, and EXPORT_OLD deleted. A
  kill at any point leaves a state that find_export reads and recover_export
  completes. Every process writes its arrays; process 0 renames.
  """
  workdir = epath.Path(workdir)
  final, tmp, old = (workdir / name for name in (EXPORT_DIR, EXPORT_TMP, EXPORT_OLD))
  if jax.process_index() == 0:
    recover_export(workdir)  # No EXPORT_TMP or EXPORT_OLD from here on.
    tmp.mkdir(parents=True)
  _sync("lsm2_export_begin")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / EXPORT_PARAMS, params)
    ckptr.wait_until_finished()
  write_description(tmp, description)
  if jax.process_index() == 0:
    if final.exists():
      final.rename(old)
    tmp.rename(final)
    if old.exists():
      old.rmtree()
  _sync("lsm2_export_end")
  return final


def recover_export(workdir: str | os.PathLike) -> None:
  """Completes or undoes an export swap that a kill interrupted (process 0 only).

  Deterministic: without EXPORT_DIR, a complete EXPORT_TMP becomes it, else
  EXPORT_OLD goes back; whatever is left of EXPORT_TMP and EXPORT_OLD is then
  deleted (an export the interrupted run did not finish is written again when
  the resumed run ends).
  """
  workdir = epath.Path(workdir)
  final, tmp, old = (workdir / name for name in (EXPORT_DIR, EXPORT_TMP, EXPORT_OLD))
  if not final.exists():
    if (tmp / DESCRIPTION_FILE).exists():
      tmp.rename(final)
      logging.warning("Completed an export that was interrupted while being swapped in: %s", final)
    elif old.exists():
      old.rename(final)
      logging.warning("An export was interrupted before it was complete: restored the previous "
                      "one in %s", final)
  for leftover in (tmp, old):
    if leftover.exists():
      logging.warning("Deleting %s, left by an interrupted export.", leftover)
      leftover.rmtree()


def find_export(path: str | os.PathLike) -> epath.Path | None:
  """The complete export that `path` (a workdir or an export directory) holds, or None.

  Between the two renames of export_params only EXPORT_OLD holds one: it is
  returned then (with a warning), so a kill there never leaves a workdir
  without its export.
  """
  path = epath.Path(path)
  candidates = [path, path / EXPORT_DIR, path / EXPORT_OLD]
  if path.name == EXPORT_DIR:
    candidates.append(path.parent / EXPORT_OLD)
  for export in candidates:
    if (export / EXPORT_PARAMS).exists() and (export / DESCRIPTION_FILE).exists():
      if export.name == EXPORT_OLD:
        logging.warning("Using %s: an export swap was interrupted (the next training start "
                        "completes it).", export)
      return export
  return None


def restore_params(path: str | os.PathLike, abstract_params: Any) -> Any:
  """Restores exported params onto `abstract_params` (shapes, dtypes, shardings)."""
  path = epath.Path(path)
  with ocp.StandardCheckpointer() as ckptr:
    check_fits(ckptr.metadata(path).item_metadata.tree, abstract_params, f"export {path}")
    return ckptr.restore(path, abstract_params)


def restore_checkpoint_params(workdir: str | os.PathLike, abstract_params: Any,
                              step: int | None = None) -> tuple[int, Any]:
  """Restores only `state["params"]` (no optimizer state) at `step` (default: the newest readable).

  Opens the checkpoints read-only: downstream evaluation never writes to them,
  so an unreadable newest step is skipped (restore_newest) but left in place.
  """
  directory = checkpoint_dir(workdir)
  reader = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler()})
  try:
    steps = reader.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory}: no checkpoints")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; have {sorted(steps)}")
    item = {"params": abstract_params}

    def restore(s: int) -> Any:
      saved = reader.item_metadata(s)[STATE]
      check_fits(getattr(saved, "tree", saved), item, f"checkpoint step {s} in {directory}",
                 exact=False)
      return reader.restore(s, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)}))[STATE]["params"]

    return restore_newest(steps if step is None else [step], restore, str(directory))
  finally:
    reader.close()


# ----------------------------------------------------------------------------
# A model with pretrained parameters.
# ----------------------------------------------------------------------------
def _abstract_model(model_cfg: model_config_lib.ModelConfig):
  with nnx.use_eager_sharding(False):  # Shardings come from the restore target.
    return mae.LSM2MAE(model_cfg, rngs=nnx.Rngs(0))


def load_pretrained(path: str | os.PathLike, step: int | None = None
                    ) -> tuple[mae.LSM2MAE, dict[str, Any], int]:
  """A model with pretrained parameters, its description (configs, channels, stats) and step.

  `path` is a training workdir (its export/ when `step` is None and training
  finished, else the checkpoint at `step` or the newest readable one) or an
  export/ directory. The step is the training step of the parameters (of an
  export: its run's total_steps). Parameters are replicated over all devices
  of this job, whatever the process and device count of the job that wrote them.
  """
  path = storage.check_reachable(path, "pretrained model")  # No bucket, no credentials: said here.
  export = find_export(path) if step is None else None
  description = read_description(
      path if export is None or (path / DESCRIPTION_FILE).exists() else export)
  # A model trained with a TPU- or GPU-only attention kernel runs here with this platform's.
  model_cfg = model_config_lib.for_platform(
      model_config_lib.ModelConfig(**description["model"]), jax.default_backend())
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: _abstract_model(model_cfg)))
  replicated = sharding_lib.replicated(sharding_lib.make_mesh({"data": -1}))
  abstract_params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_params)
  if export is not None:
    params = restore_params(export / EXPORT_PARAMS, abstract_params)
    step = int(description.get("run_config", {}).get("total_steps", 0))
  else:
    step, params = restore_checkpoint_params(path, abstract_params, step)
  return nnx.merge(graphdef, params), description, step
