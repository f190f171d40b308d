"""Flash attention with T5's bucketed relative bias computed inside the kernel (Pallas, Triton lowering).

On a GPU the common cases (no bias, or the T5 bias without positions) run the same algorithm as raw Triton kernels
(`triton_attention.py`, faster on Hopper); `impl` picks. This module holds the public entry point, the Pallas
kernels (every mode, and interpret mode on CPU) and the jnp reference.

`flash_attention(q, k, v, ...)` takes q [B, Sq, H, D], k and v [B, Sk, H, D] and one optional bias:
- `rpe_table` [num_buckets, H] (Hugging Face's `relative_attention_bias`): the bias of a pair is the table entry of
  the bucket of its relative position key - query. The kernel reads a per-head vector indexed by the distance clipped
  to +-max_distance (beyond it every pair shares the last bucket); no [Sq, Sk] tensor exists, forward or backward.
- `alibi_slopes` [H] (symmetric, -slope*|d|) or [2, H] (slopes for keys before / after the query).
- `bias` [B or 1, H or 1, Sq, Sk], any additive bias (FIRE...), with its gradient (this one is quadratic).

Masks: `causal` (key index <= query index, on raw indices: with per-segment positions this equals causality by
position inside each segment) and `q_segment_ids` / `kv_segment_ids` (a query sees keys of its own segment; 0 is
padding). A query that sees no key returns zeros, an lse of -inf and zero gradients. Relative distances use
`kv_positions - q_positions` when given (packed rows), else key index - query index.

Sequence lengths that are not multiples of the blocks are padded here and masked in the kernel. Softmax runs in
base 2 (the logits and bias are scaled by log2(e) once), in float32, with the log-sum-exp saved for the backward.

Where the T5 bias lives, per [bq, bk] tile of a q block: tiles whose distances all lie beyond +-max_distance form
one bucket each side (the loops over kv blocks split into "far left", "band", "far right", and a far tile adds one
scalar); band tiles load their bias from a small [H, shifts * bq, bk] array of precomputed tiles (one per
k_start - q_start, in the inputs' dtype), like k or v. With positions the tile decides at run time, falling back to a
gather from the per-distance vector. Positions slow the kernel (about 1.4x forward, 2.3x backward on packed rows):
when they are per-segment aranges of contiguous segments, leave them out, the result is the same.

Backward: one kernel per q block (dq and the bias-table / slope / full-bias gradients) and one per kv block (dk,
dv). The table gradient is accumulated per program into a [num_buckets] vector and the partial vectors summed
afterwards (deterministic, no atomics, no S x S buffer): a far tile adds its sum to one bucket; a band tile goes
through a [bq * bk] per-program scratch in global memory, read back skewed so that each column is one distance.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import LN2, LOG2E, resolve_interpret

# Finite stand-in for -inf: exp2(MASK - m) is 0 for any real m, and MASK - MASK is no NaN.
MASK = -0.7 * float(np.finfo(np.float32).max)
HEAD_DIMS = (32, 64, 128)
IMPLS = ("pallas", "triton")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and Triton launch parameters; every block is a power of two >= 16."""
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2


# Per GPU generation (compute capability major) and head_dim, tuned on an H100 for the Triton kernels, the default
# on GPU (benchmarks/notes_attention.md); the Pallas kernels use the same. Shared memory stays under A100's 164 KB
# (at most ~115 KB: q tile + 3 stages of k, v and the bias tile).
_BLOCK_TABLE = {
    8: {32: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3), 64: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3),
        128: BlockSizes(64, 64, 64, 64, 4, 2, 8, 2)},
    9: {32: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3), 64: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3),
        128: BlockSizes(128, 64, 64, 64, 8, 3, 4, 2)},
}
# Interpret mode (CPU): small tiles, so short test sequences still span several blocks and a padded tail.
_INTERPRET_BLOCKS = BlockSizes(32, 32, 32, 32)


def default_block_sizes(head_dim: int, interpret: bool, dtype=jnp.bfloat16) -> BlockSizes:
  if interpret:
    return _INTERPRET_BLOCKS
  major = int(float(getattr(jax.devices()[0], "compute_capability", "8.0")))
  blocks = _BLOCK_TABLE[min(max(major, 8), 9)][head_dim]
  if jnp.dtype(dtype).itemsize == 4:  # float32 tiles take twice the shared memory (tests, debugging)
    blocks = dataclasses.replace(blocks, block_q=min(blocks.block_q, 64),
                                 block_k=min(blocks.block_k, 32 if head_dim == 128 else 64), num_stages=2)
  return blocks


# ----------------------------------------------------------------------------------------------- T5 buckets


