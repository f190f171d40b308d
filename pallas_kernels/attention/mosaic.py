"""Flash attention, forward and backward, as Pallas Mosaic GPU kernels (Hopper: TMA copies, wgmma, mbarriers),
with the T5 bias.

A first step towards a FlashAttention-3 style backend: the algorithm of `triton.py` (base-2 online softmax in
float32, the T5 bias as far scalars plus precomputed band tiles, causal and segment masks, lse in base 2 with +inf
for rows that see no key, partial table gradients per q block), written with Mosaic GPU constructs; `forward` and
`backward` have triton.py's contracts. A band tile's bias is the initial accumulator of its q.k^T (`_tile_products`).
- forward, warp specialized as JAX's `attention_mgpu.py`: two q blocks of one (batch, head) per program, one per
  consumer warpgroup, which copies its q once by TMA into swizzled shared memory; a producer warpgroup streams k, v
  (the key segment ids with segments, each consumer's bias tile in its band) through two shared memory slots,
  refilling a slot's k once both consumers' q.k^T have read it and the rest once their p.v have, so the copies of
  the next blocks run while the consumers compute; q.k^T and p.v are wgmma's into float32 accumulators, the consumers
  taking turns on the tensor cores (FlashAttention-3's ping-pong). Both consumers walk the union of their kv loops (the
  other's blocks only awaited and released: every barrier phase is observed by each of its waiters). Two slots only: a
  float32 band tile per consumer and slot already takes 128 KiB of shared memory at 64 x 128 blocks. The skeleton
  (`_own_loops`, `_this_loop`, `_produce`, `_consume`) is shared with the backward kernels.
- backward, dq kernel, warp specialized as the forward: two q blocks per program, one per consumer warpgroup (q, do,
  lse, delta once), a producer streaming k, v (key segment ids, each consumer's band tile) of the union of their kv
  loops through two slots; q.k^T and do.v^T issued together (one wait), then ds.k, all wgmma's, dq accumulated in
  place; no ping-pong turns (slower there). The table gradient needs per-bucket sums of ds: far tiles add their row
  sums to one bucket (carried in registers, written once per q block); a band tile's pairs of one bucket lie along
  diagonals, which no row or column sum takes apart, so its ds goes out whole in the products' 16-bit dtype
  ([B, q blocks, H, shifts, bq, bk], zeros for the shifts a q block does not visit) and `backward` sums all programs'
  tiles in float32 and maps them to buckets with one one-hot matmul (`buckets.sum_into_buckets`, as the Triton
  backward's diagonal sums). Its shared memory fits the default 64 x 64 backward blocks (D=128, a float32 table and
  segment ids: with no cross-warp reduction scratch, `_launch`) and, at D=64, 128-row or 128-key blocks.
- backward, dk/dv kernel, warp specialized as the forward with the sides swapped: two kv blocks per program, one per
  consumer warpgroup (k, v once), a producer streaming q, do, lse, delta (query segment ids, each consumer's band tile,
  pre-transposed) of the union of their q loops through two slots; on [keys, queries] tiles k.q^T and dp^T = v.do^T
  issued together (one wait), then p^T.do and ds^T.q (dv and dk, accumulated in place) together; no ping-pong
  turns. Its shared memory (a band tile per consumer and slot) takes the default 64 x 64 backward blocks;
  128-row or 128-key ones overflow at D=128, and at D=64 with a float32 table and segment ids. Blocks that overflow
  either kernel are refused when `backward` is traced, interpreted too, with one error naming them
  (`_check_shared_memory`).
- backward, fused (FlashAttention-3's): where it fits in shared memory (D=64 at the default 64 x 64 blocks), the
  dk/dv kernel also computes each tile's part of dq, ds.k (ds^T stored once to shared memory: dk's A operand and,
  read transposed, dq's), and adds it by a TMA reduce-add to a float32 dq in global memory (`_Target.add_to_global`),
  and takes the table gradient (band tiles of ds^T out whole, far sums per key): 5 products per tile instead of
  the two kernels' 7, and no dq kernel. `backward` picks it from the shared memory it needs.

Supports: no bias or the T5 bias (without positions), causal or not, segment ids (the loops narrowed to the blocks
`segment_block_ranges` keeps). Restrictions (`check`): blocks multiples of 64, Sq and Sk multiples of them (the
public function pads), head_dim 64 or 128, 16-bit q, k, v.

Tested compiled on an H200 (jax 0.11.2: forward and both warp-specialized backward kernels) and in Mosaic GPU's
interpreter on CPU (`InterpretGPUParams`, jax 0.10.2 and 0.11.2), where the compiled variants also go through the
Pallas -> Mosaic GPU lowering. The interpreter lacks a few constructs the compiled kernels use, so `_Target` swaps
them (and only them) when interpreting: layout hints, B operands read transposed by wgmma, A operands in registers,
and `pl.run_state`: compiled, the forward's p.v and the backward's dq, dk and dv accumulate in place as in JAX's
`attention_mgpu.py`; interpreted, a product goes to a fresh accumulator and is added to the running one in
registers. The fused backward's TMA reductions and Ref operand, which the interpreter lacks too, become one dq
accumulator per consumer, read, added and written back (`_Target.add_to_global`).

Speed (H200, T5 bias, float32 table, benchmarks/notes_attention.md): at D=64 the forward at 0.84-0.94x cuDNN
without bias and 1.02-1.18x the Triton forward (S=1,024 to 4,096, causal or not), forward + backward (fused)
1.12-1.14x the Triton kernels and 0.83-0.88x cuDNN; at D=128 forward + backward 1.22-1.39x the Triton kernels
(0.82-0.88x cuDNN).
Blocks: tuning.py. The interpreter runs each kernel's three warpgroups as concurrent XLA:CPU executions:
tests/conftest.py widens XLA's CPU thread pool for them. `flash_attention(..., backend="mosaic")` runs it, and the
model's `kernel_backend=auto` where it measured faster (head_dim 128 on Hopper: fat5_jax/ops.py).

Mosaic GPU is imported when a kernel is built, so importing this module needs no GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import common
from pallas_kernels.attention.buckets import band_shifts, band_tiles, sum_into_buckets
from pallas_kernels.attention.config import Config, T5Inputs, segment_block_ranges

HEAD_DIMS = (64, 128)
_SWIZZLE = 128  # bytes: the widest swizzle, conflict-free rows for wgmma and TMA


@dataclasses.dataclass(frozen=True)
class Shape:
  """The static sizes the kernel bodies need."""
  q_len: int
  kv_len: int
  head_dim: int
  block_q: int
  block_k: int


def _smem_tile(plgpu, shape, dtype):
  """A shared memory tile laid out for TMA and wgmma: 8-row tiles as wide as one 128-byte swizzle (as one row of
  the tile if that is narrower: the 8-bit bucket ids' 64-key rows)."""
  swizzle = min(_SWIZZLE, shape[-1] * jnp.dtype(dtype).itemsize)
  minor = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(swizzle)))


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


def _kv_loop(s: Shape, cfg: Config, t5: bool, segments: bool, kv_range_ref, batch, q_block):
  """The kv loop of a q block (forward and dq kernels): blocks [lo, hi), the causal mask from first_masked on, the
  T5 band [band_lo, band_hi) (empty without the bias)."""
  bq, bk = s.block_q, s.block_k
  q_start = q_block * bq
  lo, hi, first_masked = 0, s.kv_len // bk, s.kv_len // bk
  if cfg.causal:  # blocks from cdiv(q_start + bq, bk) on lie after every query; from (q_start + 1) // bk on, some
    hi = jnp.minimum(lax.div(q_start + bq + bk - 1, bk), hi)
    first_masked = lax.div(q_start + 1, bk)
  if segments:
    hi = jnp.minimum(hi, kv_range_ref[batch, q_block, 1])
    lo = jnp.minimum(jnp.maximum(lo, kv_range_ref[batch, q_block, 0]), hi)
  if cfg.key_mask:  # masked from the row's first kv block with a hidden key on (`_operands`)
    first_masked = jnp.minimum(first_masked, kv_range_ref[batch, q_block, 2])
  band_lo = band_hi = hi
  if t5:
    band_lo, band_hi = _band_bounds(q_start, lo, hi, s, cfg.max_distance)
  return lo, hi, first_masked, band_lo, band_hi


def _walk_region(step, carry, start, stop, split, cfg: Config, segments: bool, masked_first: bool):
  """step(block, carry, masked=) over the blocks [start, stop) of one region. Causal or with a key mask, the blocks
  on one side of `split` are masked (they cross the diagonal, or may hold a hidden key): those before it if
  masked_first (the dk/dv kernel's q blocks), else those from it on (the forward's and the dq kernel's kv blocks).
  Other segment ids mask every block."""
  every = segments and not cfg.key_mask
  if not (cfg.causal or cfg.key_mask):
    return lax.fori_loop(start, stop, functools.partial(step, masked=every), carry)
  end, resume = jnp.minimum(stop, jnp.maximum(split, start)), jnp.maximum(start, jnp.minimum(split, stop))
  carry = lax.fori_loop(start, end, functools.partial(step, masked=masked_first or every), carry)
  return lax.fori_loop(resume, stop, functools.partial(step, masked=not masked_first or every), carry)


