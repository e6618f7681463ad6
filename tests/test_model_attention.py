"""Length-masked attention equals the boolean-mask path and a float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm2.model.attention import dot_product_attention

B, L, H, D = 5, 37, 2, 8
LENGTHS = np.array([0, 1, 17, 36, 37], np.int32)  # empty, odd, full


def reference(q, k, v, mask):
  """softmax(q k^T / sqrt(d)) v in float64; rows without keys are zero."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
  logits = np.where(mask[:, None], logits, -np.inf)
  top = np.max(logits, axis=-1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  w = np.exp(logits - top)
  denom = w.sum(-1, keepdims=True)
  p = np.where(denom > 0, w / np.where(denom > 0, denom, 1.0), 0.0)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.fixture(scope="module")
def qkv():
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(kk, (B, L, H, D), jnp.float32) for kk in keys)
  return q, k, v, w


def length_mask(q_lengths, kv_lengths):
  pos = np.arange(L)
  return (pos[None, :, None] < q_lengths[:, None, None]) & (pos[None, None, :] < kv_lengths[:, None, None])


@jax.jit
def by_lengths(q, k, v, q_lengths, kv_lengths):
  return dot_product_attention(q, k, v, q_lengths=q_lengths, kv_lengths=kv_lengths)


@jax.jit
def by_mask(q, k, v, mask):
  return dot_product_attention(q, k, v, mask=mask)


def test_lengths_match_reference_and_boolean_mask(qkv):
  q, k, v, _ = qkv
  kv_lengths = LENGTHS
  q_lengths = np.array([0, 5, 37, 36, 20], np.int32)
  mask = length_mask(q_lengths, kv_lengths)
  expected = reference(q, k, v, mask)
  out_lengths = np.asarray(by_lengths(q, k, v, q_lengths, kv_lengths))
  out_mask = np.asarray(by_mask(q, k, v, jnp.asarray(mask)))
  np.testing.assert_allclose(out_lengths, expected, atol=2e-5)
  np.testing.assert_allclose(out_mask, expected, atol=2e-5)
  assert np.isfinite(out_lengths).all() and np.isfinite(out_mask).all()
  # Rows past q_length and rows without any key are exactly zero.
  assert (out_lengths[0] == 0).all() and (out_lengths[1, 5:] == 0).all()


def test_kv_lengths_only_and_gradients(qkv):
  q, k, v, w = qkv

  def loss_lengths(q, k, v):
    return jnp.sum(w * dot_product_attention(q, k, v, kv_lengths=jnp.asarray(LENGTHS)))

  def loss_mask(q, k, v):
    mask = jnp.asarray(length_mask(np.full(B, L, np.int32), LENGTHS))
    return jnp.sum(w * dot_product_attention(q, k, v, mask=mask))

  g_len = jax.jit(jax.grad(loss_lengths, argnums=(0, 1, 2)))(q, k, v)
  g_mask = jax.jit(jax.grad(loss_mask, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_len, g_mask):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, b, atol=2e-5)
  # Keys past the length get no gradient; an example without keys gets none at all.
  g_k = np.asarray(g_len[1])
  assert (g_k[2, 17:] == 0).all() and (g_k[0] == 0).all() and np.abs(g_k[2, :17]).sum() > 0
  out = np.asarray(dot_product_attention(q, k, v, kv_lengths=jnp.asarray(LENGTHS)))
  np.testing.assert_allclose(out, reference(q, k, v, length_mask(np.full(B, L), LENGTHS)), atol=2e-5)


def test_general_mask_pattern(qkv):
  """The boolean path is general (not only prefixes)."""
  q, k, v, _ = qkv
  mask = np.random.default_rng(0).random((B, L, L)) < 0.3
  mask[0, 3] = False  # one row without keys
  out = np.asarray(by_mask(q, k, v, jnp.asarray(mask)))
  np.testing.assert_allclose(out, reference(q, k, v, mask), atol=2e-5)


def test_bad_arguments(qkv):
  q, k, v, _ = qkv
  with pytest.raises(ValueError, match="implementation"):
    dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="needs a GPU"):
    dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="boolean mask"):
    dot_product_attention(q, k, v, mask=jnp.ones((B, L, L), bool), implementation="blocked")
  with pytest.raises(ValueError, match="kv_lengths"):
    dot_product_attention(q, k, v, kv_lengths=jnp.ones((B + 1,), jnp.int32))
  with pytest.raises(ValueError, match="mask must be bool"):
    dot_product_attention(q, k, v, mask=jnp.ones((B, L, L - 1), bool))