@functools.lru_cache(maxsize=None)
def _bucket_lut(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bucket of every relative position in [-max_distance, max_distance], Hugging Face's formula in float32.

  Computed once on the host with numpy, so every device agrees; beyond +-max_distance the bucket is constant.
  """
  relative = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0) * num_buckets
    distance = np.abs(relative)
  else:
    distance = -np.minimum(relative, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):  # log(0) in the branch that small distances do not take
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
  large = np.minimum(max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64), num_buckets - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def _check_buckets(num_buckets: int, bidirectional: bool, max_distance: int) -> None:
  max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
  if max_exact < 1 or max_distance <= max_exact:
    raise ValueError(f"T5 buckets need max_distance ({max_distance}) > max_exact ({max_exact}) >= 1 "
                     f"(num_buckets={num_buckets}, bidirectional={bidirectional})")


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> jax.Array:
  """Hugging Face's `T5Attention._relative_position_bucket`, bit for bit (relative_position = key - query)."""
  _check_buckets(num_buckets, bidirectional, max_distance)
  lut = jnp.asarray(_bucket_lut(bidirectional, num_buckets, max_distance))
  return lut[jnp.clip(relative_position, -max_distance, max_distance) + max_distance]


# ------------------------------------------------------------------------------------------ static config


@dataclasses.dataclass(frozen=True)
class _Config:
  bias_mode: str  # none | t5 | alibi | full
  causal: bool
  scale: float
  has_segments: bool
  has_positions: bool
  blocks: BlockSizes
  interpret: bool
  num_buckets: int = 0
  bidirectional: bool = True
  max_distance: int = 0
  bias_batched: bool = False  # full bias: does it have a batch / head axis of its own
  bias_headed: bool = False
  impl: str = "pallas"  # or "triton" (triton_attention.py)

  @property
  def lut_size(self) -> int:
    return pl.next_power_of_2(2 * self.max_distance + 1)

  @property
  def buckets_padded(self) -> int:
    return pl.next_power_of_2(self.num_buckets)


def _sum2d(x):
  return jnp.sum(jnp.sum(x, axis=1), axis=0)


class _Tile:
  """Positions, relative distances and mask of one [bq, bk] tile of logits."""

  def __init__(self, cfg, q_start, k_start, bq, bk, seg_refs, pos_refs, *, q_blocked):
    self.cfg, self.bq, self.bk, self.q_blocked = cfg, bq, bk, q_blocked
    self.q_idx = q_start + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    self.k_idx = k_start + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    self.q_start, self.k_start = q_start, k_start
    self.seg_refs, self.pos_refs = seg_refs, pos_refs

  def distance(self):
    """key - query position, [bq, bk]."""
    if self.cfg.has_positions:
      q_pos = self.pos_refs[0][pl.ds(self.q_start, self.bq)]
      k_pos = self.pos_refs[1][pl.ds(self.k_start, self.bk)]
      return k_pos[None, :] - q_pos[:, None]
    return self.k_idx[None, :] - self.q_idx[:, None]

  def distance_range(self):
    """Smallest and largest key - query over the tile (scalars)."""
    if self.cfg.has_positions:
      q_pos = self.pos_refs[0][pl.ds(self.q_start, self.bq)]
      k_pos = self.pos_refs[1][pl.ds(self.k_start, self.bk)]
      return jnp.min(k_pos) - jnp.max(q_pos), jnp.max(k_pos) - jnp.min(q_pos)
    return self.k_start - self.q_start - (self.bq - 1), self.k_start + self.bk - 1 - self.q_start

  def far(self):
    """(whole tile beyond +-max_distance, keys after the queries): such a tile is one bucket."""
    md = self.cfg.max_distance
    d_min, d_max = self.distance_range()
    right = d_min >= md
    return right | (d_max <= -md), right

  def positions_follow_indices(self):
    """Positions minus indices are one constant over the tile's queries and keys: distances are as without
    positions (the case of a tile inside one packed segment)."""
    q_off = self.pos_refs[0][pl.ds(self.q_start, self.bq)] - self.q_idx
    k_off = self.pos_refs[1][pl.ds(self.k_start, self.bk)] - self.k_idx
    return jnp.minimum(jnp.min(q_off), jnp.min(k_off)) == jnp.maximum(jnp.max(q_off), jnp.max(k_off))

  def index_shift(self):
    """(holds, shift): every visible pair's distance equals shift + (j - i), with i, j local indices.

    With per-segment positions it holds for every tile whose visible pairs share one segment offset.
    """
    local_i = lax.broadcasted_iota(jnp.int32, (self.bq,), 0)
    local_j = lax.broadcasted_iota(jnp.int32, (self.bk,), 0)
    q_pos = self.pos_refs[0][pl.ds(self.q_start, self.bq)]
    k_pos = self.pos_refs[1][pl.ds(self.k_start, self.bk)]
    offset = (k_pos - local_j)[None, :] - (q_pos - local_i)[:, None]
    mask = self.mask()
    big = np.iinfo(np.int32).max
    hi = jnp.max(offset if mask is None else jnp.where(mask, offset, -big))
    lo = jnp.min(offset if mask is None else jnp.where(mask, offset, big))
    return (hi == lo) | (hi == -big), jnp.where(hi == -big, 0, hi)

  def lut_index(self):
    md = self.cfg.max_distance
    return jnp.clip(self.distance(), -md, md) + md

  def mask(self):
    """Boolean [bq, bk], or None when every pair is visible."""
    mask = None
    if self.cfg.has_segments:
      q_seg = self.seg_refs[0][pl.ds(self.q_start, self.bq)]
      k_seg = self.seg_refs[1][pl.ds(self.k_start, self.bk)]
      mask = (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] != 0)
    if self.cfg.causal:
      causal = self.q_idx[:, None] >= self.k_idx[None, :]
      mask = causal if mask is None else mask & causal
    return mask