class _Target:
  """What differs between the compiled kernel and Mosaic GPU's interpreter (jax 0.10 to 0.11), which implements
  neither layout hints (`plgpu.layout_cast`, `plgpu.load`) nor wgmma operands other than plain shared memory refs
  (no transposed refs, no A operand in registers) nor `pl.run_state` nor TMA reductions (jax 0.10.2).

  Compiled: the FlashAttention-3 operands: k tiles [bk, D] read transposed by wgmma (K-major B; likewise the
  backward's v, q and do tiles), p (the backward's p and ds) fed to wgmma from registers, WGMMA fragment layouts.
  Interpreted: those tiles transposed in registers into a shared memory tile, p (ds) staged through a shared
  memory tile, no layouts, no accumulation in place (`pl.run_state`). Everything else (copies, barriers, slots,
  masks, softmax) is the same code in both."""

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

  def p_scratch(self, bq: int, bk: int, dtype, leading=()):
    """The staging tile of `p_operand` (interpreted only), one per index of `leading` (per consumer)."""
    return _smem_tile(self.plgpu, (*leading, bq, bk), dtype) if self.interpret else None

  def p_operand(self, p, p_smem):
    """wgmma's A operand for p.v (and the backward's products of p and ds)."""
    if not self.interpret:
      return p
    p_smem[...] = p
    self.plgpu.commit_smem()  # make the generic-proxy stores visible to wgmma
    return p_smem

  def accumulate(self, pl, acc, a, b):
    """acc + a @ b: the wgmma accumulates into acc in place (`pl.run_state`, as `attention_mgpu.py`), or,
    interpreted (no run_state), into a fresh accumulator added to acc in registers."""
    if self.interpret:
      return acc + _matmul(self.plgpu, pl, a, b, acc.shape)

    def body(acc_ref):
      self.plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(body)(self.plgpu.ACC.init(acc))

  def accumulate_together(self, pl, products, while_running=None):
    """[acc + a @ b for acc, a, b in products], the wgmma's issued together, so that one wait
    covers them all (attention_mgpu.py's dv and dp^T), accumulating in place; interpreted, into fresh accumulators
    added to the accs in registers. while_running() (if given) runs between their issue and the read of their
    results. A callable among the products runs where it stands in the issue order (interpreted: first), while
    the products before it run."""
    steps, products = products, [x for x in products if not callable(x)]
    if self.interpret:
      for step in steps:
        if callable(step):
          step()
      fresh = _matmuls(self.plgpu, pl, [(a, b) for _, a, b in products], [acc.shape for acc, _, _ in products],
                       while_running)
      return [acc + product for (acc, _, _), product in zip(products, fresh)]

    def body(acc_refs):
      acc_refs = iter(acc_refs)
      for step in steps:
        if callable(step):
          step()
        else:
          self.plgpu.wgmma(next(acc_refs), *step[1:])
      if while_running is not None:
        while_running()

    return list(pl.run_state(body)(tuple(self.plgpu.ACC.init(acc) for acc, _, _ in products)))

  def add_to_global(self, tile, stage, dst):
    """dst += tile (float32 [rows, D]) in global memory, where other programs add theirs: compiled, tile goes
    through the shared memory tile `stage` and TMA adds it in L2 (a reduction, atomic against the other programs'
    ones); interpreted (no TMA reductions), read, added in registers and written back: there dst is this
    consumer's own accumulator and the programs run one after another (`backward`)."""
    if self.interpret:
      dst[...] = dst[...] + tile
      return
    # The previous reduction has read the stage (two stages in turn measured no faster: 5.56 against 5.38 ms at
    # S=4,096, D=64, H200).
    self.plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    stage[...] = tile
    self.plgpu.commit_smem()
    self.plgpu.copy_smem_to_gmem(stage, dst, reduction_op="add")

  def t_scratch(self, rows: int, head_dim: int, dtype, leading=()):
    """The staging tile of `transposed` (interpreted only), one per index of `leading`."""
    return _smem_tile(self.plgpu, (*leading, head_dim, rows), dtype) if self.interpret else None

  def transposed(self, tile, t_smem):
    """wgmma's B operand x^T of a [rows, D] tile (k for q.k^T; the backward's v, q, do too): read transposed by
    wgmma, or, interpreted, transposed in registers into the [D, rows] tile t_smem."""
    if not self.interpret:
      return tile.transpose((1, 0))
    t_smem[...] = tile[...].T
    self.plgpu.commit_smem()
    return t_smem


def _matmuls(plgpu, pl, products, shapes, while_running=None):
  """[a @ b for a, b in products] (of the given shapes), the wgmma's issued together into fresh float32 accumulators
  (the interpreter lacks pl.run_state to accumulate in place): one wait for all. while_running() (if given) runs
  between their issue and the read of their results."""
  def body(*acc_refs):
    for acc_ref, (a, b) in zip(acc_refs, products):
      plgpu.wgmma(acc_ref, a, b)
    if while_running is not None:
      while_running()
    return tuple(acc_ref[...] for acc_ref in acc_refs)

  return pl.run_scoped(body, *(plgpu.ACC(shape, jnp.float32) for shape in shapes))


def _matmul(plgpu, pl, a, b, shape):
  """a @ b: `_matmuls` of one product."""
  return _matmuls(plgpu, pl, ((a, b),), (shape,))[0]


def _visible(target: _Target, cfg: Config, shape, q_axis: int, q_start, k_start, q_seg, k_seg):
  """The pairs of a masked tile (queries along q_axis) that a query sees: same nonzero segment (q_seg None without
  segments), key not after the query when causal."""
  k_axis = 1 - q_axis
  visible = None
  if q_seg is not None:
    q_ids = lax.broadcast_in_dim(q_seg, shape, [q_axis])
    k_ids = lax.broadcast_in_dim(k_seg, shape, [k_axis])
    visible = (q_ids == k_ids) & (k_ids != 0)
  if cfg.causal:
    causal = target.iota(shape, q_axis) + q_start >= target.iota(shape, k_axis) + k_start
    visible = causal if visible is None else visible & causal
  return visible


def _tile_products(plgpu, pl, target: _Target, cfg: Config, products, shape, band=None, while_running=None):
  """A tile's products [a @ b for a, b in products] (all of one shape), issued together: one wait. On band tiles
  (band: the band tile's shared memory tile and barrier) the first, the tile's q.k^T (k.q^T), accumulates onto the
  tile's table entries divided by the scale, so that raw * scale holds the bias and no bias tile is held in
  registers beside the tile's products (a float32 [64, 128] one took the backward's dk/dv kernel at 128 x 64 blocks
  from 2.90 to 3.26 ms at S=4,096, H200). while_running() (if given) runs between their issue and the read of their
  results."""
  if band is None:
    return _matmuls(plgpu, pl, products, [shape] * len(products), while_running)
  band_tile, band_barrier = band
  plgpu.barrier_wait(band_barrier)
  bias = target.load(band_tile, target.tile).astype(jnp.float32)
  onset = bias if cfg.scale == 1.0 else bias * (1.0 / cfg.scale)
  inits = (onset,) + tuple(target.cast(jnp.zeros(shape, jnp.float32), target.tile) for _ in products[1:])
  return target.accumulate_together(pl, [(init, a, b) for init, (a, b) in zip(inits, products)], while_running)


_CONSUMERS = 2  # every kernel: warpgroups that each own one block of a program; one more issues the copies
_PRODUCER = _CONSUMERS  # the copying warpgroup's index
_STAGES = 2  # every kernel: shared memory slots of the streamed blocks
# The backward kernels take no ping-pong turns (as attention_mgpu.py's backward): with turns in both (the forward's
# schedule barrier, two round trips per block) the forward + backward measured 292 -> 261 TFLOP/s (H200, D=64,
# S=4,096), their tiles taking three or four products per exp2 where the forward's take two.


def _union(a, b):
  """The smallest kv range [lo, hi) holding the ranges a and b, an empty one ignored."""
  (lo_a, hi_a), (lo_b, hi_b) = a, b
  a_empty, b_empty = lo_a >= hi_a, lo_b >= hi_b
  lo = jnp.where(a_empty, lo_b, jnp.where(b_empty, lo_a, jnp.minimum(lo_a, lo_b)))
  hi = jnp.where(a_empty, hi_b, jnp.where(b_empty, hi_a, jnp.maximum(hi_a, hi_b)))
  return lo, hi


# The warp-specialized skeleton of the three kernels. A program owns _CONSUMERS resident blocks (the forward's
# and the dq kernel's q blocks, the dk/dv kernel's kv blocks), one per consumer warpgroup; each has a loop over the
# other side's blocks, a tuple (lo, hi, split, band_lo, band_hi): blocks [lo, hi), the causal split of
# `_walk_region`, the T5 band. The producer streams the blocks of the union of the loops.


def _own_loops(loop_of, program, count: int):
  """([the loop of resident block _CONSUMERS * program + c for each consumer c], the union (u_lo, u_hi) of their
  ranges); loop_of(block) -> (lo, hi, split, band_lo, band_hi); a loop all zeros (empty) where the last program has
  fewer than _CONSUMERS of the `count` blocks."""
  def own(block):
    bounds = loop_of(jnp.minimum(block, count - 1))
    return tuple(jnp.where(block < count, x, 0) for x in bounds)

  loops = [own(_CONSUMERS * program + c) for c in range(_CONSUMERS)]
  return loops, _union(*((lo, hi) for lo, hi, *_ in loops))


def _this_loop(wg, loops, u_hi):
  """Consumer wg's loop. An empty one (no resident block, or one that sees nothing) may lie outside the union: it
  is moved to the union's end, so that the consumer's first `skip` loop walks the whole union."""
  lo, hi, split, band_lo, band_hi = (jnp.where(wg == 0, *pair) for pair in zip(*loops))
  empty = lo >= hi
  lo, hi, band_lo, band_hi = (jnp.where(empty, u_hi, x) for x in (lo, hi, band_lo, band_hi))
  return lo, hi, split, band_lo, band_hi


def _copy_in(plgpu, scratch, name: str, src, index, dst=None):
  """Start the TMA copy of `src` into `{name}_smem` at `index` (or into `dst`), arriving on `{name}_barriers` at
  `index` (the backward kernels' scratch dicts)."""
  plgpu.copy_gmem_to_smem(src, scratch[name + "_smem"].at[index] if dst is None else dst,
                          scratch[name + "_barriers"].at[index])


