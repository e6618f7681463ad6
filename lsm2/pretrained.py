"""The pretrained-model format: what training writes and inference reads.

Layout under a training workdir:
  lsm2.json                       the description: model + masking config, dataset
                                  channels and normalisation statistics, run config
  checkpoints/<step>/state/       training state; its "params" are read from here
  checkpoints/<step>/checksums/   a checksum of every array of the state (array_checksums)
  export/params/                  model parameters only (no optimizer state)
  export/lsm2.json                the description again, beside the exported params
  export/manifest.json            every file of the export with its size and SHA-256,
                                  written last: an export is complete when all of them
                                  are there, and intact when their contents hash alike
  export.tmp/, export.old/        only while a new export is swapped in (export_params)

This module reads (and writes) exactly that, with Orbax alone: inference and
evaluation restore models without the trainer, its input pipeline or its
optimizer. Training checkpoints themselves (with optimizer and data-iterator
state) are written by lsm2/train/checkpoint.py.
"""
from collections.abc import Callable, Iterable
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, TypeVar
import zlib

from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lsm2 import errors
from lsm2 import sharding as sharding_lib
from lsm2 import storage
from lsm2.model import config as model_config_lib
from lsm2.model import mae

DESCRIPTION_FILE = "lsm2.json"
CHECKPOINTS_DIR = "checkpoints"
STATE = "state"  # The train-state item of each checkpoint step.
CHECKSUMS = "checksums"  # {"arrays": {key: [c1, c2]}}: array_checksums of the state, saved with it.
RUN_FILE = "run.json"  # The run record of a workdir (lsm2/train/run_dir.py writes it).
EXPORT_DIR = "export"
EXPORT_PARAMS = "params"
# Written last into an export: {"files": {relative path: {"bytes": n, "sha256": hex}}}.
# One object, so on a bucket too it is there whole or not at all (see export_problem).
# Manifests written before lsm2 hashed files list sizes only ({path: n}).
EXPORT_MANIFEST = "manifest.json"
# An export is written to EXPORT_TMP, then swapped in with two moves (the
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
# Integrity: a checksum of every array of a checkpoint, a SHA-256 of every exported file.
# ----------------------------------------------------------------------------
class IntegrityError(errors.Error, OSError):
  """Data whose content differs from what was saved or exported (changed or damaged since)."""


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words, one per element (two for 64-bit values and RNG keys)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """Two position-weighted sums of the words of `x`, modulo 2**32 (uint32[2]).

  Each word is multiplied by an odd weight that depends on its position, so any
  change of a single word (a flipped bit, a swapped value) changes both sums,
  and several changes cancel in both only by chance (~2**-64). A reduction:
  the same for any sharding of `x`, computed where `x` lives, never gathered.
  """
  words = _words(x)
  index, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):
    index += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  first = index * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
  second = (index + jnp.uint32(0x7F4A7C15)) * jnp.uint32(0x85EBCA6B) | jnp.uint32(1)
  rotated = (words << 13) | (words >> 19)
  return jnp.stack([jnp.sum(words * first, dtype=jnp.uint32),
                    jnp.sum(rotated * second, dtype=jnp.uint32)])


_checksums = jax.jit(lambda leaves: jnp.stack([_checksum(x) for x in leaves]))


def array_checksums(tree: Any) -> dict[str, list[int]]:
  """{"params/.../kernel/value": [c1, c2]} for every array of `tree` (see _checksum).

  Computed on the arrays' devices in one jitted pass (about one read of the
  tree: cheap next to the save it goes with); every process gets the same
  values, also when the arrays span several processes.
  """
  flat = _flat(tree)
  if not flat:
    return {}
  sums = _checksums(list(flat.values()))
  sums = np.asarray(sums.addressable_data(0))  # Replicated: any one copy is all of it.
  return {key: [int(a), int(b)] for key, (a, b) in zip(flat, sums)}


