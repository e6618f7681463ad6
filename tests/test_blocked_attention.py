"""Blocked attention equals full masked softmax attention, in outputs and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm2.model.blocked_attention import blocked_attention

# Small shapes compile fast: batch, heads, head_dim (lengths vary per test).
B, H, D = 4, 2, 8


def reference(q, k, v, q_lengths, kv_lengths):
  """Full masked attention; rows past q_length or with no valid key are 0."""
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  out = jax.nn.dot_product_attention(q32, k32, v32, key_value_seq_lengths=kv_lengths)
  rows = jnp.arange(q.shape[1])[None, :, None, None]
  keep = (rows < q_lengths[:, None, None, None]) & (kv_lengths[:, None, None, None] > 0)
  return jnp.where(keep, out, 0.0)


def _inputs(lq, lk, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (B, lq, H, D), dtype)
  k = jax.random.normal(ks[1], (B, lk, H, D), dtype)
  v = jax.random.normal(ks[2], (B, lk, H, D), dtype)
  dy = jax.random.normal(ks[3], (B, lq, H, D), jnp.float32)
  return q, k, v, dy


@functools.lru_cache(maxsize=None)
def _value_and_vjp(block_q, block_k, tail_q=None, tail_k=None, matmul_dtype="float32"):
  """jit(outputs, (dq, dk, dv)) of the blocked kernel; cached: one compile per tiling and shape."""
  tails = dict(tail_q=tail_q or block_q, tail_k=tail_k or block_k)

  @jax.jit
  def run(q, k, v, dy, q_lengths, kv_lengths):
    f = lambda q, k, v: blocked_attention(
        q, k, v, q_lengths=q_lengths, kv_lengths=kv_lengths, block_q=block_q, block_k=block_k,
        matmul_dtype=matmul_dtype, **tails)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(dy.astype(out.dtype))

  return run


@jax.jit
def _reference_value_and_vjp(q, k, v, dy, q_lengths, kv_lengths):
  out, vjp = jax.vjp(lambda q, k, v: reference(q, k, v, q_lengths, kv_lengths), q, k, v)
  return out, vjp(dy)


def _assert_matches_reference(q, k, v, dy, q_lengths, kv_lengths, *tiling, atol=2e-5):
  out, grads = _value_and_vjp(*tiling)(q, k, v, dy, q_lengths, kv_lengths)
  ref_out, ref_grads = _reference_value_and_vjp(q, k, v, dy, q_lengths, kv_lengths)
  np.testing.assert_allclose(out, ref_out, atol=atol, rtol=1e-5, err_msg="outputs")
  for name, g, rg in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, rg, atol=atol, rtol=1e-5, err_msg=f"d{name}")


# (length, (block_q, block_k, tail_q, tail_k)): one block size, unequal ones, big blocks with
# tails; lengths that are and are not multiples of the blocks. Each pair compiles once.
CASES = [(37, (16, 16)), (64, (16, 16)), (64, (32, 16)), (100, (16, 32)), (37, (32, 32, 8, 16)),
         (100, (32, 32, 8, 16))]


@pytest.mark.parametrize("length,tiling", CASES,
                         ids=[f"L{n}-{'x'.join(map(str, t))}" for n, t in CASES])
def test_matches_reference_for_random_lengths(length, tiling):
  q, k, v, dy = _inputs(length, length, seed=length)
  rng = np.random.default_rng(length + sum(tiling))
  # 0, 1, full and a random odd length, in shuffled order; queries and keys differ.
  q_lengths = jnp.asarray(rng.permutation([0, 1, length, rng.integers(1, length) | 1]), jnp.int32)
  kv_lengths = jnp.asarray(rng.permutation([length, 0, rng.integers(1, length) | 1, 1]), jnp.int32)
  _assert_matches_reference(q, k, v, dy, q_lengths, kv_lengths, *tiling)


@pytest.mark.parametrize("tiling", [(16, 32), (32, 32, 8, 16)], ids=["16x32", "32x32x8x16"])
def test_self_attention_lengths_equal_reference(tiling):
  """The AIM encoder case: q_lengths == kv_lengths, lengths straddling block and tail edges.

  Same shapes and tilings as in CASES, so no extra compile.
  """
  q, k, v, dy = _inputs(100, 100, seed=7)
  lengths = jnp.array([15, 32, 41, 97], jnp.int32)
  _assert_matches_reference(q, k, v, dy, lengths, lengths, *tiling)


def test_cross_attention_with_different_lengths():
  q, k, v, dy = _inputs(37, 64, seed=3)
  _assert_matches_reference(q, k, v, dy, jnp.array([37, 5, 0, 20]), jnp.array([64, 33, 10, 0]), 16, 32)


def test_default_blocks_and_no_lengths_equal_unmasked_attention():
  q, k, v, _ = _inputs(64, 64, seed=11)
  out = jax.jit(blocked_attention)(q, k, v)
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=2e-5, rtol=1e-5)


def test_rows_past_q_length_are_exactly_zero_and_get_no_gradient():
  q, k, v, dy = _inputs(64, 64, seed=5)
  q_lengths = jnp.array([0, 9, 40, 64], jnp.int32)
  kv_lengths = jnp.array([64, 30, 0, 64], jnp.int32)
  out, (dq, dk, dv) = _value_and_vjp(16, 16)(q, k, v, dy, q_lengths, kv_lengths)
  rows = np.arange(64)[None, :]
  past_q = rows >= np.asarray(q_lengths)[:, None]
  assert np.all(np.asarray(out)[past_q] == 0.0)
  assert np.all(np.asarray(dq)[past_q] == 0.0)
  # Keys past kv_length get no gradient; neither does anything of an example without queries.
  past_k = rows >= np.asarray(kv_lengths)[:, None]
  assert np.all(np.asarray(dk)[past_k] == 0.0) and np.all(np.asarray(dv)[past_k] == 0.0)
  assert np.all(np.asarray(dk)[0] == 0.0) and np.all(np.asarray(dv)[0] == 0.0)
  # Example 2 has no keys: its rows are 0, finite, and so are all its gradients.
  assert np.all(np.asarray(out)[2] == 0.0) and np.all(np.asarray(dq)[2] == 0.0)
  assert all(np.isfinite(np.asarray(x)).all() for x in (out, dq, dk, dv))
  # The live rows are not trivially zero (the checks above could not pass by accident).
  assert np.abs(np.asarray(out)[3]).max() > 0.1 and np.abs(np.asarray(dk)[3]).max() > 0.01


def test_zero_kv_length_everywhere_is_finite_zero():
  q, k, v, dy = _inputs(37, 37, seed=2)
  zeros = jnp.zeros((B,), jnp.int32)
  out, grads = _value_and_vjp(16, 16)(q, k, v, dy, jnp.full((B,), 37), zeros)
  for x in (out, *grads):
    assert np.all(np.asarray(x) == 0.0)


def test_bfloat16_close_to_float32_reference():
  q, k, v, dy = _inputs(64, 64, seed=13, dtype=jnp.bfloat16)
  lengths = jnp.array([64, 33, 1, 50], jnp.int32)
  out, grads = _value_and_vjp(16, 32)(q, k, v, dy, lengths, lengths)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  ref_out, ref_grads = _reference_value_and_vjp(q, k, v, dy, lengths, lengths)
  np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=1e-2, rtol=1e-2)
  for g, rg in zip(grads, ref_grads):
    np.testing.assert_allclose(g.astype(jnp.float32), rg, atol=2e-2, rtol=2e-2)


def test_bfloat16_matmuls_keep_float32_statistics_and_exact_zeros():
  q, k, v, dy = _inputs(64, 64, seed=14)
  lengths = jnp.array([64, 33, 0, 50], jnp.int32)
  out, grads = _value_and_vjp(16, 32, None, None, "bfloat16")(q, k, v, dy, lengths, lengths)
  assert out.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
  ref_out, ref_grads = _reference_value_and_vjp(q, k, v, dy, lengths, lengths)
  for got, want in zip((out, *grads), (ref_out, *ref_grads)):
    err = np.abs(np.asarray(got) - np.asarray(want)).max()
    assert 1e-4 < err < 5e-2  # bfloat16-rounded operands, float32 accumulation.
  assert (np.asarray(out[1, 33:]) == 0).all() and (np.asarray(out[2]) == 0).all()
  assert (np.asarray(grads[0][1, 33:]) == 0).all()


def test_vmap_over_an_extra_axis_matches_per_slice():
  """Under vmap (e.g. over micro-batches) each slice equals the unbatched call."""
  q, k, v, dy = _inputs(37, 37, seed=17)
  lengths = jnp.array([[37, 3, 0, 20], [1, 36, 37, 16]], jnp.int32)
  stack = lambda x: jnp.stack([x, x[::-1]])
  f = lambda q, k, v, n: blocked_attention(q, k, v, q_lengths=n, kv_lengths=n, block_q=16, block_k=16)
  loss = lambda q, k, v, dy, n: jnp.sum(f(q, k, v, n) * dy)
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(
      stack(q), stack(k), stack(v), stack(dy), lengths)
  for i in range(2):
    xs = [stack(x)[i] for x in (q, k, v, dy)]
    _, ref = _reference_value_and_vjp(*xs, lengths[i], lengths[i])
    for g, rg in zip(grads, ref):
      np.testing.assert_allclose(g[i], rg, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_q=0), "block_q"),
        (dict(block_k=32, tail_k=12), "block_k=32 must be a multiple of tail_k=12"),
        (dict(q_lengths=jnp.ones((3,), jnp.int32)), "q_lengths"),
        (dict(kv_lengths=jnp.ones((4, 1), jnp.int32)), "kv_lengths"),
        (dict(matmul_dtype="float16"), "matmul_dtype must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
  q, k, v, _ = _inputs(16, 16)
  with pytest.raises(ValueError, match=match):
    blocked_attention(q, k, v, **kwargs)


def test_mismatched_shapes_raise():
  q, k, v, _ = _inputs(16, 20)
  with pytest.raises(ValueError, match="k and v"):
    blocked_attention(q, k, v[:, :16])
  with pytest.raises(ValueError, match="head"):
    blocked_attention(q, k[..., :4], v[..., :4])
