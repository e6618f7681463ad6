"""Test set-up: 8 fake CPU devices (multi-device code runs on CPU), one compilation cache
for the session, and shared paths."""
import os
import pathlib
import shutil
import tempfile

# Must happen before JAX is imported anywhere: sharding tests need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, used by this process and by every
# process a test starts (they inherit the environment). Most tests compile the same few
# tiny programs, and a 10-step tiny run spends ~60% of its time compiling (80 s cold, 29 s
# with the cache, measured at a load of ~5): each program after its first compilation is
# read back. A fresh temporary directory, removed at the end: no test sees another
# session's cache. Files that need their own (tests/test_faults.py) still set theirs.
# Under pytest-xdist the controller makes the directory and its workers inherit it through
# LSM2_TESTS_XLA_CACHE: one cache for the whole run, removed by the process that made it.
_XLA_CACHE = os.environ.get("LSM2_TESTS_XLA_CACHE")
_OWNS_CACHE = False
if _XLA_CACHE is None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="lsm2-tests-xla-cache-")
  _OWNS_CACHE = True
  os.environ["LSM2_TESTS_XLA_CACHE"] = _XLA_CACHE
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# This process only: XLA's CPU backend at optimisation level 0. Most tests compile many
# small programs once and run them for microseconds, so LLVM's optimisation is most of
# their time (test_model_mae.py and test_aim.py: 223 s -> 149 s, benchmarks/MEASUREMENTS.md).
# XLA reads XLA_FLAGS once, when the backend starts, so the flag is set for that moment
# and taken out again: the processes tests start (training runs, compute-bound guards,
# cross-process numerics) run at the default level, as users do. This process keeps its
# own cache directory, so no child ever reads an unoptimised program.
_CHILD_XLA_FLAGS = os.environ["XLA_FLAGS"]
os.environ["XLA_FLAGS"] = f"{_CHILD_XLA_FLAGS} --xla_backend_optimization_level=0"
import jax  # noqa: E402

jax.devices()  # Starts the backend: the flags are read here.
os.environ["XLA_FLAGS"] = _CHILD_XLA_FLAGS
if _XLA_CACHE:
  jax.config.update("jax_compilation_cache_dir", os.path.join(_XLA_CACHE, "tests-process"))

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> pathlib.Path:
  """The real public datasets beside the checkout; skips when they are absent."""
  if not SHARED_DATASETS.is_dir():
    pytest.skip(f"real datasets not found at {SHARED_DATASETS} (they live beside the repo, never in it)")
  return SHARED_DATASETS



# The longest files first (the CI log's --durations). `-n 2` runs whole files on two
# workers (pyproject.toml: --dist=loadfile, so module fixtures such as test_aot's compiles
# are built once) in collection order: a long file started last would leave the other
# worker idle at the end.
_LONG_FILES = ("test_train_resume.py", "test_learning.py", "test_aot.py", "test_train.py",
               "test_storage.py", "test_faults.py", "test_pretrain_config.py", "test_api.py",
               "test_model_mae.py", "test_run_dir.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the rest as found.


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWNS_CACHE:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
