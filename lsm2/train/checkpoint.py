"""Orbax checkpoints: periodic async saves, exact resume, params-only export.

Layout under the workdir:
  lsm2.json                       model + masking config, dataset channels/statistics
  checkpoints/<step>/state/       params, optimizer state, step, RNG (sharded arrays)
  checkpoints/<step>/data_iter/   Grain iterator state, one file per process
  export/params/                  model parameters only (no optimizer state)
  export/lsm2.json                model + masking config and dataset channels/statistics

Orbax writes each step to a temporary directory and renames it when complete,
so a save killed half-way never shows up as a step. A step that exists but
fails to restore (truncated files) is skipped with a warning in favour of the
previous one.
"""
import json
import logging
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA_ITER = "data_iter"
LAYOUT = "layout"  # {"process_count": P}: data iterator states are per process.
EXPORT_DIR = "export"
EXPORT_PARAMS = "params"
EXPORT_CONFIG = "lsm2.json"


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir) / "checkpoints"


class Checkpointer:
  """A CheckpointManager for (train state, data iterator) pairs."""

  def __init__(self, workdir: str | pathlib.Path, *, save_every: int, keep: int,
               async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: grain.checkpoint.CheckpointHandler(),
                       LAYOUT: ocp.JsonCheckpointHandler()})

  def maybe_save(self, step: int, state: Any, data_iter: Any, *, force: bool = False) -> bool:
    """Saves when `step` is on the save interval (or `force`); returns whether it did."""
    return self.manager.save(
        step,
        args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                   DATA_ITER: grain.checkpoint.CheckpointSave(data_iter),
                                   LAYOUT: ocp.args.JsonSave({"process_count": jax.process_count()})}),
        force=force)

  def restore_latest(self, abstract_state: Any, data_iter: Any | None
                     ) -> tuple[int, Any, bool] | None:
    """Restores the newest complete checkpoint onto `abstract_state`'s shardings.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings, so a
    checkpoint written on one mesh restores onto another (Orbax reshards).
    `data_iter` (if given) is restored in place when the checkpoint was written
    by as many processes as this job has (iterator states are per process).
    Returns (step, state, whether data_iter was restored) or None.
    """
    self._warn_about_partial_saves()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        layout = self.manager.restore(step, args=ocp.args.Composite(
            **{LAYOUT: ocp.args.JsonRestore()}))[LAYOUT]
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        same_layout = layout["process_count"] == jax.process_count()
        if data_iter is not None and same_layout:
          items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # A truncated or corrupt step: fall back to the previous one.
        logging.warning("Checkpoint step %d in %s could not be restored (%s: %s); "
                        "trying the previous one.", step, self.directory, type(e).__name__, e)
        continue
      if data_iter is not None and not same_layout:
        logging.warning("Checkpoint step %d was written by %d processes, this job has %d: the "
                        "data iterator starts afresh.", step, layout["process_count"],
                        jax.process_count())
      return step, restored[STATE], DATA_ITER in items
    return None

  def _warn_about_partial_saves(self) -> None:
    if not self.directory.exists():
      return
    partial = [p.name for p in self.directory.iterdir() if "tmp" in p.name]
    if partial:
      logging.warning("Ignoring incomplete checkpoint directories in %s: %s",
                      self.directory, ", ".join(sorted(partial)))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_checkpoint_params(workdir: str | pathlib.Path, abstract_params: Any,
                              step: int | None = None) -> tuple[int, Any]:
  """Restores only `state["params"]` (no optimizer state) at `step` (default: latest).

  Opens the checkpoints read-only: downstream evaluation never writes to them.
  """
  directory = checkpoint_dir(workdir)
  reader = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler()})
  steps = reader.all_steps()
  if not steps:
    raise FileNotFoundError(f"{directory}: no checkpoints")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; have {sorted(steps)}")
  item = {"params": abstract_params}
  restored = reader.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)}))
  reader.close()
  return step, restored[STATE]["params"]


def export_params(workdir: str | pathlib.Path, params: Any, description: dict[str, Any]) -> pathlib.Path:
  """Writes model params (no optimizer state) and a JSON description for downstream use."""
  out = pathlib.Path(workdir) / EXPORT_DIR
  out.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out / EXPORT_PARAMS, params, force=True)
    ckptr.wait_until_finished()
  write_description(out, description)
  return out


def restore_params(path: str | pathlib.Path, abstract_params: Any) -> Any:
  """Restores exported params onto `abstract_params` (shapes, dtypes, shardings)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(pathlib.Path(path), abstract_params)


def write_description(directory: str | pathlib.Path, description: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / EXPORT_CONFIG).write_text(json.dumps(description, indent=1, sort_keys=True))


def read_description(directory: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(directory) / EXPORT_CONFIG
  if not path.exists():
    raise FileNotFoundError(f"{path}: no lsm2 description here; expected a training workdir "
                            f"or its {EXPORT_DIR}/ directory.")
  return json.loads(path.read_text())