def _load_resident(plgpu, scratch, resident, wg):
  """A backward consumer's resident blocks, ((name, src, dst or None), ...): copied at index wg, then awaited."""
  for name, src, dst in resident:
    _copy_in(plgpu, scratch, name, src, wg, dst)
  for name, _, _ in resident:
    plgpu.barrier_wait(scratch[name + "_barriers"].at[wg])


def _produce(plgpu, pl, u_lo, u_hi, fetches):
  """The producer warpgroup: for each block of the union [u_lo, u_hi), in order, each (fetch, consumed_barriers)
  of `fetches`: fetch(block) starts copies into slot block % _STAGES once both consumers have released what it
  copies of the slot's previous block (consumed_barriers, one per slot, _CONSUMERS arrivals). Tiles released apart
  (the forward's k, read by the block's first product, before v) are refilled sooner."""
  plgpu.set_max_registers(40, action="decrease")  # issuing copies needs few: the consumers take the rest

  def wait_consumed(block, consumed_barriers):
    plgpu.barrier_wait(consumed_barriers.at[lax.rem(block, jnp.int32(_STAGES))])

  @pl.loop(u_lo, u_hi)
  def _(block):
    for fetch, consumed_barriers in fetches:
      @pl.when(block >= u_lo + _STAGES)
      def _():
        wait_consumed(block - _STAGES, consumed_barriers)  # the slot's previous block is read by both consumers

      fetch(block)

  # The last blocks' releases: unneeded for the copies, but each completion of a barrier is observed by every
  # warpgroup that waits on it (the interpreter checks it), and the consumers have finished reading here.
  @pl.loop(jnp.maximum(u_lo, u_hi - _STAGES), u_hi)
  def _(block):
    for _, consumed_barriers in fetches:
      wait_consumed(block, consumed_barriers)


def _take_turn(plgpu, schedule_barrier, between=lambda: None):
  """FlashAttention-3's ping-pong (as attention_mgpu.py): hand the tensor cores to the other consumer and wait for
  them back, so that one consumer's element-wise work runs while the other's wgmma's do. Consumer 1 starts half a
  block late (`_consume`): the two turns each takes per block alternate with the other's. Without a schedule
  barrier (None), only between()."""
  if schedule_barrier is not None:
    plgpu.barrier_arrive(schedule_barrier)
  between()
  if schedule_barrier is not None:
    plgpu.barrier_wait(schedule_barrier)


def _release(plgpu, consumed_barriers, slot):
  """This consumer has read the slot (its wgmma results are read: wgmma has finished reading the tiles)."""
  plgpu.barrier_arrive(consumed_barriers.at[slot])


def _consume(plgpu, pl, wg, union, own, consumed, schedule_barrier, waits, walk):
  """A consumer's walk of the union: the blocks of [u_lo, u_hi) before and after its own [lo, hi) skipped, walk()
  (its own blocks, each with two turns and a release of each of `consumed`, as `skip`) in between; returns walk()'s
  result. consumed: the release barriers of `_produce`'s fetches. waits: (the slot barriers a block's tiles wait
  for before its first turn, those waited for during its second). schedule_barrier None: no turns."""
  (u_lo, u_hi), (lo, hi) = union, own
  take_turn = functools.partial(_take_turn, plgpu, schedule_barrier)
  before, during = waits

  def skip(block, carry):
    """A block of the other consumer's loop only: its copies are awaited (every phase is observed), it takes the
    turns of a computed block, in their order, and releases the slot."""
    slot = lax.rem(block, jnp.int32(_STAGES))
    for barriers in before:
      plgpu.barrier_wait(barriers.at[slot])
    take_turn()
    take_turn(lambda: [plgpu.barrier_wait(barriers.at[slot]) for barriers in during])
    for consumed_barriers in consumed:
      _release(plgpu, consumed_barriers, slot)
    return carry

  if schedule_barrier is not None:
    pl.when(wg == 1)(take_turn)
  lax.fori_loop(u_lo, lo, skip, ())
  result = walk()
  lax.fori_loop(hi, u_hi, skip, ())
  if schedule_barrier is not None:
    pl.when(wg == 0)(take_turn)
  return result


def _kernel(plgpu, pl, target: _Target, s: Shape, cfg: Config, t5: bool, segments: bool,
            q_ref, k_ref, v_ref, band_ref, ends_ref, q_seg_ref, kv_seg_ref, kv_range_ref,  # inputs (global memory)
            out_ref, lse_ref,  # outputs (global memory)
            q_smem, k_smem, v_smem, band_smem, q_seg_smem, kv_seg_smem, lse_smem, p_smem, t_smem,  # shared memory
            q_barriers, q_seg_barriers, k_barriers, v_barriers, band_barriers, kv_seg_barriers, k_consumed_barriers,
            consumed_barriers, schedule_barrier):
  """Two q blocks of one (batch, head), warp specialized: consumer warpgroup c < _CONSUMERS runs the kv loop of
  q block _CONSUMERS * program + c in the regions of triton._attention_fwd_kernel; the producer warpgroup streams
  the kv blocks of the union of their loops through _STAGES slots. Both consumers walk every block of the union
  (the ones outside their own loop only waited for and released), so each observes every phase of the shared
  barriers. Unused inputs and scratch (no T5 bias, no segments) are placeholders or None.

  Barrier counts, per kv block j of the union [u_lo, u_hi) in slot j % _STAGES:
  - k, v (kv_seg) slots: one TMA arrival (the producer's copy); waited once by each consumer.
  - band slot of consumer c (2 * c + slot): one TMA arrival for j in c's band; waited once by c for j in its band.
  - k consumed slot: one arrival by each consumer once q.k^T has read k (num_arrivals=_CONSUMERS), as
    attention_mgpu.py, so that the next k is copied while the softmax and p.v run; waited once by the producer:
    before copying k of block j + _STAGES into the slot, or at the end (the last _STAGES blocks).
  - consumed slot: the same for the rest of the slot (v, the band tiles, kv_seg), once p.v has read v.
  - q (q_seg) of consumer c: one TMA arrival, one wait by c.
  - schedule (`take_turn`, num_arrivals=_CONSUMERS): each consumer takes two turns per block of the union (its own
    or skipped), consumer 1 one more before its loop, consumer 0 one more after it: 2 n + 1 each; every turn
    arrives once, then waits once, so each phase completes with one arrival of each and is observed by both."""
  bq, bk = s.block_q, s.block_k
  program, head, batch, wg = (lax.axis_index(name) for name in ("q", "heads", "batch", "wg"))
  q_blocks = s.q_len // bq
  scale2 = cfg.scale * common.LOG2E
  band_first, band_step, _ = band_shifts(cfg.max_distance, bq, bk)

  loops, (u_lo, u_hi) = _own_loops(
      lambda q_block: _kv_loop(s, cfg, t5, segments, kv_range_ref, batch, q_block), program, q_blocks)

  @pl.when(wg == _PRODUCER)
  def _producer():
    def fetch_k(kv_block):
      """Start the copy of k of kv block `kv_block` into its slot."""
      slot = lax.rem(kv_block, jnp.int32(_STAGES))
      plgpu.copy_gmem_to_smem(k_ref.at[batch, pl.ds(kv_block * bk, bk), head], k_smem.at[slot], k_barriers.at[slot])

    def fetch(kv_block):
      """Start the copies of the rest of kv block `kv_block` into its slot."""
      slot = lax.rem(kv_block, jnp.int32(_STAGES))
      keys = pl.ds(kv_block * bk, bk)
      plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, head], v_smem.at[slot], v_barriers.at[slot])
      if segments:
        plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, keys], kv_seg_smem.at[slot], kv_seg_barriers.at[slot])
      if t5:
        for c, (_, _, _, band_lo, band_hi) in enumerate(loops):
          @pl.when((kv_block >= band_lo) & (kv_block < band_hi))
          def _():
            tile = lax.div(kv_block * bk - (_CONSUMERS * program + c) * bq - band_first, band_step)
            plgpu.copy_gmem_to_smem(band_ref.at[head, pl.ds(tile * bq, bq)], band_smem.at[_STAGES * c + slot],
                                    band_barriers.at[_STAGES * c + slot])

    _produce(plgpu, pl, u_lo, u_hi, ((fetch_k, k_consumed_barriers), (fetch, consumed_barriers)))

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_block = _CONSUMERS * program + wg
    exists = q_block < q_blocks
    q_start = q_block * bq
    rows = pl.ds(q_start, bq)
    lo, hi, first_masked, band_lo, band_hi = _this_loop(wg, loops, u_hi)
    q_tile, lse_tile = q_smem.at[wg], lse_smem.at[wg]
    p_tile = None if p_smem is None else p_smem.at[wg]
    t_tile = None if t_smem is None else t_smem.at[wg]
    take_turn = functools.partial(_take_turn, plgpu, schedule_barrier)

    q_seg = None

    @pl.when(exists)
    def _():
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_tile, q_barriers.at[wg])
      if segments:
        plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], q_seg_smem.at[wg], q_seg_barriers.at[wg])
      plgpu.barrier_wait(q_barriers.at[wg])
      if segments:
        plgpu.barrier_wait(q_seg_barriers.at[wg])

    if segments:
      q_seg = target.load(q_seg_smem.at[wg], target.row)  # (unread garbage without a q block: nothing uses it)

    def tiles(kv_block, carry, far_bias, band: bool, masked: bool):
      """One online softmax step on kv block `kv_block`."""
      acc, m_i, l_i = carry
      slot = lax.rem(kv_block, jnp.int32(_STAGES))
      plgpu.barrier_wait(k_barriers.at[slot])
      if segments:  # every block of the loop is masked with segments; its ids are awaited first
        plgpu.barrier_wait(kv_seg_barriers.at[slot])

      band_slot = _STAGES * wg + slot
      raw, = _tile_products(plgpu, pl, target, cfg, ((q_tile, target.transposed(k_smem.at[slot], t_tile)),), (bq, bk),
                            (band_smem.at[band_slot], band_barriers.at[band_slot]) if band else None, take_turn)
      _release(plgpu, k_consumed_barriers, slot)  # q.k^T's result is read: wgmma has read k
      if band or masked:
        logits = raw * scale2 + far_bias  # far_bias 0 on band tiles
        if masked:
          kv_seg = target.load(kv_seg_smem.at[slot], target.col) if segments else None
          visible = _visible(target, cfg, (bq, bk), 0, q_start, kv_block * bk, q_seg, kv_seg)
          logits = jnp.where(visible, logits, common.MASK)
        m_new = jnp.maximum(m_i, logits.max(axis=1))
        p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, (bq, bk), [0]))
      else:  # scale and scalar bias kept apart: `logits - row max` is one multiply-add per element
        m_new = jnp.maximum(m_i, raw.max(axis=1) * scale2 + far_bias)
        p = jnp.exp2(raw * scale2 + lax.broadcast_in_dim(far_bias - m_new, (bq, bk), [0]))
      correction = jnp.exp2(m_i - m_new)
      acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
      l_i = l_i * correction + p.sum(axis=1)
      p = p.astype(q_ref.dtype)
      # All of the softmax before the turn (attention_mgpu.py's order, which it measured to matter): the element-wise
      # work then runs while the other consumer's products do, and none of it delays p.v.
      acc, l_i, m_new, p = lax.optimization_barrier((acc, l_i, m_new, p))
      take_turn(lambda: plgpu.barrier_wait(v_barriers.at[slot]))  # the softmax is done: p.v waits for its turn
      acc = target.accumulate(pl, acc, target.p_operand(p, p_tile), v_smem.at[slot])
      _release(plgpu, consumed_barriers, slot)  # p.v's result is read: wgmma has read v
      return acc, m_new, l_i

    def walk():
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
        carry = _walk_region(functools.partial(tiles, far_bias=far_bias, band=band), carry, start, stop,
                             first_masked, cfg, segments, masked_first=False)
      return carry

    waits = ([k_barriers] + ([kv_seg_barriers] if segments else []), [v_barriers])
    acc, m_i, l_i = _consume(plgpu, pl, wg, (u_lo, u_hi), (lo, hi), (k_consumed_barriers, consumed_barriers),
                             schedule_barrier, waits, walk)

    @pl.when(exists)
    def _():
      # Rows that saw no key (m_i still MASK) summed p = 1 over masked keys: out 0, lse +inf.
      empty = m_i == common.MASK
      l_safe = jnp.where(empty, 1.0, l_i)
      out = acc * lax.broadcast_in_dim(jnp.where(empty, 0.0, 1.0 / l_safe), acc.shape, [0])
      q_tile[...] = out.astype(q_ref.dtype)  # q is no longer read: its tile stages the output
      # Mosaic GPU lowers log, not log2.
      lse_tile[...] = jnp.where(empty, jnp.inf, m_i + jnp.log(l_safe) * common.LOG2E)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, out_ref.at[batch, rows, head])
      plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[batch, head, rows])
      plgpu.wait_smem_to_gmem(0)