def _band_shifts(max_distance, bq, bk):
  """(first shift, step, count) of the tiles whose distances k_start - q_start + (j - i) reach inside
  +-max_distance. Shifts are multiples of min(bq, bk)."""
  step = min(bq, bk)
  first = -((max_distance + bk - 2) // step) * step  # smallest multiple of step with shift + bk - 1 > -md
  last = ((max_distance + bq - 2) // step) * step  # largest with shift - (bq - 1) < md
  return first, step, (last - first) // step + 1


def _band_tiles(cfg, rpe, bq, bk):
  """[H, count * bq, bk]: the bias tile of every band shift, so that the kernel loads them like k or v."""
  first, step, count = _band_shifts(cfg.max_distance, bq, bk)
  shifts = first + step * np.arange(count)
  md = cfg.max_distance
  index = np.clip(shifts[:, None, None] + np.arange(bk)[None, None, :] - np.arange(bq)[None, :, None], -md, md)
  return rpe[:, (index + md).reshape(count * bq, bk)]


# Loop regions of the t5 bias without positions: the kv (or q) blocks split into the tiles wholly before the band
# (one scalar bias), the band (precomputed tiles) and the tiles wholly after it (another scalar). None: no split,
# each tile decides for itself (other biases, or positions).
FAR_LEFT, BAND, FAR_RIGHT = "far_left", "band", "far_right"


def _t5_ends(cfg, rpe_ref):
  """Bias (base 2) of keys far before and far after the query, loaded once as a 2-vector gather (far-right tiles
  came out wrong on the GPU when this was a scalar load at a traced index)."""
  ends = lax.broadcasted_iota(jnp.int32, (2,), 0)
  values = rpe_ref[ends * (2 * cfg.max_distance)]
  return jnp.sum(jnp.where(ends == 0, values, 0.0)), jnp.sum(jnp.where(ends == 1, values, 0.0))


def _band_tile(tile, tiles_ref, shift):
  first, step, _ = _band_shifts(tile.cfg.max_distance, tile.bq, tile.bk)
  return tiles_ref[pl.ds(lax.div(shift - first, step) * tile.bq, tile.bq), :].astype(jnp.float32)


def _bias2(cfg, tile, region, rpe_refs, slopes_ref, bias_ref, ends):
  """The tile's additive bias in base-2 units ([bq, bk] or a scalar), or None."""
  if cfg.bias_mode == "t5":
    rpe_ref, tiles_ref = rpe_refs
    if region == FAR_LEFT:
      return ends[0]
    if region == FAR_RIGHT:
      return ends[1]
    if region == BAND:
      return _band_tile(tile, tiles_ref, tile.k_start - tile.q_start)
    # Positions: the tile finds out where it lies.
    far, right = tile.far()
    band = lambda: _band_tile(tile, tiles_ref, tile.k_start - tile.q_start)
    near = lambda: lax.cond(tile.positions_follow_indices(), band, lambda: rpe_ref[tile.lut_index()])
    return lax.cond(far, lambda: jnp.full((tile.bq, tile.bk), jnp.where(right, ends[1], ends[0])), near)
  if cfg.bias_mode == "alibi":
    d = tile.distance().astype(jnp.float32)
    return jnp.where(d < 0, slopes_ref[0], -slopes_ref[1]) * d
  if cfg.bias_mode == "full":
    # The bias block holds this program's q rows (forward, dq) or kv columns (dkv).
    rows = pl.ds(0, tile.bq) if tile.q_blocked else pl.ds(tile.q_start, tile.bq)
    cols = pl.ds(tile.k_start, tile.bk) if tile.q_blocked else pl.ds(0, tile.bk)
    return bias_ref[rows, cols].astype(jnp.float32) * LOG2E
  return None


def _logits2(cfg, q, k, tile, bias):
  """One tile's logits in base 2, (scale * q.k + bias) * log2(e), as (raw, multiplier, offset) with logits =
  raw * multiplier + offset. A tile with no mask and at most a scalar bias (far tiles, no bias) keeps the three
  apart, so that callers compute `logits - row value` as one multiply-add per element; otherwise raw holds the
  finished logits, MASK where hidden (multiplier 1, offset 0)."""
  raw = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
  multiplier = cfg.scale * LOG2E
  mask = tile.mask()
  if mask is None and (bias is None or jnp.ndim(bias) == 0):
    return raw, multiplier, 0.0 if bias is None else bias
  s = raw * multiplier if bias is None else raw * multiplier + bias
  return (s if mask is None else jnp.where(mask, s, MASK)), 1.0, 0.0


def _probabilities2(logits, row_value):
  """exp2(logits - row_value[:, None]) for logits = (raw, multiplier, offset) from _logits2."""
  raw, multiplier, offset = logits
  return jnp.exp2(raw * multiplier + (offset - row_value)[:, None])


def _diagonal_bucket_sums(cfg, ds, shift, scratch_ref, lut_ref, bucket_iota):
  """Per-bucket sums of a [bq, bk] tile whose pair (i, j) has distance shift + j - i.

  Triton cannot skew a register tile, so the tile goes through this program's global scratch: stored flat, read
  back skewed (row i shifted by i) so that each column holds one diagonal, i.e. one distance. Column sums, then a
  [columns, buckets] one-hot reduction: a few operations per element instead of one pass per bucket.
  """
  bq, bk = ds.shape
  width = pl.next_power_of_2(bq + bk - 1)
  rows = lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  cols = lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  barrier = (lambda: None) if cfg.interpret else plgpu.debug_barrier  # the interpreter runs one thread
  scratch_ref[rows * bk + cols] = ds
  barrier()  # the stores of every thread are visible before the skewed read
  u = lax.broadcasted_iota(jnp.int32, (1, width), 1)
  j = u - (bq - 1) + rows  # [bq, width]: column u holds the pairs with j - i = u - (bq - 1)
  inside = (j >= 0) & (j < bk)
  skewed = jnp.where(inside, scratch_ref[rows * bk + jnp.clip(j, 0, bk - 1)], 0.0)
  barrier()  # every read is done before the next tile overwrites the scratch
  diagonal_sums = jnp.sum(skewed, axis=0)
  md = cfg.max_distance
  distance = shift + lax.broadcasted_iota(jnp.int32, (width,), 0) - (bq - 1)
  bucket = lut_ref[jnp.clip(distance, -md, md) + md]
  return jnp.sum(jnp.where(bucket[:, None] == bucket_iota[None, :], diagonal_sums[:, None], 0.0), axis=0)


def _floor_div(a, b, bias_blocks):
  """floor(a / b) for a >= -bias_blocks * b (lax.div truncates toward zero)."""
  return lax.div(a + bias_blocks * b, b) - bias_blocks


def _loops(cfg, lo, hi, band_lo, band_hi, *, kv_loop):
  """[(region, start, stop)] covering blocks [lo, hi). band_[lo, hi) are the band's blocks; walking kv blocks,
  smaller blocks lie left of the band (keys before queries); walking q blocks, right of it."""
  if cfg.bias_mode != "t5" or cfg.has_positions:
    return [(None, lo, hi)]
  before, after = (FAR_LEFT, FAR_RIGHT) if kv_loop else (FAR_RIGHT, FAR_LEFT)
  return [(before, lo, jnp.minimum(band_lo, hi)),
          (BAND, jnp.maximum(lo, band_lo), jnp.minimum(band_hi, hi)),
          (after, jnp.maximum(lo, band_hi), hi)]


def _kv_band(cfg, q_start, bq, bk):
  """kv blocks [lo, hi) of the band for the q block at q_start."""
  first, _, count = _band_shifts(cfg.max_distance, bq, bk)
  last = first + (count - 1) * min(bq, bk)
  pad = (cfg.max_distance + bq + bk) // bk + 2
  return -_floor_div(-(q_start + first), bk, pad), _floor_div(q_start + last, bk, pad) + 1


def _q_band(cfg, k_start, bq, bk):
  """q blocks [lo, hi) of the band for the kv block at k_start."""
  first, _, count = _band_shifts(cfg.max_distance, bq, bk)
  last = first + (count - 1) * min(bq, bk)
  pad = (cfg.max_distance + bq + bk) // bq + 2
  return -_floor_div(-(k_start - last), bq, pad), _floor_div(k_start - first, bq, pad) + 1


def _kv_blocks_for_q(cfg, q_block, bq, bk, num_kv_blocks):
  """kv blocks a q block sees: all, or up to the diagonal when causal."""
  if cfg.causal:
    return jnp.minimum(lax.div((q_block + 1) * bq + bk - 1, bk), num_kv_blocks)
  return num_kv_blocks


def _run_loops(loops, body, carry):
  for region, start, stop in loops:
    carry = lax.fori_loop(start, stop, functools.partial(body, region), carry)
  return carry


# ---------------------------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, rpe_ref, slopes_ref, bias_ref, q_seg_ref, kv_seg_ref, q_pos_ref,
                kv_pos_ref, o_ref, lse_ref, *, cfg: _Config):
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
  q_start = pl.program_id(0) * bq
  q = q_ref[...]
  ends = _t5_ends(cfg, rpe_ref[0]) if cfg.bias_mode == "t5" else None

  def body(region, kv_block, carry):
    acc, m, l = carry
    k_start = kv_block * bk
    tile = _Tile(cfg, q_start, k_start, bq, bk, (q_seg_ref, kv_seg_ref), (q_pos_ref, kv_pos_ref),
                 q_blocked=True)
    bias = _bias2(cfg, tile, region, rpe_ref, slopes_ref, bias_ref, ends)
    logits = _logits2(cfg, q, k_ref[pl.ds(k_start, bk), :], tile, bias)
    raw, multiplier, offset = logits  # multiplier > 0: the row maximum of raw is that of the logits
    m_new = jnp.maximum(m, jnp.max(raw, axis=1) * multiplier + offset)
    correction = jnp.exp2(m - m_new)
    p = _probabilities2(logits, m_new)
    v = v_ref[pl.ds(k_start, bk), :]
    acc = acc * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l * correction + jnp.sum(p, axis=1)

  hi = _kv_blocks_for_q(cfg, pl.program_id(0), bq, bk, k_ref.shape[0] // bk)
  loops = _loops(cfg, 0, hi, *(_kv_band(cfg, q_start, bq, bk) if cfg.bias_mode == "t5" else (0, 0)),
                 kv_loop=True)
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = _run_loops(loops, body, init)
  # A row that saw no key kept m == MASK: it outputs zeros, and lse = +inf makes its backward p exactly 0.
  empty = m == MASK
  o_ref[...] = jnp.where(empty[:, None], 0.0, acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


# --------------------------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, rpe_ref, lut_ref, slopes_ref, bias_ref, q_seg_ref, kv_seg_ref, q_pos_ref,
               kv_pos_ref, do_ref, lse_ref, delta_ref, dq_ref, *grad_refs, cfg: _Config):
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
  q_start = pl.program_id(0) * bq
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  nbp = cfg.buckets_padded
  bucket_iota = lax.broadcasted_iota(jnp.int32, (nbp,), 0)
  ends = _t5_ends(cfg, rpe_ref[0]) if cfg.bias_mode == "t5" else None

  def table_grad(region, tile, ds, acc):
    lut = _bucket_lut(cfg.bidirectional, cfg.num_buckets, cfg.max_distance)

    def far_tile(bucket, acc):
      return jnp.where(bucket_iota == bucket, acc + _sum2d(ds), acc)

    def diagonal_tile(shift, acc):
      return acc + _diagonal_bucket_sums(cfg, ds, shift, grad_refs[1], lut_ref, bucket_iota)

    if region in (FAR_LEFT, FAR_RIGHT):
      return far_tile(int(lut[0] if region == FAR_LEFT else lut[-1]), acc)
    if region == BAND:
      return diagonal_tile(tile.k_start - tile.q_start, acc)

    def any_tile(acc):  # one masked reduction per bucket: only for pairs whose distance is not shift + j - i
      bucket = lut_ref[tile.lut_index()]

      def add_bucket(b, acc):
        return jnp.where(bucket_iota == b, acc + _sum2d(jnp.where(bucket == b, ds, 0.0)), acc)
      return lax.fori_loop(0, cfg.num_buckets, add_bucket, acc)

    far, right = tile.far()
    holds, shift = tile.index_shift()
    right_bucket, left_bucket = int(lut[-1]), int(lut[0])
    far_bucket = left_bucket + right.astype(jnp.int32) * (right_bucket - left_bucket)
    near = lambda acc: lax.cond(holds, functools.partial(diagonal_tile, shift), any_tile, acc)
    return lax.cond(far, functools.partial(far_tile, far_bucket), near, acc)

  def slopes_grad(tile, ds, acc):
    d = tile.distance().astype(jnp.float32)  # bias = -before * relu(-d) - after * relu(d)
    before = -_sum2d(ds * jnp.maximum(-d, 0.0))
    after = -_sum2d(ds * jnp.maximum(d, 0.0))
    return acc + jnp.where(lax.broadcasted_iota(jnp.int32, (2,), 0) == 0, before, after)

  def body(region, kv_block, carry):
    dq, acc = carry
    k_start = kv_block * bk
    tile = _Tile(cfg, q_start, k_start, bq, bk, (q_seg_ref, kv_seg_ref), (q_pos_ref, kv_pos_ref),
                 q_blocked=True)
    k, v = k_ref[pl.ds(k_start, bk), :], v_ref[pl.ds(k_start, bk), :]
    bias = _bias2(cfg, tile, region, rpe_ref, slopes_ref, bias_ref, ends)
    p = _probabilities2(_logits2(cfg, q, k, tile, bias), lse)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])  # gradient of the natural-log logits (and so of the bias)
    dq = dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    if cfg.bias_mode == "t5":
      acc = table_grad(region, tile, ds, acc)
    elif cfg.bias_mode == "alibi":
      acc = slopes_grad(tile, ds, acc)
    elif cfg.bias_mode == "full":
      grad_refs[0][:, pl.ds(k_start, bk)] = ds.astype(grad_refs[0].dtype)
    return dq, acc

  num_kv_blocks = k_ref.shape[0] // bk
  # The full-bias gradient is written tile by tile: visit every tile so hidden ones get their zeros.
  hi = (num_kv_blocks if cfg.bias_mode == "full"
        else _kv_blocks_for_q(cfg, pl.program_id(0), bq, bk, num_kv_blocks))
  loops = _loops(cfg, 0, hi, *(_kv_band(cfg, q_start, bq, bk) if cfg.bias_mode == "t5" else (0, 0)),
                 kv_loop=True)
  acc = jnp.zeros((nbp if cfg.bias_mode == "t5" else 2,), jnp.float32)
  dq, acc = _run_loops(loops, body, (jnp.zeros(q.shape, jnp.float32), acc))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
  if cfg.bias_mode in ("t5", "alibi"):
    grad_refs[0][...] = acc


