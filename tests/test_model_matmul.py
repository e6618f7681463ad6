"""bfloat16-operand dense products: forward and backward are float32 sums of rounded operands."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm2.model import matmul


def _round(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("x_shape,w_shape,k", [
    ((3, 5, 8), (8, 3, 2, 6), 1),   # qkv: one input axis -> three output axes
    ((3, 5, 2, 6), (2, 6, 7), 2),   # attention out: two input axes -> one
])
def test_forward_and_backward_use_rounded_operands_and_float32_sums(x_shape, w_shape, k):
  n = len(x_shape) - k  # x's leading (batch) axes; its trailing k meet w's leading k
  dims = ((tuple(range(n, len(x_shape))), tuple(range(k))), ((), ()))
  x, w = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate((x_shape, w_shape)))
  dot = matmul.dot_general_for("bfloat16")
  y, vjp = jax.vjp(lambda x, w: dot(x, w, dims), x, w)
  g = jax.random.normal(jax.random.key(2), y.shape)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32

  xr, wr, gr = _round(x), _round(w), _round(g)
  out_axes = list(range(k, w.ndim))
  want_y = np.tensordot(xr, wr, axes=k)
  want_dx = np.tensordot(gr, wr, axes=(list(range(n, g.ndim)), out_axes))
  want_dw = np.tensordot(xr, gr, axes=(list(range(n)), list(range(n))))
  # Float32 sums of exactly representable products: only summation round-off remains, far
  # below the ~4e-3 relative error a float32 operand (an unrounded gradient) would cause.
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  unrounded_g = np.tensordot(np.asarray(g, np.float64), wr, axes=(list(range(n, g.ndim)), out_axes))
  assert np.abs(np.asarray(dx) - unrounded_g).max() > 1e-4


def test_nnx_layers_take_it():
  layer = nnx.LinearGeneral((2, 6), 7, axis=(-2, -1), rngs=nnx.Rngs(0),
                            dot_general=matmul.dot_general_for("bfloat16"))
  x = jax.random.normal(jax.random.key(3), (3, 5, 2, 6))
  want = np.tensordot(_round(x), _round(layer.kernel[...]), axes=2) + np.asarray(layer.bias[...])
  np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)


def test_float32_is_plain_dot_general_and_bad_names_raise():
  assert matmul.dot_general_for("float32") is jax.lax.dot_general
  with pytest.raises(ValueError, match="matmul_dtype must be one of"):
    matmul.dot_general_for("float16")


def test_other_contractions_are_refused():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="trailing axes of the input"):
    matmul.bfloat16_dot_general(x, jnp.ones((4, 5)), (((0,), (0,)), ((), ())))
