"""Blocked, length-aware softmax attention with a flash-style custom VJP (for CPU).

In AIM's encoder each example has one valid length: the visible tokens come first, the
attention-masked rest are never keys and their outputs are discarded. This kernel computes
only the query-block x key-block pairs below those lengths, forward and backward, so its
cost follows the visible tokens instead of the padded length, and it stays exact: valid rows
equal full masked softmax attention, in outputs and gradients.

How it is laid out, for XLA on CPU (which fuses poorly, so few big matmuls win):
- per example, loops with traced trip counts walk the valid blocks only; heads are the batch
  dimension of every product, so each product is a [heads, block, block] batched matmul;
- each axis is covered by big blocks (`block_*`, efficient matmuls) and then small `tail_*`
  blocks for the remainder, so at most tail-1 positions per axis are computed in vain;
- only tail key blocks pay for masking; the forward keeps a running max and sum (online
  softmax) and saves the row logsumexp, from which the backward recomputes P per block;
- the backward forms dK and dV transposed ([d, block]): every product is then a plain or
  right-transposed matmul, which XLA's CPU dot runs several times faster than products that
  contract a transposed left operand (P^T dO, dS^T Q).
"""
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _segments(length, tiling):
  """Blocks covering [0, length): full `block`s, then `tail`-sized blocks for the rest.

  Returns (start, count, size, partial) per segment; start and count are traced, size is
  static, and only the tail segment can hold positions past `length` (partial=True). The
  blocks end before the length rounded up to a multiple of `tail`, which the inputs are
  padded to, so no dynamic slice is ever clamped.
  """
  block, tail = tiling
  n_full = length // block
  start = n_full * block
  return ((0, n_full, block, False), (start, (length - start + tail - 1) // tail, tail, True))


def _mm(spec: str, a: Array, b: Array, dtype) -> Array:
  """One block product: operands in `dtype`, accumulated and returned in float32."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _fwd_kernel(q, k, v, q_lengths, kv_lengths, q_tiling, k_tiling):
  """Online-softmax forward over the valid blocks of each example.

  q, k, v: [b, h, l, d] in the matmul dtype, q pre-scaled, lengths padded to multiples of
  the tails.
  Returns out [b, h, lq, d] (0 past q_length) and the row logsumexp [b, h, lq].
  """
  b, h, lq, d = q.shape
  mm = q.dtype
  out = jnp.zeros(q.shape, jnp.float32)
  lse = jnp.zeros((b, h, lq), jnp.float32)

  def per_example(e, carry):
    qlen, kvlen = q_lengths[e], kv_lengths[e]

    def q_block(start, size):
      def body(i, carry):
        out, lse = carry
        q0 = start + i * size
        qi = lax.dynamic_slice(q, (e, 0, q0, 0), (1, h, size, d))[0]
        state = (jnp.zeros((h, size, d), jnp.float32), jnp.full((h, size), -jnp.inf, jnp.float32),
                 jnp.zeros((h, size), jnp.float32))
        for k_start, k_count, k_size, partial in _segments(kvlen, k_tiling):
          state = lax.fori_loop(0, k_count, k_block(qi, k_start, k_size, partial), state)
        acc, m, l = state
        has_keys = l > 0
        l = jnp.where(has_keys, l, 1.0)
        rows = q0 + lax.broadcasted_iota(jnp.int32, (1, size), 1)
        oi = jnp.where((has_keys & (rows < qlen))[..., None], acc / l[..., None], 0.0)
        lse_i = jnp.where(has_keys, m + jnp.log(l), 0.0)
        return (lax.dynamic_update_slice(out, oi[None], (e, 0, q0, 0)),
                lax.dynamic_update_slice(lse, lse_i[None], (e, 0, q0)))
      return body

    def k_block(qi, start, size, partial):
      def body(j, state):
        acc, m, l = state
        k0 = start + j * size
        kj = lax.dynamic_slice(k, (e, 0, k0, 0), (1, h, size, d))[0]
        vj = lax.dynamic_slice(v, (e, 0, k0, 0), (1, h, size, d))[0]
        s = _mm("hqd,hkd->hqk", qi, kj, mm)
        if partial:
          keys = k0 + lax.broadcasted_iota(jnp.int32, (1, 1, size), 2)
          s = jnp.where(keys < kvlen, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + _mm("hqk,hkd->hqd", p, vj, mm)
        return acc, m_new, l
      return body

    for q_start, q_count, q_size, _ in _segments(qlen, q_tiling):
      carry = lax.fori_loop(0, q_count, q_block(q_start, q_size), carry)
    return carry

  return lax.fori_loop(0, b, per_example, (out, lse))


def _bwd_kernel(q, qt, k, v, do, dot, lse, delta, q_lengths, kv_lengths, q_tiling, k_tiling):
  """Flash-style backward over the valid blocks: P is recomputed from q, k and the saved lse.

  q, do: [b, h, lq, d] (q pre-scaled, do 0 past q_length); qt, dot: their [b, h, d, lq]
  transposes; all four, k and v in the matmul dtype. Returns dq [b, h, lq, d] w.r.t. the
  scaled q, and dk, dv transposed to [b, h, d, lk] (see the module docstring). Outer loop over key blocks, whose dK and dV
  accumulate in the loop carry; dQ is read, updated and written per query block.
  """
  b, h, lq, d = q.shape
  lk = k.shape[2]
  mm = q.dtype
  carry = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((b, h, d, lk), jnp.float32),
           jnp.zeros((b, h, d, lk), jnp.float32))

  def per_example(e, carry):
    qlen, kvlen = q_lengths[e], kv_lengths[e]

    def k_block(start, size, partial):
      def body(j, carry):
        dq, dkt, dvt = carry
        k0 = start + j * size
        kj = lax.dynamic_slice(k, (e, 0, k0, 0), (1, h, size, d))[0]
        vj = lax.dynamic_slice(v, (e, 0, k0, 0), (1, h, size, d))[0]
        keys_ok = None
        if partial:
          keys_ok = k0 + lax.broadcasted_iota(jnp.int32, (1, 1, size), 2) < kvlen
        state = (dq, jnp.zeros((h, d, size), jnp.float32), jnp.zeros((h, d, size), jnp.float32))
        for q_start, q_count, q_size, _ in _segments(qlen, q_tiling):
          state = lax.fori_loop(0, q_count, q_block(kj, vj, keys_ok, q_start, q_size), state)
        dq, dktj, dvtj = state
        return (dq, lax.dynamic_update_slice(dkt, dktj[None], (e, 0, 0, k0)),
                lax.dynamic_update_slice(dvt, dvtj[None], (e, 0, 0, k0)))
      return body

    def q_block(kj, vj, keys_ok, start, size):
      def body(i, state):
        dq, dktj, dvtj = state
        q0 = start + i * size
        rows, rows_t = (e, 0, q0, 0), (e, 0, 0, q0)
        qi = lax.dynamic_slice(q, rows, (1, h, size, d))[0]
        doi = lax.dynamic_slice(do, rows, (1, h, size, d))[0]
        qti = lax.dynamic_slice(qt, rows_t, (1, h, d, size))[0]
        doti = lax.dynamic_slice(dot, rows_t, (1, h, d, size))[0]
        lse_i = lax.dynamic_slice(lse, rows[:3], (1, h, size))[0]
        delta_i = lax.dynamic_slice(delta, rows[:3], (1, h, size))[0]
        p = jnp.exp(_mm("hqd,hkd->hqk", qi, kj, mm) - lse_i[..., None])
        if keys_ok is not None:
          p = jnp.where(keys_ok, p, 0.0)
        dvtj = dvtj + _mm("hdq,hqk->hdk", doti, p, mm)
        ds = p * (_mm("hqd,hkd->hqk", doi, vj, mm) - delta_i[..., None])
        dqi = lax.dynamic_slice(dq, rows, (1, h, size, d))[0] + _mm("hqk,hkd->hqd", ds, kj, mm)
        dktj = dktj + _mm("hdq,hqk->hdk", qti, ds, mm)
        return lax.dynamic_update_slice(dq, dqi[None], rows), dktj, dvtj
      return body

    for k_start, k_count, k_size, partial in _segments(kvlen, k_tiling):
      carry = lax.fori_loop(0, k_count, k_block(k_start, k_size, partial), carry)
    return carry

  return lax.fori_loop(0, b, per_example, carry)


def _prepare(x: Array, tiling, dtype=jnp.float32, scale: float = 1.0) -> Array:
  """[b, l, h, d] -> [b, h, l_pad, d] in `dtype` (scaled in float32 first), l_pad a multiple
  of the tail block."""
  x = jnp.swapaxes(x, 1, 2).astype(jnp.float32)
  return _pad_to((x * scale if scale != 1.0 else x).astype(dtype), 2, tiling[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blocked(q, k, v, q_lengths, kv_lengths, q_tiling, k_tiling, mm):
  return _blocked_fwd(q, k, v, q_lengths, kv_lengths, q_tiling, k_tiling, mm)[0]


def _blocked_fwd(q, k, v, q_lengths, kv_lengths, q_tiling, k_tiling, mm):
  lq, d = q.shape[1], q.shape[3]
  qs = _prepare(q, q_tiling, mm, 1.0 / math.sqrt(d))
  out, lse = _fwd_kernel(qs, _prepare(k, k_tiling, mm), _prepare(v, k_tiling, mm), q_lengths,
                         kv_lengths, q_tiling, k_tiling)
  y = jnp.swapaxes(out[:, :, :lq], 1, 2).astype(q.dtype)
  # Saves the inputs and the returned output (not the padded float32 copies the kernels use).
  return y, (q, k, v, y, lse, q_lengths, kv_lengths)


def _blocked_bwd(q_tiling, k_tiling, mm, res, dy):
  q, k, v, y, lse, q_lengths, kv_lengths = res
  lq, lk, d = q.shape[1], k.shape[1], q.shape[3]
  scale = 1.0 / math.sqrt(d)
  do = _prepare(dy, q_tiling)
  rows = lax.broadcasted_iota(jnp.int32, (1, 1, do.shape[2], 1), 2)
  do = jnp.where(rows < q_lengths[:, None, None, None], do, 0.0)
  delta = jnp.sum(do * _prepare(y, q_tiling), axis=-1)  # rowsum(dO * O), the softmax term.
  qs, do = _prepare(q, q_tiling, mm, scale), do.astype(mm)
  dq, dkt, dvt = _bwd_kernel(qs, jnp.swapaxes(qs, 2, 3), _prepare(k, k_tiling, mm),
                             _prepare(v, k_tiling, mm), do, jnp.swapaxes(do, 2, 3), lse, delta,
                             q_lengths, kv_lengths, q_tiling, k_tiling)
  dq = jnp.swapaxes(dq[:, :, :lq] * scale, 1, 2).astype(q.dtype)
  dk, dv = (jnp.transpose(x[..., :lk], (0, 3, 1, 2)) for x in (dkt, dvt))
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _tiling(name: str, block: int, tail: int, length: int) -> tuple[int, int]:
  """Static (block, tail) sizes for one axis, capped at the axis length."""
  for arg, size in ((f"block_{name}", block), (f"tail_{name}", tail)):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"{arg} must be a positive int; got {size!r}")
  tail = min(tail, block)
  if block % tail:
    raise ValueError(f"block_{name}={block} must be a multiple of tail_{name}={tail}")
  tail = min(tail, length)
  return min(block, -(-length // tail) * tail), tail


def blocked_attention(
    q: Float[Array, "b lq h d"],
    k: Float[Array, "b lk h d"],
    v: Float[Array, "b lk h d"],
    *,
    q_lengths: Int[Array, "b"] | None = None,
    kv_lengths: Int[Array, "b"] | None = None,
    block_q: int = 512,
    block_k: int = 512,
    tail_q: int = 128,
    tail_k: int = 128,
    matmul_dtype: str = "float32",
) -> Float[Array, "b lq h d"]:
  """Softmax attention (scale 1/sqrt(d)) that only computes the valid blocks of each example.

  Keys at index >= kv_lengths[i] are excluded; query rows at index >= q_lengths[i] are not
  computed, their outputs are exactly 0 and they pass no gradient. An example without keys
  gives 0 (never NaN). Valid rows equal full masked attention, and so do the gradients.
  Lengths are clipped to [0, length]; None means all positions are valid. Inputs of any float
  dtype are computed in float32 and returned in their own dtype.

  Each axis is covered by blocks of `block_*` and then blocks of `tail_*` for the rest, both
  capped at the (tail-rounded) length. The defaults were measured fastest on a 2-core AVX-512
  CPU at head_dim 64 (docs/attention.md): 512 keeps the products big enough to run at matmul
  speed on both cores, 128 keeps the work past each length small.

  `matmul_dtype="bfloat16"` feeds every block product bfloat16 operands (q, k, v, P, dO, dS)
  and accumulates in float32, as TPUs do by default; softmax statistics, the running output
  and all gradients stay float32. On CPUs with AVX512-BF16 such products run about twice as
  fast as float32 ones.

  Args:
    q: queries, [batch, q_len, heads, head_dim] (the layout of jax.nn.dot_product_attention).
    k: keys, [batch, kv_len, heads, head_dim].
    v: values, [batch, kv_len, heads, head_dim].
    q_lengths: number of leading valid query rows per example.
    kv_lengths: number of leading valid keys per example.
    block_q: query rows per big block; lengths need not be multiples of any block size.
    block_k: keys per big block.
    tail_q: query rows per small block, covering what is left past the last full block_q
      block (at most tail_q - 1 rows are computed in vain); must divide block_q.
    tail_k: keys per small block; must divide block_k.
    matmul_dtype: "float32" or "bfloat16", the operand dtype of the block products.

  Returns:
    [batch, q_len, heads, head_dim] attention outputs, 0 past q_lengths.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, length, heads, head_dim]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q and k must agree in batch, heads and head_dim; got {q.shape} and {k.shape}")
  if matmul_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"matmul_dtype must be 'float32' or 'bfloat16'; got {matmul_dtype!r}")
  b, lq = q.shape[:2]
  lk = k.shape[1]
  q_tiling, k_tiling = _tiling("q", block_q, tail_q, lq), _tiling("k", block_k, tail_k, lk)
  lengths = []
  for name, n, full in (("q_lengths", q_lengths, lq), ("kv_lengths", kv_lengths, lk)):
    if n is None:
      n = jnp.full((b,), full, jnp.int32)
    elif jnp.shape(n) != (b,) or not jnp.issubdtype(jnp.result_type(n), jnp.integer):
      raise ValueError(f"{name} must be an integer array of shape ({b},); got "
                       f"{jnp.result_type(n)} {jnp.shape(n)}")
    lengths.append(jnp.clip(jnp.asarray(n, jnp.int32), 0, full))
  return _blocked(q, k, v, *lengths, q_tiling, k_tiling, jnp.dtype(matmul_dtype))
