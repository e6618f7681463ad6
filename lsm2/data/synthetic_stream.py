"""An endless stream of fresh synthetic subject-days, paired with a written synthetic dataset.

A written synthetic dataset (lsm2.data.synthesize) holds a fixed population:
on the CPU recipe its ~5,800 training days are seen many times, and more
people, not more steps, is what helps. `SyntheticDays` generates day `i` of an
endless population on demand instead, with the paired dataset's generator
settings (seed, days per subject), so every training step sees new people
while validation and test stay the written splits.

- Deterministic: position `i` (with the draw seed) always gives the same
  record bytes, so Grain's checkpointed iterator state resumes exactly.
- Never an evaluation subject: the written dataset holds subject indices
  0 .. N-1 (ids `synthNNNNNN`); the stream draws from index FIRST_SUBJECT
  (10**9) upwards, and the constructor refuses a dataset holding any subject
  index at or above it, so no written subject (validation, test or train) can
  come out. The population is the same: same generator, same seed, same
  days per subject (`generate_subject(seed, index, days)`).
- Identical to the written records: each day is sanitized and serialized by
  the writer's own `encode_checked`, then decoded and normalized by the
  pipeline's DecodeBatch with the paired dataset's train statistics.

Layout: positions come in blocks of BLOCK_SUBJECTS subjects x D days,
permuted within the block, so a batch mixes people and days of a recording
while each subject is generated once (its D days come from one timeline).
"""
from __future__ import annotations

import re

import numpy as np

from lsm2 import errors
from lsm2.data import synthetic
from lsm2.data import writer as writer_lib
from lsm2.data.metadata import DatasetMetadata

GENERATOR = "lsm2.data.synthetic"  # metadata.json's source.generator for synthetic datasets.
FIRST_SUBJECT = 10**9  # Stream subject indices start here; written datasets stay below.
SUBJECTS_PER_SEED = 2**40  # Each draw seed has its own range of this many subjects.
BLOCK_SUBJECTS = 64  # Subjects whose days are shuffled together (~12 MB of records at 3 days).
_SUBJECT_ID = re.compile(r"synth(\d+)")


class NotPairableError(errors.Error, ValueError):
  """The dataset cannot be paired with a synthetic stream (not synthetic, or overlapping)."""


class SyntheticDays:
  """Position -> RawRecord (serialized day, name, day index) of an endless synthetic population.

  `draw_seed` picks which people (the training seed): each seed has its own
  range of SUBJECTS_PER_SEED subjects. Holds the current block's generated
  subjects (positions are read in increasing order within a process).
  """

  def __init__(self, meta: DatasetMetadata, draw_seed: int):
    source = meta.source
    if source.get("generator") != GENERATOR:
      raise NotPairableError(
          f"{meta.data_dir} is not a synthetic dataset (its metadata.json source.generator is "
          f"{source.get('generator')!r}, not {GENERATOR!r}): the synthetic stream continues "
          "the population of a dataset written by lsm2.data.synthesize")
    if draw_seed < 0:
      raise ValueError(f"draw_seed={draw_seed} must be >= 0")
    check_disjoint(meta)
    self.seed, self.days = int(source["seed"]), int(source["days"])
    self.channels = meta.channels
    self.labels = meta.labels
    self.first = FIRST_SUBJECT + draw_seed * SUBJECTS_PER_SEED
    self.block_len = BLOCK_SUBJECTS * self.days
    self._block = -1
    self._order: np.ndarray | None = None
    self._subjects: dict[int, list[bytes]] = {}
    self._draw_seed = draw_seed

  def __len__(self) -> int:
    return SUBJECTS_PER_SEED * self.days  # Endless in practice: ~10**12 days.

  def locate(self, i: int) -> tuple[int, int]:
    """(subject index, day) at position i."""
    block, j = divmod(int(i), self.block_len)
    if block != self._block:  # A new block: earlier ones are never read again.
      self._block, self._subjects = block, {}
      rng = np.random.default_rng([self.seed, self._draw_seed, block])
      self._order = rng.permutation(self.block_len)
    subject, day = divmod(int(self._order[j]), self.days)
    return self.first + block * BLOCK_SUBJECTS + subject, day

  def encode_subject(self, index: int) -> list[bytes]:
    """Subject `index`'s days as the writer stores them (bytes of each record)."""
    _, records = synthetic.generate_subject(self.seed, index, self.days)
    return [writer_lib.encode_checked(r, self.channels, self.labels, "synthetic_stream")[2]
            for r in records]

  def __call__(self, i: int) -> tuple[bytes, str, int]:
    subject, day = self.locate(i)
    if subject not in self._subjects:
      self._subjects[subject] = self.encode_subject(subject)
    return self._subjects[subject][day], f"synthetic stream subject {subject}", day


def check_disjoint(meta: DatasetMetadata) -> None:
  """Raises NotPairableError unless every written subject index is below FIRST_SUBJECT.

  The stream's subjects are `synth<n>` with n >= FIRST_SUBJECT, so this proves
  that no subject of any written split (validation and test included) can be drawn.
  """
  for split, ids in meta.subjects.items():
    for sid in ids:
      m = _SUBJECT_ID.fullmatch(sid)
      if m is None or int(m.group(1)) >= FIRST_SUBJECT:
        raise NotPairableError(
            f"{meta.data_dir}: split {split!r} holds subject {sid!r}, which is not "
            f"synth<n> with n < {FIRST_SUBJECT}: the synthetic stream could not prove it "
            "never draws that subject")
