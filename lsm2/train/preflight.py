"""Pre-flight memory check: the compiled train step against the memory it will run in.

Before the train state is allocated and before the workdir is written, training
lowers and compiles its train step, from abstract shapes, for the largest encoder
layout it will use (the compilation is the one the first step reuses) and
compares the compiler's memory analysis with the memory there is:
each accelerator's own (`Device.memory_stats()["bytes_limit"]`), or on CPU the
host RAM that all of this process's devices share. A step that cannot fit stops
the run here, with the figure and the knobs to turn, instead of an allocator
crash minutes later. `lsm2.aot` runs the same analysis for a TPU slice that is
not there.
"""
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections

from lsm2 import errors
from lsm2 import sharding as sharding_lib
from lsm2.model import aim
from lsm2.train import encoder_layout

GiB = 2**30


class DoesNotFit(errors.Error, MemoryError):
  """The compiled train step needs more memory than the devices have (a user error: its
  message names the figure and the knobs; `python -m lsm2.main` exits 1)."""


def step_arguments(config: ml_collections.ConfigDict, setup, state, mask_fn):
  """Abstract (state, batch, masks) of the train step, with the shardings training gives them.

  `state`: lsm2.train.train.abstract_state(setup); `mask_fn`: train.make_mask_fn(setup),
  compiled here for its output shardings (the masks' in training). The masks are those
  of the largest encoder layout (lsm2/train/encoder_layout.py): unpacked buckets end at
  n_keep, the fixed split's shapes; packed ones at every kept token of a group.
  """
  mesh = setup.mesh
  shape = (config.batch_size, setup.model_cfg.time_steps, setup.model_cfg.num_channels)
  batch = {"signals": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=setup.batch_sharding),
           "observed": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=setup.batch_sharding)}
  with sharding_lib.mesh_context(mesh, config.logical_axis_rules):
    lowered = mask_fn.lower(state["rng"], state["step"], batch["observed"])
    shardings = lowered.compile().output_shardings
  masks = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       lowered.out_info, shardings)
  if config.masking.pack_encoder:
    groups = sharding_lib.data_parallel_size(mesh)
    n_keep = setup.model_cfg.num_tokens - setup.mask_cfg.n_drop
    length = max(encoder_layout.layout_buckets(config.masking.encoder_buckets, n_keep,
                                               config.batch_size, groups))
    packed = jax.eval_shape(lambda m: aim.pack_visible(m, length, groups), masks)
    as_batch = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=setup.batch_sharding)
    masks = masks.replace(pack_idx=as_batch(packed.pack_idx),
                          unpack_idx=as_batch(packed.unpack_idx))
  return state, batch, masks


def needed_bytes(memory) -> int:
  """One device's memory for a compiled program (`Compiled.memory_analysis()`): arguments,
  outputs not aliased to donated arguments, temporaries and code."""
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes
          + memory.generated_code_size_in_bytes)


def host_memory_bytes() -> int:
  """Host RAM available now (Linux MemAvailable), else the physical total."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def knobs(batch_size: int, mesh: dict[str, int], attention: str) -> str:
  """The settings that shrink a train step's memory, for this run."""
  per_device = batch_size // max(mesh.get("data", 1) * mesh.get("fsdp", 1), 1)
  hints = [f"a smaller --config.batch_size (now {batch_size}, {per_device} per device)",
           "--config.model.remat=attention or =full (recompute activations in the backward pass)"]
  if mesh.get("fsdp", 1) == 1:
    hints.append("FSDP: --config.mesh.data=1 --config.mesh.fsdp=-1 (shards parameters and "
                  "optimizer state over the devices)")
  if attention == "xla":
    hints.append("an attention kernel that keeps logits out of memory (--config.model.attention="
                 "splash on TPU, cudnn on GPU, blocked on CPU)")
  hints.append("more devices, or devices with more memory")
  return "; ".join(hints)


def check_train_step(config: ml_collections.ConfigDict, setup, train_step, mask_fn, state
                     ) -> jax.stages.Compiled:
  """Compiles `train_step` for its largest layout and raises DoesNotFit if it cannot fit.

  `state` is abstract (train.abstract_state). Logs the figures either way. Returns the
  compiled step, whose cost analysis gives training its FLOPs per step without a
  second compilation.
  """
  args = step_arguments(config, setup, state, mask_fn)
  mesh = dict(setup.mesh.shape)
  what = (f"model {config.model.size}, batch {config.batch_size}, mesh {mesh}, attention "
          f"{setup.model_cfg.attention}, remat {setup.model_cfg.remat}")
  knobs_text = knobs(config.batch_size, mesh, setup.model_cfg.attention)
  with sharding_lib.mesh_context(setup.mesh, config.logical_axis_rules):
    try:
      compiled = train_step.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # The TPU compiler refuses programs that exceed the device's memory.
      reason = next(line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line)
      raise DoesNotFit(f"The train step does not fit ({what}): {reason.strip()}; stopped before "
                       f"the first step. Knobs: {knobs_text}.") from e
  memory = compiled.memory_analysis()
  if memory is None:
    logging.warning("Pre-flight: no memory analysis on this backend; memory not checked.")
    return compiled
  need = needed_bytes(memory)
  devices = setup.mesh.local_devices
  stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    have, where = stats["bytes_limit"], f"{devices[0].device_kind} memory per device"
  elif devices[0].platform == "cpu":
    # Fake CPU devices share the host: all of their figures add up, the arguments (the
    # state and batch, each device's copy or shard) too, as none is allocated yet.
    need *= len(devices)
    have, where = host_memory_bytes(), f"host RAM available to {len(devices)} CPU device(s)"
  else:
    logging.warning("Pre-flight: %s reports no memory limit; memory not checked.", devices[0])
    return compiled
  logging.info("Pre-flight: the train step needs %.2f GiB of %.2f GiB %s.", need / GiB,
               have / GiB, where)
  if need > have:
    raise DoesNotFit(
        f"The train step needs {need / GiB:.2f} GiB but there is {have / GiB:.2f} GiB of {where} "
        f"({what}); stopped before the first step. Knobs: {knobs_text}.")
  return compiled
