"""lsm2.load / PretrainedModel: shapes, units, invariance to unobserved values, restore by step."""
import dataclasses

from flax import nnx
import jax
import numpy as np
import pytest

import lsm2
from lsm2 import api
from lsm2 import pretrained
from lsm2.data import dataset
from lsm2.model import aim
from lsm2.model import config as model_config_lib
from lsm2.model import loss as loss_lib
from lsm2.model import mae
from tiny_checkpoint import tiny_pretrained


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  workdir, data = tiny_pretrained(tmp_path_factory.getbasetemp())
  model = lsm2.load(workdir)
  raw = dataset.read_split(data, "train", normalize=False, limit=5)
  signals = raw["signals"].copy()
  signals[~raw["observed"]] = np.nan  # What a user's array with gaps looks like.
  return workdir, model, signals, raw["observed"]


def _garbage(signals, observed, seed=0):
  """The same days with random junk (and inf) at every unobserved minute."""
  junk = np.random.default_rng(seed).normal(0, 1e4, signals.shape).astype(np.float32)
  junk.flat[::7] = np.inf
  return np.where(observed, signals, junk)


def test_embed_shapes_single_day_and_batch(setup):
  _, model, signals, observed = setup
  batch = model.embed(signals, observed)
  d = model.model_cfg.enc_width
  assert batch.shape == (5, d) and np.all(np.isfinite(batch))
  one = model.embed(signals[2], observed[2])
  assert one.shape == (d,)
  np.testing.assert_allclose(one, batch[2], rtol=1e-5, atol=1e-6)
  tokens, visible = model.embed(signals, observed, per_token=True)
  assert tokens.shape == (5, model.model_cfg.num_tokens, d) and visible.shape == tokens.shape[:2]
  # The day embedding is the mean of the visible token outputs.
  mean = (tokens * visible[..., None]).sum(1) / visible.sum(1, keepdims=True)
  np.testing.assert_allclose(mean, batch, rtol=1e-4, atol=1e-5)
  assert np.all(tokens[~visible] == 0)


def test_default_observed_is_the_finite_values(setup):
  _, model, signals, observed = setup
  np.testing.assert_array_equal(model.embed(signals), model.embed(signals, observed))


def test_embed_and_reconstruct_ignore_unobserved_values(setup):
  _, model, signals, observed = setup
  junk = _garbage(signals, observed)
  np.testing.assert_array_equal(model.embed(junk, observed), model.embed(signals, observed))
  tokens_a, _ = model.embed(junk, observed, per_token=True)
  tokens_b, _ = model.embed(signals, observed, per_token=True)
  np.testing.assert_array_equal(tokens_a, tokens_b)
  np.testing.assert_array_equal(model.reconstruct(junk, observed), model.reconstruct(signals, observed))


def test_reconstruct_keeps_visible_minutes_and_ignores_masked_values(setup):
  _, model, signals, observed = setup
  rng = np.random.default_rng(1)
  mask = observed & (rng.random(observed.shape) < 0.3)
  out = model.reconstruct(signals, observed, mask=mask)
  assert out.shape == signals.shape and np.all(np.isfinite(out))
  keep = observed & ~mask
  np.testing.assert_array_equal(out[keep], signals[keep])
  # The values under the mask are hidden from the model: changing them changes nothing.
  tampered = np.where(mask, signals + 1000.0, signals)
  np.testing.assert_array_equal(model.reconstruct(tampered, observed, mask=mask), out)
  # Filled minutes are the model's normalised predictions, de-normalised with the stored stats.
  z, obs, _ = model.prepare(signals, observed)
  target = ~obs | mask
  pred = model.reconstruct_normalized(z, obs, api.token_any(target, model.model_cfg))
  expected = pred * model.norm_std + model.norm_mean
  np.testing.assert_allclose(out[target], expected[target], rtol=1e-5, atol=1e-4)
  # One day in, one day out; same numbers as in the batch.
  np.testing.assert_allclose(model.reconstruct(signals[1], observed[1], mask=mask[1]), out[1],
                             rtol=1e-5, atol=1e-4)


