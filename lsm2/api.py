r"""Python API: a pretrained LSM-2 model on days of minute-level data in original units.

  import lsm2
  model = lsm2.load("/path/to/workdir")          # or WORKDIR/export, a release, or step=5000
  emb = model.embed(signals, observed)           # [N, d]: one embedding per day
  filled = model.reconstruct(signals, observed)  # unobserved minutes filled, original units

`signals` is `[N, 1440, C]` or `[1440, C]` in the channels' original units (the
order of `model.channel_names`); `observed` is a boolean array of the same
shape (default: the finite values). Normalisation uses the statistics stored
with the checkpoint. Values at unobserved minutes (even NaN) never reach the
model, so they never change any output.

Named inputs (lsm2.data.named) need no channel order: a pandas DataFrame with
a minute DatetimeIndex (one column per channel, one or many days) or a dict of
named `[1440]` / `[N, 1440]` arrays. Columns go to the model's channels by name
or documented alias ("heart_rate" -> "hr"); names the model lacks are ignored,
model channels without a column stay unobserved (AIM masks them), values
outside a channel's validity range are unobserved as in the pretraining data
(counted per column), a DataFrame must hold minute rows (daily or hourly rows
are refused), and what was used, ignored and masked is logged (a warning when
anything was left out) and kept in `model.last_channel_report`;
`model.match_channels(names)` tells beforehand.

  emb = model.embed(df)              # DataFrame of embeddings, one row per day
  filled = model.reconstruct(df)     # DataFrame: every minute of those days, all model channels

Days are processed in fixed-size padded batches, sharded over all devices:
one compilation per batch size in {D, 2D, 4D, ..., batch_size} (D = number of
devices), never one per input length.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float

from lsm2 import pretrained
from lsm2 import release
from lsm2 import sharding as sharding_lib
from lsm2.data import channels as channels_lib
from lsm2.data import metadata as metadata_lib
from lsm2.data import named as named_lib
from lsm2.model import aim
from lsm2.model import config as model_config_lib


def token_any(minutes: Bool[np.ndarray, "n t c"], model_cfg: model_config_lib.ModelConfig
              ) -> Bool[np.ndarray, "n k"]:
  """Token mask [n, num_tokens]: True where any minute of the token's patch is True."""
  n_time, n_signal = model_cfg.grid
  x = minutes.reshape(minutes.shape[0], n_time, model_cfg.patch_time, n_signal,
                      model_cfg.patch_channels)
  return x.any(axis=(2, 4)).reshape(minutes.shape[0], n_time * n_signal)


def _embed(graphdef, mask_cfg, per_token, state, signals, observed, *, pack):
  model = nnx.merge(graphdef, state)
  return model.embed(signals, observed, mask_cfg=mask_cfg, per_token=per_token, pack=pack)


def _embed_visible(model_cfg, mask_cfg, observed):
  """Each day's visible encoder tokens in `_embed` (the scheme's inherited rule)."""
  observed = aim.effective_observed(observed, mask_cfg)
  return aim.inference_masks(observed, model_cfg, mask_cfg).visible_len


def _reconstruct_inputs(model_cfg, mask_cfg, signals, observed, hidden):
  """(signals, observed, masks) the model sees with the `hidden` tokens masked, nothing dropped."""
  visible = observed & ~aim.tokens_to_minutes(hidden, model_cfg)
  signals = jnp.where(visible, signals, 0.0)  # Hidden values never reach the model.
  model_observed = aim.effective_observed(visible, mask_cfg)  # All True for LSM-1.
  # "attention_only" = n_drop 0: the hidden tokens are masked exactly as given, no top-up.
  eval_cfg = dataclasses.replace(mask_cfg, scheme="attention_only")
  masks = aim.masks_from_artificial(model_observed, hidden, jax.random.key(0), eval_cfg, model_cfg)
  return signals, model_observed, masks


def _reconstruct(graphdef, model_cfg, mask_cfg, state, signals, observed, hidden, *, pack):
  """Predictions (normalised); `pack` = (length, groups) packs the encoder (see `_batched`)."""
  signals, model_observed, masks = _reconstruct_inputs(model_cfg, mask_cfg, signals, observed,
                                                       hidden)
  model = nnx.merge(graphdef, state)
  return model(signals, model_observed, masks if pack is None else aim.pack_visible(masks, *pack))


def _reconstruct_visible(model_cfg, mask_cfg, signals, observed, hidden):
  """Each day's visible encoder tokens in `_reconstruct`."""
  return _reconstruct_inputs(model_cfg, mask_cfg, signals, observed, hidden)[2].visible_len


