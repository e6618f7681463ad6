"""Keeps libtpu unloaded on hosts without TPU chips.

The [tpu] extra brings libtpu, for TPU VMs and for compiling TPU programs on any
machine (lsm2.aot). Once installed, JAX tries its TPU backend in every process:
on a host without TPU chips that fails, quietly as far as JAX is concerned, but
libtpu prints an error block (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES) the
user cannot act on. Where no accelerator is attached and the user chose no
platform, JAX is told to use the CPU, the only backend that could start there.
`lsm2.aot` loads the TPU compiler by itself, so it keeps working.
"""
import importlib.util
import os


def use_cpu_without_accelerators() -> bool:
  """Sets jax_platforms to "cpu" where libtpu is installed but no accelerator exists.

  Leaves JAX alone where the user chose (JAX_PLATFORMS, JAX_FORCE_TPU_INIT),
  where libtpu is absent (nothing to keep off, and no JAX import), and on any
  host with TPU chips or GPUs. Returns whether it set the platform.
  """
  if (importlib.util.find_spec("libtpu") is None
      or "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  # JAX's own probes, so a chip JAX knows is never missed here.
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if (jax.config.jax_platforms or hardware_utils.num_available_tpu_chips_and_device_id()[0]
      or hardware_utils.has_visible_nvidia_gpu()
      or hardware_utils.num_available_amd_gpus(stop_at=1)):
    return False
  jax.config.update("jax_platforms", "cpu")
  return True