def test_lsm1_scheme_is_also_invariant_to_unobserved_values(setup):
  """LSM-1 trusts every minute; the API must still zero the gaps before the model sees them."""
  _, model, signals, observed = setup
  desc = dict(model.config, masking=dict(model.config["masking"], scheme="lsm1"))
  cfg = model_config_lib.ModelConfig(**desc["model"])
  lsm1 = api.PretrainedModel(mae.LSM2MAE(cfg, rngs=nnx.Rngs(0)), desc, batch_size=8)
  assert lsm1.mask_cfg.scheme == "lsm1"
  junk = _garbage(signals, observed, seed=3)
  np.testing.assert_array_equal(lsm1.embed(junk, observed), lsm1.embed(signals, observed))
  np.testing.assert_array_equal(lsm1.reconstruct(junk, observed), lsm1.reconstruct(signals, observed))


def test_batches_are_padded_not_recompiled(setup):
  workdir, _, signals, observed = setup
  model = lsm2.load(workdir, encoder_buckets=1)  # One encoder length: only padding varies.
  fn = model._embed_fn[False]  # pylint: disable=protected-access
  # conftest gives 8 devices: 1..5 days all run as one padded batch of 8.
  assert {model.padded_size(n) for n in range(1, 6)} == {8} and model.batch_size == 64
  full = model.embed(signals, observed)
  before = fn._cache_size()  # pylint: disable=protected-access
  for n in (1, 2, 3, 4):
    np.testing.assert_allclose(model.embed(signals[:n], observed[:n]), full[:n], rtol=1e-5, atol=1e-6)
  assert fn._cache_size() == before  # pylint: disable=protected-access
  many = model.embed(np.concatenate([signals] * 14), np.concatenate([observed] * 14))  # 64 + 6 days
  assert fn._cache_size() == before + 1  # pylint: disable=protected-access
  np.testing.assert_allclose(many[65:], full, rtol=1e-5, atol=1e-6)


def test_packed_encoder_gives_the_same_outputs(setup):
  """Each device's days packed into a bucket of their visible tokens: exact, fewer rows."""
  _, model, signals, observed = setup
  graph = nnx.merge(model.graphdef, model.params)
  packed = api.PretrainedModel(graph, model.config, batch_size=16, encoder_buckets=4)
  full = api.PretrainedModel(graph, model.config, batch_size=16, encoder_buckets=1)
  n_tokens = model.model_cfg.num_tokens
  # 32 days in 2 batches of 16 (2 per device): the first complete, the second showing
  # only their first 300 minutes, so its packed length is the shortest bucket.
  days = np.concatenate([signals] * 7)[:32]
  seen = np.concatenate([observed] * 7)[:32].copy()
  days[:16] = np.nan_to_num(days[:16], nan=1.0)
  seen[:16] = True
  seen[16:, 300:] = False
  z, obs, _ = packed.prepare(days, seen)
  lengths = aim.encoder_buckets(4, n_tokens * 2)
  assert 2 * np.asarray(packed._embed_visible_fn(obs[16:])).max() <= lengths[0]  # pylint: disable=protected-access
  np.testing.assert_allclose(packed.embed_normalized(z, obs), full.embed_normalized(z, obs),
                             rtol=1e-5, atol=1e-6)
  tokens_p, vis_p = packed.embed_normalized(z, obs, per_token=True)
  tokens_f, vis_f = full.embed_normalized(z, obs, per_token=True)
  np.testing.assert_array_equal(vis_p, vis_f)
  np.testing.assert_allclose(tokens_p, tokens_f, rtol=1e-5, atol=1e-5)
  hidden = np.zeros((32, n_tokens), bool)
  hidden[:, 3::7] = True
  np.testing.assert_allclose(packed.reconstruct_normalized(z, obs, hidden),
                             full.reconstruct_normalized(z, obs, hidden), rtol=1e-5, atol=1e-5)
  # Two programs: every token for the complete batch, the shortest packed length for the other.
  assert packed._embed_fn[False]._cache_size() == 2  # pylint: disable=protected-access
  assert packed._reconstruct_fn._cache_size() == 2  # pylint: disable=protected-access
  assert full._embed_fn[False]._cache_size() == 1  # pylint: disable=protected-access


