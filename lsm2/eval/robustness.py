"""Robustness: remove a sensor group or a time segment (set unobserved) and evaluate again.

Each removal applies to every day the evaluation touches: the probe is refitted
on the reduced training days and scored on the reduced test days (how much
task information survives without that data), and one generative task is
rerun on the reduced days (errors over the minutes still observed).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lsm2.eval import tasks as tasks_lib


def conditions(channel_groups: Sequence[str], *, groups: bool, segments: bool
               ) -> tuple[list[tuple[str, object]], list[str]]:
  """([(masking name, observed -> reduced observed)], notes on conditions left out)."""
  out, notes = [], []
  if groups:
    names = tasks_lib.sensor_groups(channel_groups)
    if len(names) > 1:
      for g in names:
        out.append((f"remove_group:{g}",
                    lambda obs, g=g: tasks_lib.remove_sensor_group(obs, channel_groups, g)))
    else:
      notes.append(f"sensor-group removal: the data has one sensor group ({names[0]}); removing "
                   "it would leave nothing")
  if segments:
    for s in tasks_lib.SEGMENT_HOURS:
      out.append((f"remove_segment:{s}", lambda obs, s=s: tasks_lib.remove_time_segment(obs, s)))
  return out, notes


def reduce(z: np.ndarray, observed: np.ndarray, transform) -> tuple[np.ndarray, np.ndarray]:
  """(z zeroed at removed minutes, reduced observed)."""
  reduced = transform(observed)
  return np.where(reduced, z, 0.0).astype(np.float32), reduced