def _dkv_kernel(q_ref, k_ref, v_ref, rpe_ref, slopes_ref, bias_ref, q_seg_ref, kv_seg_ref, q_pos_ref,
                kv_pos_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Config):
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
  k_start = pl.program_id(0) * bk
  k, v = k_ref[...], v_ref[...]
  ends = _t5_ends(cfg, rpe_ref[0]) if cfg.bias_mode == "t5" else None

  def body(region, q_block, carry):
    dk, dv = carry
    q_start = q_block * bq
    tile = _Tile(cfg, q_start, k_start, bq, bk, (q_seg_ref, kv_seg_ref), (q_pos_ref, kv_pos_ref),
                 q_blocked=False)
    q, do = q_ref[pl.ds(q_start, bq), :], do_ref[pl.ds(q_start, bq), :]
    lse, delta = lse_ref[pl.ds(q_start, bq)], delta_ref[pl.ds(q_start, bq)]
    bias = _bias2(cfg, tile, region, rpe_ref, slopes_ref, bias_ref, ends)
    p = _probabilities2(_logits2(cfg, q, k, tile, bias), lse)
    dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    ds = p * (jnp.dot(do, v.T, preferred_element_type=jnp.float32) - delta[:, None])
    dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
    return dk, dv

  lo = lax.div(k_start, bq) if cfg.causal else 0
  loops = _loops(cfg, lo, q_ref.shape[0] // bq,
                 *(_q_band(cfg, k_start, bq, bk) if cfg.bias_mode == "t5" else (0, 0)), kv_loop=False)
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = _run_loops(loops, body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------ pallas calls


def _specs(cfg, bq, bk, q_len, kv_len, head_dim, *, q_blocked):
  """BlockSpecs of (q, k, v, rpe, slopes, bias, segments x2, positions x2) for a grid (block, batch, head).

  q_blocked: the grid walks q blocks of bq (forward, dq) rather than kv blocks of bk (dkv).
  """
  block = bq if q_blocked else bk
  def rows(length, blocked):
    if blocked:
      return pl.BlockSpec((None, block, None, head_dim), lambda i, b, h: (b, i, h, 0))
    return pl.BlockSpec((None, length, None, head_dim), lambda i, b, h: (b, 0, h, 0))

  def per_batch(x):
    return None if x is None else pl.BlockSpec((None, x.shape[1]), lambda i, b, h: (b, 0))

  rpe_specs = None
  if cfg.bias_mode == "t5":
    band_rows = _band_shifts(cfg.max_distance, bq, bk)[2] * bq
    rpe_specs = (pl.BlockSpec((None, cfg.lut_size), lambda i, b, h: (h, 0)),
                 pl.BlockSpec((None, band_rows, bk), lambda i, b, h: (h, 0, 0)))
  full = None
  if cfg.bias_mode == "full":
    pick = lambda b, h: (b if cfg.bias_batched else 0, h if cfg.bias_headed else 0)
    if q_blocked:
      full = pl.BlockSpec((None, None, block, kv_len), lambda i, b, h: (*pick(b, h), i, 0))
    else:
      full = pl.BlockSpec((None, None, q_len, block), lambda i, b, h: (*pick(b, h), 0, i))
  return dict(
      q=rows(q_len, q_blocked), kv=rows(kv_len, not q_blocked),
      rpe=rpe_specs,
      slopes=pl.BlockSpec((None, 2), lambda i, b, h: (h, 0)) if cfg.bias_mode == "alibi" else None,
      bias=full, per_batch=per_batch)


def _padded_lut(cfg):
  """The bucket of each distance + max_distance, padded with bucket 0 to lut_size entries."""
  lut = np.zeros((cfg.lut_size,), np.int32)
  lut[: 2 * cfg.max_distance + 1] = _bucket_lut(cfg.bidirectional, cfg.num_buckets, cfg.max_distance)
  return lut


def _kernel_inputs(cfg, table, slopes, bq, bk, dtype):
  """In base-2 units: for t5, the per-head bias by distance [H, lut_size] and its band tiles (in the inputs'
  dtype: half the registers and bytes for bf16); the slopes [H, 2]."""
  rpe = slopes2 = None
  if cfg.bias_mode == "t5":
    vector = table.astype(jnp.float32).T[:, _padded_lut(cfg)] * LOG2E
    rpe = (vector, _band_tiles(cfg, vector, bq, bk).astype(dtype))
  if cfg.bias_mode == "alibi":
    slopes2 = slopes.astype(jnp.float32).T * LOG2E
  return rpe, slopes2


def _triton_t5_inputs(cfg, rpe, bq, bk):
  """(band tiles, far biases [H, 2]) and the band's (first shift, step, count) for triton_attention, or Nones."""
  if rpe is None:
    return None, None
  vector, band_tiles = rpe
  return (band_tiles, vector[:, jnp.array([0, 2 * cfg.max_distance])]), _band_shifts(cfg.max_distance, bq, bk)


def _forward(cfg, q, k, v, table, slopes, bias, q_seg, kv_seg, q_pos, kv_pos):
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  bq = cfg.blocks.block_q
  rpe, slopes2 = _kernel_inputs(cfg, table, slopes, bq, cfg.blocks.block_k, q.dtype)
  if cfg.impl == "triton":
    from pallas_kernels import triton_attention  # GPU only
    return triton_attention.attention_fwd(q, k, v, *_triton_t5_inputs(cfg, rpe, bq, cfg.blocks.block_k), q_seg,
                                          kv_seg, scale=cfg.scale, causal=cfg.causal, blocks=cfg.blocks)
  sp = _specs(cfg, bq, cfg.blocks.block_k, q_len, kv_len, head_dim, q_blocked=True)
  in_specs = [sp["q"], sp["kv"], sp["kv"], sp["rpe"], sp["slopes"], sp["bias"], sp["per_batch"](q_seg),
              sp["per_batch"](kv_seg), sp["per_batch"](q_pos), sp["per_batch"](kv_pos)]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(q_len // bq, batch, heads),
      in_specs=in_specs,
      out_specs=[sp["q"], pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.blocks.num_warps, num_stages=cfg.blocks.num_stages),
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(q, k, v, rpe, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos)


def _table_grad(cfg, partials, table):
  """The [num_buckets, H] table gradient from per-program partials [B, H, programs, buckets_padded]."""
  return jnp.sum(partials, axis=(0, 2))[:, :cfg.num_buckets].T.astype(table.dtype)


def _backward(cfg, q, k, v, table, slopes, bias, q_seg, kv_seg, q_pos, kv_pos, out, lse2, dout, dlse2):
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
  rpe, slopes2 = _kernel_inputs(cfg, table, slopes, bq, bk, q.dtype)
  # d lse / d logits = p, so an lse cotangent only shifts delta (natural-log units on both).
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32)) - dlse2 * LOG2E
  if cfg.impl == "triton":
    from pallas_kernels import triton_attention  # GPU only
    lut = _bucket_lut(cfg.bidirectional, cfg.num_buckets, cfg.max_distance) if rpe else np.zeros(1, np.int32)
    dq, dk, dv, partials = triton_attention.attention_bwd(
        q, k, v, dout, lse2, delta, *_triton_t5_inputs(cfg, rpe, bq, bk),
        jnp.asarray(_padded_lut(cfg)) if rpe else None, q_seg, kv_seg, scale=cfg.scale, causal=cfg.causal,
        blocks=cfg.blocks, num_buckets_padded=cfg.buckets_padded, max_distance=cfg.max_distance,
        end_buckets=(int(lut[0]), int(lut[-1])))
    dtable = None if partials is None else _table_grad(cfg, partials, table)
    return dq, dk, dv, dtable, None, None
  params = plgpu.CompilerParams(num_warps=cfg.blocks.num_warps_bwd, num_stages=cfg.blocks.num_stages_bwd)
  rows = lambda x, blocked, block: pl.BlockSpec(
      (None, None, block if blocked else x.shape[2]), (lambda i, b, h: (b, h, i)) if blocked
      else (lambda i, b, h: (b, h, 0)))

  sp = _specs(cfg, bq, bk, q_len, kv_len, head_dim, q_blocked=True)
  common = [sp["rpe"], sp["slopes"], sp["bias"], sp["per_batch"](q_seg), sp["per_batch"](kv_seg),
            sp["per_batch"](q_pos), sp["per_batch"](kv_pos)]
  num_q_blocks = q_len // bq
  grad_shapes, grad_specs = [], []
  if cfg.bias_mode in ("t5", "alibi"):
    width = cfg.buckets_padded if cfg.bias_mode == "t5" else 2
    grad_shapes.append(jax.ShapeDtypeStruct((batch, heads, num_q_blocks, width), jnp.float32))
    grad_specs.append(pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, h, i, 0)))
  if cfg.bias_mode == "t5":  # one [bq * bk] scratch tile per program (see _diagonal_bucket_sums)
    grad_shapes.append(jax.ShapeDtypeStruct((batch, heads, num_q_blocks, bq * bk), jnp.float32))
    grad_specs.append(pl.BlockSpec((None, None, None, bq * bk), lambda i, b, h: (b, h, i, 0)))
  elif cfg.bias_mode == "full":
    grad_shapes.append(jax.ShapeDtypeStruct((batch, heads, q_len, kv_len), jnp.float32))
    grad_specs.append(pl.BlockSpec((None, None, bq, kv_len), lambda i, b, h: (b, h, i, 0)))
  lut = jnp.asarray(_padded_lut(cfg)) if cfg.bias_mode == "t5" else None
  lut_spec = None if lut is None else pl.BlockSpec((cfg.lut_size,), lambda i, b, h: (0,))
  dq, *grads = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(num_q_blocks, batch, heads),
      in_specs=[sp["q"], sp["kv"], sp["kv"], common[0], lut_spec, *common[1:], sp["q"],
                rows(lse2, True, bq), rows(lse2, True, bq)],
      out_specs=[sp["q"], *grad_specs],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), *grad_shapes],
      compiler_params=params, interpret=cfg.interpret, name="flash_attention_dq",
  )(q, k, v, rpe, lut, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos, dout, lse2, delta)

  sp = _specs(cfg, bq, bk, q_len, kv_len, head_dim, q_blocked=False)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(kv_len // bk, batch, heads),
      in_specs=[sp["q"], sp["kv"], sp["kv"], sp["rpe"], sp["slopes"], sp["bias"], *common[3:], sp["q"],
                rows(lse2, False, bq), rows(lse2, False, bq)],
      out_specs=[sp["kv"], sp["kv"]],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=cfg.interpret, name="flash_attention_dkv",
  )(q, k, v, rpe, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos, dout, lse2, delta)

  dtable = dslopes = dbias = None
  if cfg.bias_mode == "t5":
    dtable = _table_grad(cfg, grads[0], table)
  elif cfg.bias_mode == "alibi":
    dslopes = jnp.sum(grads[0], axis=(0, 2)).T.astype(slopes.dtype)
  elif cfg.bias_mode == "full":
    axes = tuple(a for a, kept in ((0, cfg.bias_batched), (1, cfg.bias_headed)) if not kept)
    dbias = jnp.sum(grads[0], axis=axes, keepdims=True).astype(bias.dtype)
  return dq, dk, dv, dtable, dslopes, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, table, slopes, bias, q_seg, kv_seg, q_pos, kv_pos):
  """(out, lse in base 2 with +inf for rows that see no key) on block-padded inputs."""
  return tuple(_forward(cfg, q, k, v, table, slopes, bias, q_seg, kv_seg, q_pos, kv_pos))


