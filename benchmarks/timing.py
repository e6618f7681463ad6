"""Wall-clock timing shared by the benchmark scripts (run as `python benchmarks/X.py`)."""
from collections.abc import Callable, Sequence
import time

import jax


def run_times(f: Callable, args: Sequence, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of f(*args), after one untimed call that compiles."""
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return times
