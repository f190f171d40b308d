"""Flash attention (forward and backward) as raw Triton kernels called through jax-triton (GPU only).

The algorithm of `flash_attention.py` (base-2 online softmax, the T5 bias from far scalars and precomputed band
tiles, segment and causal masks, lse = +inf for rows that see no key, per-program partial table gradients),
written against Triton directly for the common cases: no bias, or the T5 bias without positions. On Hopper this
runs faster than the Pallas lowering of the same loops (benchmarks/notes_attention.md), for two reasons Pallas
cannot express: the band tiles' table gradient is skewed in shared memory (`tl.gather`) instead of through a global
scratch, and causal tiles below the diagonal skip the mask. Import lazily: triton and jax_triton do not import on
a CPU-only jaxlib.

Orientation: the forward and dq kernels hold [queries, keys] tiles; the dk/dv kernel holds [keys, queries] tiles,
so that its three matmuls need no transposed register tile.
"""

import jax
import jax.numpy as jnp
import jax_triton as jt
import triton
import triton.language as tl

from pallas_kernels.common import LOG2E
from pallas_kernels.flash_attention import MASK

_MASK = tl.constexpr(MASK)
# Regions of the kv (or q) loop: the tiles before the T5 band (one bucket), the band, the tiles after it.
_NO_BIAS, _FAR_LEFT, _BAND, _FAR_RIGHT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


# ------------------------------------------------------------------------------------------------ tiles


@triton.jit
def _logits2(raw, q_idx, k_idx, q_seg, k_seg, bias_ptr, far_bias, shift, REGION: tl.constexpr,
             MASKED: tl.constexpr, KEYS_FIRST: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
             SCALE2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BAND_FIRST: tl.constexpr,
             BAND_STEP: tl.constexpr):
  """Base-2 logits of a tile ([queries, keys], or [keys, queries] if KEYS_FIRST), MASK where hidden. Only for band
  or masked tiles: the others keep scale and scalar bias apart, so that `logits - row value` is one multiply-add."""
  bias = far_bias
  if REGION == _BAND:
    offsets = (shift - BAND_FIRST) // BAND_STEP * BLOCK_Q * BLOCK_K
    if KEYS_FIRST:  # the dk/dv kernel reads pre-transposed tiles: coalesced, like the others
      offsets += tl.arange(0, BLOCK_K)[:, None] * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :]
    else:
      offsets += tl.arange(0, BLOCK_Q)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    bias = tl.load(bias_ptr + offsets).to(tl.float32)
  s = raw * SCALE2 + bias
  if MASKED:
    if KEYS_FIRST:
      q_idx, k_idx, q_seg, k_seg = q_idx[None, :], k_idx[:, None], q_seg[None, :], k_seg[:, None]
    else:
      q_idx, k_idx, q_seg, k_seg = q_idx[:, None], k_idx[None, :], q_seg[:, None], k_seg[None, :]
    visible = tl.full(s.shape, True, tl.int1)
    if HAS_SEGMENTS:
      visible = (q_seg == k_seg) & (k_seg != 0)
    if CAUSAL:
      visible = visible & (q_idx >= k_idx)
    s = tl.where(visible, s, _MASK)
  return s


@triton.jit
def _cut(lo, hi, split):
  """Blocks [lo, hi) cut at `split`: (end of the first part, start of the second)."""
  return tl.minimum(hi, tl.maximum(split, lo)), tl.maximum(lo, tl.minimum(split, hi))