class PretrainedModel:
  """A restored LSM-2 model with its dataset description; see the module docstring.

  Attributes:
    config: the checkpoint description (model and masking configs, channels,
      normalisation statistics, pretraining data dir and run config).
    model_cfg, mask_cfg: the frozen configs it was pretrained with.
    channel_names: the channel order inputs must follow.
    channel_groups: each channel's sensor group.
    norm_mean, norm_std: per-channel statistics used to normalise inputs.
    batch_size: days per compiled batch (a multiple of the device count).
    encoder_buckets: packed encoder lengths compiled per batch size (see `_batched`);
      1 runs every token of every day.
    step: the training step of the parameters (None when not known).
    graphdef, params: the split NNX model (params replicated on every device).
  """

  def __init__(self, model: nnx.Module, description: dict[str, Any], *, batch_size: int = 64,
               step: int | None = None, encoder_buckets: int = 4):
    self.config = description
    self.step = step
    self.model_cfg = model_config_lib.ModelConfig(**description["model"])
    self.mask_cfg = pretrained.mask_config_from_description(description["masking"])
    self.channel_names = tuple(c["name"] for c in description["channels"])
    self.channel_groups = tuple(c["group"] for c in description["channels"])
    self.norm_mean = np.asarray(description["norm_mean"], np.float32)
    self.norm_std = np.asarray(description["norm_std"], np.float32)
    if len(self.channel_names) != self.model_cfg.num_channels:
      raise ValueError(f"checkpoint description lists {len(self.channel_names)} channels but the "
                       f"model has num_channels={self.model_cfg.num_channels}")
    mesh = sharding_lib.make_mesh({"data": -1})
    self._mesh = mesh
    self._batch_sharding = sharding_lib.batch_sharding(mesh)
    self._replicated = sharding_lib.replicated(mesh)
    self._devices = sharding_lib.data_parallel_size(mesh)
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be positive")
    self.batch_size = self._devices * math.ceil(batch_size / self._devices)
    self.last_channel_report: named_lib.ChannelReport | None = None  # Of the last named input.
    if encoder_buckets < 1:
      raise ValueError(f"encoder_buckets={encoder_buckets} must be positive")
    self.encoder_buckets = encoder_buckets
    self.graphdef, self.params = nnx.split(model)
    self._embed_fn = {
        per_token: jax.jit(functools.partial(_embed, self.graphdef, self.mask_cfg, per_token),
                           static_argnames="pack")
        for per_token in (False, True)}
    self._embed_visible_fn = jax.jit(functools.partial(_embed_visible, self.model_cfg,
                                                       self.mask_cfg))
    self._reconstruct_fn = jax.jit(functools.partial(
        _reconstruct, self.graphdef, self.model_cfg, self.mask_cfg), static_argnames="pack")
    self._reconstruct_visible_fn = jax.jit(functools.partial(
        _reconstruct_visible, self.model_cfg, self.mask_cfg))

  # --- Inputs in original units -------------------------------------------------
  def prepare(self, signals, observed=None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(normalised signals, observed, whether one [T, C] day was given), validated.

    Minutes whose value is not finite count as unobserved; unobserved minutes
    are 0 in the normalised signals.
    """
    signals = np.asarray(signals, np.float32)
    single = signals.ndim == 2
    if single:
      signals = signals[None]
    want = (self.model_cfg.time_steps, self.model_cfg.num_channels)
    if signals.ndim != 3 or signals.shape[1:] != want:
      raise ValueError(
          f"signals must be [N, {want[0]}, {want[1]}] or [{want[0]}, {want[1]}] with channels "
          f"{list(self.channel_names)}, got shape {np.shape(signals)}")
    if observed is None:
      observed = np.isfinite(signals)
    else:
      observed = np.asarray(observed)
      if single and observed.ndim == 2:
        observed = observed[None]
      if observed.dtype != bool or observed.shape != signals.shape:
        raise ValueError(f"observed must be a bool array shaped like signals {signals.shape}, "
                         f"got {observed.dtype} {observed.shape}")
      observed = observed & np.isfinite(signals)
    return metadata_lib.normalize(signals, observed, self.norm_mean, self.norm_std), observed, single

  # --- Public API ---------------------------------------------------------------
  def embed(self, signals, observed=None, per_token: bool = False):
    """Per-day embeddings [N, d] ([d] for one day), the mean over visible encoder tokens.

    With `per_token`: (outputs [N, num_tokens, d] on the token grid, row-major
    over (time, signal) patches, zeros at masked tokens; visible [N, num_tokens]).
    Named inputs (see the module docstring): a DataFrame gives a DataFrame with
    one row per day (index `day`), a dict the arrays above.
    """
    if named_lib.is_named(signals):
      named = self._place(signals, observed)
      out = self.embed(named.signals, named.observed, per_token)
      if named.single:
        out = jax.tree.map(lambda a: a[0], out)
      if per_token or not named.report.days:
        return out
      import pandas as pd  # pylint: disable=g-import-not-at-top
      return pd.DataFrame(out, index=pd.DatetimeIndex(named.report.days, name="day"))
    z, obs, single = self.prepare(signals, observed)
    out = self.embed_normalized(z, obs, per_token=per_token)
    return jax.tree.map(lambda a: a[0], out) if single else out

  def reconstruct(self, signals, observed=None, mask=None):
    """Fills the unobserved minutes and the `mask`ed ones, in original units.

    `mask` (bool, shaped like signals) marks observed minutes to hide from the
    model and predict. Every token (patch) holding a minute to fill is masked
    whole; observed minutes outside `mask` keep their input values exactly.
    Named inputs (see the module docstring) give every model channel, by name:
    a DataFrame over every minute of the input's days (local wall clock), or
    a dict of arrays; `mask` is then a bool DataFrame or dict with input names.
    """
    if named_lib.is_named(signals):
      named = self._place(signals, observed)
      hide = None if mask is None else named_lib.place_mask(mask, named)
      out = self.reconstruct(named.signals, named.observed, hide)
      if not named.report.days:  # A dict of arrays.
        return {c: out[..., i][0] if named.single else out[..., i]
                for i, c in enumerate(self.channel_names)}
      import pandas as pd  # pylint: disable=g-import-not-at-top
      days = np.array(named.report.days, "datetime64[m]")
      minutes = pd.DatetimeIndex((days[:, None] + np.arange(out.shape[1])).reshape(-1),
                                 name="time")
      return pd.DataFrame(out.reshape(-1, out.shape[-1]), index=minutes,
                          columns=list(self.channel_names))
    z, obs, single = self.prepare(signals, observed)
    target = ~obs
    if mask is not None:
      mask = np.asarray(mask)
      if mask.ndim == 2 and single:
        mask = mask[None]
      if mask.dtype != bool or mask.shape != z.shape:
        raise ValueError(f"mask must be a bool array shaped like signals {z.shape}, "
                         f"got {mask.dtype} {mask.shape}")
      target = target | mask
    pred = metadata_lib.denormalize(
        self.reconstruct_normalized(z, obs, token_any(target, self.model_cfg)),
        self.norm_mean, self.norm_std)
    original = np.asarray(signals, np.float32).reshape(z.shape)
    out = np.where(obs & ~target, original, pred)
    return out[0] if single else out

  def match_channels(self, names) -> named_lib.ChannelReport:
    """Which of `names` a named input would use (as which channel), ignore, and leave unobserved."""
    slots, ignored = named_lib.match_channels(list(names), self.channel_names)
    return named_lib.channel_report(slots, ignored, self.channel_names)

  def _place(self, data, observed) -> named_lib.NamedInput:
    """Places a named input at the model's channels; logs and keeps the report."""
    if observed is not None:
      raise ValueError("with named inputs, unobserved minutes are the NaN or absent values; "
                       "pass observed=None")
    # The dataset's channels with their validity ranges: inputs are checked as its records were.
    channels = [channels_lib.Channel.from_json(c) for c in self.config["channels"]]
    named = named_lib.place(data, channels, self.model_cfg.time_steps)
    self.last_channel_report = named.report
    left_out = named.report.ignored or named.report.unobserved or named.report.out_of_range
    logging.log(logging.WARNING if left_out else logging.INFO, "Named input:\n%s", named.report)
    return named

  # --- Normalised inputs (the evaluation driver's entry points) -------------------
  def embed_normalized(self, z: Float[np.ndarray, "n t c"], observed: Bool[np.ndarray, "n t c"],
                       *, per_token: bool = False, params=None):
    """`embed` on already-normalised inputs (0 at unobserved minutes); `params` overrides weights."""
    fn = self._embed_fn[per_token]
    state = self.params if params is None else params
    return self._batched(lambda pack, s, o: fn(state, s, o, pack=pack), z, observed,
                         visible=lambda s, o: self._embed_visible_fn(o))

  def reconstruct_normalized(self, z: Float[np.ndarray, "n t c"], observed: Bool[np.ndarray, "n t c"],
                             hidden_tokens: Bool[np.ndarray, "n k"]) -> np.ndarray:
    """Normalised predictions of every minute [n, T, C] with `hidden_tokens` masked."""
    hidden_tokens = np.asarray(hidden_tokens)
    if hidden_tokens.shape != (z.shape[0], self.model_cfg.num_tokens) or hidden_tokens.dtype != bool:
      raise ValueError(f"hidden_tokens must be bool [{z.shape[0]}, {self.model_cfg.num_tokens}], "
                       f"got {hidden_tokens.dtype} {hidden_tokens.shape}")
    return self._batched(
        lambda pack, s, o, h: self._reconstruct_fn(self.params, s, o, h, pack=pack),
        z, observed, hidden_tokens, visible=self._reconstruct_visible_fn)

  def padded_size(self, n: int) -> int:
    """Compiled batch size for n days: D * 2^k, at most `batch_size` (D = devices)."""
    per_device = math.ceil(max(n, 1) / self._devices)
    return min(self.batch_size, self._devices * 2 ** math.ceil(math.log2(per_device)))

  def shard(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Puts batch arrays on the devices, split along the first axis."""
    return tuple(jax.device_put(a, self._batch_sharding) for a in arrays)

  def replicate(self, tree):
    """Puts a pytree on every device (like the restored parameters)."""
    return jax.device_put(tree, self._replicated)

  def mesh_context(self):
    """Context to trace and run this model's batched functions in (see `shard`).

    With it, mesh-aware ops split their work over the batch's devices (the blocked
    attention loops per device instead of being replicated).
    """
    return sharding_lib.mesh_context(self._mesh, (("batch", sharding_lib.BATCH_AXES),))

  def _batched(self, fn: Callable, *arrays: np.ndarray, visible: Callable):
    """fn(pack, *batch) over fixed-size, zero-padded batches; the outputs concatenated.

    `visible(*batch)` counts each day's visible encoder tokens. With more than one of
    `encoder_buckets`, each device's share of a batch is packed (`aim.pack_visible`;
    pack = (length, groups)) into the smallest of that many compiled lengths that holds
    its visible tokens: the same outputs, with per-token layers following the tokens the
    days show (about half on the synthetic data) rather than all of them; attention
    already skips the masked ones. pack None runs every token (also when a batch needs
    them all: LSM-1, which trusts every minute, or complete days).
    """
    n = arrays[0].shape[0]
    if n == 0:
      raise ValueError("no days given (N = 0)")
    size = self.padded_size(n)
    lengths = aim.encoder_buckets(self.encoder_buckets,
                                  self.model_cfg.num_tokens * size // self._devices)
    outs = []
    for start in range(0, n, size):
      chunk = [a[start:start + size] for a in arrays]
      m = chunk[0].shape[0]
      if m < size:
        chunk = [np.concatenate([c, np.zeros((size - m,) + c.shape[1:], c.dtype)]) for c in chunk]
      with self.mesh_context():
        chunk = self.shard(*chunk)
        pack = None
        if len(lengths) > 1:  # Devices hold consecutive rows: one packing group each.
          group = jax.device_get(visible(*chunk)).reshape(self._devices, -1).sum(axis=1)
          length = next(x for x in lengths if x >= group.max())
          pack = (length, self._devices) if length < lengths[-1] else None  # None: all tokens.
        out = jax.device_get(fn(pack, *chunk))
      outs.append(jax.tree.map(lambda a: np.asarray(a)[:m], out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)

  def check_dataset(self, meta: metadata_lib.DatasetMetadata, checkpoint: str = "checkpoint") -> None:
    """Raises ValueError naming both sides when `meta`'s channels do not fit this model."""
    data_names = tuple(c.name for c in meta.channels)
    if data_names != self.channel_names:
      cfg = self.model_cfg
      raise ValueError(
          f"checkpoint {checkpoint} was pretrained on {len(self.channel_names)} channels "
          f"{list(self.channel_names)} (patch {cfg.patch_time} min x {cfg.patch_channels} "
          f"channels), but dataset {meta.data_dir} has {len(data_names)} channels "
          f"{list(data_names)}; evaluate on data with the same channels in the same order")


def load(path: str | pathlib.Path, step: int | None = None, *, batch_size: int = 64,
         encoder_buckets: int = 4) -> PretrainedModel:
  """Restores a model from a training workdir (export/ or a checkpoint `step`), an export/ dir
  or a release (lsm2.release: its manifest verified first).

  Without `step` and an export, the newest readable checkpoint: an unreadable
  newer one is skipped with a warning, as training does (lsm2.pretrained.restore_newest).
  `encoder_buckets`: how many encoder lengths inference compiles (1: every token of every day).
  """
  if release.is_release(path):
    model, description, step = release.load(path, step)
  else:
    model, description, step = pretrained.load_pretrained(path, step)
  return PretrainedModel(model, description, batch_size=batch_size, step=step,
                         encoder_buckets=encoder_buckets)