def check(q, k, cfg: Config, backward: bool = False) -> None:
  """The restrictions of the forward's (or the backward's) kernels (see the module docstring)."""
  blocks = cfg.blocks
  bq, bk = (blocks.block_q_bwd, blocks.block_k_bwd) if backward else (blocks.block_q, blocks.block_k)
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


def _operands(cfg: Config, t5: T5Inputs | None, q_seg, kv_seg, bq: int, bk: int):
  """The kernels' operands besides q, k, v: (band tiles, far biases [H, 2] (the vector's two ends), q_seg, kv_seg,
  kv block ranges per q block, q block ranges per kv block: `segment_block_ranges`, with a key mask the row's first
  kv block with a hidden key beside them), with (1, 1) placeholders for absent features."""
  band = ends = jnp.zeros((1, 1), jnp.float32)
  if t5 is not None:
    band, ends = t5.band, t5.vector[:, jnp.array([0, 2 * cfg.max_distance])]
  if q_seg is None:
    no_ids, no_ranges = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1, 2), jnp.int32)
    return band, ends, no_ids, no_ids, no_ranges, no_ranges
  kv_range, q_range = segment_block_ranges(q_seg, kv_seg, bq, bk)
  if cfg.key_mask:  # a third column: the row's first kv block holding a hidden key (all visible: the block count)
    hidden = (kv_seg.reshape(kv_seg.shape[0], -1, bk) == 0).any(-1)
    split = jnp.where(hidden.any(-1), jnp.argmax(hidden, -1), hidden.shape[1]).astype(jnp.int32)
    with_split = lambda ranges: jnp.concatenate(
        [ranges, jnp.broadcast_to(split[:, None, None], (*ranges.shape[:2], 1))], axis=-1)
    kv_range, q_range = with_split(kv_range), with_split(q_range)
  return band, ends, q_seg, kv_seg, kv_range, q_range


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
  s = Shape(q_len, k.shape[1], head_dim, cfg.blocks.block_q, cfg.blocks.block_k)
  bq, bk = s.block_q, s.block_k
  segments = q_seg is not None
  band, ends, q_seg, kv_seg, kv_range, _ = _operands(cfg, t5, q_seg, kv_seg, bq, bk)
  band_dtype = band.dtype

  target = _Target(plgpu, cfg.interpret)
  tile = lambda shape, dtype: _smem_tile(plgpu, shape, dtype)
  slots = lambda count=_STAGES: plgpu.Barrier(num_barriers=count)
  scratch = [
      tile((_CONSUMERS, bq, head_dim), q.dtype), tile((_STAGES, bk, head_dim), k.dtype),
      tile((_STAGES, bk, head_dim), v.dtype),
      tile((_CONSUMERS * _STAGES, bq, bk), band_dtype) if t5 is not None else None,  # per consumer and slot
      plgpu.SMEM((_CONSUMERS, bq), jnp.int32) if segments else None,
      plgpu.SMEM((_STAGES, bk), jnp.int32) if segments else None,
      plgpu.SMEM((_CONSUMERS, bq), jnp.float32),
      target.p_scratch(bq, bk, q.dtype, (_CONSUMERS,)), target.t_scratch(bk, head_dim, k.dtype, (_CONSUMERS,)),
      slots(_CONSUMERS), slots(_CONSUMERS) if segments else None,  # q, its segment ids
      slots(), slots(),  # k, v
      slots(_CONSUMERS * _STAGES) if t5 is not None else None,
      slots() if segments else None,
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=_STAGES),  # the slots' releases: k
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=_STAGES),  # the rest
      plgpu.Barrier(num_arrivals=_CONSUMERS),  # the consumers' turns on the tensor cores
  ]
  kernel = functools.partial(_kernel, plgpu, pl, target, s, cfg, t5 is not None, segments)
  return _launch(
      plgpu, cfg, "attention_fwd", kernel, scratch, heads, pl.cdiv(q_len // bq, _CONSUMERS), batch, "q",
      (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)),
      num_threads=_CONSUMERS + 1,
  )(q, k, v, band, ends, q_seg, kv_seg, kv_range)


# Shared memory as Pallas Mosaic GPU allocates a kernel's scratch: each buffer rounded up to 1 KiB, 8 bytes per
# mbarrier (jax 0.10.2: the lowering's count for both backward kernels, which take no cross-warp reduction scratch;
# the H200 reported the same 295,088 and 278,704 bytes for the dq kernel). Mosaic GPU's limit: the device's opt-in
# maximum per block, sm90's 227 KiB where it has no GPU to ask.
_SMEM_ALIGNMENT, _MBARRIER_BYTES, _SMEM_LIMIT = 1024, 8, 227 * 1024


