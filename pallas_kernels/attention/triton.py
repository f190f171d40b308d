"""Flash attention as raw Triton kernels, for the common cases: no bias, or the T5 bias without positions.

The algorithm of `pallas.py`, with the same helper names (base-2 online softmax, the T5 bias from far scalars and
precomputed band tiles, segment and causal masks, lse = +inf for rows that see no key, per-program partial table
gradients), written against Triton directly. On Hopper this runs faster than the Pallas lowering of the same loops
(benchmarks/notes_attention.md), for two reasons Pallas cannot express: the band tiles' table gradient is skewed in
shared memory (`tl.gather`) instead of through a global scratch, and causal tiles below the diagonal skip the mask.
The dq kernel leaves each band tile's table gradient as diagonal sums, one slot per distance, which `backward` maps
to buckets with one small matmul after summing the programs, instead of one-hot bucket sums per tile in the
kernel (at S=512 the band table gradient took a fifth of the attention's forward + backward: benchmarks/
notes_attention.md, "Where the bias time goes").

Launched only through `common.triton_call`: compiled through jax-triton on a GPU, Triton's interpreter off it. Load
this module with `common.load_triton_kernels` (the interpreter must be chosen before `@triton.jit` runs).

Orientation: the forward and dq kernels hold [queries, keys] tiles; the dk/dv kernel holds [keys, queries] tiles,
so that its three matmuls need no transposed register tile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from pallas_kernels import common
from pallas_kernels.attention.buckets import band_shifts, sum_into_buckets
from pallas_kernels.attention.config import Config, segment_block_ranges

_MASK = tl.constexpr(common.MASK)
_LOG2E = tl.constexpr(common.LOG2E)
# A hidden key's raw logit under KEY_MASK: scaled by any SCALE2 below 1e18 it stays finite, and far below any real one.
_HIDDEN_RAW = tl.constexpr(-1e20)
# Regions of the kv (or q) loop: the tiles before the T5 band (one bucket), the band, the tiles after it.
_NO_BIAS, _FAR_LEFT, _BAND, _FAR_RIGHT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
# The forward's band loop streams a float32 [bq, bk] bias tile beside k and v. Pipelined as deep as the far loops
# (3 stages) it took the whole kernel from 96 to 128 KiB of shared memory (D=64, 128 x 64 blocks, compiled for sm90):
# one program per SM instead of two, and the forward fell from 382 to 289 TFLOP/s at S=4,096 on the H200
# (benchmarks/notes_attention.md). Two stages keep it at 80 KiB, and the forward at 385 TFLOP/s.
_FWD_BAND_STAGES = tl.constexpr(2)


# ------------------------------------------------------------------------------------------------ tiles


@triton.jit
def _hide_keys(raw, k_ids):
  """KEY_MASK: a [queries, keys] tile's raw logits with hidden keys (id 0) at _HIDDEN_RAW, so that every formula of
  unmasked tiles applies (the fast path included); their exp2 is 0 once the row has met any visible key, and a row
  meets one in its first visited block or its earlier ones are rescaled to 0 (every row of a KEY_MASK call sees the
  same keys, and its block range holds only blocks with visible keys at both ends)."""
  return tl.where(k_ids[None, :] != 0, raw, _HIDDEN_RAW)


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
    bias = tl.load(bias_ptr + offsets).to(tl.float32) * _LOG2E  # exact table entries: far tiles' float32 value
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
def _tile_probabilities(raw, lse, q_idx, k_idx, q_seg, k_seg, bias_ptr, far_bias, shift, REGION: tl.constexpr,
                        MASKED: tl.constexpr, KEYS_FIRST: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_SEGMENTS: tl.constexpr, SCALE2: tl.constexpr, BLOCK_Q: tl.constexpr,
                        BLOCK_K: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr):
  """The backward's p of one tile: its logits against the forward's lse (both kernels of the backward)."""
  if MASKED or REGION == _BAND:
    s = _logits2(raw, q_idx, k_idx, q_seg, k_seg, bias_ptr, far_bias, shift, REGION=REGION, MASKED=MASKED,
                 KEYS_FIRST=KEYS_FIRST, CAUSAL=CAUSAL, HAS_SEGMENTS=HAS_SEGMENTS, SCALE2=SCALE2, BLOCK_Q=BLOCK_Q,
                 BLOCK_K=BLOCK_K, BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP)
    if KEYS_FIRST:
      p = tl.math.exp2(s - lse[None, :])
    else:
      p = tl.math.exp2(s - lse[:, None])
  else:  # scale and scalar bias kept apart: `logits - lse` is one multiply-add per element
    if KEYS_FIRST:
      p = tl.math.exp2(raw * SCALE2 + (far_bias - lse)[None, :])
    else:
      p = tl.math.exp2(raw * SCALE2 + (far_bias - lse)[:, None])
  return p


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
def _kv_band(q_start, lo, hi, BLOCK_K: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
             BAND_COUNT: tl.constexpr):
  """kv blocks [band_lo, band_hi) of the T5 band for the q block at q_start (pallas._kv_band), within [lo, hi)."""
  band_last: tl.constexpr = BAND_FIRST + (BAND_COUNT - 1) * BAND_STEP
  band_lo = tl.minimum(tl.maximum(tl.cdiv(q_start + BAND_FIRST, BLOCK_K), lo), hi)  # cdiv truncates: clamp
  return band_lo, tl.maximum(tl.minimum((q_start + band_last) // BLOCK_K + 1, hi), band_lo)


@triton.jit
def _segment_blocks(range_ptr, lo, hi):
  """[lo, hi) narrowed to the blocks of `segment_block_ranges` at range_ptr: those that can share a segment."""
  hi = tl.minimum(hi, tl.load(range_ptr + 1))
  return tl.minimum(tl.maximum(lo, tl.load(range_ptr)), hi), hi


@triton.jit
def _q_band(k_start, lo, hi, BLOCK_Q: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
            BAND_COUNT: tl.constexpr):
  """q blocks [band_lo, band_hi) of the T5 band for the kv block at k_start (pallas._q_band), within [lo, hi)."""
  band_last: tl.constexpr = BAND_FIRST + (BAND_COUNT - 1) * BAND_STEP
  band_lo = tl.minimum(tl.maximum(tl.cdiv(k_start - band_last, BLOCK_Q), lo), hi)
  return band_lo, tl.maximum(tl.minimum((k_start - BAND_FIRST) // BLOCK_Q + 1, hi), band_lo)


@triton.jit
def _region_blocks(lo, hi, band_lo, band_hi, REGION: tl.constexpr, KV_LOOP: tl.constexpr):
  """Blocks [start, stop) of REGION within [lo, hi), band_[lo, hi) clipped to it (pallas._loops): walking kv
  blocks, the far left comes before the band; walking q blocks, the far right."""
  start = lo
  stop = hi
  if REGION == _BAND:
    start = band_lo
    stop = band_hi
  elif REGION == (_FAR_LEFT if KV_LOOP else _FAR_RIGHT):
    stop = band_lo
  elif REGION != _NO_BIAS:
    start = band_hi
  return start, stop


@triton.jit
def _far_bias(ends_ptr, REGION: tl.constexpr):
  """The one bias (base 2) of a far region's tiles: ends_ptr[0] far left, ends_ptr[1] far right; else 0."""
  bias = 0.0
  if REGION == _FAR_LEFT:
    bias = tl.load(ends_ptr)
  elif REGION == _FAR_RIGHT:
    bias = tl.load(ends_ptr + 1)
  return bias


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, far_bias, q_start, lo, hi,
               REGION: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
               KEY_MASK: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
               PRECISION: tl.constexpr):
  """Online softmax over kv blocks [lo, hi), all of one region and one masking."""
  offs_d = tl.arange(0, HEAD_DIM)
  for kv_block in tl.range(lo, hi, num_stages=_FWD_BAND_STAGES if REGION == _BAND else None):
    k_start = kv_block * BLOCK_K
    k_idx = k_start + tl.arange(0, BLOCK_K)
    rows = k_idx[:, None] * ROW_STRIDE + offs_d[None, :]
    k = tl.load(k_ptr + rows)
    raw = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if KEY_MASK and not MASKED:
      raw = _hide_keys(raw, tl.load(kv_seg_ptr + k_idx))
    if MASKED or REGION == _BAND:
      k_seg = tl.load(kv_seg_ptr + k_idx) if HAS_SEGMENTS else k_idx
      s = _logits2(raw, q_idx, k_idx, q_seg, k_seg, bias_ptr, far_bias, k_start - q_start, REGION=REGION,
                   MASKED=MASKED, KEYS_FIRST=False, CAUSAL=CAUSAL, HAS_SEGMENTS=HAS_SEGMENTS, SCALE2=SCALE2,
                   BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP)
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
                KEY_MASK: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr,
                BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
                PRECISION: tl.constexpr):
  """Blocks [lo, hi) of a region: those before `first_masked` (the causal diagonal) need no causal mask."""
  end, start = _cut(lo, hi, first_masked)
  acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, far_bias, q_start,
                             lo, end, REGION=REGION, MASKED=HAS_SEGMENTS and not KEY_MASK, CAUSAL=CAUSAL,
                             HAS_SEGMENTS=HAS_SEGMENTS, KEY_MASK=KEY_MASK,
                             SCALE2=SCALE2, ROW_STRIDE=ROW_STRIDE, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K,
                             HEAD_DIM=HEAD_DIM, BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP, PRECISION=PRECISION)
  if CAUSAL:
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, far_bias, q_start,
                               start, hi, REGION=REGION, MASKED=True, CAUSAL=CAUSAL, HAS_SEGMENTS=HAS_SEGMENTS,
                               KEY_MASK=KEY_MASK, SCALE2=SCALE2, ROW_STRIDE=ROW_STRIDE, BLOCK_Q=BLOCK_Q,
                               BLOCK_K=BLOCK_K, HEAD_DIM=HEAD_DIM, BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP,
                               PRECISION=PRECISION)
  return acc, m_i, l_i


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, band_ptr, ends_ptr, q_seg_ptr, kv_seg_ptr, kv_range_ptr, o_ptr,
                          lse_ptr,
                          Q_LEN: tl.constexpr, KV_LEN: tl.constexpr, HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                          SCALE2: tl.constexpr, T5: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_SEGMENTS: tl.constexpr, KEY_MASK: tl.constexpr, BAND_FIRST: tl.constexpr,
                          BAND_STEP: tl.constexpr, BAND_COUNT: tl.constexpr, PRECISION: tl.constexpr):
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
  lo = 0
  hi, first_masked = _kv_blocks(q_start, KV_LEN, BLOCK_Q, BLOCK_K, CAUSAL)
  if HAS_SEGMENTS:
    lo, hi = _segment_blocks(kv_range_ptr + (batch * (Q_LEN // BLOCK_Q) + q_block) * 2, lo, hi)
  band_lo, band_hi = _kv_band(q_start, lo, hi, BLOCK_K, BAND_FIRST, BAND_STEP, BAND_COUNT)
  bias_ptr = band_ptr + head * BAND_COUNT * BLOCK_Q * BLOCK_K
  for region in tl.static_range(_FAR_LEFT if T5 else _NO_BIAS, _FAR_RIGHT + 1 if T5 else _NO_BIAS + 1):
    start, end = _region_blocks(lo, hi, band_lo, band_hi, REGION=region, KV_LOOP=True)
    acc, m_i, l_i = _fwd_region(
        acc, m_i, l_i, q, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr,
        _far_bias(ends_ptr + 2 * head, REGION=region), q_start, start, end,
        first_masked, REGION=region, CAUSAL=CAUSAL, HAS_SEGMENTS=HAS_SEGMENTS, KEY_MASK=KEY_MASK, SCALE2=SCALE2,
        ROW_STRIDE=ROW_STRIDE, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, HEAD_DIM=HEAD_DIM, BAND_FIRST=BAND_FIRST,
        BAND_STEP=BAND_STEP, PRECISION=PRECISION)
  empty = m_i == _MASK
  out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
  tl.store(o_ptr + q_rows, out.to(o_ptr.dtype.element_ty))
  lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
  tl.store(lse_ptr + (batch * HEADS + head) * Q_LEN + q_idx, lse)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def _store_diagonal_sums(ds, out_ptr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, WRAPS: tl.constexpr):
  """The diagonal sums of a [BLOCK_Q, BLOCK_K] tile: out_ptr[w * BLOCK_K + u] sums the pairs with j - i =
  u - w * BLOCK_K, w < WRAPS (`_slot_buckets` maps them to buckets, outside the kernel).

  Row i is rotated left by i (`tl.gather`, through shared memory): column u then holds the pairs with
  j - i = u - w * BLOCK_K, w = (u + i) // BLOCK_K the number of wraps; per wrap count, column sums.
  """
  u = tl.arange(0, BLOCK_K)
  j = u[None, :] + tl.arange(0, BLOCK_Q)[:, None]
  rotated = tl.gather(ds, j % BLOCK_K, axis=1)
  wraps = j // BLOCK_K
  for w in tl.static_range(WRAPS):
    tl.store(out_ptr + w * BLOCK_K + u, tl.sum(tl.where(wraps == w, rotated, 0.0), 0))


@triton.jit
def _dq_tiles(dq, far_rows, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, slots_ptr, far_bias,
              q_start, lo, hi, REGION: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_SEGMENTS: tl.constexpr, KEY_MASK: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr,
              BAND_STEP: tl.constexpr, WRAPS: tl.constexpr, PRECISION: tl.constexpr):
  """dq over kv blocks [lo, hi) of one region and masking, with the table gradient: far tiles add their sum to
  `far_rows` (one bucket; summed over rows once per region: a sum across warps per tile would wait at a barrier),
  band tiles store their diagonal sums in their shift's slots of the program's row."""
  offs_d = tl.arange(0, HEAD_DIM)
  for kv_block in tl.range(lo, hi):
    k_start = kv_block * BLOCK_K
    k_idx = k_start + tl.arange(0, BLOCK_K)
    rows = k_idx[:, None] * ROW_STRIDE + offs_d[None, :]
    k = tl.load(k_ptr + rows)
    v = tl.load(v_ptr + rows)
    raw = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    k_seg = tl.load(kv_seg_ptr + k_idx) if HAS_SEGMENTS else k_idx
    if KEY_MASK and not MASKED:
      raw = _hide_keys(raw, k_seg)
    p = _tile_probabilities(raw, lse, q_idx, k_idx, q_seg, k_seg, bias_ptr, far_bias, k_start - q_start,
                            REGION=REGION, MASKED=MASKED, KEYS_FIRST=False, CAUSAL=CAUSAL,
                            HAS_SEGMENTS=HAS_SEGMENTS, SCALE2=SCALE2, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K,
                            BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])  # gradient of the natural-log logits, and so of the bias
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    if REGION == _BAND:
      band = (k_start - q_start - BAND_FIRST) // BAND_STEP
      _store_diagonal_sums(ds, slots_ptr + band * WRAPS * BLOCK_K, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, WRAPS=WRAPS)
    elif REGION != _NO_BIAS:
      far_rows += tl.sum(ds, 1)
  return dq, far_rows


@triton.jit
def _dq_region(dq, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, slots_ptr, far_bias, q_start,
               lo, hi, first_masked, REGION: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
               KEY_MASK: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
               WRAPS: tl.constexpr, PRECISION: tl.constexpr):
  """_dq_tiles over a region, cut at the causal diagonal like _fwd_region; returns the far tiles' row sums apart."""
  end, start = _cut(lo, hi, first_masked)
  far_rows = tl.zeros((BLOCK_Q,), tl.float32)
  dq, far_rows = _dq_tiles(
      dq, far_rows, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, slots_ptr, far_bias,
      q_start, lo, end, REGION=REGION, MASKED=HAS_SEGMENTS and not KEY_MASK, CAUSAL=CAUSAL, HAS_SEGMENTS=HAS_SEGMENTS,
      KEY_MASK=KEY_MASK, SCALE2=SCALE2, ROW_STRIDE=ROW_STRIDE, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, HEAD_DIM=HEAD_DIM,
      BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP, WRAPS=WRAPS, PRECISION=PRECISION)
  if CAUSAL:
    dq, far_rows = _dq_tiles(
        dq, far_rows, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, slots_ptr, far_bias,
        q_start, start, hi, REGION=REGION, MASKED=True, CAUSAL=CAUSAL, HAS_SEGMENTS=HAS_SEGMENTS, KEY_MASK=KEY_MASK,
        SCALE2=SCALE2, ROW_STRIDE=ROW_STRIDE, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, HEAD_DIM=HEAD_DIM,
        BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP, WRAPS=WRAPS, PRECISION=PRECISION)
  return dq, far_rows


@triton.jit
def _attention_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, band_ptr, ends_ptr, q_seg_ptr, kv_seg_ptr,
                         kv_range_ptr, dq_ptr, slots_ptr, Q_LEN: tl.constexpr, KV_LEN: tl.constexpr,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                         SCALE: tl.constexpr, SCALE2: tl.constexpr, T5: tl.constexpr, CAUSAL: tl.constexpr,
                         HAS_SEGMENTS: tl.constexpr, KEY_MASK: tl.constexpr, BAND_FIRST: tl.constexpr,
                         BAND_STEP: tl.constexpr, BAND_COUNT: tl.constexpr, WRAPS: tl.constexpr,
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
  # This program's row of table-gradient slots (`_slot_buckets`): each band shift's diagonal sums, then the far
  # left and far right sums.
  slots_ptr += ((batch * HEADS + head) * (Q_LEN // BLOCK_Q) + q_block) * (BAND_COUNT * WRAPS * BLOCK_K + 2)
  lo = 0
  hi, first_masked = _kv_blocks(q_start, KV_LEN, BLOCK_Q, BLOCK_K, CAUSAL)
  if HAS_SEGMENTS:
    lo, hi = _segment_blocks(kv_range_ptr + (batch * (Q_LEN // BLOCK_Q) + q_block) * 2, lo, hi)
  band_lo, band_hi = _kv_band(q_start, lo, hi, BLOCK_K, BAND_FIRST, BAND_STEP, BAND_COUNT)
  bias_ptr = band_ptr + head * BAND_COUNT * BLOCK_Q * BLOCK_K
  for region in tl.static_range(_FAR_LEFT if T5 else _NO_BIAS, _FAR_RIGHT + 1 if T5 else _NO_BIAS + 1):
    start, end = _region_blocks(lo, hi, band_lo, band_hi, REGION=region, KV_LOOP=True)
    dq, far_rows = _dq_region(
        dq, q, do, lse, delta, q_idx, q_seg, k_ptr, v_ptr, kv_seg_ptr, bias_ptr, slots_ptr,
        _far_bias(ends_ptr + 2 * head, REGION=region), q_start, start, end,
        first_masked, REGION=region, CAUSAL=CAUSAL, HAS_SEGMENTS=HAS_SEGMENTS, KEY_MASK=KEY_MASK, SCALE2=SCALE2,
        ROW_STRIDE=ROW_STRIDE, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, HEAD_DIM=HEAD_DIM, BAND_FIRST=BAND_FIRST,
        BAND_STEP=BAND_STEP, WRAPS=WRAPS, PRECISION=PRECISION)
    if region != _NO_BIAS and region != _BAND:  # far left, then far right
      tl.store(slots_ptr + BAND_COUNT * WRAPS * BLOCK_K + (1 if region == _FAR_RIGHT else 0), tl.sum(far_rows, 0))
  if T5:  # the band shifts no kv block of this program had: zero slots
    u = tl.arange(0, BLOCK_K)
    for band in tl.static_range(BAND_COUNT):
      k_start = q_start + BAND_FIRST + band * BAND_STEP
      visited = ((k_start >= 0) & (k_start % BLOCK_K == 0) & (k_start // BLOCK_K >= band_lo)
                 & (k_start // BLOCK_K < band_hi))
      for w in tl.static_range(WRAPS):
        tl.store(slots_ptr + (band * WRAPS + w) * BLOCK_K + u, tl.zeros((BLOCK_K,), tl.float32), mask=~visited)
  tl.store(dq_ptr + q_offset + q_rows, (dq * SCALE).to(dq_ptr.dtype.element_ty))


@triton.jit
def _dkv_tiles(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr, far_bias, k_start,
               lo, hi, REGION: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
               KEY_MASK: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr,
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
    q_seg = tl.load(q_seg_ptr + q_idx) if HAS_SEGMENTS else q_idx
    p = _tile_probabilities(raw, lse, q_idx, k_idx, q_seg, k_seg, bias_ptr, far_bias, k_start - q_start,
                            REGION=REGION, MASKED=MASKED, KEYS_FIRST=True, CAUSAL=CAUSAL,
                            HAS_SEGMENTS=HAS_SEGMENTS, SCALE2=SCALE2, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K,
                            BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP)
    dv = tl.dot(p.to(do.dtype), do, dv, input_precision=PRECISION)
    dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds = p * (dp - delta[None, :])
    dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PRECISION)
  return dk, dv


@triton.jit
def _dkv_region(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr, far_bias, k_start,
                lo, hi, first_unmasked, REGION: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                KEY_MASK: tl.constexpr, SCALE2: tl.constexpr, ROW_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr,
                BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
                PRECISION: tl.constexpr):
  """_dkv_tiles over a region: with causal masking, the q blocks before `first_unmasked` straddle the diagonal."""
  end, start = _cut(lo, hi, first_unmasked)
  if CAUSAL:
    dk, dv = _dkv_tiles(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr,
                        far_bias, k_start, lo, end, REGION=REGION, MASKED=True, CAUSAL=CAUSAL,
                        HAS_SEGMENTS=HAS_SEGMENTS, KEY_MASK=KEY_MASK, SCALE2=SCALE2, ROW_STRIDE=ROW_STRIDE,
                        BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, HEAD_DIM=HEAD_DIM, BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP,
                        PRECISION=PRECISION)
  dk, dv = _dkv_tiles(dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr, far_bias,
                      k_start, start, hi, REGION=REGION, MASKED=HAS_SEGMENTS and not KEY_MASK, CAUSAL=CAUSAL,
                      HAS_SEGMENTS=HAS_SEGMENTS, KEY_MASK=KEY_MASK, SCALE2=SCALE2, ROW_STRIDE=ROW_STRIDE,
                      BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, HEAD_DIM=HEAD_DIM, BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP,
                      PRECISION=PRECISION)
  return dk, dv


@triton.jit
def _attention_dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, band_ptr, ends_ptr, q_seg_ptr, kv_seg_ptr,
                          q_range_ptr, dk_ptr, dv_ptr, Q_LEN: tl.constexpr, KV_LEN: tl.constexpr, HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr,
                          SCALE2: tl.constexpr, T5: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                          KEY_MASK: tl.constexpr, BAND_FIRST: tl.constexpr, BAND_STEP: tl.constexpr,
                          BAND_COUNT: tl.constexpr, PRECISION: tl.constexpr):
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
  if HAS_SEGMENTS:
    lo, hi = _segment_blocks(q_range_ptr + (batch * (KV_LEN // BLOCK_K) + kv_block) * 2, lo, hi)
  # Walking q blocks, the band's keys lie after the queries of later blocks: far right comes first.
  band_lo, band_hi = _q_band(k_start, lo, hi, BLOCK_Q, BAND_FIRST, BAND_STEP, BAND_COUNT)
  bias_ptr = band_ptr + head * BAND_COUNT * BLOCK_Q * BLOCK_K
  for step in tl.static_range(_FAR_LEFT if T5 else _NO_BIAS, _FAR_RIGHT + 1 if T5 else _NO_BIAS + 1):
    # The regions in the order of the q blocks: far right, band, far left (REGION = 4 - step); or no bias.
    start, end = _region_blocks(lo, hi, band_lo, band_hi, REGION=_FAR_LEFT + _FAR_RIGHT - step if T5 else step,
                                KV_LOOP=False)
    dk, dv = _dkv_region(
        dk, dv, k, v, k_idx, k_seg, q_ptr, do_ptr, lse_ptr, delta_ptr, q_seg_ptr, bias_ptr,
        _far_bias(ends_ptr + 2 * head, REGION=_FAR_LEFT + _FAR_RIGHT - step if T5 else step), k_start, start, end,
        first_unmasked, REGION=_FAR_LEFT + _FAR_RIGHT - step if T5 else step, CAUSAL=CAUSAL,
        HAS_SEGMENTS=HAS_SEGMENTS, KEY_MASK=KEY_MASK, SCALE2=SCALE2, ROW_STRIDE=ROW_STRIDE, BLOCK_Q=BLOCK_Q,
        BLOCK_K=BLOCK_K,
        HEAD_DIM=HEAD_DIM, BAND_FIRST=BAND_FIRST, BAND_STEP=BAND_STEP, PRECISION=PRECISION)
  if KEY_MASK:  # hidden keys ran unmasked here (their rows only): their gradients are zero
    dk = tl.where(k_seg[:, None] != 0, dk, 0.0)
    dv = tl.where(k_seg[:, None] != 0, dv, 0.0)
  tl.store(dk_ptr + kv_offset + k_rows, (dk * SCALE).to(dk_ptr.dtype.element_ty))
  tl.store(dv_ptr + kv_offset + k_rows, dv.to(dv_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------- launchers


def _wraps(bq: int, bk: int) -> int:
  """How many times a row of a [bq, bk] tile rotated left by its index can wrap: the w of `_store_diagonal_sums`."""
  return (bq + bk - 2) // bk + 1


def _slot_buckets(cfg: Config, bq: int, bk: int) -> np.ndarray:
  """The bucket of each slot of a dq program's table-gradient row: for each band shift, w and u, the bucket of the
  distance shift + u - w * bk (`_store_diagonal_sums`); then the far left and far right buckets."""
  first, step, count = band_shifts(cfg.max_distance, bq, bk)
  shift, wrap, u = np.meshgrid(first + step * np.arange(count), np.arange(_wraps(bq, bk)), np.arange(bk),
                               indexing="ij")
  distance = np.clip(shift + u - wrap * bk, -cfg.max_distance, cfg.max_distance)
  return np.concatenate([cfg.lut()[distance + cfg.max_distance].reshape(-1), cfg.end_buckets()])


def _arguments(cfg: Config, q, k, t5, q_seg, kv_seg, bq: int, bk: int):
  """Arrays and compile-time constants shared by the three kernels: the T5 inputs (or placeholders)."""
  placeholder = jnp.zeros((1,), jnp.float32)
  if t5 is None:
    band, ends, (first, step, count) = placeholder, placeholder, (0, 1, 1)
  else:  # the far biases [H, 2]: the vector's two ends
    band, ends = t5.band, t5.vector[:, jnp.array([0, 2 * cfg.max_distance])]
    first, step, count = band_shifts(cfg.max_distance, bq, bk)
  kv_range = q_range = placeholder
  if q_seg is not None:
    kv_range, q_range = segment_block_ranges(q_seg, kv_seg, bq, bk)
  arrays = dict(band=band, ends=ends, q_seg=placeholder if q_seg is None else q_seg,
                kv_seg=placeholder if kv_seg is None else kv_seg, kv_range=kv_range, q_range=q_range)
  constants = dict(Q_LEN=q.shape[1], KV_LEN=k.shape[1], HEADS=q.shape[2], HEAD_DIM=q.shape[3], BLOCK_Q=bq,
                   BLOCK_K=bk, SCALE2=cfg.scale * common.LOG2E, T5=t5 is not None, CAUSAL=cfg.causal,
                   HAS_SEGMENTS=q_seg is not None, KEY_MASK=cfg.key_mask, BAND_FIRST=first, BAND_STEP=step,
                   BAND_COUNT=count,
                   PRECISION="ieee" if q.dtype == jnp.float32 else "tf32")
  return arrays, constants


def forward(cfg: Config, q, k, v, t5, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos):
  """(out [B, Sq, H, D], lse in base 2 [B, H, Sq]) on block-padded inputs: pallas.forward's contract, for no
  bias or the T5 bias without positions."""
  del slopes2, bias, q_pos, kv_pos  # the public function sends such calls to Pallas, or raises
  batch, q_len, heads, _ = q.shape
  blocks = cfg.blocks
  a, constants = _arguments(cfg, q, k, t5, q_seg, kv_seg, blocks.block_q, blocks.block_k)
  return common.triton_call(
      q, k, v, a["band"], a["ends"], a["q_seg"], a["kv_seg"], a["kv_range"], kernel=_attention_fwd_kernel,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      grid=(q_len // blocks.block_q, batch * heads), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
      interpret=cfg.interpret, **constants)


def backward(cfg: Config, q, k, v, t5, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos, dout, lse2, delta):
  """(dq, dk, dv, the table gradient [1, H, 1, buckets_padded] or None): pallas.backward's contract (whose table
  gradient is per program, [B, H, Sq / bq, buckets_padded]: the caller sums axes 0 and 2). delta [B, H, Sq] is
  rowsum(out * dout) minus the lse cotangent."""
  del slopes2, bias, q_pos, kv_pos
  batch, q_len, heads, _ = q.shape
  blocks = cfg.blocks
  bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
  a, constants = _arguments(cfg, q, k, t5, q_seg, kv_seg, bq, bk)
  launch = dict(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd, interpret=cfg.interpret,
                SCALE=cfg.scale, **constants)
  t5_bias = t5 is not None
  slot_buckets = _slot_buckets(cfg, bq, bk) if t5_bias else np.zeros(1, np.int64)
  dq, slots = common.triton_call(
      q, k, v, dout, lse2, delta, a["band"], a["ends"], a["q_seg"], a["kv_seg"], a["kv_range"],
      kernel=_attention_dq_kernel,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len // bq, len(slot_buckets)), jnp.float32)],
      grid=(q_len // bq, batch * heads), WRAPS=_wraps(bq, bk), **launch)
  if t5_bias:  # [H, count * bq, bk] -> [H, count * bk, bq]: the dk/dv kernel's [keys, queries] tiles
    a["band"] = a["band"].reshape(heads, -1, bq, bk).swapaxes(2, 3).reshape(heads, -1, bq)
  dk, dv = common.triton_call(
      q, k, v, dout, lse2, delta, a["band"], a["ends"], a["q_seg"], a["kv_seg"], a["q_range"],
      kernel=_attention_dkv_kernel,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(k.shape[1] // bk, batch * heads), **launch)
  if not t5_bias:
    return dq, dk, dv, None
  dtable = sum_into_buckets(jnp.sum(slots, axis=(0, 2)), slot_buckets, cfg.buckets_padded)
  return dq, dk, dv, dtable[None, :, None, :]
