"""Flash attention as Pallas kernels (Triton lowering on a GPU, Pallas' interpreter off it): every bias kind.

The same algorithm as the raw Triton kernels of `triton.py`, with the same helper names, so that a change is made
in both: base-2 online softmax; the T5 bias from far scalars and precomputed band tiles; segment and causal masks;
lse = +inf for rows that see no key; per-program partial table gradients.

Where the T5 bias lives, per [bq, bk] tile of a q block: tiles whose distances all lie beyond +-max_distance form
one bucket each side (the loops over kv blocks split into "far left", "band", "far right", and a far tile adds one
scalar); band tiles load their bias from [H, shifts * bq, bk] precomputed tiles (`buckets.band_tiles`) of exact
table entries, scaled by log2(e) in float32 on load: the far tiles' float32 value (`config.T5Inputs`). With
positions the tile decides at run time, falling back to a gather from the per-distance vector.

Backward: one kernel per q block (dq and the bias-table / slope / full-bias gradients) and one per kv block (dk,
dv). The table gradient is accumulated per program into a [num_buckets] vector: a far tile adds its sum to one
bucket; a band tile goes through a [bq * bk] per-program scratch in global memory, read back skewed so that each
column is one distance (Pallas cannot skew a register tile; the Triton kernels do it with `tl.gather`).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention.buckets import band_shifts
from pallas_kernels.attention.config import Config, segment_block_ranges
from pallas_kernels.common import LOG2E, MASK

# Loop regions of the t5 bias without positions: the kv (or q) blocks split into the tiles wholly before the band
# (one scalar bias), the band (precomputed tiles) and the tiles wholly after it (another scalar). None: no split,
# each tile decides for itself (other biases, or positions).
FAR_LEFT, BAND, FAR_RIGHT = "far_left", "band", "far_right"


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

  def _positions(self):
    return self.pos_refs[0][pl.ds(self.q_start, self.bq)], self.pos_refs[1][pl.ds(self.k_start, self.bk)]

  def distance(self):
    """key - query position, [bq, bk]."""
    if self.cfg.has_positions:
      q_pos, k_pos = self._positions()
      return k_pos[None, :] - q_pos[:, None]
    return self.k_idx[None, :] - self.q_idx[:, None]

  def far(self):
    """(whole tile beyond +-max_distance, keys after the queries): such a tile is one bucket. Only with positions:
    without them the loops know each tile's region."""
    md = self.cfg.max_distance
    q_pos, k_pos = self._positions()
    right = jnp.min(k_pos) - jnp.max(q_pos) >= md
    return right | (jnp.max(k_pos) - jnp.min(q_pos) <= -md), right

  def positions_follow_indices(self):
    """Positions minus indices are one constant over the tile's queries and keys: distances are as without
    positions (the case of a tile inside one packed segment)."""
    q_pos, k_pos = self._positions()
    q_off, k_off = q_pos - self.q_idx, k_pos - self.k_idx
    return jnp.minimum(jnp.min(q_off), jnp.min(k_off)) == jnp.maximum(jnp.max(q_off), jnp.max(k_off))

  def index_shift(self):
    """(holds, shift): every visible pair's distance equals shift + (j - i), with i, j local indices.

    With per-segment positions it holds for every tile whose visible pairs share one segment offset.
    """
    local_i = lax.broadcasted_iota(jnp.int32, (self.bq,), 0)
    local_j = lax.broadcasted_iota(jnp.int32, (self.bk,), 0)
    q_pos, k_pos = self._positions()
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


def _t5_ends(cfg, rpe_ref):
  """Bias (base 2) of keys far before and far after the query, loaded once as a 2-vector gather (far-right tiles
  came out wrong on the GPU when this was a scalar load at a traced index)."""
  ends = lax.broadcasted_iota(jnp.int32, (2,), 0)
  values = rpe_ref[ends * (2 * cfg.max_distance)]
  return jnp.sum(jnp.where(ends == 0, values, 0.0)), jnp.sum(jnp.where(ends == 1, values, 0.0))


def _band_tile(tile, tiles_ref, shift):
  """The band tile of `shift` in base 2: its exact table entries times log2(e) in float32, the far tiles' value."""
  first, step, _ = band_shifts(tile.cfg.max_distance, tile.bq, tile.bk)
  return tiles_ref[pl.ds(lax.div(shift - first, step) * tile.bq, tile.bq), :].astype(jnp.float32) * LOG2E


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


def _tile_probabilities(cfg, tile, region, q, k, lse, bias_refs, ends):
  """The backward's p of one tile: its logits against the forward's lse (both kernels of the backward)."""
  bias = _bias2(cfg, tile, region, *bias_refs, ends)
  return _probabilities2(_logits2(cfg, q, k, tile, bias), lse)


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
  first, step, count = band_shifts(cfg.max_distance, bq, bk)
  last = first + (count - 1) * step
  pad = (cfg.max_distance + bq + bk) // bk + 2
  return -_floor_div(-(q_start + first), bk, pad), _floor_div(q_start + last, bk, pad) + 1