def check_checksums(tree: Any, saved: dict[str, list[int]], where: str) -> None:
  """Raises IntegrityError naming the arrays of `tree` whose checksums differ from `saved`'s.

  Arrays `saved` does not list (a partial restore lists more, never fewer) are
  an error too: the checksums were saved for another tree.
  """
  have = array_checksums(tree)
  bad = [key for key in have if saved.get(key) != have[key]]
  if bad:
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise IntegrityError(
        f"{where}: the values of {', '.join(bad[:3])}{more} differ from the ones saved (their "
        f"checksums, in {CHECKSUMS}/, do not match): its files were changed or damaged after "
        "they were written.")


def verify_checksums(manager: ocp.CheckpointManager, step: int, restored: Any, where: str
                     ) -> None:
  """check_checksums of `restored` (all or part of step `step`'s state) against the
  checksums saved with it; a step saved before lsm2 saved them is not verified (logged).

  Every process reads and checks alike (`agreed`): an IntegrityError on one is
  raised by all, so that restore_newest falls back to the same older step everywhere.
  """
  if not (epath.Path(manager.directory) / str(step) / CHECKSUMS).exists():
    logging.info("%s has no %s (saved before lsm2 saved them): its arrays are not verified.",
                 where, CHECKSUMS)
    return
  saved = agreed(lambda: manager.restore(step, args=ocp.args.Composite(**{
      CHECKSUMS: ocp.args.JsonRestore()})), orbax_restore=True)[CHECKSUMS]["arrays"]
  agreed(lambda: check_checksums(restored, saved, where))


def sha256(path: epath.Path) -> str:
  """A file's SHA-256, read in 4 MiB pieces (export and release manifests)."""
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


# ----------------------------------------------------------------------------
# Restoring the newest readable step: unreadable data falls back, a mismatch raises.
# ----------------------------------------------------------------------------
T = TypeVar("T")


class CheckpointMismatchError(errors.Error, ValueError):
  """A readable checkpoint whose arrays do not fit the model being restored."""


class CheckpointUnreadableError(errors.Error, OSError):
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

  In a multi-process job every process decides alike (`agreed`): a step that one
  process cannot read (its shard) is skipped by all, and a mismatch on one stops
  all, so that no process goes on from another step than the others (which
  would hang their next collective).
  """
  steps = sorted(steps, reverse=True)
  listed = _agree(np.array([len(steps), zlib.crc32(repr(steps).encode())], np.int64))
  if not (listed == listed[0]).all():
    raise CheckpointUnreadableError(
        f"the processes of this job see different checkpoint steps in {where} (this one: "
        f"{steps}): every process must read the same workdir (a bucket, or one shared disk)")
  unreadable = []
  for step in steps:
    try:
      restored = agreed(lambda step=step: restore(step))
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


# Every CheckpointManager of lsm2 prefixes Orbax's barrier names with "lsm2", so
# that `agreed` knows the name of the barrier that ends Orbax's restore.
ORBAX_PROCESSES = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="lsm2")
_ORBAX_RESTORE_BARRIER = ocp.multihost.unique_barrier_key(
    "Checkpointer:restore", prefix=ORBAX_PROCESSES.barrier_sync_key_prefix)
_RESTORED, _UNREADABLE, _MISMATCH = 0, 1, 2  # What `agreed`'s fn did, per process.


def agreed(fn: Callable[[], T], *, orbax_restore: bool = False) -> T:
  """fn() on every process of the job, which then all return or all raise.

  Each process tells the others how its fn() ended (a collective): if one saw a
  CheckpointMismatchError all raise one, else if one failed all raise (the
  others a CheckpointUnreadableError naming the processes whose log says why).
  With `orbax_restore` (fn is a CheckpointManager.restore, whose last step is a
  barrier, a collective) a process whose fn raised first joins that barrier,
  which the others reached: an unmatched collective pairs with the next one, and
  the processes would hang or mix up their answers. (A restore that fails
  before Orbax's Checkpointer.restore on some processes only, which needs them
  to list different steps, is not covered; restore_newest refuses that first.)
  """
  value, error, status = None, None, _RESTORED
  try:
    value = fn()
  except CheckpointMismatchError as e:
    error, status = e, _MISMATCH
  except Exception as e:  # pylint: disable=broad-except
    error, status = e, _UNREADABLE
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return value
  if error is not None and orbax_restore:
    multihost_utils.sync_global_devices(_ORBAX_RESTORE_BARRIER)
  statuses = _agree(np.array([status], np.int64)).reshape(-1)
  if (statuses == _MISMATCH).any():
    if isinstance(error, CheckpointMismatchError):
      raise error
    raise CheckpointMismatchError(
        f"process(es) {np.flatnonzero(statuses == _MISMATCH).tolist()} found a checkpoint that "
        "does not fit this model (their log says how); nothing was restored, moved or deleted.")
  if (statuses == _UNREADABLE).any():
    if error is not None:
      raise error
    raise CheckpointUnreadableError(
        f"process(es) {np.flatnonzero(statuses == _UNREADABLE).tolist()} could not read their "
        "part of it (their log says why)")
  return value


def _agree(values: np.ndarray) -> np.ndarray:
  """`values` of every process, stacked along a new first axis (a collective when there are
  several processes: each must call it alike)."""
  if jax.process_count() == 1:
    return values[None]
  return np.asarray(multihost_utils.process_allgather(values))


# ----------------------------------------------------------------------------
# Parameters: exported, or read-only from a training checkpoint.
# ----------------------------------------------------------------------------
def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINTS_DIR


def _sync(name: str) -> None:
  """All processes of a multi-process job wait here for each other."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class IncompleteExportError(storage.StorageError):
  """An export directory that is not complete (an interrupted swap or copy) and has no
  complete copy beside it."""