def test_bad_inputs_name_the_problem(setup):
  _, model, signals, observed = setup
  with pytest.raises(ValueError, match=r"\[N, 1440, 26\].*'hr'"):
    model.embed(signals[:, :, :3])
  with pytest.raises(ValueError, match="observed must be a bool"):
    model.embed(signals, observed.astype(np.float32))
  with pytest.raises(ValueError, match="mask must be a bool"):
    model.reconstruct(signals, observed, mask=observed[:, :100])


def test_restore_a_chosen_step(setup):
  workdir, model, signals, observed = setup
  final = lsm2.load(workdir, step=10).embed(signals, observed)
  np.testing.assert_allclose(final, model.embed(signals, observed), rtol=1e-6, atol=1e-6)
  early = lsm2.load(workdir, step=5)
  assert early.config == model.config
  assert not np.allclose(early.embed(signals, observed), final)
  with pytest.raises(FileNotFoundError, match="step 7"):
    lsm2.load(workdir, step=7)


def test_mask_config_round_trips_through_the_description(setup):
  _, model, _, _ = setup
  cfg = pretrained.mask_config_from_description(model.config["masking"])
  assert cfg == model.mask_cfg
  assert dataclasses.asdict(cfg) == {**model.config["masking"],
                                     "strategy_weights": cfg.strategy_weights}
  assert hash(cfg)  # Static jit argument.


def test_batched_functions_split_the_blocked_attention_over_devices(setup):
  """Under the model's mesh context the embed program gathers nothing (the kernel is per device)."""
  _, model, signals, observed = setup
  assert model.model_cfg.attention == "blocked" and model._devices > 1
  z, obs, _ = model.prepare(signals, observed)
  size = model.padded_size(z.shape[0])
  arrays = model.shard(*(np.resize(a, (size,) + a.shape[1:]) for a in (z, obs)))
  embed = model._embed_fn[False]
  packed = (aim.encoder_buckets(4, model.model_cfg.num_tokens * size // model._devices)[1],
            model._devices)  # One packing group per device.
  with model.mesh_context():
    for pack in (None, packed):
      assert "all-gather" not in embed.lower(model.params, *arrays, pack=pack).compile().as_text()
  outside = embed.lower(model.params, *arrays, pack=None).compile().as_text()
  assert "all-gather" in outside  # Without the context GSPMD replicates the kernel's loop.


def test_evaluation_reconstruction_reproduces_the_training_loss(setup):
  """The eval path (hide tokens, reconstruct, score observed target minutes) computes the
  training loss exactly when it hides the training masks' artificial tokens: a well-trained
  model cannot look worse in evaluation through a misalignment of masks, days or minutes
  (de-normalisation is checked in test_reconstruct_keeps_visible_minutes_and_ignores_masked_values)."""
  _, model, signals, observed = setup
  z, obs, _ = model.prepare(signals, observed)
  masks = aim.aim_masks(obs, jax.random.key(3), model.mask_cfg, model.model_cfg)
  net = nnx.merge(model.graphdef, model.params)
  train_pred = net(z, obs, masks, loss_tokens_only=True)
  loss, _ = loss_lib.reconstruction_loss(train_pred, z, masks, model.mask_cfg.strategy_names)
  hidden = np.asarray(masks.artificial)
  scored = np.asarray(masks.loss_weight) > 0
  assert scored.any()
  pred = model.reconstruct_normalized(z, obs, hidden)
  np.testing.assert_allclose(np.mean((pred - z)[scored] ** 2), float(loss), rtol=1e-4)
