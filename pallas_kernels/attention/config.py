"""What the public function, both kernel backends and the reference share: the static configuration a kernel
specializes on, the T5 / ALiBi inputs in the kernels' base-2 units, and the input checks."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.attention import buckets
from pallas_kernels.attention.tuning import BlockSizes
from pallas_kernels.common import LOG2E, next_power_of_2

HEAD_DIMS = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static under jit: one compiled kernel per value."""
  bias_mode: str  # none | t5 | alibi | full
  causal: bool
  scale: float
  has_segments: bool
  has_positions: bool
  blocks: BlockSizes
  interpret: bool
  backend: str = "pallas"  # or "triton" or "mosaic" (__init__.BACKENDS)
  key_mask: bool = False  # the ids are a key mask (kv_mask): queries all 1, so Triton masks the keys alone
  num_buckets: int = 0
  bidirectional: bool = True
  max_distance: int = 0
  bias_batched: bool = False  # full bias: does it have a batch / head axis of its own
  bias_headed: bool = False

  @property
  def lut_size(self) -> int:
    return buckets.lut_size(self.max_distance)

  @property
  def buckets_padded(self) -> int:
    return next_power_of_2(self.num_buckets)

  def lut(self):
    """The bucket of each distance + max_distance, [lut_size] (numpy, a compile-time constant)."""
    return buckets.padded_lut(self.bidirectional, self.num_buckets, self.max_distance)

  def end_buckets(self) -> tuple[int, int]:
    """The buckets of keys far before and far after the query."""
    lut = buckets.bucket_lut(self.bidirectional, self.num_buckets, self.max_distance)
    return int(lut[0]), int(lut[-1])


class T5Inputs(NamedTuple):
  """The T5 bias as the kernels read it. Every tile gets the same float32 value per pair, float32(table entry) *
  log2(e) (logits are scaled by log2(e) once): far tiles and gathers read it from `vector`; band tiles hold the
  table's entries unscaled and exact, and the kernels multiply them by log2(e) in float32 when they load them."""
  vector: jax.Array  # [H, lut_size] float32: the bias of each distance + max_distance, in base-2 units
  band: jax.Array  # [H, count * bq, bk]: the band tiles' table entries, in the table's dtype when it is 16-bit


def kernel_inputs(cfg: Config, table, slopes, bq: int, bk: int) -> tuple[Optional[T5Inputs], Optional[jax.Array]]:
  """(T5 inputs for blocks bq x bk, or None; slopes [H, 2] in base 2, or None)."""
  t5 = slopes2 = None
  if cfg.bias_mode == "t5":
    entries = table.astype(jnp.float32).T[:, cfg.lut()]
    # A 16-bit table keeps its dtype in the band tiles: exact, and half the bytes of float32. Rounding the scaled
    # bias to 16 bits instead (as before) moved band tiles' bias by up to 2**-9 of it, and not the far tiles'.
    band_dtype = table.dtype if jnp.dtype(table.dtype).itemsize < 4 else jnp.float32
    t5 = T5Inputs(entries * LOG2E, buckets.band_tiles(entries, cfg.max_distance, bq, bk).astype(band_dtype))
  if cfg.bias_mode == "alibi":
    slopes2 = slopes.astype(jnp.float32).T * LOG2E
  return t5, slopes2


