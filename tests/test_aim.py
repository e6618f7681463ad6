"""The AIM mask kernel: invariants on random masks, strategy counts, schemes, no retrace."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm2.model.aim import (NO_STRATEGY, aim_masks, encoder_buckets, inference_masks,
                            masks_from_artificial, pack_visible, truncate_kept)
from lsm2.model.config import STRATEGIES, MaskConfig, ModelConfig, effective_mask_config

PAPER = ModelConfig()  # 1440 x 26, 10-minute patches: 144 x 26 = 3,744 tokens.
N_TIME, N_SIGNAL = PAPER.grid
ALL_STRATEGIES = tuple((name, 1.0) for name in STRATEGIES)
BATCH = 32


def synthetic_observed(seed: int, b: int, t: int, c: int) -> np.ndarray:
  """Missingness like a watch: scattered minutes, an off-wrist block, dead channels,
  plus one fully observed and one fully missing day."""
  rng = np.random.default_rng(seed)
  obs = rng.random((b, t, c)) > rng.uniform(0.0, 0.4, (b, 1, c))
  for i in range(b):
    start, length = rng.integers(0, t), rng.integers(0, int(0.7 * t))
    obs[i, start:start + length] = False
    if rng.random() < 0.5:
      obs[i, :, rng.integers(c)] = False
  obs[0] = True
  obs[1] = False
  return obs


def inherited_reference(obs: np.ndarray, cfg: ModelConfig, threshold: float) -> np.ndarray:
  n_time, n_signal = cfg.grid
  x = obs.reshape(obs.shape[0], n_time, cfg.patch_time, n_signal, cfg.patch_channels)
  missing_frac = 1.0 - x.mean(axis=(2, 4))
  return (missing_frac >= threshold - 1e-9).reshape(obs.shape[0], -1)


@pytest.fixture(scope="module")
def observed():
  return synthetic_observed(0, BATCH, PAPER.time_steps, PAPER.num_channels)


def draw(observed, mask_cfg, seed=0):
  masks = aim_masks(jnp.asarray(observed), jax.random.key(seed), mask_cfg, PAPER)
  return jax.tree.map(np.asarray, masks)


def check_invariants(m, obs, mask_cfg):
  n = PAPER.num_tokens
  n_drop = effective_mask_config(mask_cfg, PAPER).n_drop
  assert m.keep_idx.shape == (obs.shape[0], n - n_drop)
  np.testing.assert_array_equal(m.dropped.sum(1), n_drop)          # exactly n_drop dropped
  assert not (m.dropped & ~m.total).any()                          # dropped tokens are masked
  assert (m.total.sum(1) >= n_drop).all()                          # enough masked tokens
  assert not (m.inherited & ~m.total).any()                        # inherited always masked
  np.testing.assert_array_equal(m.total, m.inherited | m.artificial)
  for i in range(obs.shape[0]):
    kept = m.keep_idx[i]
    assert len(set(kept.tolist())) == len(kept)                    # no duplicates
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, np.flatnonzero(m.dropped[i])])),
                                  np.arange(n))                    # kept + dropped = grid
    np.testing.assert_array_equal(m.keep_visible[i], ~m.total[i][kept])
    # Visible first (in grid order): a valid length is the whole attention mask,
    # so no visible token is ever masked out of attention.
    visible = int(m.visible_len[i])
    assert visible == int((~m.total[i]).sum())
    np.testing.assert_array_equal(m.keep_visible[i], np.arange(len(kept)) < visible)
    np.testing.assert_array_equal(kept[:visible], np.flatnonzero(~m.total[i]))
  minutes = np.repeat(np.repeat(m.total.reshape(-1, N_TIME, N_SIGNAL), PAPER.patch_time, 1),
                      PAPER.patch_channels, 2)
  np.testing.assert_array_equal(m.loss_weight, (minutes & obs).astype(np.float32))


def test_invariants_paper_default(observed):
  mask_cfg = MaskConfig()
  strategies = []
  for seed in range(3):
    m = draw(observed, mask_cfg, seed)
    check_invariants(m, observed, mask_cfg)
    np.testing.assert_array_equal(m.inherited, inherited_reference(observed, PAPER, 1.0))
    assert m.visible_len[1] == 0 and m.inherited[1].all()          # fully missing day
    assert not m.inherited[0].any()                                 # fully observed day
    strategies.append(m.strategy)
  strategies = np.concatenate(strategies)
  assert set(strategies) == {STRATEGIES.index("random"), STRATEGIES.index("time_bars")}
  assert 0.3 < np.mean(strategies == STRATEGIES.index("random")) < 0.7  # odds 0.5, sd 0.05


def test_strategy_counts_match_config(observed):
  """Without top-up (n_drop = 0) each strategy masks exactly what the config says."""
  mask_cfg = MaskConfig(strategy_weights=ALL_STRATEGIES, n_drop=0, interp_gap_minutes=180,
                        extrap_gap_minutes=60, signal_imputation_k=6)
  seen = set()
  for seed in range(3):
    m = draw(observed, mask_cfg, seed)
    check_invariants(m, observed, mask_cfg)
    for i in range(BATCH):
      name = STRATEGIES[m.strategy[i]]
      seen.add(name)
      art = m.artificial[i].reshape(N_TIME, N_SIGNAL)
      inh = m.inherited[i]
      if name == "random":
        assert m.total[i].sum() == max(2995, inh.sum())
        assert not (m.artificial[i] & inh).any()
        continue
      full_steps = art.all(axis=1)
      assert (art.any(axis=1) == full_steps).all() or name == "signal_imputation"
      if name == "time_bars":
        assert full_steps.sum() == 57 and art.sum() == 57 * N_SIGNAL
      elif name == "temporal_interpolation":
        steps = np.flatnonzero(full_steps)
        assert len(steps) == 18 and (np.diff(steps) == 1).all()
        assert art.sum() == 18 * N_SIGNAL
      elif name == "temporal_extrapolation":
        np.testing.assert_array_equal(np.flatnonzero(full_steps), np.arange(N_TIME - 6, N_TIME))
      else:
        full_signals = art.all(axis=0)
        assert full_signals.sum() == 6 and (art.any(axis=0) == full_signals).all()
  assert seen == set(STRATEGIES)


def test_top_up_guarantees_n_drop(observed):
  """Strategies that mask fewer than n_drop tokens are topped up with random tokens."""
  mask_cfg = MaskConfig(strategy_weights=(("temporal_interpolation", 1.0), ("time_bars", 0.0),
                                          ("signal_imputation", 1.0)),
                        interp_gap_minutes=60, signal_imputation_k=2)
  m = draw(observed, mask_cfg)
  check_invariants(m, observed, mask_cfg)
  assert STRATEGIES.index("time_bars") not in m.strategy           # weight 0: never drawn
  # Same key without top-up: the same strategy draw, exactly inherited | strategy.
  own = draw(observed, dataclasses.replace(mask_cfg, n_drop=0))
  np.testing.assert_array_equal(own.strategy, m.strategy)
  assert not (own.total & ~m.total).any()
  np.testing.assert_array_equal(m.total.sum(1), np.maximum(1482, own.total.sum(1)))
  assert own.total[0].sum() <= 288 and m.total[0].sum() == 1482  # fully observed day


def test_threshold_makes_partial_tokens_inherited(observed):
  mask_cfg = MaskConfig(inherited_threshold=0.5)
  m = draw(observed, mask_cfg)
  np.testing.assert_array_equal(m.inherited, inherited_reference(observed, PAPER, 0.5))
  assert m.inherited.sum() > inherited_reference(observed, PAPER, 1.0).sum()


def test_lsm1_treats_gaps_as_data(observed):
  mask_cfg = MaskConfig(scheme="lsm1")
  m = draw(observed, mask_cfg)
  check_invariants(m, np.ones_like(observed), mask_cfg)
  assert not m.inherited.any()
  np.testing.assert_array_equal(m.total.sum(1), 2995)
  np.testing.assert_array_equal(m.dropped, m.total)                 # every masked token dropped
  assert m.keep_visible.all()
  np.testing.assert_array_equal(m.strategy, STRATEGIES.index("random"))


def test_dropout_only_and_attention_only(observed):
  m = draw(observed, MaskConfig(scheme="dropout_only"))
  check_invariants(m, observed, MaskConfig(scheme="dropout_only"))
  np.testing.assert_array_equal(m.dropped.sum(1), 2995)
  # Attention-masked tokens remain only where the day's own mask exceeds 2,995.
  attention_masked = (~m.keep_visible).sum(1)
  np.testing.assert_array_equal(attention_masked, m.total.sum(1) - 2995)
  m = draw(observed, MaskConfig(scheme="attention_only"))
  check_invariants(m, observed, MaskConfig(scheme="attention_only"))
  assert m.keep_idx.shape[1] == PAPER.num_tokens and not m.dropped.any()


def test_inference_masks(observed):
  m = jax.tree.map(np.asarray, inference_masks(jnp.asarray(observed), PAPER))
  assert m.keep_idx.shape[1] == PAPER.num_tokens
  assert not m.artificial.any() and not m.dropped.any()
  np.testing.assert_array_equal(m.total, inherited_reference(observed, PAPER, 1.0))
  np.testing.assert_array_equal(m.strategy, NO_STRATEGY)
  np.testing.assert_array_equal(m.keep_visible, np.arange(PAPER.num_tokens) < m.visible_len[:, None])
  lsm1 = inference_masks(jnp.asarray(observed), PAPER, MaskConfig(scheme="lsm1"))
  assert not np.asarray(lsm1.total).any()


def test_masks_from_artificial_keeps_the_callers_mask(observed):
  artificial = np.zeros((BATCH, PAPER.num_tokens), bool)
  artificial[:, :N_SIGNAL * 3] = True  # first 30 minutes
  m = masks_from_artificial(jnp.asarray(observed), jnp.asarray(artificial), jax.random.key(0),
                            MaskConfig(n_drop=0), PAPER)
  np.testing.assert_array_equal(np.asarray(m.artificial), artificial)
  np.testing.assert_array_equal(np.asarray(m.strategy), NO_STRATEGY)


def test_encoder_bucket_lengths():
  assert encoder_buckets(4, 2262) == (576, 1136, 1712, 2262)
  assert encoder_buckets(1, 2262) == (2262,)
  assert encoder_buckets(4, 20) == (16, 20)  # Multiples of 16, capped: fewer distinct lengths.


def test_truncate_kept(observed):
  m = aim_masks(jnp.asarray(observed), jax.random.key(0), MaskConfig(), PAPER)
  longest = int(m.visible_len.max())
  t = truncate_kept(m, longest)
  assert t.keep_idx.shape[1] == longest
  np.testing.assert_array_equal(t.keep_idx, m.keep_idx[:, :longest])
  assert (np.asarray(t.dropped).sum(1) == PAPER.num_tokens - longest).all()
  assert not (np.asarray(t.dropped) & ~np.asarray(t.total)).any()
  with pytest.raises(ValueError, match="cut visible tokens"):
    truncate_kept(m, longest - 1)
  with pytest.raises(ValueError, match="length"):
    truncate_kept(m, m.n_keep + 1)


@pytest.mark.parametrize("groups", [1, 4])
def test_pack_visible_holds_every_visible_token_once(observed, groups):
  m = aim_masks(jnp.asarray(observed), jax.random.key(0), MaskConfig(), PAPER)
  visible = np.asarray(m.visible_len)
  per_group = visible.reshape(groups, -1).sum(axis=1)
  length = int(per_group.max()) + 3
  p = pack_visible(m, length, groups)
  pack, unpack = np.asarray(p.pack_idx), np.asarray(p.unpack_idx)
  assert pack.shape == (groups, length) and unpack.shape == m.keep_idx.shape
  size = BATCH // groups
  for g in range(groups):
    # Slots in order: each example's visible positions 0..visible_len-1, example after example.
    want = np.concatenate([e * m.n_keep + np.arange(visible[g * size + e]) for e in range(size)])
    np.testing.assert_array_equal(pack[g, :per_group[g]], want)
    for e in range(size):
      # Unpacking finds each visible token's slot.
      slots = unpack[g * size + e, :visible[g * size + e]]
      np.testing.assert_array_equal(pack[g, slots], e * m.n_keep + np.arange(len(slots)))
  with pytest.raises(ValueError, match="cannot hold"):
    pack_visible(m, int(per_group.max()) - 1, groups)
  with pytest.raises(ValueError, match="divide"):
    pack_visible(m, length, 5)
  with pytest.raises(ValueError, match="packed"):
    truncate_kept(p, int(visible.max()))


def test_one_compilation_serves_any_missingness():
  mask_cfg = MaskConfig(time_bars=40)
  fn = jax.jit(aim_masks, static_argnames=("mask_cfg", "model_cfg"))
  for seed in range(3):
    obs = synthetic_observed(10 + seed, 4, PAPER.time_steps, PAPER.num_channels)
    fn(jnp.asarray(obs), jax.random.key(seed), mask_cfg, PAPER)
  assert fn._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize("change, match", [
    (dict(n_drop=3744), "n_drop"),
    (dict(n_drop=-1), "n_drop"),
    (dict(strategy_weights=(("bogus", 1.0),)), "bogus"),
    (dict(strategy_weights=(("random", 0.0),)), "sum to zero"),
    (dict(strategy_weights=(("temporal_interpolation", 1.0),), interp_gap_minutes=15),
     "interp_gap_minutes"),
    (dict(strategy_weights=(("signal_imputation", 1.0),), signal_imputation_k=27),
     "signal_imputation_k"),
    (dict(time_bars=145), "time_bars"),
    (dict(inherited_threshold=0.0), "inherited_threshold"),
    (dict(scheme="mae"), "scheme"),
    (dict(random_ratio=1.0), "random_ratio"),
])
def test_mask_config_errors_name_the_field(change, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(MaskConfig(), **change).validate(PAPER)


def test_observed_must_match_the_model():
  with pytest.raises(ValueError, match="observed must have shape"):
    aim_masks(jnp.ones((2, 1440, 25), bool), jax.random.key(0), MaskConfig(), PAPER)
  with pytest.raises(ValueError, match="bool"):
    aim_masks(jnp.ones((2, 1440, 26)), jax.random.key(0), MaskConfig(), PAPER)
