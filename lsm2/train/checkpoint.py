"""Training checkpoints: periodic async saves of (train state, data iterator), exact resume.

Layout under the workdir (the pretrained-model format, lsm2/pretrained.py, reads
the params of these steps and the export):
  checkpoints/<step>/state/       params, optimizer state, step, RNG (sharded arrays)
  checkpoints/<step>/data_iter/   Grain iterator state, one file per process
  checkpoints/<step>/layout/      {"process_count": P}

Orbax writes each step to a temporary directory and renames it when complete,
so a save killed half-way never shows up as a step. A step that exists but
fails to restore (truncated files) is skipped with a warning in favour of the
previous one.
"""
import logging
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lsm2 import pretrained

DATA_ITER = "data_iter"
LAYOUT = "layout"  # {"process_count": P}: data iterator states are per process.


class Checkpointer:
  """A CheckpointManager for (train state, data iterator) pairs."""

  def __init__(self, workdir: str | pathlib.Path, *, save_every: int, keep: int,
               async_save: bool = True):
    self.directory = pretrained.checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={pretrained.STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: grain.checkpoint.CheckpointHandler(),
                       LAYOUT: ocp.JsonCheckpointHandler()})

  def maybe_save(self, step: int, state: Any, data_iter: Any, *, force: bool = False) -> bool:
    """Saves when `step` is on the save interval (or `force`); returns whether it did."""
    return self.manager.save(
        step,
        args=ocp.args.Composite(**{
            pretrained.STATE: ocp.args.StandardSave(state),
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
        items = {pretrained.STATE: ocp.args.StandardRestore(abstract_state)}
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
      return step, restored[pretrained.STATE], DATA_ITER in items
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