@triton.jit
def _kv_blocks(q_start, KV_LEN: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
               CAUSAL: tl.constexpr):
  """(end of the kv loop, first kv block that needs the causal mask) for the q block at q_start."""
  hi = tl.full([], KV_LEN // BLOCK_K, tl.int32)
  first_masked = hi
  if CAUSAL:  # kv blocks from (q_start + 1) // BLOCK_K on reach past some query of the block
    hi = tl.minimum(tl.cdiv(q_start + BLOCK_Q, BLOCK_K), hi)
    first_masked = (q_start + 1) // BLOCK_K
  return hi, first_masked


@triton.jit
def _kv_band(q_start, hi, BLOCK_K: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
             BAND_COUNT: tl.constexpr):
  """kv blocks [lo, hi) of the T5 band for the q block at q_start (flash_attention._kv_band), clipped to `hi`."""
  band_last: tl.constexpr = BAND_FIRST + (BAND_COUNT - 1) * BAND_STEP
  band_lo = tl.minimum(tl.maximum(tl.cdiv(q_start + BAND_FIRST, BLOCK_K), 0), hi)  # cdiv truncates: clamp
  return band_lo, tl.minimum((q_start + band_last) // BLOCK_K + 1, hi)


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, far_bias, q_start, lo, hi,
               REGION: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
               SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
               HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
               PRECISION: tl.constexpr):
  """Online softmax over kv blocks [lo, hi), all of one region and one masking."""
  offs_d = tl.arange(0, HEAD_DIM)
  for kv_block in tl.range(lo, hi):
    k_start = kv_block * BLOCK_K
    k_idx = k_start + tl.arange(0, BLOCK_K)
    rows = k_idx[:, None] * ROW_STRIDE + offs_d[None, :]
    k = tl.load(k_ptr + rows)
    raw = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED or REGION == _BAND:
      k_seg = tl.load(kv_seg_ptr + k_idx) if HAS_SEGMENTS else k_idx
      s = _logits2(raw, q_idx, k_idx, q_seg, k_seg, bias_ptr, far_bias, k_start - q_start, REGION, MASKED, False,
                   CAUSAL, HAS_SEGMENTS, SCALE2, BLOCK_Q, BLOCK_K, BAND_FIRST, BAND_STEP)
      m_new = tl.maximum(m_i, tl.max(s, 1))
      p = tl.math.exp2(s - m_new[:, None])
    else:  # scale and scalar bias kept apart: `logits - row value` is one multiply-add per element
      m_new = tl.maximum(m_i, tl.max(raw, 1) * SCALE2 + far_bias)
      p = tl.math.exp2(raw * SCALE2 + (far_bias - m_new)[:, None])
    correction = tl.math.exp2(m_i - m_new)
    l_i = l_i * correction + tl.sum(p, 1)
    v = tl.load(v_ptr + rows)
    acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=PRECISION)
    m_i = m_new
  return acc, m_i, l_i