def _shared_memory_bytes(plgpu, scratch: dict, band_itemsize: int | None = None) -> int:
  """The shared memory of a compiled kernel's scratch (without the interpreter's staging tiles), the band tiles
  counted at band_itemsize bytes if given."""
  def size(name, x):
    if isinstance(x, plgpu.Barrier):
      return _MBARRIER_BYTES * int(np.prod(x.num_barriers))
    itemsize = band_itemsize if name == "band_smem" and band_itemsize else jnp.dtype(x.dtype).itemsize
    return -(-int(np.prod(x.shape)) * itemsize // _SMEM_ALIGNMENT) * _SMEM_ALIGNMENT

  return sum(size(name, x) for name, x in scratch.items())


def _shared_memory_available() -> int:
  return getattr(jax.local_devices()[0], "shared_memory_per_block_optin", _SMEM_LIMIT)


def _check_shared_memory(plgpu, cfg: Config, scratch: dict, kernel: str, head_dim: int, table_dtype,
                         segments: bool) -> None:
  """Refuse, when `backward` is traced, blocks whose compiled `kernel` overflows shared memory: the lowering's own
  error comes at compilation and names no block. Interpreted too, so that CPU runs refuse what the GPU would."""
  used, available = _shared_memory_bytes(plgpu, scratch), _shared_memory_available()
  if used > available:
    table = "no bias" if table_dtype is None else f"a {jnp.dtype(table_dtype).name} T5 table"
    setting = f"head_dim {head_dim}, {table}" + (", segment ids" if segments else "")
    bf16_fits = table_dtype == jnp.float32 and _shared_memory_bytes(plgpu, scratch, 2) <= available
    raise ValueError(f"the Mosaic GPU backward's {kernel} kernel needs {used:,} bytes of shared memory at "
                     f"block_q_bwd={cfg.blocks.block_q_bwd}, block_k_bwd={cfg.blocks.block_k_bwd} ({setting}), more "
                     f"than the {available:,} available: use smaller backward blocks (64 is the smallest)"
                     + (" or a bfloat16 T5 table" if bf16_fits else ""))


def _launch(plgpu, cfg: Config, name: str, kernel, scratch, heads: int, programs: int, batch: int, block_axis: str,
            out_type, num_threads: int | None = None, rows_only_reductions: bool = False):
  """plgpu.kernel over (heads, programs, batch), in Mosaic GPU's interpreter if cfg.interpret. Heads vary fastest,
  as in attention_mgpu.py: the programs running at once then spread over heads instead of all reading one head's
  blocks; measured 1.15-1.18x faster at S=4,096 (H200, D=64, forward with or without the T5 bias;
  benchmarks/notes_attention.md), where the Triton kernels lose as much from that order. scratch: a list (the
  forward) or a dict of keyword arguments (the backward's kernels); num_threads warpgroups (axis "wg") if given.
  rows_only_reductions: the kernel only reduces WGMMA tiles along their rows (within warps), so none of the shared
  memory Pallas reserves for cross-warp reductions (2 KiB by default, wherever a kernel reduces) is needed. `name`
  names the compiled kernel (`{name}_mosaic_gpu_kernel` in profiles), except with a Ref operand: jax 0.10.2's
  discharge of Refs renames it `new_body`."""
  params = dict(approx_math=True)
  if rows_only_reductions:
    params.update(reduction_scratch_bytes=0)
  interpret = None
  if cfg.interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import \
        InterpretGPUParams  # pylint: disable=import-outside-toplevel
    interpret = InterpretGPUParams()
  import jax.experimental.pallas as pl  # pylint: disable=import-outside-toplevel
  mesh = plgpu.Mesh(grid=(heads, programs, batch), grid_names=("heads", block_axis, "batch"),
                    num_threads=num_threads, thread_name=None if num_threads is None else "wg")

  def body(*refs):  # as plgpu.kernel, whose vmap rule takes no Ref operands (the backward's dq accumulator)
    lists, dicts = (scratch, {}) if isinstance(scratch, (list, tuple)) else ((), scratch)
    pl.run_scoped(functools.partial(kernel, *refs), *lists, collective_axes=mesh.thread_name or (), **dicts)

  return pl.kernel(body, out_type=out_type, mesh=mesh, compiler_params=plgpu.CompilerParams(**params),
                   interpret=interpret, name=name)


# ---------------------------------------------------------------------------------------------- backward


def _band_slot(scratch, index):
  """The backward kernels' band tile and barrier at `index` (per consumer and slot), as `_tile_products` takes them."""
  return scratch["band_smem"].at[index], scratch["band_barriers"].at[index]


def _probabilities(cfg: Config, raw, lse, q_axis: int, far_bias, visible):
  """The backward's p of a tile (triton._tile_probabilities): its base-2 logits against the forward's lse (+inf
  gives p = 0). raw: the tile's q.k^T, plus the bias / scale on band tiles (`_tile_products`; far_bias 0 there);
  visible: the mask of a masked tile, else None."""
  scale2 = cfg.scale * common.LOG2E
  if visible is None:  # scale and scalar bias kept apart: one multiply-add per element
    return jnp.exp2(raw * scale2 + lax.broadcast_in_dim(far_bias - lse, raw.shape, [q_axis]))
  logits = jnp.where(visible, raw * scale2 + far_bias, common.MASK)
  return jnp.exp2(logits - lax.broadcast_in_dim(lse, raw.shape, [q_axis]))


def _streamed_probabilities(plgpu, target: _Target, cfg: Config, scratch, slot, raw, lse, far_bias, masked: bool,
                            q_axis: int, q_start, k_start, ids):
  """_probabilities of a backward tile, with segments (`ids`: the resident side's ids and the scratch name of the
  walked side's, "kv_seg" in the dq kernel, "q_seg" in the dk/dv kernel) the walked blocks' segment ids that stream
  through `slot` beside its operands (masked tiles)."""
  visible = None
  if ids is not None:  # awaited on every tile, masked or not (a key mask leaves some unmasked): each phase observed
    plgpu.barrier_wait(scratch[f"{ids[1]}_barriers"].at[slot])
  if masked:
    q_seg = k_seg = None
    if ids is not None:
      resident, walked_name = ids
      walked = target.load(scratch[f"{walked_name}_smem"].at[slot], target.col)
      q_seg, k_seg = (resident, walked) if q_axis == 0 else (walked, resident)
    visible = _visible(target, cfg, raw.shape, q_axis, q_start, k_start, q_seg, k_seg)
  return _probabilities(cfg, raw, lse, q_axis, far_bias, visible)


def _clear_unvisited_band_tiles(pl, target: _Target, tiles_ref, walked_start, band_lo, band_hi, block: int,
                                count: int, dtype):
  """Zeros to the band tiles [count, rows, cols] of `tiles_ref` that a resident block's walk did not visit
  (`backward` sums every program's tiles): shift's tile starts at walked_start(shift) on the walked side, visited
  if a walked block of `block` rows in the band [band_lo, band_hi) starts there."""
  zeros = target.cast(jnp.zeros(tiles_ref.shape[1:], dtype), target.tile)
  for shift in range(count):
    start = walked_start(shift)
    visited = (start >= band_lo * block) & (start < band_hi * block) & (lax.rem(start - band_lo * block, block) == 0)

    @pl.when(~visited)
    def _():
      tiles_ref.at[shift][...] = zeros


def _dq_kernel(plgpu, pl, target: _Target, s: Shape, cfg: Config, t5: bool, segments: bool,
               q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, band_ref, ends_ref, q_seg_ref, kv_seg_ref,
               kv_range_ref, dq_ref, band_ds_ref, far_ref, **scratch):
  """dq of two q blocks of one (batch, head) over the kv loop of the forward (triton._attention_dq_kernel), warp
  specialized as the forward (`_kernel`): consumer warpgroup c < _CONSUMERS owns q block _CONSUMERS * program + c
  (q, do, lse, delta, query segment ids copied once) and walks its kv loop (`_kv_loop`: far left, band, far
  right); the producer warpgroup streams k, v (key segment ids, each consumer's band tile) of the union of their
  kv loops through _STAGES slots. Both consumers walk the whole union (`_consume`). A tile: q.k^T and dp = do.v^T
  issued together; p; ds; dq += ds.k in place. With the T5 bias each consumer also writes its block's parts of the
  table gradient: each far region's row sums of ds (carried in registers) to far_ref[batch, q_block, head, side],
  each band tile's ds (16-bit) to band_ds_ref[batch, q_block, head, shift], zeros for the shifts it does not visit;
  `backward` sums them per bucket.
  scratch: shared memory tiles (`*_smem`) and barriers (`*_barriers`) by name, without those of absent features.

  Barrier counts, per kv block j of the union [u_lo, u_hi) in slot j % _STAGES:
  - k, v (kv_seg) slots: one TMA arrival (the producer's copy); waited once by each consumer.
  - band slot of consumer c (_STAGES * c + slot): one TMA arrival for j in c's band; waited once by c for j in
    its band.
  - consumed slot: one arrival by each consumer once it has read the slot (its wgmma results and its band tile
    read; num_arrivals=_CONSUMERS); waited once by the producer: before copying block j + _STAGES into the
    slot, or at the end (the last _STAGES blocks).
  - q, do, lse, delta (q_seg) of consumer c: one TMA arrival, one wait by c (none without a q block).
  No schedule barrier: no ping-pong turns."""
  bq, bk = s.block_q, s.block_k
  program, head, batch, wg = (lax.axis_index(name) for name in ("q", "heads", "batch", "wg"))
  q_blocks = s.q_len // bq
  band_first, band_step, band_count = band_shifts(cfg.max_distance, bq, bk)
  consumed = scratch["consumed_barriers"]
  streamed = ("k", "v") + (("kv_seg",) if segments else ())

  loops, (u_lo, u_hi) = _own_loops(
      lambda q_block: _kv_loop(s, cfg, t5, segments, kv_range_ref, batch, q_block), program, q_blocks)

  @pl.when(wg == _PRODUCER)
  def _producer():
    def fetch(kv_block):
      """Start the copies of kv block `kv_block` into its slot."""
      slot, cols = lax.rem(kv_block, jnp.int32(_STAGES)), pl.ds(kv_block * bk, bk)
      for name, src in (("k", k_ref.at[batch, cols, head]), ("v", v_ref.at[batch, cols, head]),
                        ("kv_seg", kv_seg_ref.at[batch, cols]))[:len(streamed)]:
        _copy_in(plgpu, scratch, name, src, slot)
      if t5:
        for c, (_, _, _, band_lo, band_hi) in enumerate(loops):
          @pl.when((kv_block >= band_lo) & (kv_block < band_hi))
          def _():
            tile = pl.ds(lax.div(kv_block * bk - (_CONSUMERS * program + c) * bq - band_first, band_step) * bq, bq)
            _copy_in(plgpu, scratch, "band", band_ref.at[head, tile], _STAGES * c + slot)

    _produce(plgpu, pl, u_lo, u_hi, ((fetch, consumed),))

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_block = _CONSUMERS * program + wg
    exists = q_block < q_blocks
    q_start = q_block * bq
    rows = pl.ds(q_start, bq)
    lo, hi, first_masked, band_lo, band_hi = _this_loop(wg, loops, u_hi)
    q_tile, do_tile = scratch["q_smem"].at[wg], scratch["do_smem"].at[wg]
    p_tile = scratch["p_smem"].at[wg] if "p_smem" in scratch else None
    # (interpreted: k and v transposed into two staging tiles, both read by the products issued together)
    t_k, t_v = (scratch["t_smem"].at[wg, i] for i in range(2)) if "t_smem" in scratch else (None, None)
    rows_smem = scratch["rows_smem"].at[wg]  # lse, delta
    resident = (("q", q_ref.at[batch, rows, head], None), ("do", do_ref.at[batch, rows, head], None),
                ("lse", lse_ref.at[batch, head, rows], rows_smem.at[0]),
                ("delta", delta_ref.at[batch, head, rows], rows_smem.at[1]),
                ("q_seg", q_seg_ref.at[batch, rows], None))[:5 if segments else 4]

    pl.when(exists)(lambda: _load_resident(plgpu, scratch, resident, wg))

    # (unread garbage without a q block: nothing uses it)
    lse, delta = target.load(rows_smem.at[0], target.row), target.load(rows_smem.at[1], target.row)
    q_seg = target.load(scratch["q_seg_smem"].at[wg], target.row) if segments else None

    def tiles(kv_block, carry, far_bias, band: bool, masked: bool, side):
      """One kv block: dq += ds.k, and the table gradient's parts: a band tile's ds, or a far tile's row sums (side
      0 or 1: far left or right, carried), or nothing (side None)."""
      dq, far = carry
      slot = lax.rem(kv_block, jnp.int32(_STAGES))
      plgpu.barrier_wait(scratch["k_barriers"].at[slot])
      k_tile = scratch["k_smem"].at[slot]
      plgpu.barrier_wait(scratch["v_barriers"].at[slot])
      # q.k^T and do.v^T issued together, one wait for both (measured 3.41 -> 3.26 ms at S=4,096, H200, D=64).
      raw, dp = _tile_products(plgpu, pl, target, cfg,
                               ((q_tile, target.transposed(k_tile, t_k)),
                                (do_tile, target.transposed(scratch["v_smem"].at[slot], t_v))), (bq, bk),
                               _band_slot(scratch, _STAGES * wg + slot) if band else None)
      p = _streamed_probabilities(plgpu, target, cfg, scratch, slot, raw, lse, far_bias, masked, 0, q_start,
                                  kv_block * bk, (q_seg, "kv_seg") if segments else None)
      ds = p * (dp - lax.broadcast_in_dim(delta, (bq, bk), [0]))  # gradient of the natural-log logits and bias
      ds16 = ds.astype(q_ref.dtype)  # what the products take
      dq = target.accumulate(pl, dq, target.p_operand(ds16, p_tile), k_tile)
      if band:
        # The table gradient of a band tile is the sum of ds over each bucket's pairs, whose distances run along
        # the tile's diagonals: no sum of Mosaic GPU's (along rows or columns) takes them apart, and one masked sum
        # per bucket cost 0.7 ms of 3.3 at S=4,096 (benchmarks/notes_attention.md). So the tile goes out whole,
        # from registers to band_ds_ref[batch, q_block, head, shift], in the 16-bit dtype the products take
        # (half the bytes of float32 to write and to sum), and `backward` sums the tiles of all programs in
        # float32, then maps them to buckets with one matmul.
        band_ds_ref.at[batch, q_block, head, lax.div(kv_block * bk - q_start - band_first, band_step)][...] = ds16
      elif side is not None:
        far = far + ds.sum(axis=1)
      _release(plgpu, consumed, slot)  # the products' results are read: wgmma has read k and v
      return dq, far

    def walk():
      dq = target.cast(jnp.zeros((bq, s.head_dim), jnp.float32), target.tile)
      if t5:  # far regions: the row sums of their tiles (one bucket each: `backward` adds them to it)
        regions = ((lo, band_lo, ends_ref[head, 0], False, 0), (band_lo, band_hi, 0.0, True, None),
                   (band_hi, hi, ends_ref[head, 1], False, 1))
      else:
        regions = ((lo, hi, 0.0, False, None),)
      fars = []
      for start, stop, far_bias, band, side in regions:
        far = () if side is None else target.cast(jnp.zeros((bq,), jnp.float32), target.row)
        dq, far = _walk_region(functools.partial(tiles, far_bias=far_bias, band=band, side=side), (dq, far),
                               start, stop, first_masked, cfg, segments, masked_first=False)
        if side is not None:
          fars.append(far)
      return dq, fars

    waits = ([scratch[name + "_barriers"] for name in streamed if name != "v"], [scratch["v_barriers"]])
    dq, fars = _consume(plgpu, pl, wg, (u_lo, u_hi), (lo, hi), (consumed,), None, waits, walk)

    @pl.when(exists)
    def _():
      q_tile[...] = (dq * cfg.scale).astype(q_ref.dtype)  # q is no longer read: its tile stages dq
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[batch, rows, head])
      if t5:
        for side, far in enumerate(fars):
          far_ref.at[batch, q_block, head, side][...] = far
        _clear_unvisited_band_tiles(pl, target, band_ds_ref.at[batch, q_block, head],
                                    lambda shift: q_start + band_first + shift * band_step, band_lo, band_hi, bk,
                                    band_count, q_ref.dtype)

      plgpu.wait_smem_to_gmem(0)