def _attention_fwd(cfg, *args):
  out, lse2 = _forward(cfg, *args)
  return (out, lse2), (*args, out, lse2)


def _attention_bwd(cfg, residuals, cotangents):
  *args, out, lse2 = residuals
  dout, dlse2 = cotangents
  dq, dk, dv, dtable, dslopes, dbias = _backward(cfg, *args, out, lse2, dout, dlse2)
  return dq, dk, dv, dtable, dslopes, dbias, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------------------- public API


def _validate(q, k, v, rpe_table, alibi_slopes, bias, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != (heads, head_dim):
    raise ValueError(f"k and v must be [{batch}, Sk, {heads}, {head_dim}]; got {k.shape}, {v.shape}")
  if head_dim not in HEAD_DIMS:
    raise ValueError(f"head_dim must be one of {HEAD_DIMS}; got {head_dim}")
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


def _pad_axis(x, axis, length):
  if x is None or x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def _fit_blocks(blocks: BlockSizes, q_len: int, kv_len: int) -> BlockSizes:
  """Shrink blocks for short sequences (never under 16, Triton's smallest dot)."""
  fit = lambda block, length: max(16, min(block, pl.next_power_of_2(length)))
  return dataclasses.replace(
      blocks, block_q=fit(blocks.block_q, q_len), block_k=fit(blocks.block_k, kv_len),
      block_q_bwd=fit(blocks.block_q_bwd, q_len), block_k_bwd=fit(blocks.block_k_bwd, kv_len))


def flash_attention(q, k, v, *, rpe_table=None, rpe_bidirectional: bool = True, rpe_max_distance: int = 128,
                    alibi_slopes=None, bias=None, causal: bool = False, q_segment_ids=None, kv_segment_ids=None,
                    q_positions=None, kv_positions=None, scale: float = 1.0, return_lse: bool = False,
                    block_sizes: BlockSizes | None = None, impl: str | None = None,
                    interpret: bool | None = None):
  """Attention over q [B, Sq, H, D], k and v [B, Sk, H, D] -> out [B, Sq, H, D] (and lse [B, H, Sq] if asked).

  See the module docstring for the bias kinds and masks. `interpret=None` runs the Pallas interpreter off GPU and
  the Triton lowering on GPU. Differentiable in q, k, v, rpe_table, alibi_slopes and bias (and in the lse).
  impl: "pallas", or "triton" (raw Triton kernels through jax-triton, triton_attention.py: GPU only, no bias or
  the T5 bias without positions); None picks "triton" where it applies on a GPU.
  """
  _validate(q, k, v, rpe_table, alibi_slopes, bias, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
  if not scale > 0:
    raise ValueError(f"scale must be positive; got {scale}")
  triton_applies = alibi_slopes is None and bias is None and q_positions is None
  if impl is None:
    impl = "triton" if triton_applies and not resolve_interpret(interpret) else "pallas"
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
  if impl == "triton" and not triton_applies:
    raise ValueError("impl='triton' takes no alibi_slopes, bias or positions")
  interpret = resolve_interpret(interpret, impl)
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  blocks = _fit_blocks(block_sizes or default_block_sizes(head_dim, interpret, q.dtype), q_len, kv_len)
  q_pad = -(-q_len // max(blocks.block_q, blocks.block_q_bwd)) * max(blocks.block_q, blocks.block_q_bwd)
  kv_pad = -(-kv_len // max(blocks.block_k, blocks.block_k_bwd)) * max(blocks.block_k, blocks.block_k_bwd)

  bias_mode, extra = "none", {}
  if rpe_table is not None:
    _check_buckets(rpe_table.shape[0], rpe_bidirectional, rpe_max_distance)
    bias_mode, extra = "t5", dict(num_buckets=rpe_table.shape[0], bidirectional=rpe_bidirectional,
                                  max_distance=rpe_max_distance)
  elif alibi_slopes is not None:
    bias_mode = "alibi"
    if alibi_slopes.ndim == 1:
      alibi_slopes = jnp.stack([alibi_slopes, alibi_slopes])
  elif bias is not None:
    bias_mode, extra = "full", dict(bias_batched=bias.shape[0] > 1, bias_headed=bias.shape[1] > 1)
    bias = _pad_axis(_pad_axis(bias, 2, q_pad), 3, kv_pad)

  # Padded keys must be hidden: without segment ids, make ones that mark the real keys.
  if q_segment_ids is None and kv_pad != kv_len:
    q_segment_ids = jnp.ones((batch, q_len), jnp.int32)
    kv_segment_ids = jnp.ones((batch, kv_len), jnp.int32)
  cfg = _Config(bias_mode=bias_mode, causal=causal, scale=float(scale), has_segments=q_segment_ids is not None,
                has_positions=q_positions is not None, blocks=blocks, interpret=bool(interpret),
                impl=impl, **extra)
  as_int = lambda x, length: None if x is None else _pad_axis(x.astype(jnp.int32), 1, length)
  out, lse2 = _attention(
      cfg, _pad_axis(q, 1, q_pad), _pad_axis(k, 1, kv_pad), _pad_axis(v, 1, kv_pad), rpe_table, alibi_slopes,
      bias, as_int(q_segment_ids, q_pad), as_int(kv_segment_ids, kv_pad), as_int(q_positions, q_pad),
      as_int(kv_positions, kv_pad))
  out = out[:, :q_len]
  if not return_lse:
    return out
  lse2 = lse2[:, :, :q_len]
  return out, jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * LN2)


def flash_attention_reference(q, k, v, *, rpe_table=None, rpe_bidirectional: bool = True,
                              rpe_max_distance: int = 128, alibi_slopes=None, bias=None, causal: bool = False,
                              q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None,
                              scale: float = 1.0, return_lse: bool = False):
  """`flash_attention` in plain jnp: materialized [B, H, Sq, Sk] bias and mask, float32 softmax (or float64)."""
  _validate(q, k, v, rpe_table, alibi_slopes, bias, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
  batch, q_len, _, _ = q.shape
  kv_len = k.shape[1]
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype),
                      precision=lax.Precision.HIGHEST) * scale
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
    kv_positions = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
  distance = kv_positions[:, None, :] - q_positions[:, :, None]  # [B, Sq, Sk]
  if rpe_table is not None:
    buckets = relative_position_bucket(distance, rpe_bidirectional, rpe_table.shape[0], rpe_max_distance)
    logits = logits + jnp.moveaxis(rpe_table.astype(dtype)[buckets], -1, 1)
  elif alibi_slopes is not None:
    slopes = alibi_slopes.astype(dtype)
    before, after = (slopes, slopes) if slopes.ndim == 1 else (slopes[0], slopes[1])
    d = distance.astype(dtype)[:, None]
    logits = logits - before[:, None, None] * jnp.maximum(-d, 0) - after[:, None, None] * jnp.maximum(d, 0)
  elif bias is not None:
    logits = logits + bias.astype(dtype)
  mask = jnp.ones((batch, 1, q_len, kv_len), bool)
  if q_segment_ids is not None:
    mask = ((q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0))[:, None]
  if causal:
    mask &= jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]
  logits = jnp.where(mask, logits, MASK)
  lse = jax.nn.logsumexp(logits, axis=-1)
  weights = jnp.where(mask, jnp.exp(logits - lse[..., None]), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(dtype), precision=lax.Precision.HIGHEST).astype(q.dtype)
  if not return_lse:
    return out
  return out, jnp.where(jnp.any(mask, axis=-1), lse, -jnp.inf)
