"""Training checkpoints: periodic async saves of (train state, data iterator), exact resume.

Layout under the workdir (the pretrained-model format, lsm2/pretrained.py, reads
the params of these steps and the export):
  checkpoints/<step>/state/       params, optimizer state, step, RNG (sharded arrays)
  checkpoints/<step>/data_iter/   Grain iterator state, one file per process
  checkpoints/<step>/layout/      {"process_count": P}
  checkpoints/<step>/checksums/   a checksum of every array of the state
                                  (pretrained.array_checksums), verified on restore

Orbax writes each step to a temporary directory and renames it when complete,
so a save killed half-way never shows up as a step. A step that exists but
cannot be read (truncated files) or whose arrays differ from their checksums
(changed or damaged files) is skipped with a loud warning in favour of
the previous one and moved aside to checkpoints_corrupt/<step>.<time>/, so that
it neither counts toward `keep` nor blocks later saves of its step; a readable
step that does not fit the model stops the run (pretrained.restore_newest).
"""
import logging
import pathlib
import time
from typing import Any

import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from lsm2 import pretrained
from lsm2 import storage

DATA_ITER = "data_iter"
LAYOUT = "layout"  # {"process_count": P}: data iterator states are per process.
CORRUPT_DIR = "checkpoints_corrupt"  # Unreadable steps, moved out of Orbax's sight.
REASON_FILE = "REASON.txt"  # In a moved step: why it could not be read.
COMMIT_FILE = "commit_success.txt"  # Orbax's mark of a complete step on a bucket.