def _q_band_bounds(k_start, lo, hi, s: Shape, max_distance: int):
  """q blocks [band_lo, band_hi) of the T5 band within [lo, hi) for the kv block at k_start (triton._q_band).
  k_start - first >= 0; a negative k_start - last rounds towards 0 but is clamped to lo >= 0 anyway."""
  first, step, count = band_shifts(max_distance, s.block_q, s.block_k)
  last = first + (count - 1) * step
  band_lo = jnp.minimum(jnp.maximum(lax.div(k_start - last + s.block_q - 1, s.block_q), lo), hi)
  band_hi = jnp.maximum(jnp.minimum(lax.div(k_start - first, s.block_q) + 1, hi), band_lo)
  return band_lo, band_hi


def _q_loop(s: Shape, cfg: Config, t5: bool, segments: bool, q_range_ref, batch, kv_block):
  """The q loop of a kv block (dk/dv kernel): blocks [lo, hi), the causal mask before first_unmasked, the T5 band
  [band_lo, band_hi) (empty without the bias)."""
  bq, bk = s.block_q, s.block_k
  k_start = kv_block * bk
  lo, hi, first_unmasked = 0, s.q_len // bq, 0
  if cfg.causal:  # q blocks before k_start // bq see no key; before cdiv(k_start + bk - 1, bq), not all
    lo = lax.div(k_start, bq)
    first_unmasked = lax.div(k_start + bk - 1 + bq - 1, bq)
  if segments:
    hi = jnp.minimum(hi, q_range_ref[batch, kv_block, 1])
    lo = jnp.minimum(jnp.maximum(lo, q_range_ref[batch, kv_block, 0]), hi)
  if cfg.key_mask:  # every q block masked from the row's first kv block with a hidden key on (`_operands`)
    first_unmasked = jnp.where(kv_block >= q_range_ref[batch, kv_block, 2], hi, first_unmasked)
  band_lo = band_hi = hi
  if t5:
    band_lo, band_hi = _q_band_bounds(k_start, lo, hi, s, cfg.max_distance)
  return lo, hi, first_unmasked, band_lo, band_hi


