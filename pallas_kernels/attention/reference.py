"""The one jnp reference of attention, which is also the model's XLA path (`fat5_jax.ops`): the bias and the mask
materialized as [B or 1, H, Sq, Sk] arrays, logits and softmax in float32 (float64 for float64 inputs).

`dense_bias` and `mask` are public because the cuDNN path feeds them to `jax.nn.dot_product_attention`. Quadratic
in memory: the flash kernels of this package compute the same without materializing anything.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.attention.buckets import relative_position_bucket
from pallas_kernels.attention.config import key_mask_ids, validate
from pallas_kernels.common import MASK

__all__ = ["attention", "dense_bias", "mask", "relative_position_bucket"]


def dense_bias(q_positions, kv_positions, *, q_len: int | None = None, kv_len: int | None = None,
               batch: int | None = None, rpe_table=None, rpe_bidirectional: bool = True,
               rpe_max_distance: int = 128, alibi_slopes=None, bias=None, dtype=jnp.float32):
  """The additive bias as a [B or 1, H or 1, Sq, Sk] array of `dtype` (float32), or None when there is none.

  Distances are kv_positions - q_positions ([B, Sk] and [B, Sq]); without positions, key index - query index, and
  the bias is [1, H, Sq, Sk] (shared by the batch; q_len and kv_len are then needed). `batch`, when given, is
  checked against the positions.
  """
  if bias is not None:
    return bias.astype(dtype)
  if rpe_table is None and alibi_slopes is None:
    return None
  if q_positions is None:
    if q_len is None or kv_len is None:
      raise ValueError("dense_bias without positions needs q_len and kv_len")
    q_positions, kv_positions = jnp.arange(q_len)[None], jnp.arange(kv_len)[None]
  elif batch is not None and (q_positions.shape[0], kv_positions.shape[0]) != (batch, batch):
    raise ValueError(f"positions must have batch {batch}; got {q_positions.shape} and {kv_positions.shape}")
  relative = kv_positions[:, None, :] - q_positions[:, :, None]  # key - query, [B or 1, Sq, Sk]
  if rpe_table is not None:
    buckets = relative_position_bucket(relative, rpe_bidirectional, rpe_table.shape[0], rpe_max_distance)
    return jnp.moveaxis(rpe_table.astype(dtype)[buckets], -1, 1)
  slopes = alibi_slopes.astype(dtype)
  before, after = (slopes, slopes) if slopes.ndim == 1 else (slopes[0], slopes[1])
  d = relative.astype(dtype)[:, None]
  return -before[:, None, None] * jnp.maximum(-d, 0) - after[:, None, None] * jnp.maximum(d, 0)


def mask(q_segment_ids, kv_segment_ids, *, causal: bool, q_len: int | None = None, kv_len: int | None = None):
  """[B or 1, 1, Sq, Sk] boolean: the key is in the query's non-zero segment, and not after it when causal.

  Without segment ids every pair is visible but for causality ([1, 1, Sq, Sk]; q_len and kv_len are then needed).
  """
  if q_segment_ids is None:
    if q_len is None or kv_len is None:
      raise ValueError("mask without segment ids needs q_len and kv_len")
    visible = jnp.ones((1, q_len, kv_len), bool)
  else:
    q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    visible = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  if causal:
    visible &= jnp.arange(kv_len)[None, None, :] <= jnp.arange(q_len)[None, :, None]
  return visible[:, None]


def attention(q, k, v, *, rpe_table=None, rpe_bidirectional: bool = True, rpe_max_distance: int = 128,
              alibi_slopes=None, bias=None, causal: bool = False, q_segment_ids=None, kv_segment_ids=None,
              kv_mask=None, q_positions=None, kv_positions=None, scale: float = 1.0, return_lse: bool = False):
  """`flash_attention` in jnp (same arguments but the kernel choices): out [B, Sq, H, D] in q's dtype, and the lse
  [B, H, Sq] (-inf for queries that see no key) if asked.

  Logits accumulate in float32 at the highest precision (XLA would otherwise round float32 inputs through bf16 on
  a GPU); the softmax is float32; the probabilities are cast to v's dtype for the product with v, as in the
  kernels. Float64 inputs keep float64 throughout: the tests' reference.
  """
  q_segment_ids, kv_segment_ids = key_mask_ids(q, k, kv_mask, q_segment_ids, kv_segment_ids)
  validate(q, k, v, rpe_table, alibi_slopes, bias, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
  q_len, kv_len = q.shape[1], k.shape[1]
  dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=dtype,
                      precision=lax.Precision.HIGHEST) * scale
  dense = dense_bias(q_positions, kv_positions, q_len=q_len, kv_len=kv_len, rpe_table=rpe_table,
                     rpe_bidirectional=rpe_bidirectional, rpe_max_distance=rpe_max_distance,
                     alibi_slopes=alibi_slopes, bias=bias, dtype=dtype)
  if dense is not None:
    logits = logits + dense
  visible = mask(q_segment_ids, kv_segment_ids, causal=causal, q_len=q_len, kv_len=kv_len)
  logits = jnp.where(visible, logits, MASK)
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  sees_a_key = jnp.any(visible, axis=-1, keepdims=True)
  # Hidden pairs get exp(MASK - lse) = 0; a row that sees no key would be uniform: zero it.
  weights = jnp.where(sees_a_key, jnp.exp(logits - lse), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=dtype,
                   precision=lax.Precision.HIGHEST).astype(q.dtype)
  if not return_lse:
    return out
  return out, jnp.where(sees_a_key, lse, -jnp.inf)[..., 0]
