"""The one dispatch point for attention: the model calls `dot_product_attention`, the config picks the code.

- `xla`: the reference. Materializes the [B, H, Sq, Sk] bias and mask; quadratic memory, exact.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` with the materialized bias (GPU, bf16/fp16).
- `pallas`: our flash kernel; the T5 bias and ALiBi are computed inside it from the table or slopes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AttentionBias:
  """How positions enter the logits of one stack's attention (computed once per stack, shared by its layers).

  kind: "t5" (table [num_buckets, H], bucketed by key - query), "alibi" (slopes [2, H] for keys before / after the
  query) or "full" (bias [B or 1, H, Sq, Sk], e.g. FIRE).
  """
  kind: str
  table: Optional[jax.Array] = None
  bidirectional: bool = True
  max_distance: int = 128
  slopes: Optional[jax.Array] = None
  bias: Optional[jax.Array] = None


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """Hugging Face's `T5Attention._relative_position_bucket` (relative_position = key - query), bit for bit."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # float32 log as in PyTorch, then truncation toward zero; the max() only guards log(0) in the unused branch.
  scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(relative_position.dtype), num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


def materialize_bias(bias: Optional[AttentionBias], q_positions, kv_positions) -> Optional[jax.Array]:
  """The additive bias as a float32 [B or 1, H, Sq, Sk] array (None when there is none)."""
  if bias is None:
    return None
  if bias.kind == "full":
    return bias.bias.astype(jnp.float32)
  relative = kv_positions[:, None, :] - q_positions[:, :, None]  # key - query, [B, Sq, Sk]
  if bias.kind == "t5":
    buckets = relative_position_bucket(relative, bidirectional=bias.bidirectional,
                                       num_buckets=bias.table.shape[0], max_distance=bias.max_distance)
    return jnp.moveaxis(bias.table[buckets], -1, 1)
  if bias.kind == "alibi":
    distance = relative.astype(jnp.float32)[:, None]
    before, after = bias.slopes[0][:, None, None], bias.slopes[1][:, None, None]
    return -before * jnp.maximum(-distance, 0.0) - after * jnp.maximum(distance, 0.0)
  raise ValueError(f"unknown attention bias kind {bias.kind!r}")


def attention_mask(q_segment_ids, kv_segment_ids, *, causal: bool) -> jax.Array:
  """[B, 1, Sq, Sk] boolean: same non-zero segment, and key index <= query index when causal."""
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] != 0)
  if causal:
    sq, sk = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    mask &= jnp.arange(sk)[None, None, :] <= jnp.arange(sq)[None, :, None]
  return mask[:, None]


def dot_product_attention(q, k, v, *, bias: Optional[AttentionBias], q_segment_ids, kv_segment_ids, q_positions,
                          kv_positions, causal: bool, scale: float, impl: str) -> jax.Array:
  """Attention over q [B, Sq, H, D], k and v [B, Sk, H, D] -> [B, Sq, H, D].

  Segment ids (0 = padding) confine each query to keys of its own segment; a query with no visible key (padding)
  returns zeros. Positions are per-segment, so relative distances never cross segments.
  """
  if impl == "pallas":
    return _pallas_attention(q, k, v, bias=bias, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                             q_positions=q_positions, kv_positions=kv_positions, causal=causal, scale=scale)
  mask = attention_mask(q_segment_ids, kv_segment_ids, causal=causal)
  dense_bias = materialize_bias(bias, q_positions, kv_positions)
  if impl == "cudnn":
    out = jax.nn.dot_product_attention(
        q, k, v, bias=None if dense_bias is None else dense_bias.astype(q.dtype), mask=mask, scale=scale,
        implementation="cudnn")
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
  if impl != "xla":
    raise ValueError(f"unknown attention_impl {impl!r}; expected xla, cudnn or pallas")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if dense_bias is not None:
    logits = logits + dense_bias
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1) * jnp.any(mask, axis=-1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def _pallas_attention(q, k, v, *, bias, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, scale):
  from pallas_kernels.flash_attention import flash_attention  # GPU kernel; interpret mode elsewhere

  kwargs = {}
  if bias is not None and bias.kind == "t5":
    kwargs.update(rpe_table=bias.table, rpe_bidirectional=bias.bidirectional, rpe_max_distance=bias.max_distance)
  elif bias is not None:
    kwargs.update(bias=materialize_bias(bias, q_positions, kv_positions))
  return flash_attention(q, k, v, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         q_positions=q_positions, kv_positions=kv_positions, scale=scale, **kwargs)