def segment_block_ranges(q_seg, kv_seg, block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
  """The tiles packed rows need: ([B, Sq / block_q, 2] int32, for each q block the kv blocks [first, end) that may
  hold a key visible to one of its queries; [B, Sk / block_k, 2], for each kv block the q blocks likewise).

  A query sees only keys of its own nonzero segment, so a q block and a kv block whose ranges of nonzero ids do not
  intersect share no visible pair, and the kernels skip that tile. Packed rows have non-decreasing ids (then
  padding): the tiles kept are about the sum of the squares of the segments, not the square of the row. Blocks
  between first and end that see nothing are still run, masked as usual, so any ids stay correct."""
  def id_ranges(ids, block):  # [B, blocks]: lowest and highest nonzero id (empty blocks: max int, 0)
    ids = ids.reshape(ids.shape[0], -1, block)
    real = ids > 0
    return jnp.where(real, ids, jnp.iinfo(jnp.int32).max).min(-1), jnp.where(real, ids, 0).max(-1)

  def spans(share):  # [first, end) of the True entries along the last axis, (0, 0) if none
    first = jnp.argmax(share, -1)
    end = share.shape[-1] - jnp.argmax(share[..., ::-1], -1)
    found = share.any(-1)
    return jnp.stack([jnp.where(found, first, 0), jnp.where(found, end, 0)], -1).astype(jnp.int32)

  q_low, q_high = id_ranges(q_seg, block_q)
  k_low, k_high = id_ranges(kv_seg, block_k)
  share = (q_low[:, :, None] <= k_high[:, None, :]) & (k_low[:, None, :] <= q_high[:, :, None])  # [B, nq, nk]
  return spans(share), spans(share.swapaxes(1, 2))


def key_mask_ids(q, k, kv_mask, q_segment_ids, kv_segment_ids):
  """(q_segment_ids, kv_segment_ids) of a call: those given, or for a key mask [B, Sk] query ids of 1 and key ids of
  the mask."""
  if kv_mask is None:
    return q_segment_ids, kv_segment_ids
  if q_segment_ids is not None or kv_segment_ids is not None:
    raise ValueError("give segment ids or kv_mask, not both (a key mask is query ids of 1 and key ids of the mask)")
  if kv_mask.shape != k.shape[:2]:
    raise ValueError(f"kv_mask must be [{k.shape[0]}, {k.shape[1]}]; got {kv_mask.shape}")
  return jnp.ones(q.shape[:2], jnp.int32), kv_mask.astype(jnp.int32)


def validate(q, k, v, rpe_table, alibi_slopes, bias, q_segment_ids, kv_segment_ids, q_positions,
             kv_positions) -> None:
  """The shapes attention takes, kernels or reference (the kernels also restrict head_dim to HEAD_DIMS)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != (heads, head_dim):
    raise ValueError(f"k and v must be [{batch}, Sk, {heads}, {head_dim}]; got {k.shape}, {v.shape}")
  if sum(x is not None for x in (rpe_table, alibi_slopes, bias)) > 1:
    raise ValueError("give at most one of rpe_table, alibi_slopes and bias")
  if rpe_table is not None and (rpe_table.ndim != 2 or rpe_table.shape[1] != heads):
    raise ValueError(f"rpe_table must be [num_buckets, {heads}]; got {rpe_table.shape}")
  if alibi_slopes is not None and alibi_slopes.shape not in ((heads,), (2, heads)):
    raise ValueError(f"alibi_slopes must be [{heads}] or [2, {heads}]; got {alibi_slopes.shape}")
  if bias is not None and (bias.ndim != 4 or bias.shape[0] not in (1, batch) or bias.shape[1] not in (1, heads)
                           or bias.shape[2:] != (q_len, kv_len)):
    raise ValueError(f"bias must be [{batch} or 1, {heads} or 1, {q_len}, {kv_len}]; got {bias.shape}")
  for name, pair in (("segment_ids", (q_segment_ids, kv_segment_ids)), ("positions", (q_positions, kv_positions))):
    if (pair[0] is None) != (pair[1] is None):
      raise ValueError(f"give both q_{name} and kv_{name}, or neither")
    if pair[0] is not None and (pair[0].shape != (batch, q_len) or pair[1].shape != (batch, kv_len)):
      raise ValueError(f"q_{name} / kv_{name} must be [{batch}, {q_len}] / [{batch}, {kv_len}]; got "
                       f"{pair[0].shape} / {pair[1].shape}")