def _dkv_kernel(plgpu, pl, target: _Target, s: Shape, cfg: Config, t5: bool, segments: bool,
                q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, band_ref, ends_ref, q_seg_ref, kv_seg_ref,
                q_range_ref, dq_ref, dk_ref, dv_ref, band_ds_ref=None, far_ref=None, **scratch):
  """dk, dv of two kv blocks of one (batch, head) (triton._attention_dkv_kernel), warp specialized as the forward
  (`_kernel`) with the sides swapped: consumer warpgroup c < _CONSUMERS owns kv block _CONSUMERS * program + c (k,
  v, key segment ids copied once) and walks its q loop (`_q_loop`: far right, band, far left) on [keys, queries]
  tiles, k.q^T, v.do^T, p^T.do and ds^T.q wgmma's, dk and dv accumulated in place; the producer warpgroup streams q,
  do, lse, delta (query segment ids, each consumer's band tile, pre-transposed: band_ref [H, count * bk, bq]) of
  the union of their q loops through _STAGES slots. Both consumers walk the whole union (`_consume`). A tile:
  k.q^T and dp^T = v.do^T issued together (one wgmma wait); p; ds; dv += p^T.do and dk += ds^T.q together. scratch:
  shared memory tiles (`*_smem`) and barriers (`*_barriers`) by name, without those of absent
  features.
  Fused (dq_ref given, the float32 dq accumulator: `backward`), each tile's dq part ds.k is issued with dv's and
  dk's products (ds staged in `ds_smem`, read transposed) and added to dq_ref by TMA; with the T5 bias the kernel
  also writes the table gradient's parts: each band tile's ds^T to band_ds_ref[batch, kv_block, head, shift] (by
  TMA from `ds_smem`; zeros for the shifts its block does not visit) and each far region's sums per key to
  far_ref[batch, kv_block, head, side]. Else (dq_ref None) the dq kernel computes those.

  Barrier counts, per q block i of the union [u_lo, u_hi) in slot i % _STAGES:
  - q, do, lse, delta (q_seg) slots: one TMA arrival (the producer's copy); waited once by each consumer.
  - band slot of consumer c (_STAGES * c + slot): one TMA arrival for i in c's band; waited once by c for i in its
    band.
  - consumed slot: one arrival by each consumer once it has read the slot (num_arrivals=_CONSUMERS); waited once
    by the producer: before copying block i + _STAGES into the slot, or at the end (the last _STAGES blocks).
  - k, v (kv_seg) of consumer c: one TMA arrival, one wait by c (none without a kv block).
  No schedule barrier: no ping-pong turns."""
  bq, bk = s.block_q, s.block_k
  program, head, batch, wg = (lax.axis_index(name) for name in ("kv", "heads", "batch", "wg"))
  kv_blocks = s.kv_len // bk
  fused = dq_ref is not None
  band_first, band_step, band_count = band_shifts(cfg.max_distance, bq, bk)
  consumed = scratch["consumed_barriers"]
  streamed = ("q", "do", "lse", "delta") + (("q_seg",) if segments else ())

  loops, (u_lo, u_hi) = _own_loops(
      lambda kv_block: _q_loop(s, cfg, t5, segments, q_range_ref, batch, kv_block), program, kv_blocks)

  @pl.when(wg == _PRODUCER)
  def _producer():
    def fetch(q_block):
      """Start the copies of q block `q_block` into its slot."""
      slot, rows = lax.rem(q_block, jnp.int32(_STAGES)), pl.ds(q_block * bq, bq)
      for name, src in (("q", q_ref.at[batch, rows, head]), ("do", do_ref.at[batch, rows, head]),
                        ("lse", lse_ref.at[batch, head, rows]), ("delta", delta_ref.at[batch, head, rows]),
                        ("q_seg", q_seg_ref.at[batch, rows]))[:len(streamed)]:
        _copy_in(plgpu, scratch, name, src, slot)
      if t5:
        for c, (_, _, _, band_lo, band_hi) in enumerate(loops):
          @pl.when((q_block >= band_lo) & (q_block < band_hi))
          def _():
            tile = lax.div((_CONSUMERS * program + c) * bk - q_block * bq - band_first, band_step)
            _copy_in(plgpu, scratch, "band", band_ref.at[head, pl.ds(tile * bk, bk)], _STAGES * c + slot)

    _produce(plgpu, pl, u_lo, u_hi, ((fetch, consumed),))

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    kv_block = _CONSUMERS * program + wg
    exists = kv_block < kv_blocks
    k_start = kv_block * bk
    keys = pl.ds(k_start, bk)
    lo, hi, first_unmasked, band_lo, band_hi = _this_loop(wg, loops, u_hi)
    k_tile, v_tile = scratch["k_smem"].at[wg], scratch["v_smem"].at[wg]
    # (interpreted: staging tiles for the transposed operands and for p and ds, read by products issued together)
    p_stage = scratch["p_smem"].at[wg] if "p_smem" in scratch else None
    t_q, t_do = (scratch["t_smem"].at[wg, i] for i in range(2)) if "t_smem" in scratch else (None, None)
    if fused:
      ds_tile, dq_stage = scratch["ds_smem"].at[wg], scratch["dq_smem"].at[wg]
      ds_t = scratch["ds_t_smem"].at[wg] if "ds_t_smem" in scratch else None
      dq_acc = dq_ref.at[wg if target.interpret else 0, batch]  # interpreted: one accumulator per consumer
    else:
      ds_stage = scratch["ds_stage_smem"].at[wg] if "ds_stage_smem" in scratch else None

    if fused and target.interpret:
      @pl.when(program == 0)  # the first program of this (batch, head) to run
      def _():
        dq_acc.at[:, head][...] = jnp.zeros((s.q_len, s.head_dim), jnp.float32)
    resident = (("k", k_ref.at[batch, keys, head], None), ("v", v_ref.at[batch, keys, head], None),
                ("kv_seg", kv_seg_ref.at[batch, keys], None))[:3 if segments else 2]

    pl.when(exists)(lambda: _load_resident(plgpu, scratch, resident, wg))

    # (unread garbage without a kv block: nothing uses it)
    kv_seg = target.load(scratch["kv_seg_smem"].at[wg], target.row) if segments else None

    def tiles(q_block, carry, far_bias, band: bool, masked: bool, side):
      """One q block: dv += p^T.do, dk += ds^T.q on [bk, bq] tiles, ds.k added to dq in global memory, and the
      table gradient's parts: a band tile's ds, or a far tile's sums per key (side 0 or 1: far left or right,
      carried), or nothing (side None)."""
      dk, dv, far = carry
      slot = lax.rem(q_block, jnp.int32(_STAGES))
      q_start = q_block * bq
      plgpu.barrier_wait(scratch["q_barriers"].at[slot])
      q_tile, do_tile = scratch["q_smem"].at[slot], scratch["do_smem"].at[slot]
      plgpu.barrier_wait(scratch["do_barriers"].at[slot])
      # The products in two groups, one wait each: k.q^T with dp^T = v.do^T, then dv, dk and dq's part (measured
      # 3.34 -> 3.14 ms at S=4,096, D=64, H200, where dv's product was issued with dp^T and dk's alone).
      raw, dp = _tile_products(plgpu, pl, target, cfg,
                               ((k_tile, target.transposed(q_tile, t_q)), (v_tile, target.transposed(do_tile, t_do))),
                               (bk, bq), _band_slot(scratch, _STAGES * wg + slot) if band else None)
      plgpu.barrier_wait(scratch["lse_barriers"].at[slot])
      lse = target.load(scratch["lse_smem"].at[slot], target.col)
      p = _streamed_probabilities(plgpu, target, cfg, scratch, slot, raw, lse, far_bias, masked, 1, q_start,
                                  k_start, (kv_seg, "q_seg") if segments else None)
      plgpu.barrier_wait(scratch["delta_barriers"].at[slot])
      delta = target.load(scratch["delta_smem"].at[slot], target.col)
      ds = p * (dp - lax.broadcast_in_dim(delta, (bk, bq), [1]))  # gradient of the natural-log logits and bias
      ds16 = ds.astype(q_ref.dtype)  # what the products take
      dv_product = (dv, target.p_operand(p.astype(q_ref.dtype), p_stage), do_tile)
      if not fused:
        dv, dk = target.accumulate_together(pl, (dv_product, (dk, target.p_operand(ds16, ds_stage), q_tile)))
        _release(plgpu, consumed, slot)  # the products' results are read: wgmma has read q and do
        return dk, dv, far

      def stage_ds():  # dq's A operand, read transposed; stored while dv's and dk's products run
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous band tile's copy has read ds_tile
        ds_tile[...] = ds16
        plgpu.commit_smem()

      zero_dq = target.cast(jnp.zeros((bq, s.head_dim), jnp.float32), target.tile)
      # (interpreted, dk's operand is staged in ds_tile too, before dq's is read from it)
      dv, dk, dq = target.accumulate_together(pl, (dv_product, (dk, target.p_operand(ds16, ds_tile), q_tile), stage_ds,
                                                   (zero_dq, target.transposed(ds_tile, ds_t), k_tile)))
      _release(plgpu, consumed, slot)  # the products' results are read: wgmma has read q and do
      target.add_to_global(dq, dq_stage, dq_acc.at[pl.ds(q_start, bq), head])
      if band:  # as the Triton backward's band tiles: out whole, summed per bucket by `backward`; copied from
        # ds_tile by TMA (stored from registers, the band tiles took 0.48 ms of 5.50 at S=4,096, D=64, H200)
        plgpu.copy_smem_to_gmem(ds_tile, band_ds_ref.at[batch, kv_block, head,
                                                        lax.div(k_start - q_start - band_first, band_step)])
      elif side is not None:
        far = far + ds.sum(axis=1)
      return dk, dv, far

    def walk():
      zero = lambda: target.cast(jnp.zeros((bk, s.head_dim), jnp.float32), target.tile)
      # Regions in the order of the q blocks: far right (keys far after the queries), band, far left; or no bias.
      # Far regions: the sums per key of their tiles (one bucket each: `backward` adds them to it).
      if t5:
        regions = ((lo, band_lo, ends_ref[head, 1], False, 1), (band_lo, band_hi, 0.0, True, None),
                   (band_hi, hi, ends_ref[head, 0], False, 0))
      else:
        regions = ((lo, hi, 0.0, False, None),)
      dk, dv, fars = zero(), zero(), {}
      for start, stop, far_bias, band, side in regions:
        side = side if fused else None  # (the dq kernel takes the table gradient)
        far = () if side is None else target.cast(jnp.zeros((bk,), jnp.float32), target.row)
        dk, dv, far = _walk_region(functools.partial(tiles, far_bias=far_bias, band=band, side=side),
                                   (dk, dv, far), start, stop, first_unmasked, cfg, segments,
                                   masked_first=True)
        if side is not None:
          fars[side] = far
      return dk, dv, fars

    waits = ([scratch[name + "_barriers"] for name in streamed if name != "do"], [scratch["do_barriers"]])
    dk, dv, fars = _consume(plgpu, pl, wg, (u_lo, u_hi), (lo, hi), (consumed,), None, waits, walk)

    @pl.when(exists)
    def _():
      k_tile[...] = (dk * cfg.scale).astype(k_ref.dtype)  # k and v are no longer read: they stage dk, dv
      v_tile[...] = dv.astype(v_ref.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[batch, keys, head])
      plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[batch, keys, head])
      if fused and t5:
        for side, far in fars.items():
          far_ref.at[batch, kv_block, head, side][...] = far
        _clear_unvisited_band_tiles(pl, target, band_ds_ref.at[batch, kv_block, head],
                                    lambda shift: k_start - band_first - shift * band_step, band_lo, band_hi, bq,
                                    band_count, q_ref.dtype)

      plgpu.wait_smem_to_gmem(0)


