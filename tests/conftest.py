"""Test set-up: 8 fake CPU devices (multi-device code runs on CPU) and shared paths."""
import os
import pathlib

# Must happen before JAX is imported anywhere: sharding tests need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> pathlib.Path:
  """The real public datasets beside the checkout; skips when they are absent."""
  if not SHARED_DATASETS.is_dir():
    pytest.skip(f"real datasets not found at {SHARED_DATASETS} (they live beside the repo, never in it)")
  return SHARED_DATASETS