@triton.jit
def _fwd_region(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, far_bias, q_start, lo, hi,
                first_masked, REGION: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
                PRECISION: tl.constexpr):
  """Blocks [lo, hi) of a region: those before `first_masked` (the causal diagonal) need no causal mask."""
  end, start = _cut(lo, hi, first_masked)
  acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, far_bias, q_start,
                             lo, end, REGION, HAS_SEGMENTS, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q,
                             BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, PRECISION)
  if CAUSAL:
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, far_bias,
                               q_start, start, hi, REGION, True, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q,
                               BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, PRECISION)
  return acc, m_i, l_i


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, band_ptr, ends_ptr, q_seg_ptr, kv_seg_ptr, o_ptr, lse_ptr,
                          Q_LEN: tl.constexpr, KV_LEN: tl.constexpr, HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                          SCALE2: tl.constexpr, T5: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_SEGMENTS: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
                          BAND_COUNT: tl.constexpr, PRECISION: tl.constexpr):
  q_block, batch, head = tl.program_id(0), tl.program_id(1) // HEADS, tl.program_id(1) % HEADS
  ROW_STRIDE: tl.constexpr = HEADS * HEAD_DIM
  q_start = q_block * BLOCK_Q
  q_idx = q_start + tl.arange(0, BLOCK_Q)
  q_rows = q_idx[:, None] * ROW_STRIDE + tl.arange(0, HEAD_DIM)[None, :]
  q_ptr += batch.to(tl.int64) * Q_LEN * ROW_STRIDE + head * HEAD_DIM
  o_ptr += batch.to(tl.int64) * Q_LEN * ROW_STRIDE + head * HEAD_DIM
  k_ptr += batch.to(tl.int64) * KV_LEN * ROW_STRIDE + head * HEAD_DIM
  v_ptr += batch.to(tl.int64) * KV_LEN * ROW_STRIDE + head * HEAD_DIM
  kv_seg_ptr += batch * KV_LEN
  q_seg = tl.load(q_seg_ptr + batch * Q_LEN + q_idx) if HAS_SEGMENTS else q_idx
  q = tl.load(q_ptr + q_rows)

  acc = tl.zeros((BLOCK_Q, HEAD_DIM), tl.float32)
  m_i = tl.full((BLOCK_Q,), _MASK, tl.float32)
  l_i = tl.zeros((BLOCK_Q,), tl.float32)
  hi, first_masked = _kv_blocks(q_start, KV_LEN, BLOCK_Q, BLOCK_K, CAUSAL)
  if T5:
    band_lo, band_hi = _kv_band(q_start, hi, BLOCK_K, BAND_FIRST, BAND_STEP, BAND_COUNT)
    bias_ptr = band_ptr + head * BAND_COUNT * BLOCK_Q * BLOCK_K
    acc, m_i, l_i = _fwd_region(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr,
                                tl.load(ends_ptr + 2 * head), q_start, 0, band_lo, first_masked, _FAR_LEFT, CAUSAL,
                                HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST,
                                BAND_STEP, PRECISION)
    acc, m_i, l_i = _fwd_region(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, 0.0, q_start,
                                band_lo, band_hi, first_masked, _BAND, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE,
                                BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, PRECISION)
    acc, m_i, l_i = _fwd_region(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr,
                                tl.load(ends_ptr + 2 * head + 1), q_start, band_hi, hi, first_masked, _FAR_RIGHT,
                                CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST,
                                BAND_STEP, PRECISION)
  else:
    acc, m_i, l_i = _fwd_region(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, band_ptr, 0.0, q_start,
                                0, hi, first_masked, _NO_BIAS, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q,
                                BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, PRECISION)
  empty = m_i == _MASK
  out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
  tl.store(o_ptr + q_rows, out.to(o_ptr.dtype.element_ty))
  lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
  tl.store(lse_ptr + (batch * HEADS + head) * Q_LEN + q_idx, lse)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def _diagonal_bucket_sums(ds, shift, lut_ptr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                          NUM_BUCKETS_PADDED: tl.constexpr, MAX_DISTANCE: tl.constexpr):
  """Per-bucket sums of a [BLOCK_Q, BLOCK_K] tile whose pair (i, j) has distance shift + j - i.

  Row i is rotated left by i (`tl.gather`, through shared memory): column u then holds the pairs with
  j - i = u - w * BLOCK_K, w = (u + i) // BLOCK_K the number of wraps. Per wrap count, column sums are diagonal
  sums, i.e. sums per distance, then a one-hot reduction into buckets.
  """
  u = tl.arange(0, BLOCK_K)
  j = u[None, :] + tl.arange(0, BLOCK_Q)[:, None]
  rotated = tl.gather(ds, j % BLOCK_K, axis=1)
  wraps = j // BLOCK_K
  bucket_ids = tl.arange(0, NUM_BUCKETS_PADDED)[None, :]
  sums = tl.zeros((NUM_BUCKETS_PADDED,), tl.float32)
  for w in tl.static_range((BLOCK_Q + BLOCK_K - 2) // BLOCK_K + 1):
    diagonal_sums = tl.sum(tl.where(wraps == w, rotated, 0.0), 0)
    distance = tl.minimum(tl.maximum(shift + u - w * BLOCK_K, -MAX_DISTANCE), MAX_DISTANCE)
    bucket = tl.load(lut_ptr + distance + MAX_DISTANCE)
    sums += tl.sum(tl.where(bucket[:, None] == bucket_ids, diagonal_sums[:, None], 0.0), 0)
  return sums


@triton.jit
def _dq_tiles(dq, buckets, far_sum, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, lut_ptr,
              far_bias, q_start, lo, hi, REGION: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_SEGMENTS: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr,
              BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
              NUM_BUCKETS_PADDED: tl.constexpr, MAX_DISTANCE: tl.constexpr, PRECISION: tl.constexpr):
  """dq over kv blocks [lo, hi) of one region and masking, with the table gradient: far tiles add their sum to
  `far_sum` (one bucket), band tiles their diagonal sums to `buckets`."""
  offs_d = tl.arange(0, HEAD_DIM)
  for kv_block in tl.range(lo, hi):
    k_start = kv_block * BLOCK_K
    k_idx = k_start + tl.arange(0, BLOCK_K)
    rows = k_idx[:, None] * ROW_STRIDE + offs_d[None, :]
    k = tl.load(k_ptr + rows)
    v = tl.load(v_ptr + rows)
    raw = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED or REGION == _BAND:
      k_seg = tl.load(kv_seg_ptr + k_idx) if HAS_SEGMENTS else k_idx
      s = _logits2(raw, q_idx, k_idx, q_seg, k_seg, bias_ptr, far_bias, k_start - q_start, REGION, MASKED, False,
                   CAUSAL, HAS_SEGMENTS, SCALE2, BLOCK_Q, BLOCK_K, BAND_FIRST, BAND_STEP)
      p = tl.math.exp2(s - lse[:, None])
    else:
      p = tl.math.exp2(raw * SCALE2 + (far_bias - lse)[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])  # gradient of the natural-log logits, and so of the bias
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    if REGION == _BAND:
      buckets += _diagonal_bucket_sums(ds, k_start - q_start, lut_ptr, BLOCK_Q, BLOCK_K, NUM_BUCKETS_PADDED,
                                       MAX_DISTANCE)
    elif REGION != _NO_BIAS:
      far_sum += tl.sum(tl.sum(ds, 1), 0)
  return dq, buckets, far_sum


@triton.jit
def _dq_region(dq, buckets, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, lut_ptr,
               far_bias, q_start, lo, hi, first_masked, REGION: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_SEGMENTS: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
               NUM_BUCKETS_PADDED: tl.constexpr, MAX_DISTANCE: tl.constexpr, PRECISION: tl.constexpr):
  """_dq_tiles over a region, cut at the causal diagonal like _fwd_region; returns the far tiles' sum apart."""
  end, start = _cut(lo, hi, first_masked)
  far_sum = 0.0
  dq, buckets, far_sum = _dq_tiles(dq, buckets, far_sum, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr,
                                   bias_ptr, lut_ptr, far_bias, q_start, lo, end, REGION, HAS_SEGMENTS, CAUSAL,
                                   HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST,
                                   BAND_STEP, NUM_BUCKETS_PADDED, MAX_DISTANCE, PRECISION)
  if CAUSAL:
    dq, buckets, far_sum = _dq_tiles(dq, buckets, far_sum, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr,
                                     kv_seg_ptr, bias_ptr, lut_ptr, far_bias, q_start, start, hi, REGION, True,
                                     CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q, BLOCK_K, HEAD_DIM,
                                     BAND_FIRST, BAND_STEP, NUM_BUCKETS_PADDED, MAX_DISTANCE, PRECISION)
  return dq, buckets, far_sum


@triton.jit
def _attention_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, band_ptr, ends_ptr, lut_ptr, q_seg_ptr,
                         kv_seg_ptr, dq_ptr, dtable_ptr, Q_LEN: tl.constexpr, KV_LEN: tl.constexpr,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr,
                         BLOCK_K: tl.constexpr, SCALE: tl.constexpr, SCALE2: tl.constexpr, T5: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BAND_FIRST: tl.constexpr,
                         BAND_STEP: tl.constexpr, BAND_COUNT: tl.constexpr, NUM_BUCKETS_PADDED: tl.constexpr,
                         MAX_DISTANCE: tl.constexpr, LEFT_BUCKET: tl.constexpr, RIGHT_BUCKET: tl.constexpr,
                         PRECISION: tl.constexpr):
  q_block, batch, head = tl.program_id(0), tl.program_id(1) // HEADS, tl.program_id(1) % HEADS
  ROW_STRIDE: tl.constexpr = HEADS * HEAD_DIM
  q_start = q_block * BLOCK_Q
  q_idx = q_start + tl.arange(0, BLOCK_Q)
  q_rows = q_idx[:, None] * ROW_STRIDE + tl.arange(0, HEAD_DIM)[None, :]
  q_offset = batch.to(tl.int64) * Q_LEN * ROW_STRIDE + head * HEAD_DIM
  k_ptr += batch.to(tl.int64) * KV_LEN * ROW_STRIDE + head * HEAD_DIM
  v_ptr += batch.to(tl.int64) * KV_LEN * ROW_STRIDE + head * HEAD_DIM
  kv_seg_ptr += batch * KV_LEN
  q_seg = tl.load(q_seg_ptr + batch * Q_LEN + q_idx) if HAS_SEGMENTS else q_idx
  q = tl.load(q_ptr + q_offset + q_rows)
  do = tl.load(do_ptr + q_offset + q_rows)
  row = (batch * HEADS + head) * Q_LEN + q_idx
  lse, delta = tl.load(lse_ptr + row), tl.load(delta_ptr + row)

  dq = tl.zeros((BLOCK_Q, HEAD_DIM), tl.float32)
  buckets = tl.zeros((NUM_BUCKETS_PADDED,), tl.float32)
  hi, first_masked = _kv_blocks(q_start, KV_LEN, BLOCK_Q, BLOCK_K, CAUSAL)
  if T5:
    band_lo, band_hi = _kv_band(q_start, hi, BLOCK_K, BAND_FIRST, BAND_STEP, BAND_COUNT)
    bias_ptr = band_ptr + head * BAND_COUNT * BLOCK_Q * BLOCK_K
    dq, buckets, left = _dq_region(dq, buckets, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr,
                                   lut_ptr, tl.load(ends_ptr + 2 * head), q_start, 0, band_lo, first_masked,
                                   _FAR_LEFT, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q, BLOCK_K, HEAD_DIM,
                                   BAND_FIRST, BAND_STEP, NUM_BUCKETS_PADDED, MAX_DISTANCE, PRECISION)
    dq, buckets, _ = _dq_region(dq, buckets, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr,
                                lut_ptr, 0.0, q_start, band_lo, band_hi, first_masked, _BAND, CAUSAL, HAS_SEGMENTS,
                                SCALE2, ROW_STRIDE, BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP,
                                NUM_BUCKETS_PADDED, MAX_DISTANCE, PRECISION)
    dq, buckets, right = _dq_region(dq, buckets, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr,
                                    bias_ptr, lut_ptr, tl.load(ends_ptr + 2 * head + 1), q_start, band_hi, hi,
                                    first_masked, _FAR_RIGHT, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q,
                                    BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, NUM_BUCKETS_PADDED, MAX_DISTANCE,
                                    PRECISION)
    bucket_idx = tl.arange(0, NUM_BUCKETS_PADDED)
    buckets += tl.where(bucket_idx == LEFT_BUCKET, left, 0.0) + tl.where(bucket_idx == RIGHT_BUCKET, right, 0.0)
    program = (batch * HEADS + head) * (Q_LEN // BLOCK_Q) + q_block
    tl.store(dtable_ptr + program * NUM_BUCKETS_PADDED + bucket_idx, buckets)
  else:
    dq, buckets, _ = _dq_region(dq, buckets, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, band_ptr,
                                lut_ptr, 0.0, q_start, 0, hi, first_masked, _NO_BIAS, CAUSAL, HAS_SEGMENTS, SCALE2,
                                ROW_STRIDE, BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, NUM_BUCKETS_PADDED,
                                MAX_DISTANCE, PRECISION)
  tl.store(dq_ptr + q_offset + q_rows, (dq * SCALE).to(dq_ptr.dtype.element_ty))


@triton.jit
def _dkv_tiles(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr, far_bias,
               k_start, lo, hi, REGION: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_SEGMENTS: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
               PRECISION: tl.constexpr):
  """dk, dv over q blocks [lo, hi) of one region and masking, on [keys, queries] tiles."""
  offs_d = tl.arange(0, HEAD_DIM)
  for q_block in tl.range(lo, hi):
    q_start = q_block * BLOCK_Q
    q_idx = q_start + tl.arange(0, BLOCK_Q)
    rows = q_idx[:, None] * ROW_STRIDE + offs_d[None, :]
    q = tl.load(q_ptr + rows)
    do = tl.load(do_ptr + rows)
    lse, delta = tl.load(lse_ptr + q_idx), tl.load(delta_ptr + q_idx)
    raw = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    if MASKED or REGION == _BAND:
      q_seg = tl.load(q_seg_ptr + q_idx) if HAS_SEGMENTS else q_idx
      s = _logits2(raw, q_idx, k_idx, q_seg, k_seg, bias_ptr, far_bias, k_start - q_start, REGION, MASKED, True,
                   CAUSAL, HAS_SEGMENTS, SCALE2, BLOCK_Q, BLOCK_K, BAND_FIRST, BAND_STEP)
      p = tl.math.exp2(s - lse[None, :])
    else:
      p = tl.math.exp2(raw * SCALE2 + (far_bias - lse)[None, :])
    dv = tl.dot(p.to(do.dtype), do, dv, input_precision=PRECISION)
    dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds = p * (dp - delta[None, :])
    dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PRECISION)
  return dk, dv