def _q_band(cfg, k_start, bq, bk):
  """q blocks [lo, hi) of the band for the kv block at k_start."""
  first, step, count = band_shifts(cfg.max_distance, bq, bk)
  last = first + (count - 1) * step
  pad = (cfg.max_distance + bq + bk) // bq + 2
  return -_floor_div(-(k_start - last), bq, pad), _floor_div(k_start - first, bq, pad) + 1


def _kv_blocks(cfg, q_block, bq, bk, num_kv_blocks):
  """kv blocks a q block sees: all, or up to the diagonal when causal."""
  if cfg.causal:
    return jnp.minimum(lax.div((q_block + 1) * bq + bk - 1, bk), num_kv_blocks)
  return num_kv_blocks


def _segment_blocks(cfg, range_ref, lo, hi):
  """[lo, hi) narrowed to this program's blocks of `segment_block_ranges`: those that can share a segment."""
  if not cfg.has_segments:
    return lo, hi
  # One 2-vector load, split by masked sums, as _t5_ends does (scalar loads misbehaved in the Triton lowering).
  which, blocks = lax.broadcasted_iota(jnp.int32, (2,), 0), range_ref[...]
  first, end = jnp.sum(jnp.where(which == 0, blocks, 0)), jnp.sum(jnp.where(which == 1, blocks, 0))
  hi = jnp.minimum(hi, end)
  return jnp.minimum(jnp.maximum(lo, first), hi), hi


def _run_loops(loops, body, carry):
  for region, start, stop in loops:
    carry = lax.fori_loop(start, stop, functools.partial(body, region), carry)
  return carry


