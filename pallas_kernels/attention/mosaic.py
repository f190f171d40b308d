"""Flash attention forward as a Pallas Mosaic GPU kernel (Hopper: TMA copies, wgmma, mbarriers), with the T5 bias.

A first step towards a FlashAttention-3 style backend: the algorithm of `triton.py`'s forward (base-2 online
softmax in float32, the T5 bias as far scalars plus precomputed band tiles, causal and segment masks, lse in base 2
with +inf for rows that see no key, so the Triton backward can consume it), written with Mosaic GPU constructs.
One warpgroup per program computes one q block of one (batch, head): q is copied once by TMA into swizzled shared
memory; k, v (and the bias tile in the band, the key segment ids with segments) stream through two shared memory
slots, block i + 1 copied while block i is computed; q.k^T and p.v are wgmma's into float32 accumulators.

Supports: no bias or the T5 bias (without positions), causal or not, segment ids (the kv loop narrowed to the
blocks `segment_block_ranges` keeps). Restrictions (`check`): block_q and block_k multiples of 64, Sq and Sk
multiples of them (the public function pads), head_dim 64 or 128, 16-bit q, k, v.

Run only in Mosaic GPU's interpreter so far (`InterpretGPUParams`, jax 0.10.2 and 0.11.2); the compiled variant
goes through the Pallas -> Mosaic GPU lowering on a CPU (jax 0.10.2 and 0.11.2), but was never compiled to PTX nor
run on a GPU. The interpreter lacks a few constructs the compiled kernel uses, so `_Target` swaps them (and only
them) when interpreting: layout hints, k read transposed by wgmma, p as a wgmma operand in registers. It also
lacks `pl.run_state`, so each p.v product goes to a fresh accumulator and is added to the running output in
registers (both targets), instead of accumulating in place as JAX's `attention_mgpu.py` does.

Not done yet: the backward, warp specialization (a producer warpgroup and two consumer warpgroups, as in
`attention_mgpu.py`), tuning, and the public function's dispatch to this backend.

Mosaic GPU is imported when a kernel is built, so importing this module needs no GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.attention.buckets import band_shifts
from pallas_kernels.attention.config import Config, T5Inputs, segment_block_ranges

HEAD_DIMS = (64, 128)
_SWIZZLE = 128  # bytes: the widest swizzle, conflict-free rows for wgmma and TMA


@dataclasses.dataclass(frozen=True)
class Shape:
  """The static sizes the kernel body needs."""
  kv_len: int
  head_dim: int
  block_q: int
  block_k: int


def _smem_tile(plgpu, shape, dtype):
  """A shared memory tile laid out for TMA and wgmma: 8-row tiles as wide as one 128-byte swizzle."""
  minor = _SWIZZLE // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(_SWIZZLE)))


def _band_bounds(q_start, lo, hi, s: Shape, max_distance: int):
  """kv blocks [band_lo, band_hi) of the T5 band within [lo, hi) (triton._kv_band), without negative divisions:
  Mosaic GPU's integer division truncates."""
  first, step, count = band_shifts(max_distance, s.block_q, s.block_k)
  last = first + (count - 1) * step
  lift = -(first // s.block_k)  # whole blocks that make q_start + first non-negative
  band_lo = lax.div(q_start + first + lift * s.block_k + s.block_k - 1, s.block_k) - lift
  band_lo = jnp.minimum(jnp.maximum(band_lo, lo), hi)
  band_hi = jnp.maximum(jnp.minimum(lax.div(q_start + last, s.block_k) + 1, hi), band_lo)
  return band_lo, band_hi


class _Target:
  """What differs between the compiled kernel and Mosaic GPU's interpreter (jax 0.10 to 0.11), which implements
  neither layout hints (`plgpu.layout_cast`, `plgpu.load`) nor wgmma operands other than plain shared memory refs
  (no transposed refs, no A operand in registers).

  Compiled: the FlashAttention-3 operands: k tiles [bk, D] read transposed by wgmma (K-major B), p fed to the
  p.v wgmma from registers, WGMMA fragment layouts. Interpreted: k pre-transposed in global memory ([B, H, D, Sk],
  one XLA transpose) and copied as [D, bk] tiles, p staged through a shared memory tile, no layouts. Everything
  else (copies, barriers, slots, masks, softmax) is the same code in both."""

  def __init__(self, plgpu, interpret: bool):
    self.plgpu, self.interpret = plgpu, interpret
    self.load_takes_index = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty
    self.tile = plgpu.Layout.WGMMA
    self.row, self.col = self.tile.reduce(1), self.tile.reduce(0)  # per query, per key of a tile

  def cast(self, x, layout):
    return x if self.interpret else self.plgpu.layout_cast(x, layout)

  def load(self, ref, layout):
    if self.interpret:
      return ref[...]
    if self.load_takes_index:  # jax 0.10 (jax 0.11 deprecates the index argument)
      return self.plgpu.load(ref, (), layout=layout)
    return self.plgpu.load(ref, layout=layout)

  def iota(self, shape, dimension):
    return self.cast(lax.broadcasted_iota(jnp.int32, shape, dimension), self.tile)

  def k_global(self, k):
    return k.transpose(0, 2, 3, 1) if self.interpret else k

  def k_tiles(self, bk: int, head_dim: int, dtype):
    """The two k slots in shared memory."""
    return _smem_tile(self.plgpu, (2, head_dim, bk) if self.interpret else (2, bk, head_dim), dtype)

  def k_block(self, pl, k_ref, batch, head, start, bk: int):
    """The k rows [start, start + bk) of (batch, head) in global memory."""
    if self.interpret:
      return k_ref.at[batch, head, :, pl.ds(start, bk)]
    return k_ref.at[batch, pl.ds(start, bk), head]

  def k_transposed(self, k_tile):
    """wgmma's B operand for q.k^T: [D, bk]."""
    return k_tile if self.interpret else k_tile.transpose((1, 0))

  def p_scratch(self, bq: int, bk: int, dtype):
    return _smem_tile(self.plgpu, (bq, bk), dtype) if self.interpret else None

  def p_operand(self, p, p_smem):
    """wgmma's A operand for p.v."""
    if not self.interpret:
      return p
    p_smem[...] = p
    self.plgpu.commit_smem()  # make the generic-proxy stores visible to wgmma
    return p_smem


def _kernel(plgpu, pl, target: _Target, s: Shape, cfg: Config, t5: bool, segments: bool,
            q_ref, k_ref, v_ref, band_ref, ends_ref, q_seg_ref, kv_seg_ref, kv_range_ref,  # inputs (global memory)
            out_ref, lse_ref,  # outputs (global memory)
            q_smem, k_smem, v_smem, band_smem, q_seg_smem, kv_seg_smem, lse_smem, p_smem,  # shared memory
            q_barrier, q_seg_barrier, k_barriers, v_barriers, band_barriers, kv_seg_barriers):
  """One q block of one (batch, head): the kv loop in the regions of triton._attention_fwd_kernel. Unused
  inputs and scratch (no T5 bias, no segments) are placeholders or None."""
  bq, bk = s.block_q, s.block_k
  q_block, head, batch = lax.axis_index("q"), lax.axis_index("heads"), lax.axis_index("batch")
  q_start = q_block * bq
  scale2 = cfg.scale * common.LOG2E

  plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, bq), head], q_smem, q_barrier)
  if segments:
    plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, pl.ds(q_start, bq)], q_seg_smem, q_seg_barrier)

  # The kv loop: [lo, hi), causal mask from first_masked on, T5 band [band_lo, band_hi).
  lo, hi, first_masked = 0, s.kv_len // bk, s.kv_len // bk
  if cfg.causal:  # blocks from cdiv(q_start + bq, bk) on lie after every query; from (q_start + 1) // bk on, some
    hi = jnp.minimum(lax.div(q_start + bq + bk - 1, bk), hi)
    first_masked = lax.div(q_start + 1, bk)
  if segments:
    hi = jnp.minimum(hi, kv_range_ref[batch, q_block, 1])
    lo = jnp.minimum(jnp.maximum(lo, kv_range_ref[batch, q_block, 0]), hi)
  band_lo = band_hi = hi
  if t5:
    band_lo, band_hi = _band_bounds(q_start, lo, hi, s, cfg.max_distance)
    band_first, band_step, _ = band_shifts(cfg.max_distance, bq, bk)

  def fetch(kv_block):
    """Start the copies of kv block `kv_block` into its slot (kv_block % 2)."""
    slot = lax.rem(kv_block, jnp.int32(2))
    plgpu.copy_gmem_to_smem(target.k_block(pl, k_ref, batch, head, kv_block * bk, bk), k_smem.at[slot],
                            k_barriers.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, pl.ds(kv_block * bk, bk), head], v_smem.at[slot], v_barriers.at[slot])
    if segments:
      plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, pl.ds(kv_block * bk, bk)], kv_seg_smem.at[slot],
                              kv_seg_barriers.at[slot])
    if t5:
      @pl.when((kv_block >= band_lo) & (kv_block < band_hi))
      def _():
        tile = lax.div(kv_block * bk - q_start - band_first, band_step)
        plgpu.copy_gmem_to_smem(band_ref.at[head, pl.ds(tile * bq, bq)], band_smem.at[slot],
                                band_barriers.at[slot])

  @pl.when(lo < hi)
  def _():
    fetch(lo)

  plgpu.barrier_wait(q_barrier)
  if segments:
    plgpu.barrier_wait(q_seg_barrier)
    q_seg = target.load(q_seg_smem, target.row)

  def tiles(kv_block, carry, far_bias, band: bool, masked: bool):
    """One online softmax step on kv block `kv_block`."""
    acc, m_i, l_i = carry
    slot = lax.rem(kv_block, jnp.int32(2))

    @pl.when(kv_block + 1 < hi)
    def _():
      fetch(kv_block + 1)  # its slot's last reader, block kv_block - 1, has finished (wgmma results are read)

    plgpu.barrier_wait(k_barriers.at[slot])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, target.k_transposed(k_smem.at[slot]))
      return acc_ref[...]

    raw = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
    if band or masked:
      logits = raw * scale2
      if band:  # exact table entries: times log2(e) in float32, the far tiles' value
        plgpu.barrier_wait(band_barriers.at[slot])
        bias = target.load(band_smem.at[slot], target.tile).astype(jnp.float32)
        logits = logits + bias * common.LOG2E
      else:
        logits = logits + far_bias
      if masked:
        visible = None
        if segments:
          plgpu.barrier_wait(kv_seg_barriers.at[slot])
          kv_seg = target.load(kv_seg_smem.at[slot], target.col)
          q_ids = lax.broadcast_in_dim(q_seg, (bq, bk), [0])
          k_ids = lax.broadcast_in_dim(kv_seg, (bq, bk), [1])
          visible = (q_ids == k_ids) & (k_ids != 0)
        if cfg.causal:
          rows = target.iota((bq, bk), 0) + q_start
          cols = target.iota((bq, bk), 1) + kv_block * bk
          causal = rows >= cols
          visible = causal if visible is None else visible & causal
        logits = jnp.where(visible, logits, common.MASK)
      m_new = jnp.maximum(m_i, logits.max(axis=1))
      p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, (bq, bk), [0]))
    else:  # scale and scalar bias kept apart: `logits - row max` is one multiply-add per element
      m_new = jnp.maximum(m_i, raw.max(axis=1) * scale2 + far_bias)
      p = jnp.exp2(raw * scale2 + lax.broadcast_in_dim(far_bias - m_new, (bq, bk), [0]))
    correction = jnp.exp2(m_i - m_new)
    l_i = l_i * correction + p.sum(axis=1)
    plgpu.barrier_wait(v_barriers.at[slot])

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, target.p_operand(p.astype(q_ref.dtype), p_smem), v_smem.at[slot])
      return acc_ref[...]

    acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + pl.run_scoped(
        pv, plgpu.ACC((bq, s.head_dim), jnp.float32))
    return acc, m_new, l_i

  def cut(start, stop, split):
    """[start, stop) cut at split: (end of the first part, start of the second)."""
    return jnp.minimum(stop, jnp.maximum(split, start)), jnp.maximum(start, jnp.minimum(split, stop))

  carry = (target.cast(jnp.zeros((bq, s.head_dim), jnp.float32), target.tile),
           target.cast(jnp.full((bq,), common.MASK, jnp.float32), target.row),
           target.cast(jnp.zeros((bq,), jnp.float32), target.row))
  # Regions of the kv loop, in order: (start, stop, far bias, band tile?); one region without bias.
  if t5:
    regions = ((lo, band_lo, ends_ref[head, 0], False), (band_lo, band_hi, 0.0, True),
               (band_hi, hi, ends_ref[head, 1], False))
  else:
    regions = ((lo, hi, 0.0, False),)
  for start, stop, far_bias, band in regions:
    end, masked_start = cut(start, stop, first_masked)
    step = functools.partial(tiles, far_bias=far_bias, band=band)
    carry = lax.fori_loop(start, end, functools.partial(step, masked=segments), carry)
    if cfg.causal:  # blocks from first_masked on cross the diagonal
      carry = lax.fori_loop(masked_start, stop, functools.partial(step, masked=True), carry)
  acc, m_i, l_i = carry

  # Rows that saw no key (m_i still MASK) summed p = 1 over masked keys: out 0, lse +inf.
  empty = m_i == common.MASK
  l_safe = jnp.where(empty, 1.0, l_i)
  out = acc * lax.broadcast_in_dim(jnp.where(empty, 0.0, 1.0 / l_safe), acc.shape, [0])
  q_smem[...] = out.astype(q_ref.dtype)  # q is no longer read: its tile stages the output
  # Mosaic GPU lowers log, not log2.
  lse_smem[...] = jnp.where(empty, jnp.inf, m_i + jnp.log(l_safe) * common.LOG2E)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, pl.ds(q_start, bq), head])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_start, bq)])
  plgpu.wait_smem_to_gmem(0)