@triton.jit
def _dkv_region(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr, far_bias,
                k_start, lo, hi, first_unmasked, REGION: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_SEGMENTS: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr,
                BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
                PRECISION: tl.constexpr):
  """_dkv_tiles over a region: with causal masking, the q blocks before `first_unmasked` straddle the diagonal."""
  end, start = _cut(lo, hi, first_unmasked)
  if CAUSAL:
    dk, dv = _dkv_tiles(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr,
                        far_bias, k_start, lo, end, REGION, True, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q,
                        BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, PRECISION)
  dk, dv = _dkv_tiles(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr, far_bias,
                      k_start, start, hi, REGION, HAS_SEGMENTS, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q,
                      BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, PRECISION)
  return dk, dv


@triton.jit
def _attention_dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, band_ptr, ends_ptr, q_seg_ptr,
                          kv_seg_ptr, dk_ptr, dv_ptr, Q_LEN: tl.constexpr, KV_LEN: tl.constexpr,
                          HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr,
                          BLOCK_K: tl.constexpr, SCALE: tl.constexpr, SCALE2: tl.constexpr, T5: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BAND_FIRST: tl.constexpr,
                          BAND_STEP: tl.constexpr, BAND_COUNT: tl.constexpr, PRECISION: tl.constexpr):
  kv_block, batch, head = tl.program_id(0), tl.program_id(1) // HEADS, tl.program_id(1) % HEADS
  ROW_STRIDE: tl.constexpr = HEADS * HEAD_DIM
  k_start = kv_block * BLOCK_K
  k_idx = k_start + tl.arange(0, BLOCK_K)
  k_rows = k_idx[:, None] * ROW_STRIDE + tl.arange(0, HEAD_DIM)[None, :]
  kv_offset = batch.to(tl.int64) * KV_LEN * ROW_STRIDE + head * HEAD_DIM
  q_ptr += batch.to(tl.int64) * Q_LEN * ROW_STRIDE + head * HEAD_DIM
  do_ptr += batch.to(tl.int64) * Q_LEN * ROW_STRIDE + head * HEAD_DIM
  lse_ptr += (batch * HEADS + head) * Q_LEN
  delta_ptr += (batch * HEADS + head) * Q_LEN
  q_seg_ptr += batch * Q_LEN
  k_seg = tl.load(kv_seg_ptr + batch * KV_LEN + k_idx) if HAS_SEGMENTS else k_idx
  k = tl.load(k_ptr + kv_offset + k_rows)
  v = tl.load(v_ptr + kv_offset + k_rows)

  dk = tl.zeros((BLOCK_K, HEAD_DIM), tl.float32)
  dv = tl.zeros((BLOCK_K, HEAD_DIM), tl.float32)
  lo = 0
  hi = Q_LEN // BLOCK_Q
  first_unmasked = lo
  if CAUSAL:  # q blocks before cdiv(k_start + BLOCK_K - 1, BLOCK_Q) hold a query before some key of the block
    lo = k_start // BLOCK_Q
    first_unmasked = tl.cdiv(k_start + BLOCK_K - 1, BLOCK_Q)
  if T5:
    # Walking q blocks, the band's keys lie after the queries of later blocks: far right comes first.
    band_last: tl.constexpr = BAND_FIRST + (BAND_COUNT - 1) * BAND_STEP
    band_lo = tl.minimum(tl.maximum(tl.cdiv(k_start - band_last, BLOCK_Q), lo), hi)
    band_hi = tl.maximum(tl.minimum((k_start - BAND_FIRST) // BLOCK_Q + 1, hi), band_lo)
    bias_ptr = band_ptr + head * BAND_COUNT * BLOCK_Q * BLOCK_K
    dk, dv = _dkv_region(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr,
                         tl.load(ends_ptr + 2 * head + 1), k_start, lo, band_lo, first_unmasked, _FAR_RIGHT, CAUSAL,
                         HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP,
                         PRECISION)
    dk, dv = _dkv_region(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr, 0.0,
                         k_start, band_lo, band_hi, first_unmasked, _BAND, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE,
                         BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, PRECISION)
    dk, dv = _dkv_region(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr,
                         tl.load(ends_ptr + 2 * head), k_start, band_hi, hi, first_unmasked, _FAR_LEFT, CAUSAL,
                         HAS_SEGMENTS, SCALE2, ROW_STRIDE, BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP,
                         PRECISION)
  else:
    dk, dv = _dkv_region(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, band_ptr, 0.0,
                         k_start, lo, hi, first_unmasked, _NO_BIAS, CAUSAL, HAS_SEGMENTS, SCALE2, ROW_STRIDE,
                         BLOCK_Q, BLOCK_K, HEAD_DIM, BAND_FIRST, BAND_STEP, PRECISION)
  tl.store(dk_ptr + kv_offset + k_rows, (dk * SCALE).to(dk_ptr.dtype.element_ty))
  tl.store(dv_ptr + kv_offset + k_rows, dv.to(dv_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------- launchers


def _common(q, k, t5_bias, q_seg, kv_seg, scale, causal, band):
  """Arguments shared by the three kernels: the T5 inputs (or placeholders) and the compile-time constants."""
  placeholder = jnp.zeros((1,), jnp.float32)
  band_tiles, ends = t5_bias if t5_bias is not None else (placeholder, placeholder)
  first, step, count = band if t5_bias is not None else (0, 1, 1)
  arrays = dict(band=band_tiles, ends=ends, q_seg=placeholder if q_seg is None else q_seg,
                kv_seg=placeholder if kv_seg is None else kv_seg)
  constants = dict(Q_LEN=q.shape[1], KV_LEN=k.shape[1], HEADS=q.shape[2], HEAD_DIM=q.shape[3],
                   SCALE2=scale * LOG2E, T5=t5_bias is not None, CAUSAL=causal,
                   HAS_SEGMENTS=q_seg is not None, BAND_FIRST=first, BAND_STEP=step, BAND_COUNT=count,
                   PRECISION="ieee" if q.dtype == jnp.float32 else "tf32")
  return arrays, constants


def attention_fwd(q, k, v, t5_bias, band, q_seg, kv_seg, *, scale, causal, blocks):
  """(out [B, Sq, H, D], lse2 [B, H, Sq]) on block-padded inputs. t5_bias: (band tiles [H, count * bq, bk],
  far biases [H, 2]) in base 2, or None; band = (first shift, step, count) of the band tiles."""
  batch, q_len, heads, _ = q.shape
  a, constants = _common(q, k, t5_bias, q_seg, kv_seg, scale, causal, band)
  return jt.triton_call(
      q, k, v, a["band"], a["ends"], a["q_seg"], a["kv_seg"], kernel=_attention_fwd_kernel,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      grid=(q_len // blocks.block_q, batch * heads), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
      BLOCK_Q=blocks.block_q, BLOCK_K=blocks.block_k, **constants)


def attention_bwd(q, k, v, dout, lse2, delta, t5_bias, band, lut, q_seg, kv_seg, *, scale, causal, blocks,
                  num_buckets_padded, max_distance, end_buckets):
  """(dq, dk, dv, per-program table gradients [B, H, Sq / bq, num_buckets_padded] or None) on block-padded
  inputs; delta [B, H, Sq] is rowsum(out * dout) minus the lse cotangent, lut the padded bucket of each
  distance + max_distance, end_buckets the buckets of the far left and far right."""
  batch, q_len, heads, _ = q.shape
  bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
  a, constants = _common(q, k, t5_bias, q_seg, kv_seg, scale, causal, band)
  launch = dict(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd, BLOCK_Q=bq, BLOCK_K=bk,
                SCALE=scale, **constants)
  t5 = t5_bias is not None
  dtable_shape = (batch, heads, q_len // bq, num_buckets_padded) if t5 else (1,)
  dq, dtable = jt.triton_call(
      q, k, v, dout, lse2, delta, a["band"], a["ends"], lut if t5 else a["ends"], a["q_seg"], a["kv_seg"],
      kernel=_attention_dq_kernel,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(dtable_shape, jnp.float32)],
      grid=(q_len // bq, batch * heads), NUM_BUCKETS_PADDED=num_buckets_padded if t5 else 1,
      MAX_DISTANCE=max_distance, LEFT_BUCKET=end_buckets[0], RIGHT_BUCKET=end_buckets[1], **launch)
  if t5:  # [H, count * bq, bk] -> [H, count * bk, bq]
    a["band"] = a["band"].reshape(heads, -1, bq, bk).swapaxes(2, 3).reshape(heads, -1, bq)
  dk, dv = jt.triton_call(
      q, k, v, dout, lse2, delta, a["band"], a["ends"], a["q_seg"], a["kv_seg"], kernel=_attention_dkv_kernel,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(k.shape[1] // bk, batch * heads), **launch)
  return dq, dk, dv, dtable if t5 else None
