"""Cross-entropy as raw Triton kernels: the algorithms, block sizes and launch shapes of pallas.py, helper for
helper (the package docstring describes them); change both. Pallas' `_stats_init` / `_stats_update` are inline in
`_row_stats` here, and its `_tile_mask` is `_load_tile`'s and `_store_tile`'s MASKED branch.

Implements `backends.Kernels` (forward, backward, fused), launched through `common.triton_call`: jax-triton on a
GPU, Triton's interpreter off it. Load this module with `common.load_triton_kernels` (the interpreter must be
chosen before `@triton.jit` runs). Row offsets are int64, so [tokens, vocab] arrays past 2**31 elements work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from pallas_kernels import common
from pallas_kernels.cross_entropy.tuning import fused_num_programs, stats_shapes

# Globals read inside @triton.jit functions must be constexpr.
_LOG2E = tl.constexpr(common.LOG2E)  # base 2 throughout: exp2 is one hardware instruction
_LN2 = tl.constexpr(common.LN2)
_MASK = tl.constexpr(common.MASK)


@triton.jit
def _load_tile(logits_ptr, row_offsets, rows, cols, NUM_TOKENS: tl.constexpr, VOCAB: tl.constexpr,
               OTHER: tl.constexpr, MASKED: tl.constexpr, EVICTION: tl.constexpr):
  pointers = logits_ptr + row_offsets[:, None] + cols[None, :]
  if MASKED:
    x = tl.load(pointers, mask=(rows < NUM_TOKENS)[:, None] & (cols < VOCAB)[None, :], other=OTHER,
                eviction_policy=EVICTION)
  else:
    x = tl.load(pointers, eviction_policy=EVICTION)
  return x.to(tl.float32)


@triton.jit
def _target_logit(logits_ptr, row_offsets, rows, targets, NUM_TOKENS: tl.constexpr, VOCAB: tl.constexpr):
  valid = (rows < NUM_TOKENS) & (targets >= 0) & (targets < VOCAB)
  target_logit = tl.load(logits_ptr + row_offsets + tl.where(valid, targets, 0), mask=valid, other=0.0)
  return target_logit.to(tl.float32), valid


@triton.jit
def _stats_finish(running_max, sum_exp, logit_sum, target_logit, valid, VOCAB: tl.constexpr, Z_LOSS: tl.constexpr,
                  LABEL_SMOOTHING: tl.constexpr):
  lse = (running_max + tl.log2(tl.sum(sum_exp, axis=1))) * _LN2
  loss = (1 - LABEL_SMOOTHING) * (lse - target_logit) + Z_LOSS * lse * lse
  if LABEL_SMOOTHING > 0:
    loss += LABEL_SMOOTHING * (lse - tl.sum(logit_sum, axis=1) / VOCAB)
  return tl.where(valid, loss, 0.0), lse


@triton.jit
def _row_stats(logits_ptr, row_offsets, rows, targets, NUM_TOKENS: tl.constexpr, VOCAB: tl.constexpr,
               Z_LOSS: tl.constexpr, LABEL_SMOOTHING: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
               BLOCK_VOCAB: tl.constexpr, MASKED: tl.constexpr, WITH_ARGMAX: tl.constexpr,
               EVICTION: tl.constexpr):
  """Online (loss, lse, block of the first maximum, maximum in base 2) over vocab blocks; per-element
  accumulators, one max reduction a block."""
  running_max = tl.full([BLOCK_TOKENS], _MASK, tl.float32)
  sum_exp = tl.zeros([BLOCK_TOKENS, BLOCK_VOCAB], tl.float32)
  logit_sum = tl.zeros([BLOCK_TOKENS, BLOCK_VOCAB], tl.float32)
  best_block = tl.zeros([BLOCK_TOKENS], tl.int32)
  for block in range(0, tl.cdiv(VOCAB, BLOCK_VOCAB)):
    cols = block * BLOCK_VOCAB + tl.arange(0, BLOCK_VOCAB)
    x = _load_tile(logits_ptr, row_offsets, rows, cols, NUM_TOKENS, VOCAB, float("-inf"), MASKED, EVICTION)
    x2 = x * _LOG2E
    block_max = tl.max(x2, axis=1)
    new_max = tl.maximum(running_max, block_max)
    sum_exp = sum_exp * tl.exp2(running_max - new_max)[:, None] + tl.exp2(x2 - new_max[:, None])
    if WITH_ARGMAX:  # strict >: the first block holding the maximum
      best_block = tl.where(block_max > running_max, block, best_block)
    running_max = new_max
    if LABEL_SMOOTHING > 0:
      if MASKED:
        logit_sum += tl.where((rows < NUM_TOKENS)[:, None] & (cols < VOCAB)[None, :], x, 0.0)
      else:
        logit_sum += x
  target_logit, valid = _target_logit(logits_ptr, row_offsets, rows, targets, NUM_TOKENS, VOCAB)
  loss, lse = _stats_finish(running_max, sum_exp, logit_sum, target_logit, valid, VOCAB, Z_LOSS, LABEL_SMOOTHING)
  return loss, lse, best_block, running_max


@triton.jit
def _first_max(x, cols, row_max2, VOCAB: tl.constexpr):
  """Per row, the first column whose logit * log2(e) equals the maximum found by _row_stats (same product, so
  an exact comparison); VOCAB where there is none."""
  return tl.min(tl.where(x * _LOG2E == row_max2[:, None], cols, VOCAB), axis=1)


@triton.jit
def _argmax(logits_ptr, row_offsets, rows, best_block, row_max2, NUM_TOKENS: tl.constexpr, VOCAB: tl.constexpr,
            BLOCK_VOCAB: tl.constexpr):
  """First argmax per row, from one more read of the block that holds the maximum."""
  cols = best_block[:, None] * BLOCK_VOCAB + tl.arange(0, BLOCK_VOCAB)[None, :]
  mask = (rows < NUM_TOKENS)[:, None] & (cols < VOCAB)
  x = tl.load(logits_ptr + row_offsets[:, None] + cols, mask=mask, other=float("-inf")).to(tl.float32)
  return _first_max(x, cols, row_max2, VOCAB)


@triton.jit
def _grad_coefficients(targets, lse, dloss, dlse, VOCAB: tl.constexpr, Z_LOSS: tl.constexpr,
                       LABEL_SMOOTHING: tl.constexpr):
  dloss = tl.where((targets >= 0) & (targets < VOCAB), dloss, 0.0)
  c1 = dloss * (1 + 2 * Z_LOSS * lse) + dlse
  return c1[:, None], (dloss * (1 - LABEL_SMOOTHING))[:, None], (dloss * (LABEL_SMOOTHING / VOCAB))[:, None]


@triton.jit
def _grad_block(x, cols, targets, lse, c1, c2, c3):
  softmax = tl.exp2(x * _LOG2E - (lse * _LOG2E)[:, None])
  return c1 * softmax - tl.where(cols[None, :] == targets[:, None], c2, 0.0) - c3


@triton.jit
def _store_tile(dlogits_ptr, row_offsets, rows, cols, d, NUM_TOKENS: tl.constexpr, VOCAB: tl.constexpr,
                MASKED: tl.constexpr):
  pointers = dlogits_ptr + row_offsets[:, None] + cols[None, :]
  d = d.to(dlogits_ptr.dtype.element_ty)
  if MASKED:
    tl.store(pointers, d, mask=(rows < NUM_TOKENS)[:, None] & (cols < VOCAB)[None, :], eviction_policy="evict_first")
  else:
    tl.store(pointers, d, eviction_policy="evict_first")


@triton.jit
def _write_grad(logits_ptr, dlogits_ptr, row_offsets, rows, targets, lse, c1, c2, c3, best_block, row_max2,
                NUM_TOKENS: tl.constexpr, VOCAB: tl.constexpr, BLOCK_VOCAB: tl.constexpr, MASKED: tl.constexpr,
                REVERSE: tl.constexpr, FIND_ARGMAX: tl.constexpr):
  """dlogits block by block (last block first if REVERSE); nothing here is read again, so L2 may drop it.
  Returns the first argmax if FIND_ARGMAX, looked for in the block `best_block` only."""
  argmax = tl.zeros_like(best_block)
  # tl.cdiv inline, not in a variable: Triton's interpreter turns assigned ints into 1-element tensors, which
  # range() cannot take (NumPy 2). Compiled, it is the same constant.
  for j in range(0, tl.cdiv(VOCAB, BLOCK_VOCAB)):
    block = tl.cdiv(VOCAB, BLOCK_VOCAB) - 1 - j if REVERSE else j
    cols = block * BLOCK_VOCAB + tl.arange(0, BLOCK_VOCAB)
    x = _load_tile(logits_ptr, row_offsets, rows, cols, NUM_TOKENS, VOCAB, 0.0, MASKED, "evict_first")
    _store_tile(dlogits_ptr, row_offsets, rows, cols, _grad_block(x, cols, targets, lse, c1, c2, c3), NUM_TOKENS,
                VOCAB, MASKED)
    if FIND_ARGMAX:
      here = best_block == block
      if tl.max(here.to(tl.int32), axis=0) > 0:
        argmax = tl.where(here, _first_max(x, cols[None, :], row_max2, VOCAB), argmax)
  return argmax


@triton.jit
def _rows(block, VOCAB: tl.constexpr, BLOCK_TOKENS: tl.constexpr):
  rows = block * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
  return rows, rows.to(tl.int64) * VOCAB


@triton.jit
def _load_rows(pointer, rows, NUM_TOKENS: tl.constexpr, OTHER: tl.constexpr):
  return tl.load(pointer + rows, mask=rows < NUM_TOKENS, other=OTHER)


@triton.jit
def _store_stats(loss_ptr, lse_ptr, argmax_ptr, rows, loss, lse, argmax, NUM_TOKENS: tl.constexpr,
                 WITH_ARGMAX: tl.constexpr):
  tl.store(loss_ptr + rows, loss, mask=rows < NUM_TOKENS)
  tl.store(lse_ptr + rows, lse, mask=rows < NUM_TOKENS)
  if WITH_ARGMAX:
    tl.store(argmax_ptr + rows, argmax, mask=rows < NUM_TOKENS)


@triton.jit
def _fwd_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, argmax_ptr, NUM_TOKENS: tl.constexpr,
                VOCAB: tl.constexpr, Z_LOSS: tl.constexpr, LABEL_SMOOTHING: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
                BLOCK_VOCAB: tl.constexpr, MASKED: tl.constexpr, WITH_ARGMAX: tl.constexpr):
  rows, row_offsets = _rows(tl.program_id(0), VOCAB, BLOCK_TOKENS)
  targets = _load_rows(targets_ptr, rows, NUM_TOKENS, -1)
  loss, lse, best_block, row_max2 = _row_stats(logits_ptr, row_offsets, rows, targets, NUM_TOKENS, VOCAB, Z_LOSS,
                                               LABEL_SMOOTHING, BLOCK_TOKENS, BLOCK_VOCAB, MASKED, WITH_ARGMAX, "")
  argmax = best_block
  if WITH_ARGMAX:
    argmax = _argmax(logits_ptr, row_offsets, rows, best_block, row_max2, NUM_TOKENS, VOCAB, BLOCK_VOCAB)
  _store_stats(loss_ptr, lse_ptr, argmax_ptr, rows, loss, lse, argmax, NUM_TOKENS, WITH_ARGMAX)


@triton.jit
def _bwd_kernel(logits_ptr, targets_ptr, lse_ptr, dloss_ptr, dlse_ptr, dlogits_ptr, NUM_TOKENS: tl.constexpr,
                VOCAB: tl.constexpr, Z_LOSS: tl.constexpr, LABEL_SMOOTHING: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
                BLOCK_VOCAB: tl.constexpr, MASKED: tl.constexpr):
  rows, row_offsets = _rows(tl.program_id(0), VOCAB, BLOCK_TOKENS)
  targets = _load_rows(targets_ptr, rows, NUM_TOKENS, -1)
  lse = _load_rows(lse_ptr, rows, NUM_TOKENS, 0.0)
  c1, c2, c3 = _grad_coefficients(targets, lse, _load_rows(dloss_ptr, rows, NUM_TOKENS, 0.0),
                                  _load_rows(dlse_ptr, rows, NUM_TOKENS, 0.0), VOCAB, Z_LOSS, LABEL_SMOOTHING)
  # No argmax here: targets and lse only fill the argmax-locator slots, which FIND_ARGMAX=False leaves unread.
  _write_grad(logits_ptr, dlogits_ptr, row_offsets, rows, targets, lse, c1, c2, c3, targets, lse, NUM_TOKENS,
              VOCAB, BLOCK_VOCAB, MASKED, False, False)


@triton.jit
def _fused_kernel(logits_ptr, targets_ptr, dloss_ptr, loss_ptr, lse_ptr, argmax_ptr, dlogits_ptr,
                  NUM_TOKENS: tl.constexpr, VOCAB: tl.constexpr, Z_LOSS: tl.constexpr, LABEL_SMOOTHING: tl.constexpr,
                  BLOCK_TOKENS: tl.constexpr, BLOCK_VOCAB: tl.constexpr, MASKED: tl.constexpr,
                  NUM_PROGRAMS: tl.constexpr):
  for block in range(tl.program_id(0), tl.cdiv(NUM_TOKENS, BLOCK_TOKENS), NUM_PROGRAMS):
    rows, row_offsets = _rows(block, VOCAB, BLOCK_TOKENS)
    targets = _load_rows(targets_ptr, rows, NUM_TOKENS, -1)
    dloss = _load_rows(dloss_ptr, rows, NUM_TOKENS, 0.0)
    loss, lse, best_block, row_max2 = _row_stats(logits_ptr, row_offsets, rows, targets, NUM_TOKENS, VOCAB,
                                                 Z_LOSS, LABEL_SMOOTHING, BLOCK_TOKENS, BLOCK_VOCAB, MASKED, True,
                                                 "evict_last")
    c1, c2, c3 = _grad_coefficients(targets, lse, dloss, tl.zeros_like(lse), VOCAB, Z_LOSS, LABEL_SMOOTHING)
    argmax = _write_grad(logits_ptr, dlogits_ptr, row_offsets, rows, targets, lse, c1, c2, c3, best_block,
                         row_max2, NUM_TOKENS, VOCAB, BLOCK_VOCAB, MASKED, True, True)
    _store_stats(loss_ptr, lse_ptr, argmax_ptr, rows, loss, lse, argmax, NUM_TOKENS, True)


def _launch(kernel, args, out_shape, tiles, options, num_programs=None, **constants):
  """One program per block of tokens, or num_programs looping over them (passed as NUM_PROGRAMS)."""
  (num_tokens, vocab), (block_tokens, block_vocab, num_warps) = args[0].shape, tiles
  masked = bool(num_tokens % block_tokens or vocab % block_vocab)
  if num_programs is not None:
    constants["NUM_PROGRAMS"] = num_programs
  return common.triton_call(
      *args, kernel=kernel, out_shape=out_shape, grid=(num_programs or triton.cdiv(num_tokens, block_tokens),),
      num_warps=num_warps, num_stages=options.block_sizes.num_stages, interpret=options.interpret,
      NUM_TOKENS=num_tokens, VOCAB=vocab, Z_LOSS=options.z_loss, LABEL_SMOOTHING=options.label_smoothing,
      BLOCK_TOKENS=block_tokens, BLOCK_VOCAB=block_vocab, MASKED=masked, **constants)


def forward(logits, targets, options, with_argmax):
  """(loss, lse, argmax or None)."""
  bs = options.block_sizes
  out_shape = stats_shapes(logits.shape[0], with_argmax)
  if not with_argmax:  # the kernel's argmax pointer then points at a dummy output it never writes
    out_shape += (jax.ShapeDtypeStruct((1,), jnp.int32),)
  tiles = (bs.block_tokens, bs.block_vocab, bs.num_warps)
  loss, lse, argmax = _launch(_fwd_kernel, (logits, targets), out_shape, tiles, options, WITH_ARGMAX=with_argmax)
  return loss, lse, argmax if with_argmax else None


def backward(logits, targets, lse, dloss, dlse, options):
  """dlogits."""
  bs = options.block_sizes
  args = (logits, targets, lse, dloss.astype(jnp.float32), dlse.astype(jnp.float32))
  return _launch(_bwd_kernel, args, jax.ShapeDtypeStruct(logits.shape, logits.dtype),
                 (bs.bwd_block_tokens, bs.bwd_block_vocab, bs.bwd_num_warps), options)


def fused(logits, targets, dloss, dlogits_dtype, options):
  """(loss, lse, argmax, dlogits in dlogits_dtype)."""
  bs = options.block_sizes
  out_shape = stats_shapes(logits.shape[0]) + (jax.ShapeDtypeStruct(logits.shape, dlogits_dtype),)
  return _launch(_fused_kernel, (logits, targets, dloss.astype(jnp.float32)), out_shape,
                 (1, bs.fused_block_vocab, bs.fused_num_warps), options, fused_num_programs(bs, logits.shape[0]))
