"""The LSM-2 MAE on AIM masks: exactness of the drop/attention-mask split, no
imputation leaks, one compilation for any missingness, remat, bf16, sharding names."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm2.model.aim import aim_masks, inference_masks, loss_tokens, pack_visible, truncate_kept
from lsm2.model.config import MaskConfig, get_model_config
from lsm2.model.loss import reconstruction_loss
from lsm2.model.mae import LSM2MAE

CFG = get_model_config("tiny", time_steps=120, num_channels=4)  # 12 x 4 = 48 tokens
MASK = MaskConfig(time_bars=5, n_drop=20)                        # 20 = 5 bars x 4 signals
B = 6
AXIS_NAMES = {"embed", "mlp", "heads", "kv", "patch", "head_out", None}
RULES = (("embed", None), ("mlp", "model"), ("heads", "model"), ("kv", None),
         ("patch", None), ("head_out", None))


def synthetic_batch(seed: int, b: int = B):
  """Signals with random fill at unobserved minutes; one fully missing day (last)."""
  rng = np.random.default_rng(seed)
  obs = rng.random((b, CFG.time_steps, CFG.num_channels)) > 0.3
  for i in range(b):
    start = rng.integers(0, 60)
    obs[i, start:start + rng.integers(10, 60)] = False
  obs[-1] = False
  signals = rng.normal(size=obs.shape).astype(np.float32)
  return jnp.asarray(signals), jnp.asarray(obs)


@pytest.fixture(scope="module")
def model():
  return LSM2MAE(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def fns(model):
  """Compiled pure functions of (params, ...) shared by the tests."""
  graphdef, params = nnx.split(model)

  def loss(params, signals, observed, masks):
    pred = nnx.merge(graphdef, params)(signals, observed, masks)
    return reconstruction_loss(pred, signals, masks, MASK.strategy_names)[0]

  return dict(
      params=params,
      pred=jax.jit(lambda p, s, o, m: nnx.merge(graphdef, p)(s, o, m)),
      encode=jax.jit(lambda p, s, o, m: nnx.merge(graphdef, p).encode(s, o, m)),
      embed=jax.jit(lambda p, s, o: nnx.merge(graphdef, p).embed(s, o)),
      loss=jax.jit(loss),
      grad=jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
  )


def on_grid(enc, masks):
  """Encoder outputs at visible tokens on the full grid (NaN elsewhere)."""
  enc, idx, vis = (np.asarray(x) for x in (enc, masks.keep_idx, masks.keep_visible))
  grid = np.full((enc.shape[0], CFG.num_tokens, enc.shape[-1]), np.nan, np.float32)
  for i in range(enc.shape[0]):
    grid[i, idx[i][vis[i]]] = enc[i][vis[i]]
  return grid


def test_dropping_equals_attention_masking(fns):
  """AIM is exact: visible outputs do not depend on which masked tokens are dropped."""
  signals, observed = synthetic_batch(0)
  key = jax.random.key(3)
  aim = aim_masks(observed, key, MASK, CFG)
  attention_only = aim_masks(observed, key, dataclasses.replace(MASK, scheme="attention_only"), CFG)
  n_drop_zero = aim_masks(observed, key, dataclasses.replace(MASK, n_drop=0), CFG)
  np.testing.assert_array_equal(aim.total, attention_only.total)
  assert (~np.asarray(aim.keep_visible)).any()   # some masked tokens are attention-masked
  assert attention_only.n_keep == CFG.num_tokens and aim.n_keep == CFG.num_tokens - 20
  p = fns["params"]
  reference = on_grid(fns["encode"](p, signals, observed, attention_only), attention_only)
  np.testing.assert_allclose(on_grid(fns["encode"](p, signals, observed, aim), aim),
                             reference, atol=1e-5)
  np.testing.assert_allclose(fns["pred"](p, signals, observed, aim),
                             fns["pred"](p, signals, observed, attention_only), atol=1e-5)
  # n_drop = 0 is the attention-mask-only path.
  np.testing.assert_array_equal(fns["pred"](p, signals, observed, n_drop_zero),
                                fns["pred"](p, signals, observed, attention_only))
  # Visible-token bucket: cutting the kept masked tokens changes nothing.
  bucket = truncate_kept(aim, int(aim.visible_len.max()))
  np.testing.assert_allclose(fns["pred"](p, signals, observed, bucket),
                             fns["pred"](p, signals, observed, aim), atol=1e-5)
  # Pure MAE dropping (every masked token removed) for one example.
  one = jax.tree.map(lambda x: x[:1], aim)
  pure = truncate_kept(one, int(one.visible_len[0]))
  assert pure.keep_visible.all()
  np.testing.assert_allclose(on_grid(fns["encode"](p, signals[:1], observed[:1], pure), pure),
                             reference[:1], atol=1e-5)


def test_no_imputation_leaks(fns):
  """Values at unobserved minutes change neither loss, prediction nor embedding."""
  signals, observed = synthetic_batch(1)
  masks = aim_masks(observed, jax.random.key(0), MASK, CFG)
  noise = np.random.default_rng(5).normal(scale=100.0, size=signals.shape).astype(np.float32)
  refilled = jnp.where(observed, signals, noise)
  p = fns["params"]
  loss, (_, g_signals) = fns["grad"](p, signals, observed, masks)
  np.testing.assert_array_equal(fns["loss"](p, refilled, observed, masks), loss)
  np.testing.assert_array_equal(fns["pred"](p, refilled, observed, masks),
                                fns["pred"](p, signals, observed, masks))
  np.testing.assert_array_equal(fns["embed"](p, refilled, observed), fns["embed"](p, signals, observed))
  g_signals = np.asarray(g_signals)
  assert (g_signals[~np.asarray(observed)] == 0).all()
  assert np.abs(g_signals[np.asarray(observed)]).sum() > 0
  # Even a non-finite fill cannot leak.
  nan_filled = jnp.where(observed, signals, jnp.nan)
  np.testing.assert_array_equal(fns["loss"](p, nan_filled, observed, masks), loss)
  assert np.isfinite(loss) and loss > 0


def test_observed_in_embedding_does_not_leak_either():
  cfg = dataclasses.replace(CFG, observed_in_embedding=True)
  model = LSM2MAE(cfg, rngs=nnx.Rngs(1))
  signals, observed = synthetic_batch(2)
  masks = aim_masks(observed, jax.random.key(0), MASK, cfg)
  embed = nnx.jit(lambda m, s, o: m.embed(s, o))
  refilled = jnp.where(observed, signals, 7.0)
  np.testing.assert_array_equal(embed(model, refilled, observed), embed(model, signals, observed))
  pred = nnx.jit(lambda m, s, o, k: m(s, o, k))
  np.testing.assert_array_equal(pred(model, refilled, observed, masks), pred(model, signals, observed, masks))
  assert model.patch_embed.kernel.shape == (2 * cfg.patch_size, cfg.enc_width)


def test_one_compilation_for_any_missingness(fns):
  for seed in range(3):
    signals, observed = synthetic_batch(10 + seed)
    masks = aim_masks(observed, jax.random.key(seed), MASK, CFG)
    loss, _ = fns["grad"](fns["params"], signals, observed, masks)
    assert np.isfinite(loss)
  assert fns["grad"]._cache_size() == 1  # pylint: disable=protected-access


def test_embeddings(fns, model):
  signals, observed = synthetic_batch(3)
  p = fns["params"]
  mean = np.asarray(fns["embed"](p, signals, observed))
  tokens, visible = nnx.jit(lambda m, s, o: m.embed(s, o, per_token=True))(model, signals, observed)
  tokens, visible = np.asarray(tokens), np.asarray(visible)
  masks = inference_masks(observed, CFG)
  np.testing.assert_array_equal(visible, ~np.asarray(masks.total))
  assert (tokens[~visible] == 0).all()
  expected = tokens.sum(1) / np.maximum(visible.sum(1), 1)[:, None]
  np.testing.assert_allclose(mean, expected, atol=1e-5)
  assert mean.shape == (B, CFG.enc_width) and np.isfinite(mean).all()
  assert (mean[-1] == 0).all()  # fully missing day: no visible token


def test_remat_modes_give_the_same_gradients(fns):
  signals, observed = synthetic_batch(4, b=2)
  masks = aim_masks(observed, jax.random.key(0), MASK, CFG)
  ref_loss, (ref_grads, _) = fns["grad"](fns["params"], signals, observed, masks)
  for remat in ("attention", "full"):
    model = LSM2MAE(dataclasses.replace(CFG, remat=remat), rngs=nnx.Rngs(0))

    def loss(m):
      return reconstruction_loss(m(signals, observed, masks), signals, masks, MASK.strategy_names)[0]

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 nnx.state(grads, nnx.Param), nnx.state(ref_grads, nnx.Param))


def test_bfloat16_compute_float32_params(fns):
  model = LSM2MAE(dataclasses.replace(CFG, dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  signals, observed = synthetic_batch(5)
  masks = aim_masks(observed, jax.random.key(0), MASK, CFG)
  pred = nnx.jit(lambda m: m(signals, observed, masks))(model)
  assert pred.dtype == jnp.float32 and np.isfinite(np.asarray(pred)).all()
  ref = fns["pred"](fns["params"], signals, observed, masks)
  assert np.abs(np.asarray(pred) - np.asarray(ref)).max() < 0.1


def test_parameters_carry_logical_axis_names(model):
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = param.get_metadata().get("out_sharding")
    assert names is not None and len(names) == param.ndim, path
    assert set(names) <= AXIS_NAMES, (path, names)
  assert model.encoder.blocks[0].mlp.fc1.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_mesh_rules_shard_the_parameters(fns, model):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with nnx.logical_axis_rules(RULES):
    specs = nnx.get_partition_spec(nnx.state(model))
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
  sharded = jax.device_put(fns["params"], shardings)
  fc1 = sharded["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"][...]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  signals, observed = synthetic_batch(6, b=4)
  masks = aim_masks(observed, jax.random.key(0), MASK, CFG)
  np.testing.assert_allclose(fns["pred"](sharded, signals, observed, masks),
                             fns["pred"](fns["params"], signals, observed, masks), atol=1e-5)
  # Created under a mesh and rules (here abstractly), parameters are sharded at creation.
  with nnx.logical_axis_rules(RULES):
    _, abstract = nnx.get_abstract_model(lambda: LSM2MAE(CFG, rngs=nnx.Rngs(0)), mesh)
  qkv = abstract["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"].get_value()
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)


def test_bad_inputs_are_named(model):
  signals, observed = synthetic_batch(7, b=2)
  masks = aim_masks(observed, jax.random.key(0), MASK, CFG)
  with pytest.raises(ValueError, match="signals must be"):
    model(signals[:, :60], observed[:, :60], masks)
  with pytest.raises(ValueError, match="observed must be bool"):
    model(signals, observed.astype(jnp.float32), masks)
  other = get_model_config("tiny", time_steps=120, num_channels=8)
  obs8 = jnp.ones((2, 120, 8), bool)
  with pytest.raises(ValueError, match="masks are for"):
    model(signals, observed, aim_masks(obs8, jax.random.key(0), MASK, other))


def test_bfloat16_matmuls_float32_everything_else(fns):
  """matmul_dtype="bfloat16": float32 params, activations and gradients, ~bf16-rounding error."""
  cfg = dataclasses.replace(CFG, matmul_dtype="bfloat16", attention="blocked")
  model = LSM2MAE(cfg, rngs=nnx.Rngs(0))
  signals, observed = synthetic_batch(6, b=2)
  masks = aim_masks(observed, jax.random.key(0), MASK, CFG)

  def loss(m):
    return reconstruction_loss(m(signals, observed, masks), signals, masks, MASK.strategy_names)[0]

  value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
  ref_value, (ref_grads, _) = fns["grad"](fns["params"], signals, observed, masks)
  grads, ref_grads = (jax.tree.leaves(nnx.state(g, nnx.Param)) for g in (grads, ref_grads))
  assert all(g.dtype == jnp.float32 for g in grads)
  flat = np.concatenate([np.ravel(g) for g in grads])
  ref = np.concatenate([np.ravel(g) for g in ref_grads])
  rel = np.linalg.norm(flat - ref) / np.linalg.norm(ref)
  assert 0 < rel < 3e-2  # Rounded operands (not float32), yet the same descent direction.
  np.testing.assert_allclose(value, ref_value, rtol=1e-2)


@pytest.mark.parametrize("attention", ["xla", "blocked"])
def test_loss_tokens_only_is_exact_for_the_loss(attention):
  """Decoding only the loss tokens gives the same loss and gradients; the rest is not decoded."""
  graphdef, params = nnx.split(LSM2MAE(dataclasses.replace(CFG, attention=attention), rngs=nnx.Rngs(0)))
  signals, observed = synthetic_batch(6)
  masks = aim_masks(observed, jax.random.key(2), MASK, CFG)

  def loss(params, only):
    pred = nnx.merge(graphdef, params)(signals, observed, masks, loss_tokens_only=only)
    return reconstruction_loss(pred, signals, masks, MASK.strategy_names)[0], pred

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (ref_loss, ref_pred), ref_grads = step(params, False)
  (value, pred), grads = step(params, True)
  np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)
  selected = np.asarray(masks.loss_weight) > 0
  np.testing.assert_allclose(np.asarray(pred)[selected], np.asarray(ref_pred)[selected], atol=1e-5)
  # Tokens without a loss minute are left at 0 (the full pass reconstructs them).
  t, c = CFG.patch_time, CFG.patch_channels
  tokens = selected.reshape(B, -1, t, CFG.num_channels // c, c).any(axis=(2, 4))
  np.testing.assert_array_equal(loss_tokens(masks, CFG), tokens.reshape(B, -1))
  untouched = ~np.repeat(np.repeat(tokens, t, axis=1), c, axis=2)
  assert untouched.any() and tokens.any()
  assert (np.asarray(pred)[untouched] == 0).all()
  assert (np.asarray(ref_pred)[untouched] != 0).all()


@pytest.mark.parametrize("attention,remat,groups", [("xla", "none", 2), ("blocked", "none", 1),
                                                   ("blocked", "full", 2)])
def test_packed_encoder_is_exact(attention, remat, groups):
  """Packing the visible tokens (per group of examples) changes no encoder output or gradient."""
  cfg = dataclasses.replace(CFG, attention=attention, remat=remat)
  graphdef, params = nnx.split(LSM2MAE(cfg, rngs=nnx.Rngs(0)))
  signals, observed = synthetic_batch(7)
  masks = aim_masks(observed, jax.random.key(4), MASK, CFG)

  def loss(params, masks):
    model = nnx.merge(graphdef, params)
    pred = model(signals, observed, masks)
    return reconstruction_loss(pred, signals, masks, MASK.strategy_names)[0], model.encode(
        signals, observed, masks)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (ref_loss, ref_enc), ref_grads = step(params, masks)
  visible = np.asarray(masks.visible_len)
  length = int(visible.reshape(groups, -1).sum(axis=1).max()) + 2
  packed = pack_visible(masks, length, groups)
  assert groups * length < B * masks.n_keep  # fewer rows than the unpacked layout
  (value, enc), grads = step(params, packed)
  np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(on_grid(enc, masks), on_grid(ref_enc, masks), atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_packed_encoder_under_a_data_mesh_stays_local():
  """One packing group per data shard: same loss as unpacked, and nothing is all-gathered."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rules = (("batch", "data"),) + tuple((name, None) for name, _ in RULES)
  signals, observed = synthetic_batch(0, b=8)
  masks = aim_masks(observed, jax.random.key(3), MASK, CFG)
  length = int(np.asarray(masks.visible_len).max())  # groups of one example
  results = {}
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, params = nnx.split(LSM2MAE(dataclasses.replace(CFG, attention="blocked"),
                                         rngs=nnx.Rngs(0)))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    s, o = put(signals), put(observed)
    for name, m in (("plain", masks), ("packed", pack_visible(masks, length, groups=8))):
      m = jax.tree.map(put, m)
      step = jax.jit(jax.value_and_grad(lambda p, m: reconstruction_loss(
          nnx.merge(graphdef, p)(s, o, m), s, m, MASK.strategy_names)[0]))
      results[name] = step(params, m)
      hlo = step.lower(params, m).compile().as_text()
      assert "all-gather" not in hlo and "all-to-all" not in hlo, name
  np.testing.assert_allclose(results["packed"][0], results["plain"][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), results["packed"][1],
               results["plain"][1])


def test_fresh_model_predicts_near_the_channel_mean(fns):
  """The head starts small: first predictions are ~0 (the normalised channel mean), not the
  xavier head's noise of variance ~0.7 that AdamW needs hundreds of small-LR steps to undo."""
  signals, observed = synthetic_batch(4)
  masks = aim_masks(observed, jax.random.key(0), MASK, CFG)
  pred = np.asarray(fns["pred"](fns["params"], signals, observed, masks))
  assert 0 < np.var(pred) < 0.05