def export_params(workdir: str | os.PathLike, params: Any, description: dict[str, Any]
                  ) -> epath.Path:
  """Writes model params (no optimizer state) and the description to WORKDIR/export.

  An earlier export stays loadable throughout: the new one is written to
  EXPORT_TMP, its manifest last (which marks it complete), then the old one is
  moved to EXPORT_OLD, EXPORT_TMP to EXPORT_DIR, and EXPORT_OLD deleted. Each
  move keeps one complete copy at every moment (_move_export), so a kill at
  any point leaves a complete export that find_export reads and recover_export
  puts back in place. Every process writes its arrays; process 0 the rest.
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
  _sync("lsm2_export_written")  # Every process's arrays are in place.
  if jax.process_index() == 0:
    write_manifest(tmp)
    _swap_in(workdir)
  _sync("lsm2_export_end")
  return final


def _swap_in(workdir: epath.Path) -> None:
  """Puts the complete export EXPORT_TMP in EXPORT_DIR's place (process 0 only)."""
  final, tmp, old = (workdir / name for name in (EXPORT_DIR, EXPORT_TMP, EXPORT_OLD))
  if final.exists():
    _move_export(final, old)
  _move_export(tmp, final)
  if old.exists():
    _delete_export(old)


def write_manifest(directory: str | os.PathLike) -> None:
  """Writes DIRECTORY/manifest.json, listing every file below it with its size and SHA-256.

  export_params calls it once the export is written. By hand, only for an
  export known to be intact that has none or lists sizes only (written before
  lsm2 wrote manifests or hashes): find_export refuses or does not verify it.
  """
  directory = storage.as_path(directory)
  files = {name: {"bytes": size, "sha256": sha256(directory / name)}
           for name, size in storage.list_files(directory).items()
           if not name.startswith(EXPORT_MANIFEST)}  # Nor a leftover temporary name of it.
  storage.write_text_atomic(directory / EXPORT_MANIFEST,
                            json.dumps({"files": files}, indent=1, sort_keys=True))


def _listed_files(directory: epath.Path) -> dict[str, Any]:
  """The manifest's {name: {"bytes", "sha256"} or size}; FileNotFoundError without one."""
  return json.loads((directory / EXPORT_MANIFEST).read_text())["files"]


_UNMARKED = (f"it has no {EXPORT_MANIFEST}, so it may be part of an interrupted copy (on a "
             "bucket, exports written before lsm2 wrote manifests have none)")