# ---------------------------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, rpe_ref, slopes_ref, bias_ref, q_seg_ref, kv_seg_ref, q_pos_ref,
                kv_pos_ref, range_ref, o_ref, lse_ref, *, cfg: Config):
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

  lo, hi = _segment_blocks(cfg, range_ref, 0, _kv_blocks(cfg, pl.program_id(0), bq, bk, k_ref.shape[0] // bk))
  loops = _loops(cfg, lo, hi, *(_kv_band(cfg, q_start, bq, bk) if cfg.bias_mode == "t5" else (0, 0)),
                 kv_loop=True)
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = _run_loops(loops, body, init)
  # A row that saw no key kept m == MASK: it outputs zeros, and lse = +inf makes its backward p exactly 0.
  empty = m == MASK
  o_ref[...] = jnp.where(empty[:, None], 0.0, acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


# --------------------------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, rpe_ref, lut_ref, slopes_ref, bias_ref, q_seg_ref, kv_seg_ref, q_pos_ref,
               kv_pos_ref, range_ref, do_ref, lse_ref, delta_ref, dq_ref, *grad_refs, cfg: Config):
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
  q_start = pl.program_id(0) * bq
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  nbp = cfg.buckets_padded
  bucket_iota = lax.broadcasted_iota(jnp.int32, (nbp,), 0)
  ends = _t5_ends(cfg, rpe_ref[0]) if cfg.bias_mode == "t5" else None

  def table_grad(region, tile, ds, acc):
    left_bucket, right_bucket = cfg.end_buckets()

    def far_tile(bucket, acc):
      return jnp.where(bucket_iota == bucket, acc + _sum2d(ds), acc)

    def diagonal_tile(shift, acc):
      return acc + _diagonal_bucket_sums(cfg, ds, shift, grad_refs[1], lut_ref, bucket_iota)

    if region in (FAR_LEFT, FAR_RIGHT):
      return far_tile(left_bucket if region == FAR_LEFT else right_bucket, acc)
    if region == BAND:
      return diagonal_tile(tile.k_start - tile.q_start, acc)

    def any_tile(acc):  # one masked reduction per bucket: only for pairs whose distance is not shift + j - i
      bucket = lut_ref[tile.lut_index()]

      def add_bucket(b, acc):
        return jnp.where(bucket_iota == b, acc + _sum2d(jnp.where(bucket == b, ds, 0.0)), acc)
      return lax.fori_loop(0, cfg.num_buckets, add_bucket, acc)

    far, right = tile.far()
    holds, shift = tile.index_shift()
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
    p = _tile_probabilities(cfg, tile, region, q, k, lse, (rpe_ref, slopes_ref, bias_ref), ends)
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
  lo, hi = 0, num_kv_blocks
  if cfg.bias_mode != "full":
    lo, hi = _segment_blocks(cfg, range_ref, lo, _kv_blocks(cfg, pl.program_id(0), bq, bk, num_kv_blocks))
  loops = _loops(cfg, lo, hi, *(_kv_band(cfg, q_start, bq, bk) if cfg.bias_mode == "t5" else (0, 0)),
                 kv_loop=True)
  acc = jnp.zeros((nbp if cfg.bias_mode == "t5" else 2,), jnp.float32)
  dq, acc = _run_loops(loops, body, (jnp.zeros(q.shape, jnp.float32), acc))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
  if cfg.bias_mode in ("t5", "alibi"):
    grad_refs[0][...] = acc


def _dkv_kernel(q_ref, k_ref, v_ref, rpe_ref, slopes_ref, bias_ref, q_seg_ref, kv_seg_ref, q_pos_ref,
                kv_pos_ref, range_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: Config):
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
    p = _tile_probabilities(cfg, tile, region, q, k, lse, (rpe_ref, slopes_ref, bias_ref), ends)
    dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    ds = p * (jnp.dot(do, v.T, preferred_element_type=jnp.float32) - delta[:, None])
    dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
    return dk, dv

  lo, hi = _segment_blocks(cfg, range_ref, lax.div(k_start, bq) if cfg.causal else 0, q_ref.shape[0] // bq)
  loops = _loops(cfg, lo, hi,
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

  def per_program(x):  # [B, blocks, 2]: this program's row
    return None if x is None else pl.BlockSpec((None, None, 2), lambda i, b, h: (b, i, 0))

  rpe_specs = None
  if cfg.bias_mode == "t5":
    band_rows = band_shifts(cfg.max_distance, bq, bk)[2] * bq
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
      bias=full, per_batch=per_batch, per_program=per_program)


def forward(cfg: Config, q, k, v, t5, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos):
  """(out [B, Sq, H, D], lse in base 2 [B, H, Sq]) on block-padded inputs; t5 and slopes2 from
  config.kernel_inputs for the forward blocks."""
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  bq = cfg.blocks.block_q
  sp = _specs(cfg, bq, cfg.blocks.block_k, q_len, kv_len, head_dim, q_blocked=True)
  kv_range = None if q_seg is None else segment_block_ranges(q_seg, kv_seg, bq, cfg.blocks.block_k)[0]
  in_specs = [sp["q"], sp["kv"], sp["kv"], sp["rpe"], sp["slopes"], sp["bias"], sp["per_batch"](q_seg),
              sp["per_batch"](kv_seg), sp["per_batch"](q_pos), sp["per_batch"](kv_pos), sp["per_program"](kv_range)]
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
  )(q, k, v, None if t5 is None else tuple(t5), slopes2, bias, q_seg, kv_seg, q_pos, kv_pos, kv_range)


def backward(cfg: Config, q, k, v, t5, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos, dout, lse2, delta):
  """(dq, dk, dv, bias gradient parts) on block-padded inputs, t5 and slopes2 for the backward blocks.

  The parts: t5, per-program table gradients [B, H, Sq / bq, buckets_padded]; alibi, per-program slope gradients
  [B, H, Sq / bq, 2]; full, the gradient of the logits [B, H, Sq, Sk]; else None.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
  rpe = None if t5 is None else tuple(t5)
  params = plgpu.CompilerParams(num_warps=cfg.blocks.num_warps_bwd, num_stages=cfg.blocks.num_stages_bwd)
  rows = lambda x, blocked, block: pl.BlockSpec(
      (None, None, block if blocked else x.shape[2]), (lambda i, b, h: (b, h, i)) if blocked
      else (lambda i, b, h: (b, h, 0)))

  sp = _specs(cfg, bq, bk, q_len, kv_len, head_dim, q_blocked=True)
  segments_and_positions = [sp["per_batch"](x) for x in (q_seg, kv_seg, q_pos, kv_pos)]
  kv_range, q_range = (None, None) if q_seg is None else segment_block_ranges(q_seg, kv_seg, bq, bk)
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
  lut = jnp.asarray(cfg.lut()) if cfg.bias_mode == "t5" else None
  lut_spec = None if lut is None else pl.BlockSpec((cfg.lut_size,), lambda i, b, h: (0,))
  dq, *grads = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(num_q_blocks, batch, heads),
      in_specs=[sp["q"], sp["kv"], sp["kv"], sp["rpe"], lut_spec, sp["slopes"], sp["bias"],
                *segments_and_positions, sp["per_program"](kv_range), sp["q"], rows(lse2, True, bq),
                rows(lse2, True, bq)],
      out_specs=[sp["q"], *grad_specs],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), *grad_shapes],
      compiler_params=params, interpret=cfg.interpret, name="flash_attention_dq",
  )(q, k, v, rpe, lut, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos, kv_range, dout, lse2, delta)

  sp = _specs(cfg, bq, bk, q_len, kv_len, head_dim, q_blocked=False)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(kv_len // bk, batch, heads),
      in_specs=[sp["q"], sp["kv"], sp["kv"], sp["rpe"], sp["slopes"], sp["bias"], *segments_and_positions,
                sp["per_program"](q_range), sp["q"], rows(lse2, False, bq), rows(lse2, False, bq)],
      out_specs=[sp["kv"], sp["kv"]],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=cfg.interpret, name="flash_attention_dkv",
  )(q, k, v, rpe, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos, q_range, dout, lse2, delta)
  return dq, dk, dv, grads[0] if grads else None
