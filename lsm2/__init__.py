"""lsm2: LSM-2 wearable foundation models with Adaptive and Inherited Masking, in JAX/Flax."""

__version__ = "0.1.0"