def export_problem(directory: str | os.PathLike) -> str | None:
  """Why `directory` is not a complete export, or None when it is one.

  Complete: its manifest is there and every file it lists is there with its
  size (verify_export then checks their contents). Without a manifest (written before lsm2 wrote them) a local directory
  with lsm2.json and params/ is complete too: local renames are atomic and the
  description was written after the arrays. On a bucket a directory rename is a
  copy and a delete object by object, so there such a directory may be half of
  an interrupted move, and is not trusted.
  """
  directory = epath.Path(directory)
  try:
    listed = _listed_files(directory)
  except FileNotFoundError:
    missing = [n for n in (DESCRIPTION_FILE, EXPORT_PARAMS) if not (directory / n).exists()]
    if missing:
      return f"it has no {EXPORT_MANIFEST} and no {' or '.join(missing)}"
    return None if storage.renames_atomically(directory) else _UNMARKED
  except (ValueError, KeyError, TypeError) as e:
    return f"its {EXPORT_MANIFEST} is unreadable ({type(e).__name__}: {e})"
  if not isinstance(listed, dict) or not all(
      isinstance(e, int) or (isinstance(e, dict) and isinstance(e.get("bytes"), int))
      for e in listed.values()):
    return f"its {EXPORT_MANIFEST} is unreadable (not a list of files with their sizes)"
  for name, entry in sorted(listed.items()):
    size = entry["bytes"] if isinstance(entry, dict) else entry
    try:
      have = (directory / name).stat().length
    except FileNotFoundError:
      return f"{name} is missing (listed in its {EXPORT_MANIFEST})"
    if have != size:
      return f"{name} has {have} bytes, its {EXPORT_MANIFEST} lists {size}"
  return None


def verify_export(export: epath.Path) -> None:
  """Raises IntegrityError unless every file of complete export `export` hashes as its
  manifest lists (every process reads every file once more: benchmarks/integrity.py).

  A manifest that lists sizes only (written before lsm2 hashed files) is
  trusted with a warning. An export without a manifest is local and predates
  manifests (export_problem): nothing to check it against, also said in the log.
  """
  try:
    listed = _listed_files(export)
  except FileNotFoundError:
    logging.warning("%s has no %s (written before lsm2 wrote them): its contents are not "
                    "verified.", export, EXPORT_MANIFEST)
    return
  if not all(isinstance(e, dict) and "sha256" in e for e in listed.values()):
    logging.warning("%s lists no content hashes (written before lsm2 hashed exports): its "
                    "contents are not verified. Re-export or run write_manifest to add them.",
                    export / EXPORT_MANIFEST)
    return
  bad = [name for name, entry in sorted(listed.items())
         if sha256(export / name) != entry["sha256"]]
  if bad:
    root = export.parent if export.name in (EXPORT_DIR, EXPORT_OLD, EXPORT_TMP) else export
    raise IntegrityError(
        f"{export}: the content of {', '.join(bad[:3])}"
        f"{f' and {len(bad) - 3} more files' if len(bad) > 3 else ''} differs from the one "
        f"exported (SHA-256 in {EXPORT_MANIFEST}): changed or damaged since; nothing was "
        f"loaded. To recover, run the training command on {root} again (a finished run "
        f"exports anew from its newest checkpoint), or read a checkpoint with "
        f"lsm2.load('{root}', step=N).")


def _delete_export(directory: epath.Path) -> None:
  """Deletes an export directory, its manifest first: a kill half-way never leaves
  something that looks complete."""
  storage.delete_tree(directory, first=EXPORT_MANIFEST)


def _move_export(src: epath.Path, dst: epath.Path) -> None:
  """Moves export `src` to `dst` (which must not exist) so that one of them is complete
  at every moment.

  Locally one rename. On a bucket every file is copied, the manifest last (now
  `dst` is complete), then `src` is deleted, its manifest first.
  """
  if storage.renames_atomically(src):
    src.rename(dst)
  else:
    storage.copy_tree(src, dst, last=EXPORT_MANIFEST)
    _delete_export(src)