def _dq_call(plgpu, pl, target: _Target, s: Shape, cfg: Config, t5: T5Inputs | None, segments: bool, q, k, v,
             dout, lse2, delta, band, ends, q_seg, kv_seg, kv_range):
  """(dq, band tiles' ds [B, q blocks, H, shifts, bq, bk], far row sums [B, q blocks, H, 2, bq]) by the dq kernel,
  for the backward whose fused kernel overflows shared memory (`backward`'s arguments and `_operands`)."""
  batch, q_len, heads, head_dim = q.shape
  bq, bk = s.block_q, s.block_k
  slots = lambda: plgpu.Barrier(num_barriers=_STAGES)
  tile = lambda shape, dtype: _smem_tile(plgpu, shape, dtype)
  # dq kernel, warp specialized: q, do, lse, delta (q_seg) once per consumer; k, v (kv_seg) in _STAGES slots, a
  # band tile and a tile of bucket ids per consumer and slot.
  consumers = lambda: plgpu.Barrier(num_barriers=_CONSUMERS)
  scratch = dict(q_smem=tile((_CONSUMERS, bq, head_dim), q.dtype),
                 do_smem=tile((_CONSUMERS, bq, head_dim), dout.dtype),
                 k_smem=tile((_STAGES, bk, head_dim), k.dtype), v_smem=tile((_STAGES, bk, head_dim), v.dtype),
                 q_barriers=consumers(), do_barriers=consumers(), lse_barriers=consumers(),
                 delta_barriers=consumers(), k_barriers=slots(), v_barriers=slots(),
                 consumed_barriers=plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=_STAGES))  # the releases
  if segments:
    scratch.update(q_seg_smem=plgpu.SMEM((_CONSUMERS, bq), jnp.int32), q_seg_barriers=consumers(),
                   kv_seg_smem=plgpu.SMEM((_STAGES, bk), jnp.int32), kv_seg_barriers=slots())
  if t5 is not None:
    scratch.update(band_smem=tile((_CONSUMERS * _STAGES, bq, bk), band.dtype),
                   band_barriers=plgpu.Barrier(num_barriers=_CONSUMERS * _STAGES))
  # Per consumer, rows 0 and 1 take lse and delta (one buffer: Pallas aligns each to 1,024 bytes).
  scratch.update(rows_smem=plgpu.SMEM((_CONSUMERS, 2, bq), jnp.float32))
  table_dtype = None if t5 is None else band.dtype
  _check_shared_memory(plgpu, cfg, scratch, "dq", head_dim, table_dtype, segments)
  if cfg.interpret:
    scratch.update(t_smem=target.t_scratch(bk, head_dim, k.dtype, (_CONSUMERS, 2)),
                   p_smem=target.p_scratch(bq, bk, q.dtype, (_CONSUMERS,)))
  _, _, band_count = band_shifts(cfg.max_distance, bq, bk)
  q_blocks = q_len // bq
  # Batch and q blocks lead: `backward` sums them as one reduction of the leading dimensions.
  band_ds_shape, far_shape = (((batch, q_blocks, heads, band_count, bq, bk), (batch, q_blocks, heads, 2, bq))
                              if t5 is not None else ((1,), (1,)))
  kernel = functools.partial(_dq_kernel, plgpu, pl, target, s, cfg, t5 is not None, segments)
  return _launch(
      plgpu, cfg, "attention_dq", kernel, scratch, heads, pl.cdiv(q_blocks, _CONSUMERS), batch, "q",
      (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(band_ds_shape, q.dtype),
       jax.ShapeDtypeStruct(far_shape, jnp.float32)),
      num_threads=_CONSUMERS + 1, rows_only_reductions=True,
  )(q, k, v, dout, lse2, delta, band, ends, q_seg, kv_seg, kv_range)


def backward(cfg: Config, q, k, v, t5: T5Inputs | None, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos, dout, lse2,
             delta):
  """(dq, dk, dv, table gradients per q block [B, H, Sq / bq, buckets_padded] float32 or None): triton.backward's
  contract, on block-padded inputs, blocks cfg.blocks.block_q_bwd x block_k_bwd and t5 built for them. lse2 is the
  forward's (+inf for rows that see no key); delta [B, H, Sq] is rowsum(out * dout) minus the lse cotangent."""
  del slopes2, bias, q_pos, kv_pos
  check(q, k, cfg, backward=True)
  import jax.experimental.pallas as pl  # pylint: disable=import-outside-toplevel
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel

  batch, q_len, heads, head_dim = q.shape
  s = Shape(q_len, k.shape[1], head_dim, cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd)
  bq, bk = s.block_q, s.block_k
  segments = q_seg is not None
  band, ends, q_seg, kv_seg, kv_range, q_range = _operands(cfg, t5, q_seg, kv_seg, bq, bk)
  band_t = band  # [keys, queries] tiles
  if t5 is not None:
    band_t = band.reshape(heads, -1, bq, bk).swapaxes(2, 3).reshape(heads, -1, bq)
  target = _Target(plgpu, cfg.interpret)
  slots = lambda: plgpu.Barrier(num_barriers=_STAGES)
  tile = lambda shape, dtype: _smem_tile(plgpu, shape, dtype)

  # The dk/dv kernel, warp specialized: k, v (kv_seg) once per consumer; q, do, lse, delta (q_seg) in _STAGES
  # slots, a transposed band tile per consumer and slot. Fused (dq's parts added by TMA, and the table gradient),
  # per consumer a tile of ds and the float32 stage of dq's part, where they fit in shared memory.
  consumers = lambda: plgpu.Barrier(num_barriers=_CONSUMERS)
  scratch = dict(k_smem=tile((_CONSUMERS, bk, head_dim), k.dtype), v_smem=tile((_CONSUMERS, bk, head_dim), v.dtype),
                 q_smem=tile((_STAGES, bq, head_dim), q.dtype), do_smem=tile((_STAGES, bq, head_dim), dout.dtype),
                 lse_smem=plgpu.SMEM((_STAGES, bq), jnp.float32), delta_smem=plgpu.SMEM((_STAGES, bq), jnp.float32),
                 k_barriers=consumers(), v_barriers=consumers(), q_barriers=slots(), do_barriers=slots(),
                 lse_barriers=slots(), delta_barriers=slots(),
                 consumed_barriers=plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=_STAGES))  # the releases
  if segments:
    scratch.update(kv_seg_smem=plgpu.SMEM((_CONSUMERS, bk), jnp.int32), kv_seg_barriers=consumers(),
                   q_seg_smem=plgpu.SMEM((_STAGES, bq), jnp.int32), q_seg_barriers=slots())
  if t5 is not None:
    scratch.update(band_smem=tile((_CONSUMERS * _STAGES, bk, bq), band.dtype),
                   band_barriers=plgpu.Barrier(num_barriers=_CONSUMERS * _STAGES))
  table_dtype = None if t5 is None else band.dtype
  fused_scratch = dict(scratch, ds_smem=tile((_CONSUMERS, bk, bq), q.dtype),
                       dq_smem=tile((_CONSUMERS, bq, head_dim), jnp.float32))
  fused = _shared_memory_bytes(plgpu, fused_scratch) <= _shared_memory_available()
  kv_blocks = k.shape[1] // bk
  _, _, band_count = band_shifts(cfg.max_distance, bq, bk)
  out_type = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  operands = (q, k, v, dout, lse2, delta, band_t, ends, q_seg, kv_seg, q_range)
  kernel = functools.partial(_dkv_kernel, plgpu, pl, target, s, cfg, t5 is not None, segments)
  if not fused:
    _check_shared_memory(plgpu, cfg, scratch, "dk/dv", head_dim, table_dtype, segments)
  scratch = fused_scratch if fused else scratch
  if cfg.interpret:  # staging tiles: the transposed q and do, p, and ds (fused: ds^T for dq's product)
    scratch.update(t_smem=target.t_scratch(bq, head_dim, q.dtype, (_CONSUMERS, 2)),
                   p_smem=target.p_scratch(bk, bq, q.dtype, (_CONSUMERS,)),
                   **({"ds_t_smem": target.t_scratch(bk, bq, q.dtype, (_CONSUMERS,))} if fused else
                      {"ds_stage_smem": target.p_scratch(bk, bq, q.dtype, (_CONSUMERS,))}))
  if fused:
    if t5 is not None:  # batch and kv blocks lead: summed below as one reduction of the leading dimensions
      out_type += [jax.ShapeDtypeStruct((batch, kv_blocks, heads, band_count, bk, bq), q.dtype),
                   jax.ShapeDtypeStruct((batch, kv_blocks, heads, 2, bk), jnp.float32)]
    # dq sums the parts of every kv block: a float32 accumulator in global memory, zeros to start. Compiled, a Ref
    # that the kernel updates in place; the interpreter takes no Ref operands, so there it is an output, one per
    # consumer, that each consumer of the first program clears (the interpreter runs the programs in order).
    dq_type = jax.ShapeDtypeStruct((_CONSUMERS if cfg.interpret else 1, batch, q_len, heads, head_dim), jnp.float32)
    if cfg.interpret:
      launched = lambda *refs, **scratch: kernel(*refs[:len(operands)], refs[-1], *refs[len(operands):-1], **scratch)
      out_type.append(dq_type)
    else:
      dq_acc = jax.new_ref(jnp.zeros(dq_type.shape, dq_type.dtype))
      launched, operands = kernel, operands + (dq_acc,)
  else:
    launched = lambda *refs, **scratch: kernel(*refs[:len(operands)], None, *refs[len(operands):], **scratch)
  outs = _launch(plgpu, cfg, "attention_bwd" if fused else "attention_dkv", launched, scratch, heads,
                 pl.cdiv(kv_blocks, _CONSUMERS), batch, "kv", out_type, num_threads=_CONSUMERS + 1,
                 rows_only_reductions=True)(*operands)
  dk, dv = outs[:2]
  if fused:
    dq = (outs[-1] if cfg.interpret else jax.freeze(dq_acc)).sum(0)
    dq = (dq * cfg.scale).astype(q.dtype)
    if t5 is not None:  # [keys, queries] band tiles, sums per key
      band_ds, far_sums = outs[2:4]
  else:
    dq, band_ds, far_sums = _dq_call(plgpu, pl, target, s, cfg, t5, segments, q, k, v, dout, lse2, delta, band, ends,
                                     q_seg, kv_seg, kv_range)
  if t5 is None:
    return dq, dk, dv, None
  # The band tiles' ds and the far sums of all programs, summed, then per bucket: each pair of a band tile holds its
  # bucket id (`band_tiles` of the bucket table), the far sums the end buckets.
  bucket_ids = np.asarray(band_tiles(cfg.lut()[None], cfg.max_distance, bq, bk)[0]).reshape(-1)
  band_sums = band_ds.astype(jnp.float32).sum((0, 1))
  band_sums = (band_sums.swapaxes(2, 3) if fused else band_sums).reshape(heads, -1)
  sums = jnp.concatenate([band_sums, far_sums.sum((0, 1, 4))], axis=1)
  dtable = sum_into_buckets(sums, np.concatenate([bucket_ids, cfg.end_buckets()]), cfg.buckets_padded)
  return dq, dk, dv, dtable[None, :, None, :]
