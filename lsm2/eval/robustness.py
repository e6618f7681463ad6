"""Robustness: remove a sensor group or a time segment (set unobserved) and evaluate again.

Each removal applies to every day the evaluation touches: the probe is refitted
on the reduced training days and scored on the reduced test days (how much
task information survives without that data), and one generative task is
rerun on the reduced days (errors over the minutes still observed).

Device subsets keep only the channels of a named device profile
(lsm2.data.channels.DEVICE_PROFILES, e.g. apple_watch_basic = heart rate +
steps + active energy), matched to the model's channels by name and alias:
what the same pretrained model is worth on a device with fewer sensors. The
condition is named `device:PROFILE(CHANNELS USED)`; profile channels the model
lacks are left out, and a profile sharing no channel with the model, or
holding all of them, is skipped with the reason.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lsm2.data import channels as channels_lib
from lsm2.eval import tasks as tasks_lib


def keep_channels(observed: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """observed [n, t, c] with every channel outside bool[c] `keep` unobserved."""
  return observed & keep[None, None, :]


def conditions(channel_groups: Sequence[str], *, groups: bool, segments: bool,
               channel_names: Sequence[str] = (), device_profiles: Sequence[str] = ()
               ) -> tuple[list[tuple[str, object]], list[str]]:
  """([(masking name, observed -> reduced observed)], notes on conditions left out)."""
  out, notes = [], []
  for profile in device_profiles:
    wanted = channels_lib.profile_channels(profile)
    keep = np.array([(channels_lib.resolve_name(n) or n) in wanted for n in channel_names])
    used = [n for n, k in zip(channel_names, keep) if k]
    if not used or keep.all():
      notes.append(f"device subset {profile} ({'+'.join(wanted)}): the model's channels "
                   f"{list(channel_names)} include {'none' if not used else 'all'} of them")
      continue
    out.append((f"device:{profile}({'+'.join(used)})",
                lambda obs, keep=keep: keep_channels(obs, keep)))
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
