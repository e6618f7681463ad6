"""Keeps libtpu unloaded on hosts without TPU chips.

The [tpu] extra brings libtpu, for TPU VMs and for compiling TPU programs on any
machine (lsm2.aot). Once installed, JAX tries its TPU backend in every process:
on a host without TPU chips that fails, quietly as far as JAX is concerned, but
libtpu prints an error block (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES) the
user cannot act on. Where no accelerator is attached and the user chose no
platform, JAX is told to use the CPU, the only backend that could start there.
`lsm2.aot` loads the TPU compiler by itself, so it keeps working.
"""
import glob
import importlib.util
import os
import pathlib
import sys

# PCI vendors of the accelerators JAX drives: Google (TPUs; also its virtual NICs),
# NVIDIA, AMD.
_ACCELERATOR_VENDORS = {"0x1ae0", "0x10de", "0x1002"}


def _may_have_accelerators() -> bool:
  """False only where no PCI device of an accelerator vendor exists (read from sysfs,
  without importing JAX)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if pathlib.Path(vendor).read_text().strip() in _ACCELERATOR_VENDORS:
        return True
    except OSError:
      return True
  return False


def use_cpu_without_accelerators() -> bool:
  """Makes JAX use the CPU where libtpu is installed but no accelerator exists.

  Leaves JAX alone where the user chose (JAX_PLATFORMS, JAX_FORCE_TPU_INIT),
  where libtpu is absent (nothing to keep off), and on any host with TPU chips
  or GPUs. Costs no JAX import on a host with no accelerator vendor's device;
  elsewhere JAX's own probes decide, so a chip JAX knows is never missed. Before
  JAX is imported it sets JAX_PLATFORMS (which JAX reads at import, and child
  processes inherit); after, the jax_platforms option. Returns whether it did.
  """
  if (importlib.util.find_spec("libtpu") is None
      or "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ):
    return False
  if _may_have_accelerators():
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    if (hardware_utils.num_available_tpu_chips_and_device_id()[0]
        or hardware_utils.has_visible_nvidia_gpu()
        or hardware_utils.num_available_amd_gpus(stop_at=1)):
      return False
  jax = sys.modules.get("jax")
  if jax is None:
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif jax.config.jax_platforms:
    return False
  else:
    jax.config.update("jax_platforms", "cpu")
  return True
