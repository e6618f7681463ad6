"""Subject-disjoint train/validation/test assignment."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SPLIT_NAMES = ("train", "validation", "test")


def assign_subjects(subject_ids: Iterable[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                    seed: int = 0) -> dict[str, list[str]]:
  """Shuffles the subjects with `seed` and cuts them into train/validation/test.

  Every split with a positive fraction gets at least one subject when there
  are enough subjects; train always gets the rest. Each subject is in exactly
  one split, so no person's days leak between training and evaluation.
  """
  if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1):
    raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, "
                     f"got {tuple(fractions)}")
  ids = sorted(set(subject_ids))
  n = len(ids)
  needed = sum(1 for f in fractions if f > 0)
  if n < needed:
    raise ValueError(f"{n} subjects cannot fill {needed} subject-disjoint splits "
                     f"with fractions {tuple(fractions)}")
  order = np.random.default_rng(seed).permutation(n)
  counts = [0, 0, 0]
  for k in (1, 2):
    if fractions[k] > 0:
      counts[k] = max(1, int(round(fractions[k] * n)))
  counts[0] = n - counts[1] - counts[2]
  if counts[0] < (1 if fractions[0] > 0 else 0):
    raise ValueError(f"{n} subjects leave none for training with fractions {tuple(fractions)}")
  out, start = {}, 0
  for name, k in zip(SPLIT_NAMES, counts):
    out[name] = sorted(ids[i] for i in order[start:start + k])
    start += k
  return out
