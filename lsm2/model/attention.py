"""Length-masked multi-head dot-product attention behind one interface.

AIM lays the encoder's tokens out visible first, so its attention mask is one
valid key length per example. Every implementation here takes such lengths:
"xla" (`jax.nn.dot_product_attention`, any backend), "cudnn" (its fused GPU
kernel) and "blocked" (lsm2.model.blocked_attention, which skips the blocks
past the lengths). "xla" also takes a general boolean mask, the reference the
length path is tested against.

Conventions, identical for every implementation: query rows at or past
`q_lengths`, and rows with no valid key, return zeros (finite, no NaN).

Under a mesh (`jax.set_mesh`) with logical axis rules in context
(`nnx.logical_axis_rules`), "blocked" runs inside `jax.shard_map`: each device
loops over its own examples and heads, split as the rules map the logical
names "batch" and "heads". Without it GSPMD would replicate the kernel's
per-example loop on every device.
"""
import math

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

IMPLEMENTATIONS = ("xla", "blocked", "cudnn")


def dot_product_attention(
    q: Float[Array, "b lq h d"],
    k: Float[Array, "b lk h d"],
    v: Float[Array, "b lk h d"],
    *,
    kv_lengths: Int[Array, "b"] | None = None,
    q_lengths: Int[Array, "b"] | None = None,
    mask: Bool[Array, "b lq lk"] | None = None,
    implementation: str = "xla",
    matmul_dtype: str = "float32",
) -> Float[Array, "b lq h d"]:
  """Softmax(q k^T / sqrt(d)) v per head, keys limited to the first `kv_lengths`.

  Args:
    q, k, v: [batch, length, heads, head_dim].
    kv_lengths: valid keys per example (keys [0, kv_length) take part).
    q_lengths: valid queries per example; later rows are zero.
    mask: general mask (True = query may attend to key); "xla" only.
    implementation: "xla", "blocked" or "cudnn" (GPU only).
    matmul_dtype: operand dtype of the "blocked" kernel's products (accumulated in
      float32); "xla" and "cudnn" compute in the inputs' dtype.

  Returns:
    [batch, lq, heads, head_dim] in q's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  b, lq, _, _ = q.shape
  lk = k.shape[1]
  for name, lengths in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
    if lengths is not None and (lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer)):
      raise ValueError(f"{name} must be an int array of shape ({b},), got {lengths.dtype} {lengths.shape}")
  if mask is not None and (mask.shape != (b, lq, lk) or mask.dtype != jnp.bool_):
    raise ValueError(f"mask must be bool [{b}, {lq}, {lk}], got {mask.dtype} {mask.shape}")
  if mask is not None and implementation != "xla":
    raise ValueError(f"a general boolean mask needs implementation='xla', got {implementation!r}")
  q_lengths = None if q_lengths is None else q_lengths.astype(jnp.int32)
  kv_lengths = None if kv_lengths is None else kv_lengths.astype(jnp.int32)

  if implementation == "blocked":
    # Imported here: the kernel is optional for every other implementation.
    from lsm2.model.blocked_attention import blocked_attention  # pylint: disable=g-import-not-at-top
    full_q = jnp.full((b,), lq, jnp.int32)
    full_k = jnp.full((b,), lk, jnp.int32)
    kernel = lambda q, k, v, ql, kl: blocked_attention(
        q, k, v, q_lengths=ql, kv_lengths=kl, matmul_dtype=matmul_dtype)
    specs = _mesh_specs(b, q.shape[2])
    if specs is not None:
      qkv, lengths, manual = specs
      # Manual over the split axes only; the kernel's loops carry per-device values.
      kernel = jax.shard_map(kernel, in_specs=(qkv, qkv, qkv, lengths, lengths), out_specs=qkv,
                             axis_names=manual, check_vma=False)
    return kernel(q, k, v, full_q if q_lengths is None else q_lengths,
                  full_k if kv_lengths is None else kv_lengths)

  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(
        f"attention implementation 'cudnn' needs a GPU, the JAX backend is {jax.default_backend()!r}; "
        "use 'xla' or 'blocked'")
  out = jax.nn.dot_product_attention(
      q, k, v,
      mask=None if mask is None else mask[:, None],
      query_seq_lengths=q_lengths,
      key_value_seq_lengths=kv_lengths,
      implementation=implementation)
  # Rows without any valid key would average all values: zero them instead.
  if mask is not None:
    out = jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0)
  if kv_lengths is not None:
    out = jnp.where((kv_lengths > 0)[:, None, None, None], out, 0)
  return out


def _mesh_specs(batch: int, heads: int) -> tuple[P, P, set[str]] | None:
  """Specs splitting [b, l, h, d] over the context mesh by the "batch"/"heads" rules.

  None when there is no mesh, no rule maps either name onto a mesh axis larger
  than 1, or the sizes do not divide (then the kernel runs unsplit, as GSPMD
  lays it out).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  rules = dict(spmd.get_logical_axis_rules())

  def axes(name: str, size: int) -> tuple[str, ...] | None:
    names = rules.get(name)
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    names = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    if not names or size % math.prod(mesh.shape[a] for a in names):
      return None
    return names

  batch_axes, head_axes = axes("batch", batch), axes("heads", heads)
  if batch_axes is None and head_axes is None:
    return None
  manual = set(batch_axes or ()) | set(head_axes or ())
  return P(batch_axes, None, head_axes, None), P(batch_axes), manual
