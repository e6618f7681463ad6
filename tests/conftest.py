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


# The slowest files, slowest first (measured with --durations). `pytest -n N --dist loadfile`
# (the README's command) hands whole files to its workers in collection order: started
# first, the long files overlap the many short ones instead of ending the run on one worker.
SLOWEST_FIRST = ("test_aot.py", "test_learning.py", "test_train.py", "test_storage.py",
                 "test_faults.py", "test_model_mae.py", "test_pretrain_config.py", "test_api.py",
                 "test_eval_run.py", "test_run_dir.py", "test_throughput.py", "test_data_beam.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files keep their order.