def recover_export(workdir: str | os.PathLike) -> None:
  """Completes or undoes an export swap that a kill interrupted (process 0 only).

  Deterministic, and safe to be killed and run again: a complete EXPORT_DIR
  stays. Otherwise the newest complete one of EXPORT_TMP and EXPORT_OLD takes
  its place (an incomplete EXPORT_DIR beside a complete copy is what a kill in
  the middle of a move on a bucket leaves; it is deleted first). Whatever is
  left of EXPORT_TMP and EXPORT_OLD is then deleted (an export the interrupted
  run did not finish is written again when the resumed run ends). An
  incomplete EXPORT_DIR without a complete copy is left as it is, with an error
  in the log, until the run's own export replaces it.
  """
  workdir = epath.Path(workdir)
  final, tmp, old = (workdir / name for name in (EXPORT_DIR, EXPORT_TMP, EXPORT_OLD))
  problem = export_problem(final) if final.exists() else None
  if final.exists() and problem is None:
    source = None
  else:
    source = next((d for d in (tmp, old) if d.exists() and export_problem(d) is None), None)
  if problem is not None:
    if source is None:
      logging.error("%s is not a complete export (%s), and no complete copy of it is left; "
                    "leaving it as it is (this run exports again when it ends).", final, problem)
    else:
      logging.warning("%s is not a complete export (%s): an export swap was interrupted. "
                      "Deleting it for %s.", final, problem, source)
      _delete_export(final)
  if source is not None:
    _move_export(source, final)
    if source == tmp:
      logging.warning("Completed an export that was interrupted while being swapped in: %s", final)
    else:
      logging.warning("An export was interrupted before it was complete: restored the previous "
                      "one in %s", final)
  for leftover in (tmp, old):
    if leftover.exists():
      logging.warning("Deleting %s, left by an interrupted export.", leftover)
      _delete_export(leftover)


def find_export(path: str | os.PathLike) -> epath.Path | None:
  """The complete, verified export (export_problem, verify_export) that `path`, a workdir
  or an export directory, holds.

  During a swap (export_params) WORKDIR/export may be missing or, on a bucket,
  half moved: then a complete EXPORT_OLD or EXPORT_TMP is returned, with a
  warning. None when `path` holds no export at all (a workdir before its
  export: callers read its checkpoints). IncompleteExportError when `path` or
  WORKDIR/export is an export that is not complete and no complete copy is
  left: it is never read, nor silently replaced by a checkpoint. IntegrityError
  when the export found has a file whose content differs from its manifest's hash.
  """
  path = epath.Path(path)
  root = path.parent if path.name == EXPORT_DIR else path
  own = [root / EXPORT_DIR]  # What the user asked for: WORKDIR/export, or PATH as given ...
  if path.name != EXPORT_DIR and ((path / EXPORT_PARAMS).exists()
                                  or (path / EXPORT_MANIFEST).exists()):
    own.insert(0, path)  # ... when PATH is an export that is not named export/.
  problems = []
  for export in (*own, root / EXPORT_OLD, root / EXPORT_TMP):
    if not export.exists():
      continue
    problem = export_problem(export)
    if problem is None:
      if export not in own:
        logging.warning("Using %s: an export swap was interrupted (the next training start "
                        "completes it).", export)
      verify_export(export)
      return export
    if export in own:
      problems.append((export, problem))
  if not problems:
    return None
  hint = "".join(f" If you know {export} is complete, mark it so with `python -c \"from lsm2 "
                 f"import pretrained; pretrained.write_manifest('{export}')\"`."
                 for export, problem in problems if problem == _UNMARKED)
  raise IncompleteExportError(
      "; ".join(f"{export} is not a complete export: {problem}" for export, problem in problems)
      + f". An export swap or copy was interrupted and no complete copy "
      f"({EXPORT_OLD}/, {EXPORT_TMP}/) is left; nothing was read. Running the training "
      f"command on {root} again repairs it or exports anew; meanwhile lsm2.load('{root}', "
      f"step=N) reads a training checkpoint.{hint}")


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
      directory, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0,
          multiprocessing_options=ORBAX_PROCESSES),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                     CHECKSUMS: ocp.JsonCheckpointHandler()})
  try:
    steps = reader.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory}: no checkpoints")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; have {sorted(steps)}")
    item = {"params": abstract_params}

    def restore(s: int) -> Any:  # Each step agreed by every process (see `agreed`).
      saved = agreed(lambda: reader.item_metadata(s)[STATE])
      agreed(lambda: check_fits(getattr(saved, "tree", saved), item,
                                f"checkpoint step {s} in {directory}", exact=False))
      restored = agreed(lambda: reader.restore(s, args=ocp.args.Composite(**{
          STATE: ocp.args.PyTreeRestore(
              item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True)})), orbax_restore=True)[STATE]
      verify_checksums(reader, s, restored, f"checkpoint step {s} in {directory}")
      return restored["params"]

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
  description = read_description(path if export is None else export)  # The params' own.
  if export is None:
    check_description(path, description)
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
    _say_what_is_served(export, step)
  else:
    step, params = restore_checkpoint_params(path, abstract_params, step)
    logging.info("Loaded the parameters of checkpoint step %d of %s.", step, path)
  return nnx.merge(graphdef, params), description, step


