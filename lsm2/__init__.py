"""lsm2: LSM-2 wearable foundation models with Adaptive and Inherited Masking, in JAX/Flax."""

from lsm2 import backends

__version__ = "0.1.0"

backends.use_cpu_without_accelerators()


def load(path, step=None, **kwargs):
  """A pretrained model for embedding and reconstruction; see `lsm2.api.load`.

  Imported lazily so that `import lsm2` stays cheap (no JAX until needed).
  """
  from lsm2 import api  # pylint: disable=g-import-not-at-top
  return api.load(path, step, **kwargs)