def check(q, k, cfg: Config) -> None:
  """The restrictions of this kernel (see the module docstring)."""
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
  if bq % 64 or bk % 64:  # a warpgroup's wgmma covers 64 rows
    raise ValueError(f"the Mosaic GPU kernel needs blocks that are multiples of 64; got {bq}, {bk}")
  if q.shape[1] % bq or k.shape[1] % bk:
    raise ValueError(f"the Mosaic GPU kernel needs lengths that are multiples of the blocks ({bq}, {bk}); got "
                     f"{q.shape[1]}, {k.shape[1]}")
  if q.shape[3] not in HEAD_DIMS:
    raise ValueError(f"the Mosaic GPU kernel takes head_dim in {HEAD_DIMS}; got {q.shape[3]}")
  if jnp.dtype(q.dtype).itemsize != 2:
    raise ValueError(f"the Mosaic GPU kernel takes 16-bit q, k, v; got {q.dtype}")
  if cfg.bias_mode not in ("none", "t5") or cfg.has_positions:
    raise ValueError("the Mosaic GPU kernel takes no bias or the T5 bias, without positions")


def forward(cfg: Config, q, k, v, t5: T5Inputs | None, slopes2=None, bias=None, q_seg=None, kv_seg=None,
            q_pos=None, kv_pos=None):
  """(out [B, Sq, H, D], lse in base 2 [B, H, Sq], +inf for rows that see no key) on block-padded inputs:
  triton.forward's contract, for no bias or the T5 bias without positions. cfg.interpret runs it in Mosaic GPU's
  interpreter."""
  del slopes2, bias, q_pos, kv_pos
  check(q, k, cfg)
  import jax.experimental.pallas as pl  # pylint: disable=import-outside-toplevel
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel

  batch, q_len, heads, head_dim = q.shape
  s = Shape(k.shape[1], head_dim, cfg.blocks.block_q, cfg.blocks.block_k)
  bq, bk = s.block_q, s.block_k
  placeholder = jnp.zeros((1, 1), jnp.float32)
  segments = q_seg is not None
  band, ends, band_dtype = placeholder, placeholder, jnp.float32
  if t5 is not None:  # the far biases [H, 2]: the vector's two ends
    band, ends, band_dtype = t5.band, t5.vector[:, jnp.array([0, 2 * cfg.max_distance])], t5.band.dtype
  kv_range = jnp.zeros((1, 1, 2), jnp.int32)
  if segments:
    kv_range, _ = segment_block_ranges(q_seg, kv_seg, bq, bk)
  else:
    q_seg = kv_seg = jnp.zeros((1, 1), jnp.int32)

  target = _Target(plgpu, cfg.interpret)
  scratch = [
      _smem_tile(plgpu, (bq, head_dim), q.dtype), target.k_tiles(bk, head_dim, k.dtype),
      _smem_tile(plgpu, (2, bk, head_dim), v.dtype),
      _smem_tile(plgpu, (2, bq, bk), band_dtype) if t5 is not None else None,
      plgpu.SMEM((bq,), jnp.int32) if segments else None,
      plgpu.SMEM((2, bk), jnp.int32) if segments else None,
      plgpu.SMEM((bq,), jnp.float32), target.p_scratch(bq, bk, q.dtype),
      plgpu.Barrier(), plgpu.Barrier() if segments else None,  # q, its segment ids
      plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),  # k, v slots
      plgpu.Barrier(num_barriers=2) if t5 is not None else None,
      plgpu.Barrier(num_barriers=2) if segments else None,
  ]
  if cfg.interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import \
        InterpretGPUParams  # pylint: disable=import-outside-toplevel
    interpret = InterpretGPUParams()
  else:
    interpret = None
  kernel = functools.partial(_kernel, plgpu, pl, target, s, cfg, t5 is not None, segments)
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)),
      scratch_types=scratch,
      grid=(q_len // bq, heads, batch),
      grid_names=("q", "heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(q, target.k_global(k), v, band, ends, q_seg, kv_seg, kv_range)
