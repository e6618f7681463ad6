"""The pretrained-model format: what training writes and inference reads.

Layout under a training workdir:
  lsm2.json                       the description: model + masking config, dataset
                                  channels and normalisation statistics, run config
  checkpoints/<step>/state/       training state; its "params" are read from here
  export/params/                  model parameters only (no optimizer state)
  export/lsm2.json                the description again, beside the exported params

This module reads (and writes) exactly that, with Orbax alone: inference and
evaluation restore models without the trainer, its input pipeline or its
optimizer. Training checkpoints themselves (with optimizer and data-iterator
state) are written by lsm2/train/checkpoint.py.
"""
import dataclasses
import json
import pathlib
from typing import Any

from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp

from lsm2 import sharding as sharding_lib
from lsm2.model import config as model_config_lib
from lsm2.model import mae

DESCRIPTION_FILE = "lsm2.json"
CHECKPOINTS_DIR = "checkpoints"
STATE = "state"  # The train-state item of each checkpoint step.
EXPORT_DIR = "export"
EXPORT_PARAMS = "params"


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


def write_description(directory: str | pathlib.Path, description: dict[str, Any]) -> None:
  """Writes DIRECTORY/lsm2.json (process 0 only)."""
  if jax.process_index() == 0:
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / DESCRIPTION_FILE).write_text(json.dumps(description, indent=1, sort_keys=True))


def read_description(directory: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(directory) / DESCRIPTION_FILE
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
# Parameters: exported, or read-only from a training checkpoint.
# ----------------------------------------------------------------------------
def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir) / CHECKPOINTS_DIR


def export_params(workdir: str | pathlib.Path, params: Any, description: dict[str, Any]) -> pathlib.Path:
  """Writes model params (no optimizer state) and the description to WORKDIR/export."""
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


def has_export(path: str | pathlib.Path) -> bool:
  """Whether `path` is an export directory or a workdir holding one."""
  path = pathlib.Path(path)
  return (path / EXPORT_PARAMS).exists() or (path / EXPORT_DIR / EXPORT_PARAMS).exists()


# ----------------------------------------------------------------------------
# A model with pretrained parameters.
# ----------------------------------------------------------------------------
def _abstract_model(model_cfg: model_config_lib.ModelConfig):
  with nnx.use_eager_sharding(False):  # Shardings come from the restore target.
    return mae.LSM2MAE(model_cfg, rngs=nnx.Rngs(0))


def load_pretrained(path: str | pathlib.Path, step: int | None = None
                    ) -> tuple[mae.LSM2MAE, dict[str, Any]]:
  """A model with pretrained parameters, and its description (configs, channels, stats).

  `path` is a training workdir (its export/ when `step` is None and training
  finished, else the checkpoint at `step` or the latest) or an export/
  directory. Parameters are replicated over all devices of this job, whatever
  the process and device count of the job that wrote them.
  """
  path = pathlib.Path(path)
  description = read_description(path)
  model_cfg = model_config_lib.ModelConfig(**description["model"])
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: _abstract_model(model_cfg)))
  replicated = sharding_lib.replicated(sharding_lib.make_mesh({"data": -1}))
  abstract_params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_params)
  export = path if (path / EXPORT_PARAMS).exists() else path / EXPORT_DIR
  if step is None and (export / EXPORT_PARAMS).exists():
    params = restore_params(export / EXPORT_PARAMS, abstract_params)
  else:
    step, params = restore_checkpoint_params(path, abstract_params, step)
  return nnx.merge(graphdef, params), description
