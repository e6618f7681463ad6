"""Hyper-parameters of the LSM-2 masked autoencoder and of AIM masking.

`ModelConfig` fixes the architecture (patching, widths, depths, numerics);
`MaskConfig` fixes how the inherited and artificial masks are drawn and how
many masked tokens are dropped before the encoder. Defaults are the paper's
(see docs/method.md) and are the only place they are written: configs/pretrain.py
reads them with `field_defaults`. Both are frozen so that they can be static
arguments of jitted functions.
"""
import dataclasses
import math
from typing import Any, Literal

from lsm2 import errors

_DTYPES = ("float32", "bfloat16")
_ATTENTION = ("xla", "blocked", "cudnn", "splash")
_REMAT = ("none", "attention", "full")
SCHEMES = ("aim", "lsm1", "dropout_only", "attention_only")
STRATEGIES = (
    "random",
    "time_bars",
    "temporal_interpolation",
    "temporal_extrapolation",
    "signal_imputation",
)


def field_defaults(cls) -> dict[str, Any]:
  """{field name: default} of a config dataclass (ModelConfig, MaskConfig).

  The run configs (configs/pretrain.py) take their defaults from here, so that
  each default is written once.
  """
  return {f.name: f.default for f in dataclasses.fields(cls)}


def _check_positive(cfg, names):
  for name in names:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise errors.ConfigError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def _check_choice(cfg, name, choices):
  value = getattr(cfg, name)
  if value not in choices:
    raise errors.ConfigError(f"{type(cfg).__name__}.{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the ViT masked autoencoder over (time x signal) patches.

  Attributes:
    num_channels: signals per minute (C).
    time_steps: minutes per example (T).
    patch_time: minutes per token.
    patch_channels: signals per token.
    enc_width, enc_depth, enc_heads, enc_mlp: encoder transformer.
    dec_width, dec_depth, dec_heads, dec_mlp: decoder transformer.
    dtype: compute dtype ("float32" or "bfloat16").
    param_dtype: parameter dtype.
    matmul_dtype: operand dtype of the dense-layer and blocked-attention
      products, accumulated in float32 ("bfloat16" = TPU-style mixed
      precision, about 2x faster on CPUs with AVX512-BF16; see
      lsm2/model/matmul.py). The mixed dense products return float32, so the
      xla and splash attention kernels then compute on float32 q/k/v; cudnn
      takes bfloat16 only and gets q/k/v rounded to bfloat16
      (lsm2/model/attention.py).
    attention: encoder attention kernel ("xla", "blocked", "cudnn": GPU and
      dtype bfloat16 only, or "splash": TPU; the decoder always runs full
      attention with the same kernel family).
    remat: activation rematerialization ("none", "attention": recompute the
      attention core in the backward pass, "full": recompute whole blocks).
    observed_in_embedding: also feed the minute-level observed mask to the
      patch embedding (off in the paper).
  """

  num_channels: int = 26
  time_steps: int = 1440
  patch_time: int = 10
  patch_channels: int = 1
  enc_width: int = 384
  enc_depth: int = 12
  enc_heads: int = 6
  enc_mlp: int = 1536
  dec_width: int = 256
  dec_depth: int = 4
  dec_heads: int = 8
  dec_mlp: int = 1024
  dtype: Literal["float32", "bfloat16"] = "float32"
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  matmul_dtype: Literal["float32", "bfloat16"] = "float32"
  attention: Literal["xla", "blocked", "cudnn", "splash"] = "xla"
  remat: Literal["none", "attention", "full"] = "none"
  observed_in_embedding: bool = False

  @property
  def grid(self) -> tuple[int, int]:
    """Token grid (n_time, n_signal)."""
    return self.time_steps // self.patch_time, self.num_channels // self.patch_channels

  @property
  def num_tokens(self) -> int:
    n_time, n_signal = self.grid
    return n_time * n_signal

  @property
  def patch_size(self) -> int:
    """Minute values per token (patch_time * patch_channels)."""
    return self.patch_time * self.patch_channels

  def validate(self) -> "ModelConfig":
    """Raises ValueError naming the offending field; returns self."""
    _check_positive(self, (
        "num_channels", "time_steps", "patch_time", "patch_channels",
        "enc_width", "enc_depth", "enc_heads", "enc_mlp",
        "dec_width", "dec_depth", "dec_heads", "dec_mlp"))
    if self.time_steps % self.patch_time:
      raise errors.ConfigError(
          f"ModelConfig.patch_time={self.patch_time} does not divide time_steps={self.time_steps}")
    if self.num_channels % self.patch_channels:
      raise errors.ConfigError(
          f"ModelConfig.patch_channels={self.patch_channels} does not divide "
          f"num_channels={self.num_channels}")
    for part in ("enc", "dec"):
      width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
      if width % heads:
        raise errors.ConfigError(
            f"ModelConfig.{part}_heads={heads} does not divide {part}_width={width}")
      if width % 4:
        raise errors.ConfigError(
            f"ModelConfig.{part}_width={width} must be a multiple of 4 "
            "(2-D sine-cosine positional embedding)")
    _check_choice(self, "dtype", _DTYPES)
    _check_choice(self, "param_dtype", _DTYPES)
    _check_choice(self, "matmul_dtype", _DTYPES)
    _check_choice(self, "attention", _ATTENTION)
    if self.attention == "cudnn" and self.dtype != "bfloat16":
      raise errors.ConfigError(
          f"ModelConfig.attention='cudnn' needs dtype='bfloat16' (cuDNN's fused attention "
          f"rejects {self.dtype} inputs), got dtype={self.dtype!r}: set config.model.dtype to "
          "'bfloat16' (or 'auto'), or config.model.attention to 'xla'")
    if self.attention == "cudnn" and not cudnn_takes_head_dims(self.head_dims):
      raise errors.ConfigError(
          f"ModelConfig.attention='cudnn' needs head dimensions (width / heads) that are "
          f"multiples of 8 and at most {CUDNN_MAX_HEAD_DIM}; this model's are "
          f"{self.enc_width}/{self.enc_heads} and {self.dec_width}/{self.dec_heads} "
          f"(encoder, decoder) = {self.head_dims}: set config.model.attention to 'xla' (or "
          "'auto', which picks XLA's attention for such a model on GPU), or change the heads")
    _check_choice(self, "remat", _REMAT)
    if not isinstance(self.observed_in_embedding, bool):
      raise errors.ConfigError(
          f"ModelConfig.observed_in_embedding must be a bool, got {self.observed_in_embedding!r}")
    return self

  @property
  def head_dims(self) -> tuple[int, int]:
    """Per-head width of the encoder and the decoder."""
    return self.enc_width // self.enc_heads, self.dec_width // self.dec_heads


_SIZES = {
    # Compiles in seconds; for tests.
    "tiny": dict(enc_width=32, enc_depth=2, enc_heads=2, enc_mlp=64,
                 dec_width=32, dec_depth=1, dec_heads=2, dec_mlp=64),
    # Between tiny and XS (~0.13M parameters): the middle point of the CPU-scale
    # parameter axis (benchmarks/paper_comparison.py --scaling params).
    "XXS": dict(enc_width=64, enc_depth=3, enc_heads=4, enc_mlp=128,
                dec_width=48, dec_depth=1, dec_heads=4, dec_mlp=128),
    # CPU scale (~0.45M parameters): the 30-minute recipe on a 2-core machine
    # (configs/pretrain.py:XS,aim,cpu; docs/results.md).
    "XS": dict(enc_width=96, enc_depth=4, enc_heads=4, enc_mlp=256,
               dec_width=64, dec_depth=2, dec_heads=4, dec_mlp=192),
    # Paper default (~25M parameters with 26 channels).
    "S": dict(enc_width=384, enc_depth=12, enc_heads=6, enc_mlp=1536,
              dec_width=256, dec_depth=4, dec_heads=8, dec_mlp=1024),
    # ViT-B encoder (~110M).
    "B": dict(enc_width=768, enc_depth=12, enc_heads=12, enc_mlp=3072,
              dec_width=512, dec_depth=8, dec_heads=16, dec_mlp=2048),
    # ViT-L encoder (~330M).
    "L": dict(enc_width=1024, enc_depth=24, enc_heads=16, enc_mlp=4096,
              dec_width=512, dec_depth=8, dec_heads=16, dec_mlp=2048),
}
SIZES = tuple(_SIZES)
# The fields a named size sets (every size sets the same); run configs may override each
# (configs/pretrain.py).
SIZE_FIELDS = tuple(_SIZES["S"])


def get_model_config(size: str, **overrides) -> ModelConfig:
  """Named model variant ("tiny", "S", "B", "L") with field overrides, validated."""
  if size not in _SIZES:
    raise errors.ConfigError(f"unknown model size {size!r}; expected one of {SIZES}")
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise errors.ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}")
  return ModelConfig(**{**_SIZES[size], **overrides}).validate()


# The precision policy: what "auto" means per platform ("cpu", "gpu", "tpu").
def auto_dtype(platform: str) -> str:
  """Compute dtype: bfloat16 on TPU and GPU, float32 on CPU.

  Parameters, optimizer state and the loss stay float32 whatever it is
  (`param_dtype`; the model returns float32 and the loss computes in it).
  """
  return "float32" if platform == "cpu" else "bfloat16"


# cuDNN's fused (flash) attention takes head dimensions that are multiples of 8, up to 128
# on every GPU (256 from Hopper on; "auto" keeps to what every GPU takes).
CUDNN_MAX_HEAD_DIM = 128


def cudnn_takes_head_dims(head_dims) -> bool:
  return all(h % 8 == 0 and h <= CUDNN_MAX_HEAD_DIM for h in head_dims)


def auto_attention(platform: str, dtype: str, head_dims=()) -> str:
  """The fastest attention kernel for a platform, compute dtype and the model's head
  dimensions: "blocked" on CPU, "splash" on TPU, "cudnn" on GPU in bfloat16 (it rejects
  float32) with head dimensions it takes, else "xla"."""
  if platform == "cpu":
    return "blocked"
  if platform == "tpu":
    return "splash"
  if platform == "gpu" and dtype == "bfloat16" and cudnn_takes_head_dims(head_dims):
    return "cudnn"
  return "xla"


def for_platform(cfg: ModelConfig, platform: str) -> ModelConfig:
  """The same model computed on `platform`: an attention kernel that only runs elsewhere
  (splash: TPU, cudnn: GPU), as a model trained there records, becomes this platform's
  `auto_attention`. Every kernel computes the same function."""
  home = {"splash": "tpu", "cudnn": "gpu"}.get(cfg.attention)
  if home is None or home == platform:
    return cfg
  return dataclasses.replace(cfg, attention=auto_attention(platform, cfg.dtype, cfg.head_dims))


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """How AIM draws the masks of one example.

  Attributes:
    scheme: "aim" (paper), or a baseline on the same code path: "lsm1" (no
      inherited mask, the filled values are treated as data, random masking,
      every masked token dropped), "dropout_only" (drop as many masked tokens
      as static shapes allow: masks are topped up to `round(random_ratio * N)`
      tokens, all of which are dropped) or "attention_only" (`n_drop = 0`).
      Use `effective_mask_config` to get the settings a scheme implies.
    inherited_threshold: fraction of a token's minutes that must be missing
      for the token to be inherited-missing (1.0: all of them).
    strategy_weights: ((strategy name, weight), ...); one strategy is drawn
      per example with these odds. Names are from `STRATEGIES`.
    random_ratio: "random" tops the inherited mask up to this fraction.
    time_bars: "time_bars" masks all signals at this many time steps.
    interp_gap_minutes: gap length of "temporal_interpolation".
    extrap_gap_minutes: gap length (at the end) of "temporal_extrapolation".
    signal_imputation_k: channels masked by "signal_imputation".
    n_drop: masked tokens removed before the encoder (static). Strategies that
      mask fewer are topped up with random tokens.
  """

  scheme: Literal["aim", "lsm1", "dropout_only", "attention_only"] = "aim"
  inherited_threshold: float = 1.0
  strategy_weights: tuple[tuple[str, float], ...] = (("random", 0.5), ("time_bars", 0.5))
  random_ratio: float = 0.8
  time_bars: int = 57
  interp_gap_minutes: int = 60
  extrap_gap_minutes: int = 60
  signal_imputation_k: int = 6
  n_drop: int = 1482

  @property
  def strategy_names(self) -> tuple[str, ...]:
    """Strategy names in the order of `strategy_weights` (= AimMasks.strategy ids)."""
    return tuple(name for name, _ in self.strategy_weights)

  @property
  def uses_inherited_mask(self) -> bool:
    """False when missing minutes are treated as data (LSM-1 style)."""
    return self.scheme != "lsm1"

  def random_count(self, model_cfg: ModelConfig) -> int:
    """Tokens masked by the "random" strategy (paper: 2,995 of 3,744)."""
    return int(round(self.random_ratio * model_cfg.num_tokens))

  def validate(self, model_cfg: ModelConfig) -> "MaskConfig":
    """Raises ValueError naming the offending field; returns self."""
    model_cfg.validate()
    n_time, n_signal = model_cfg.grid
    _check_choice(self, "scheme", SCHEMES)
    if not 0.0 < self.inherited_threshold <= 1.0:
      raise errors.ConfigError(
          f"MaskConfig.inherited_threshold must be in (0, 1], got {self.inherited_threshold!r}")
    if not self.strategy_weights:
      raise errors.ConfigError("MaskConfig.strategy_weights is empty")
    names = self.strategy_names
    for name, weight in self.strategy_weights:
      if name not in STRATEGIES:
        raise errors.ConfigError(
            f"MaskConfig.strategy_weights: unknown strategy {name!r}; expected one of {STRATEGIES}")
      if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise errors.ConfigError(
            f"MaskConfig.strategy_weights: weight of {name!r} must be >= 0, got {weight!r}")
    if len(set(names)) != len(names):
      raise errors.ConfigError(f"MaskConfig.strategy_weights names a strategy twice: {names}")
    if sum(w for _, w in self.strategy_weights) <= 0:
      raise errors.ConfigError(f"MaskConfig.strategy_weights sum to zero: {self.strategy_weights}")
    if not 0.0 <= self.random_ratio < 1.0:
      raise errors.ConfigError(
          f"MaskConfig.random_ratio must be in [0, 1), got {self.random_ratio!r}")
    # Parameters of strategies outside the mix are not checked (they are unused).
    if "time_bars" in names and (
        not isinstance(self.time_bars, int) or not 0 <= self.time_bars <= n_time):
      raise errors.ConfigError(
          f"MaskConfig.time_bars={self.time_bars!r} must be in [0, n_time={n_time}]")
    for strategy, field in (("temporal_interpolation", "interp_gap_minutes"),
                            ("temporal_extrapolation", "extrap_gap_minutes")):
      minutes = getattr(self, field)
      bad = (not isinstance(minutes, int) or not 0 <= minutes <= model_cfg.time_steps
             or minutes % model_cfg.patch_time)
      if strategy in names and bad:
        raise errors.ConfigError(
            f"MaskConfig.{field}={minutes!r} must be a multiple of patch_time="
            f"{model_cfg.patch_time} in [0, time_steps={model_cfg.time_steps}]")
    k = self.signal_imputation_k
    bad = (not isinstance(k, int) or not 0 <= k <= model_cfg.num_channels
           or k % model_cfg.patch_channels)
    if "signal_imputation" in names and bad:
      raise errors.ConfigError(
          f"MaskConfig.signal_imputation_k={k!r} must be a multiple of patch_channels="
          f"{model_cfg.patch_channels} in [0, num_channels={model_cfg.num_channels}]")
    if not isinstance(self.n_drop, int) or not 0 <= self.n_drop < model_cfg.num_tokens:
      raise errors.ConfigError(
          f"MaskConfig.n_drop={self.n_drop!r} must be in [0, num_tokens={model_cfg.num_tokens})")
    return self


def effective_mask_config(mask_cfg: MaskConfig, model_cfg: ModelConfig) -> MaskConfig:
  """The settings a scheme implies (validated).

  - "aim": unchanged.
  - "lsm1": no inherited mask (see `MaskConfig.uses_inherited_mask`), only the
    "random" strategy, and every masked token dropped (`n_drop` = the random
    count, which is exact because nothing is inherited).
  - "dropout_only": `n_drop` = the random count; every strategy is topped up
    to it, so all masked tokens are dropped except on days whose own mask
    exceeds that count (static shapes cannot drop a varying number; the
    excess is attention-masked).
  - "attention_only": `n_drop = 0`.
  """
  mask_cfg.validate(model_cfg)
  n_random = mask_cfg.random_count(model_cfg)
  if mask_cfg.scheme == "lsm1":
    mask_cfg = dataclasses.replace(mask_cfg, strategy_weights=(("random", 1.0),), n_drop=n_random)
  elif mask_cfg.scheme == "dropout_only":
    mask_cfg = dataclasses.replace(mask_cfg, n_drop=n_random)
  elif mask_cfg.scheme == "attention_only":
    mask_cfg = dataclasses.replace(mask_cfg, n_drop=0)
  return mask_cfg.validate(model_cfg)