class Checkpointer:
  """A CheckpointManager for (train state, data iterator) pairs."""

  def __init__(self, workdir: str | pathlib.Path, *, save_every: int, keep: int,
               async_save: bool = True, checksums: bool = True):
    self.directory = pretrained.checkpoint_dir(workdir)
    self.checksums = checksums
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        multiprocessing_options=pretrained.ORBAX_PROCESSES,  # Barrier names `agreed` knows.
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={pretrained.STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: grain.checkpoint.CheckpointHandler(),
                       LAYOUT: ocp.JsonCheckpointHandler(),
                       pretrained.CHECKSUMS: ocp.JsonCheckpointHandler()})

  def maybe_save(self, step: int, state: Any, data_iter: Any, *, force: bool = False) -> bool:
    """Saves when `step` is on the save interval (or `force`); returns whether it did.

    The checksums of the state's arrays are saved with them, in the same step,
    unless `checksums` is off (config.checkpoint_checksums: a pass over the
    state at each save, benchmarks/integrity.py); restores verify them where saved.
    """
    if not (force or self.manager.should_save(step)):
      return False
    items = {pretrained.STATE: ocp.args.StandardSave(state),
             DATA_ITER: grain.checkpoint.CheckpointSave(data_iter),
             LAYOUT: ocp.args.JsonSave({"process_count": jax.process_count()})}
    if self.checksums:
      items[pretrained.CHECKSUMS] = ocp.args.JsonSave({"arrays": pretrained.array_checksums(state)})
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore_latest(self, abstract_state: Any, data_iter: Any | None
                     ) -> tuple[int, Any, bool] | None:
    """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings, so a
    checkpoint written on one mesh restores onto another (Orbax reshards).
    `data_iter` (if given) is restored in place when the checkpoint was written
    by as many processes as this job has (iterator states are per process).
    Newer unreadable steps are moved aside; a step that does not fit
    `abstract_state` raises pretrained.CheckpointMismatchError and changes nothing.
    Returns (step, state, whether data_iter was restored) or None.
    """
    self._warn_about_partial_saves()
    self._finish_interrupted_deletes()

    def restore(step: int):  # Each part agreed by every process (pretrained.agreed).
      saved = pretrained.agreed(lambda: self.manager.item_metadata(step)[pretrained.STATE])
      pretrained.agreed(lambda: pretrained.check_fits(
          getattr(saved, "tree", saved), abstract_state,
          f"checkpoint step {step} in {self.directory}",
          hint="Start a fresh run with a new --workdir, or fine-tune this one's parameters in "
               f"a new workdir with --config.init_from={self.directory.parent}."))
      layout = pretrained.agreed(lambda: self.manager.restore(step, args=ocp.args.Composite(
          **{LAYOUT: ocp.args.JsonRestore()})), orbax_restore=True)[LAYOUT]
      items = {pretrained.STATE: ocp.args.StandardRestore(abstract_state)}
      same_layout = layout["process_count"] == jax.process_count()
      if data_iter is not None and same_layout:
        items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
      restored = pretrained.agreed(
          lambda: self.manager.restore(step, args=ocp.args.Composite(**items)),
          orbax_restore=True)
      pretrained.verify_checksums(self.manager, step, restored[pretrained.STATE],
                                  f"checkpoint step {step} in {self.directory}")
      return restored, layout, DATA_ITER in items

    found = pretrained.restore_newest(self.manager.all_steps(), restore, str(self.directory),
                                      on_unreadable=self._move_aside)
    if found is None:
      return None
    step, (restored, layout, data_restored) = found
    if data_iter is not None and not data_restored:
      logging.warning("Checkpoint step %d was written by %d processes, this job has %d: the "
                      "data iterator starts afresh.", step, layout["process_count"],
                      jax.process_count())
    return step, restored[pretrained.STATE], data_restored

  def _move_aside(self, step: int, reason: str) -> None:
    """Moves unreadable step `step` to checkpoints_corrupt/<step>.<UTC time>/ with a
    REASON.txt; never deletes a file that has no copy.

    Locally one rename (REASON.txt written into the step first). On a bucket, where a
    rename is a copy and a delete object by object, every file is copied, then
    REASON.txt is written, and only then the step deleted (Orbax's commit marker
    last, so that the step stays visible until the end). A kill at any point
    leaves each file in the step or in the copy; the next start finds the step
    unreadable again and completes the move into the same copy (_interrupted_move).
    """
    source = self.directory / str(step)
    if jax.process_index() == 0:
      files = storage.list_files(source)
      target = self._interrupted_move(step, files)
      if target is None:
        when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.directory.parent / CORRUPT_DIR / f"{step}.{when}"
      if storage.renames_atomically(source) and not target.exists():
        storage.write_text_atomic(source / REASON_FILE, reason + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
      else:
        storage.copy_tree(source, target)
        storage.write_text_atomic(target / REASON_FILE, reason + "\n")
        storage.delete_tree(source, last=COMMIT_FILE)
      logging.warning("CHECKPOINT UNREADABLE: moved step %d aside to %s (%s).", step, target,
                      reason)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"lsm2_moved_aside_{step}")
    self.manager.reload()  # Orbax forgets the step: it no longer counts toward `keep`.

  def _finish_interrupted_deletes(self) -> None:
    """Finishes each move aside that was killed while deleting the step, before any restore.

    Its copy is complete (REASON.txt is written only after every file was copied);
    what is left of the step may have lost its metadata files, so that a restore
    would take it for a checkpoint of another model instead of an unreadable one.
    """
    if not (self.directory.parent / CORRUPT_DIR).exists():
      return  # No move aside ever started: nothing to finish, no barrier, no re-listing.
    if jax.process_index() == 0:
      for step in self.manager.all_steps():
        source = self.directory / str(step)
        files = storage.list_files(source)
        target = self._interrupted_move(step, files)
        if target is not None and (target / REASON_FILE).exists():
          storage.delete_tree(source, last=COMMIT_FILE)
          logging.warning("CHECKPOINT UNREADABLE: finished moving step %d aside to %s.", step,
                          target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("lsm2_finished_moves")
    self.manager.reload()

  def _interrupted_move(self, step: int, files: dict[str, int]):
    """The copy in checkpoints_corrupt/ of an interrupted move of this very step, or None.

    That copy holds some or all of the step's files (`files`: name -> size), or the
    step holds what is left of them after a part was deleted: their common files
    have the same sizes, and one side holds all of the other's. (A later save of
    the same step has other array file names, so it never matches.)
    """
    corrupt = self.directory.parent / CORRUPT_DIR
    if not corrupt.exists():
      return None
    for candidate in sorted((d for d in corrupt.iterdir() if d.name.startswith(f"{step}.")),
                            key=lambda d: d.name, reverse=True):
      copied = {k: v for k, v in storage.list_files(candidate).items() if k != REASON_FILE}
      mine = {k: v for k, v in files.items() if k != REASON_FILE}
      common = copied.keys() & mine.keys()
      if (common and all(copied[k] == mine[k] for k in common)
          and (copied.keys() <= mine.keys() or mine.keys() <= copied.keys())):
        logging.warning("Completing the interrupted move of unreadable step %d to %s.", step,
                        candidate)
        return candidate
    return None

  def _warn_about_partial_saves(self) -> None:
    if not self.directory.exists():
      return
    partial = [p.name for p in self.directory.iterdir() if "tmp" in p.name]
    if partial:
      logging.warning("Ignoring incomplete checkpoint directories in %s: %s",
                      self.directory, ", ".join(sorted(partial)))

  def reached_preemption(self, step: int) -> bool:
    """Orbax's preemption sync point: True at the same step on every process after a
    SIGTERM to any (needs a JAX distributed runtime; always False without one)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
