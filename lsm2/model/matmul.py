"""Mixed-precision matmuls for the model's dense layers: bfloat16 operands, float32 results.

This is what TPUs do by default (one bfloat16 pass, float32 accumulation), and on CPUs with
AVX512-BF16 such products run about twice as fast as float32 ones. Parameters, activations,
norms, softmax and the loss stay float32; only the operands of each product are rounded.

`dot_general_for(matmul_dtype)` returns a drop-in `dot_general` for nnx.Linear and
nnx.LinearGeneral. Its custom VJP keeps the backward products mixed as well: JAX's own
transpose of a bfloat16-operand product would run the weight and input gradients in
float32 (no speed-up) or round them to bfloat16 (precision loss).
"""
from collections.abc import Callable, Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jaxtyping import Array

MATMUL_DTYPES = ("float32", "bfloat16")


def dot_general_for(matmul_dtype: str) -> Callable[..., Array]:
  """The `dot_general` nnx layers should use for this operand dtype."""
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
  return lax.dot_general if matmul_dtype == "float32" else bfloat16_dot_general


def bfloat16_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                         preferred_element_type=None, out_sharding=None) -> Array:
  """x . W contracting x's trailing axes with W's leading ones (what nnx layers ask for).

  Returns float32 (or `preferred_element_type`). `precision` does not apply: the
  operands are bfloat16 by construction.
  """
  del precision
  if out_sharding is not None:
    raise ValueError("bfloat16_dot_general takes no out_sharding; shardings propagate from the "
                     "parameters and the batch")
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  if (lhs_batch or rhs_batch or tuple(rhs_contract) != tuple(range(n))
      or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))):
    raise ValueError(
        "bfloat16_dot_general contracts the trailing axes of the input with the leading axes "
        f"of the kernel; got dimension_numbers={dimension_numbers} for shapes "
        f"{lhs.shape} x {rhs.shape}")
  out = _tensordot(lhs, rhs, n, jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype))
  return out.astype(preferred_element_type or jnp.float32)


def _dot(a: Array, b: Array, contract: tuple[Sequence[int], Sequence[int]]) -> Array:
  contract = tuple(tuple(axes) for axes in contract)
  return lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), (contract, ((), ())),
                         preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _tensordot(x: Array, w: Array, n: int, x_dtype, w_dtype) -> Array:
  del x_dtype, w_dtype  # The gradients' dtypes, for the backward.
  return _dot(x, w, (range(x.ndim - n, x.ndim), range(n)))


def _tensordot_fwd(x, w, n, x_dtype, w_dtype):
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  # Saving the bfloat16 operands also halves the activation memory this layer keeps.
  return _tensordot(xb, wb, n, x_dtype, w_dtype), (xb, wb)


def _tensordot_bwd(n, x_dtype, w_dtype, res, g):
  xb, wb = res
  lead, feat = xb.ndim - n, wb.ndim - n
  # dx[..., K] = g[..., N] . W[K, N]^T ; dW[K, N] = x[..., K]^T . g[..., N].
  dx = _dot(g, wb, (range(lead, lead + feat), range(n, n + feat)))
  dw = _dot(xb, g, (range(lead), range(lead)))
  return dx.astype(x_dtype), dw.astype(w_dtype)


_tensordot.defvjp(_tensordot_fwd, _tensordot_bwd)