def _say_what_is_served(export: epath.Path, step: int) -> None:
  """Logs the step an export serves, with a warning when its workdir has newer checkpoints
  (a finished run resumed with more steps and not finished again)."""
  workdir = export.parent if export.name in (EXPORT_DIR, EXPORT_OLD, EXPORT_TMP) else None
  steps = sorted(int(d.name) for d in checkpoint_dir(workdir).iterdir()
                 if d.name.isdigit()) if workdir and checkpoint_dir(workdir).exists() else []
  newer = [s for s in steps if s > step]
  if newer:
    logging.warning("Serving %s, the export of step %d; %s has newer checkpoints (steps %s) "
                    "that the run has not exported yet: lsm2.load('%s', step=%d) reads the "
                    "newest.", export, step, checkpoint_dir(workdir), newer, workdir, newer[-1])
  else:
    logging.info("Serving %s, the export of step %d.", export, step)


def check_description(workdir: epath.Path, description: dict[str, Any]) -> None:
  """Raises IntegrityError when WORKDIR/lsm2.json disagrees with WORKDIR/run.json.

  run.json records the config fields that decide what is trained and the
  dataset's channels and normalisation (lsm2/train/run_dir.py), written when
  the run started; the description must say the same, or a checkpoint would be
  read with another normalisation or channel order. Workdirs from before
  run.json existed have nothing to compare with.
  """
  path = workdir / RUN_FILE
  if not path.exists():
    return
  try:
    record = json.loads(path.read_text())
    recorded, dataset = record["config"], record["dataset"]
  except (ValueError, KeyError, TypeError) as e:
    raise IntegrityError(f"{path} is unreadable ({type(e).__name__}: {e}); the checkpoints' "
                         "description cannot be checked against it, nothing was loaded.") from None
  run_config = {}
  stack = [("", description.get("run_config", {}))]
  while stack:  # Flattened like run.json's fields ("model.size", "masking.ratio").
    prefix, d = stack.pop()
    for k, v in d.items():
      if isinstance(v, dict):
        stack.append((f"{prefix}{k}.", v))
      else:
        run_config[f"{prefix}{k}"] = v
  differ = [k for k in ("channels", "norm_mean", "norm_std")
            if k in dataset and description.get(k) != dataset[k]]
  differ += [f"run_config.{k}" for k in sorted(recorded)
             if k in run_config and run_config[k] != recorded[k]]
  if differ:
    raise IntegrityError(
        f"{workdir / DESCRIPTION_FILE} disagrees with {path} on {', '.join(differ[:5])}: the "
        "description was changed after the run wrote it; nothing was loaded. Training writes it "
        f"again when it resumes (run the training command on {workdir} once more).")