@pytest.mark.parametrize("heads", [4, 3], ids=["heads_split", "heads_not_divisible"])
def test_blocked_under_a_mesh_runs_per_device_and_matches_xla(heads):
  """On a (data, fsdp, tensor) = (2, 2, 2) mesh the blocked kernel is split, not replicated."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("heads", "tensor"))
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(kk, (4, 40, heads, D), jnp.float32) for kk in keys)
  lengths = jnp.array([0, 7, 40, 33], jnp.int32)

  def loss(q, k, v, lengths, implementation):
    out = dot_product_attention(q, k, v, q_lengths=lengths, kv_lengths=lengths,
                                implementation=implementation)
    return jnp.sum(jnp.sin(out) * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size)

  grad = lambda impl: jax.jit(jax.value_and_grad(
      lambda q, k, v, n: loss(q, k, v, n, impl), argnums=(0, 1, 2)))
  expected = grad("xla")(q, k, v, lengths)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    sharded = [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in (q, k, v, lengths)]
    step = grad("blocked")
    got = step(*sharded)
    hlo = step.lower(*sharded).compile().as_text()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
  # Each device loops over its own examples: nothing is gathered to replicate the loop.
  assert "all-gather" not in hlo
  assert "all-to-all" not in hlo


# ---------------------------------------------------------------------------
# Splash (Pallas TPU kernel), here in Pallas interpret mode on the CPU.
# ---------------------------------------------------------------------------
def test_splash_matches_reference_outputs_and_gradients():
  """Random lengths with 0 and full among them; q and kv lengths differ per example.

  Lengths that are not multiples of the kernel's 128-wide tiles exercise the padding.
  """
  rng = np.random.default_rng(3)
  b, l = 6, 150
  keys = jax.random.split(jax.random.key(7), 4)
  q, k, v, w = (jax.random.normal(kk, (b, l, H, D), jnp.float32) for kk in keys)
  kv_lengths = np.array([0, l, *rng.integers(1, l, b - 2)], np.int32)
  q_lengths = np.array([l, 0, *rng.integers(1, l + 1, b - 2)], np.int32)
  pos = np.arange(l)
  mask = (pos[None, :, None] < q_lengths[:, None, None]) & (pos[None, None, :] < kv_lengths[:, None, None])

  def loss(q, k, v, implementation):
    out = dot_product_attention(q, k, v, q_lengths=jnp.asarray(q_lengths),
                                kv_lengths=jnp.asarray(kv_lengths), implementation=implementation)
    return jnp.sum(w * out), out

  grad = lambda impl: jax.jit(jax.grad(lambda *a: loss(*a, impl), argnums=(0, 1, 2), has_aux=True))
  (g_splash, out_splash), (g_xla, _) = grad("splash")(q, k, v), grad("xla")(q, k, v)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  np.testing.assert_allclose(out_splash, reference(q64, k64, v64, mask), atol=2e-5)
  assert (np.asarray(out_splash)[0] == 0).all()  # No valid key: zero rows.
  assert (np.asarray(out_splash)[1] == 0).all()  # No valid query: zero rows.
  for a, b_ in zip(g_splash, g_xla):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, b_, atol=2e-5)
  g_k = np.asarray(g_splash[1])
  n = kv_lengths[2]
  assert (g_k[2, n:] == 0).all() and np.abs(g_k[2, :n]).sum() > 0  # Masked keys: no gradient.


def test_splash_under_a_mesh_runs_per_device_and_matches_xla():
  """Split over batch and heads by the logical rules, like the blocked kernel."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("heads", "tensor"))
  keys = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(kk, (4, 40, 4, D), jnp.float32) for kk in keys)
  lengths = jnp.array([0, 7, 40, 33], jnp.int32)

  def loss(q, k, v, lengths, implementation):
    out = dot_product_attention(q, k, v, q_lengths=lengths, kv_lengths=lengths,
                                implementation=implementation)
    return jnp.sum(jnp.sin(out) * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size)

  grad = lambda impl: jax.jit(jax.value_and_grad(
      lambda q, k, v, n: loss(q, k, v, n, impl), argnums=(0, 1, 2)))
  expected = grad("xla")(q, k, v, lengths)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    sharded = [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in (q, k, v, lengths)]
    step = grad("splash")
    got = step(*sharded)
    hlo = step.lower(*sharded).compile().as_text()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
  assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_splash_refuses_gpus_and_general_masks(monkeypatch):
  q = jnp.ones((2, 8, 2, D), jnp.float32)
  with pytest.raises(ValueError, match="boolean mask"):
    dot_product_attention(q, q, q, mask=jnp.ones((2, 8, 8), bool), implementation="splash")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="'splash' is a TPU kernel"):
    dot_product_attention(q, q, q, kv_lengths=jnp.array([3, 8]), implementation="splash")
