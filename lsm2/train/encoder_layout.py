"""The encoder's layout per step: the fixed split, cut to a bucket, or packed.

AIM keeps a fixed number of tokens per example (n_keep = num_tokens - n_drop)
for the encoder, visible tokens first. Most days show fewer, so the encoder
can run on less, exactly:

  fixed split   every example's n_keep kept tokens (no buckets).
  buckets       the kept tokens cut to the smallest compiled length that holds
                the batch's largest visible count (the cut tail is only
                attention-masked tokens whose outputs are discarded).
  packed        the visible tokens of each group of examples (one group per
                data-parallel shard) laid end to end, so per-token layers
                follow the batch's total, not its largest, visible count
                (`aim.pack_visible`).

Each compiled length is one compilation of the train step: the host picks the
length from the drawn masks' visible counts, before the step runs.
"""
from collections.abc import Callable
import logging

import jax
import jax.numpy as jnp
import ml_collections

from lsm2 import sharding as sharding_lib
from lsm2.model import aim
from lsm2.model import config as model_config_lib


def layout_buckets(num_buckets: int, n_keep: int, batch_size: int, pack_groups: int
                   ) -> tuple[int, ...] | None:
  """Encoder lengths to compile (None: the fixed split). Packed lengths range up to every
  kept token of a group's examples."""
  if num_buckets <= 0:
    return None
  return aim.encoder_buckets(num_buckets, n_keep * batch_size // pack_groups if pack_groups else n_keep)


def fit_encoder(masks: aim.AimMasks, buckets: tuple[int, ...], pack_groups: int = 0
                ) -> tuple[aim.AimMasks, int]:
  """Masks cut (or, with `pack_groups`, packed) to the smallest bucket that holds the
  batch's visible tokens (largest count per example, or total per group), and that length."""
  visible = masks.visible_len
  if pack_groups:
    visible = visible.reshape(pack_groups, -1).sum(axis=1)
  longest = int(jax.device_get(jnp.max(visible)))
  length = next(b for b in buckets if b >= longest)
  if pack_groups:
    return aim.pack_visible(masks, length, pack_groups), length
  return aim.truncate_kept(masks, length), length


class MaskLayout:
  """Draws a step's masks and lays the encoder out for them (module docstring).

  `mask_fn(rng, step, observed)` draws the AIM masks (lsm2.train.train.make_mask_fn);
  `draw` returns them cut or packed to a bucket (`buckets` None: as drawn, the
  fixed split). `compiled_lengths` records the lengths drawn so far: the train
  step compiles once per length.
  """

  def __init__(self, mask_fn: Callable[..., aim.AimMasks], buckets: tuple[int, ...] | None,
               pack_groups: int = 0):
    self.mask_fn = mask_fn
    self.buckets = buckets
    self.pack_groups = pack_groups
    self.compiled_lengths: set[int] = set()

  def draw(self, rng, step, observed) -> aim.AimMasks:
    masks = self.mask_fn(rng, step, observed)
    if self.buckets is None:
      return masks
    masks, length = fit_encoder(masks, self.buckets, self.pack_groups)
    self.compiled_lengths.add(length)
    return masks


def make_mask_layout(config: ml_collections.ConfigDict, mask_fn: Callable[..., aim.AimMasks],
                     model_cfg: model_config_lib.ModelConfig,
                     mask_cfg: model_config_lib.MaskConfig, mesh: jax.sharding.Mesh
                     ) -> MaskLayout:
  """The layout config.masking asks for: fixed split, buckets, or packed buckets (one
  packing group per data-parallel shard of `mesh`)."""
  n_keep = model_cfg.num_tokens - mask_cfg.n_drop
  pack_groups = sharding_lib.data_parallel_size(mesh) if config.masking.pack_encoder else 0
  buckets = layout_buckets(config.masking.encoder_buckets, n_keep, config.batch_size, pack_groups)
  layout = ("fixed split" if buckets is None else
            f"packed encoder, {pack_groups} group(s), lengths {buckets}" if pack_groups else
            f"encoder buckets {buckets}")
  logging.info("Encoder layout: %s (n_keep %d).", layout, n_keep)
  return MaskLayout(mask_fn, buckets, pack_groups)
