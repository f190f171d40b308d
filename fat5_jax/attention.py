"""The one dispatch point for attention: the model calls `dot_product_attention`, the config picks the code.

- `xla`: the reference. Materializes the [B, H, Sq, Sk] bias and mask; quadratic memory, exact.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` with the materialized bias (GPU, bf16/fp16).
- `pallas`: our flash kernel; the T5 bias and ALiBi are computed inside it from the table or slopes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import flash_attention, relative_position_bucket


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


def index_positions(segment_ids: jax.Array) -> jax.Array:
  """Positions 0..S-1 of every row: within a contiguous segment their differences are the true distances."""
  return jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)


def materialize_bias(bias: Optional[AttentionBias], q_positions, kv_positions) -> Optional[jax.Array]:
  """The additive bias as a float32 [B or 1, H, Sq, Sk] array (None when there is none)."""
  if bias is None:
    return None
  if bias.kind == "full":
    return bias.bias.astype(jnp.float32)
  relative = kv_positions[:, None, :] - q_positions[:, :, None]  # key - query, [B, Sq, Sk]
  if bias.kind == "t5":
    buckets = relative_position_bucket(relative, bias.bidirectional, bias.table.shape[0], bias.max_distance)
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
  returns zeros. Positions (per-segment) give the relative distances; None means index differences, which are
  the same distances when every segment is contiguous and starts its positions at 0, and lets the flash kernel
  skip reading positions.
  """
  if impl == "pallas":
    return _pallas_attention(q, k, v, bias=bias, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                             q_positions=q_positions, kv_positions=kv_positions, causal=causal, scale=scale)
  mask = attention_mask(q_segment_ids, kv_segment_ids, causal=causal)
  if q_positions is None:
    q_positions, kv_positions = index_positions(q_segment_ids), index_positions(kv_segment_ids)
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
  kwargs = {}
  if bias is not None and bias.kind == "t5":
    kwargs.update(rpe_table=bias.table, rpe_bidirectional=bias.bidirectional, rpe_max_distance=bias.max_distance)
  elif bias is not None and bias.kind == "alibi":
    kwargs.update(alibi_slopes=bias.slopes)
  elif bias is not None:
    kwargs.update(bias=bias.bias)
  return flash_attention(q, k, v, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         q_positions=q_positions, kv_positions=kv_positions, scale=scale, **kwargs)
