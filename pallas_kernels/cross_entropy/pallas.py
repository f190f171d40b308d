"""Cross-entropy as Pallas kernels (Triton lowering; Pallas' interpreter off GPU). triton.py holds the same
kernels in raw Triton, helper for helper: change both. The algorithms are described in the package docstring.

Implements `backends.Kernels` (forward, backward, fused).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.common import LN2, LOG2E, MASK
from pallas_kernels.cross_entropy.tuning import fused_num_programs, stats_shapes


def _rows(block, block_tokens, num_rows):
  """The rows of block number `block`, and their mask (None when the block size divides the rows: no masking
  cost)."""
  rows = block * block_tokens + jnp.arange(block_tokens)
  return rows, (rows < num_rows if num_rows % block_tokens else None)


def _tile_mask(rows, row_mask, cols, vocab):
  """In-bounds mask of a [rows, cols] tile, None when nothing is out of bounds."""
  col_mask = cols < vocab if vocab % cols.shape[0] else None
  shape = (rows.shape[0], cols.shape[0])
  if row_mask is None:
    return None if col_mask is None else jnp.broadcast_to(col_mask[None, :], shape)
  if col_mask is None:
    return jnp.broadcast_to(row_mask[:, None], shape)
  return row_mask[:, None] & col_mask[None, :]


def _load_tile(logits_ref, rows, cols, mask, other, eviction_policy=None):
  x = plgpu.load(logits_ref.at[rows[:, None], cols[None, :]], mask=mask, other=None if mask is None else other,
                 eviction_policy=eviction_policy)
  return x.astype(jnp.float32)


def _load_rows(ref, rows, row_mask, other):
  return plgpu.load(ref.at[rows], mask=row_mask, other=None if row_mask is None else other)


def _stats_init(block_tokens, block_vocab, with_argmax, with_logit_sum):
  tile = (block_tokens, block_vocab)
  # A finite start keeps exp2(running_max - new_max) a number on masked rows (all -inf).
  carry = {"max": jnp.full((block_tokens,), MASK, jnp.float32), "sum_exp": jnp.zeros(tile, jnp.float32)}
  if with_logit_sum:
    carry["logit_sum"] = jnp.zeros(tile, jnp.float32)
  if with_argmax:
    carry["best_block"] = jnp.zeros((block_tokens,), jnp.int32)
  return carry


def _stats_update(carry, x, block, mask):
  """Online update with vocab block number `block` (masked entries -inf). Accumulators stay per element, so a
  block costs one cross-thread reduction (the max); the rest are reduced once at the end. For the argmax only
  the block holding the first maximum is tracked (strict >): the index inside it is found on a later read."""
  x2 = x * LOG2E
  block_max = jnp.max(x2, axis=1)
  new_max = jnp.maximum(carry["max"], block_max)
  out = {"max": new_max, "sum_exp": (carry["sum_exp"] * jnp.exp2(carry["max"] - new_max)[:, None]
                                     + jnp.exp2(x2 - new_max[:, None]))}
  if "logit_sum" in carry:
    out["logit_sum"] = carry["logit_sum"] + (x if mask is None else jnp.where(mask, x, 0.0))
  if "best_block" in carry:
    out["best_block"] = jnp.where(block_max > carry["max"], block, carry["best_block"])
  return out


def _stats_finish(carry, target_logit, valid, vocab, z_loss, label_smoothing):
  """(loss, lse, argmax locator or None) from the accumulators; the locator is (block of the first maximum,
  maximum of logits * log2(e))."""
  lse = (carry["max"] + jnp.log2(jnp.sum(carry["sum_exp"], axis=1))) * LN2
  loss = (1 - label_smoothing) * (lse - target_logit) + z_loss * lse * lse
  if "logit_sum" in carry:
    loss += label_smoothing * (lse - jnp.sum(carry["logit_sum"], axis=1) / vocab)
  locator = (carry["best_block"], carry["max"]) if "best_block" in carry else None
  return jnp.where(valid, loss, 0.0), lse, locator


def _first_max(x, cols, row_max2, vocab):
  """Per row, the first column whose logit * log2(e) equals the row's maximum (computed the same way in the
  first pass, so the comparison is exact); vocab where there is none."""
  return jnp.min(jnp.where(x * LOG2E == row_max2[:, None], cols, vocab), axis=1)


def _argmax(logits_ref, rows, row_mask, locator, block_vocab):
  """First argmax per row, from one more read of the block that holds the maximum."""
  best_block, row_max2 = locator
  vocab = logits_ref.shape[1]
  cols = best_block[:, None] * block_vocab + jnp.arange(block_vocab)[None, :]
  mask = (cols < vocab) if row_mask is None else (cols < vocab) & row_mask[:, None]
  x = plgpu.load(logits_ref.at[rows[:, None], cols], mask=mask, other=float("-inf"))
  return _first_max(x.astype(jnp.float32), cols, row_max2, vocab)


def _target_logit(logits_ref, rows, row_mask, targets):
  vocab = logits_ref.shape[1]
  valid = (targets >= 0) & (targets < vocab)
  if row_mask is not None:
    valid &= row_mask
  target_logit = plgpu.load(logits_ref.at[rows, jnp.where(valid, targets, 0)], mask=valid, other=0.0)
  return target_logit.astype(jnp.float32), valid


def _row_stats(logits_ref, rows, row_mask, targets, *, block_vocab, z_loss, label_smoothing, with_argmax,
               eviction_policy=None):
  """Loop over the rows' vocab blocks: (loss, lse, argmax locator or None)."""
  vocab = logits_ref.shape[1]

  def body(j, carry):
    cols = j * block_vocab + jnp.arange(block_vocab)
    mask = _tile_mask(rows, row_mask, cols, vocab)
    x = _load_tile(logits_ref, rows, cols, mask, float("-inf"), eviction_policy)
    return _stats_update(carry, x, j, mask)

  carry = lax.fori_loop(0, pl.cdiv(vocab, block_vocab), body,
                        _stats_init(rows.shape[0], block_vocab, with_argmax, label_smoothing > 0))
  target_logit, valid = _target_logit(logits_ref, rows, row_mask, targets)
  return _stats_finish(carry, target_logit, valid, vocab, z_loss, label_smoothing)


def _grad_coefficients(targets, lse, dloss, dlse, vocab, z_loss, label_smoothing):
  """Per-row c1, c2, c3 of dlogits = c1 * softmax - c2 * onehot(target) - c3."""
  dloss = jnp.where((targets >= 0) & (targets < vocab), dloss, 0.0)
  c1 = dloss * (1 + 2 * z_loss * lse) + dlse
  return c1[:, None], (dloss * (1 - label_smoothing))[:, None], (dloss * (label_smoothing / vocab))[:, None]


def _grad_block(x, cols, targets, lse, coefficients):
  c1, c2, c3 = coefficients
  softmax = jnp.exp2(x * LOG2E - (lse * LOG2E)[:, None])
  return c1 * softmax - jnp.where(cols[None, :] == targets[:, None], c2, 0.0) - c3


def _write_grad(logits_ref, dlogits_ref, rows, row_mask, targets, lse, coefficients, *, block_vocab,
                reverse=False, argmax_locator=None):
  """Loop over the rows' vocab blocks writing dlogits (last block first if `reverse`). Neither the logits nor
  their gradient are read again: both ask L2 to evict them first. With an argmax locator, returns the first
  argmax, looked for in the block that holds it."""
  vocab = logits_ref.shape[1]
  num_blocks = pl.cdiv(vocab, block_vocab)

  def body(j, argmax):
    block = num_blocks - 1 - j if reverse else j
    cols = block * block_vocab + jnp.arange(block_vocab)
    mask = _tile_mask(rows, row_mask, cols, vocab)
    x = _load_tile(logits_ref, rows, cols, mask, 0.0, "evict_first")
    d = _grad_block(x, cols, targets, lse, coefficients)
    plgpu.store(dlogits_ref.at[rows[:, None], cols[None, :]], d.astype(dlogits_ref.dtype), mask=mask,
                eviction_policy="evict_first")
    if argmax_locator is None:
      return argmax
    best_block, row_max2 = argmax_locator
    here = best_block == block
    return lax.cond(jnp.max(here.astype(jnp.int32)) > 0,
                    lambda: jnp.where(here, _first_max(x, cols[None, :], row_max2, vocab), argmax),
                    lambda: argmax)

  return lax.fori_loop(0, num_blocks, body, jnp.zeros(rows.shape, jnp.int32))


def _store_stats(rows, row_mask, loss_ref, lse_ref, argmax_ref, loss, lse, argmax):
  plgpu.store(loss_ref.at[rows], loss, mask=row_mask)
  plgpu.store(lse_ref.at[rows], lse, mask=row_mask)
  if argmax_ref is not None:
    plgpu.store(argmax_ref.at[rows], argmax, mask=row_mask)


def _fwd_kernel(logits_ref, targets_ref, loss_ref, lse_ref, argmax_ref=None, *, z_loss, label_smoothing,
                block_tokens, block_vocab):
  rows, row_mask = _rows(pl.program_id(0), block_tokens, logits_ref.shape[0])
  targets = _load_rows(targets_ref, rows, row_mask, -1)
  loss, lse, locator = _row_stats(logits_ref, rows, row_mask, targets, block_vocab=block_vocab, z_loss=z_loss,
                                  label_smoothing=label_smoothing, with_argmax=argmax_ref is not None)
  argmax = None if locator is None else _argmax(logits_ref, rows, row_mask, locator, block_vocab)
  _store_stats(rows, row_mask, loss_ref, lse_ref, argmax_ref, loss, lse, argmax)


def _bwd_kernel(logits_ref, targets_ref, lse_ref, dloss_ref, dlse_ref, dlogits_ref, *, z_loss, label_smoothing,
                block_tokens, block_vocab):
  rows, row_mask = _rows(pl.program_id(0), block_tokens, logits_ref.shape[0])
  targets = _load_rows(targets_ref, rows, row_mask, -1)
  lse = _load_rows(lse_ref, rows, row_mask, 0.0)
  coefficients = _grad_coefficients(targets, lse, _load_rows(dloss_ref, rows, row_mask, 0.0),
                                    _load_rows(dlse_ref, rows, row_mask, 0.0), logits_ref.shape[1], z_loss,
                                    label_smoothing)
  _write_grad(logits_ref, dlogits_ref, rows, row_mask, targets, lse, coefficients, block_vocab=block_vocab)


def _fused_kernel(logits_ref, targets_ref, dloss_ref, loss_ref, lse_ref, argmax_ref, dlogits_ref, *, z_loss,
                  label_smoothing, block_tokens, block_vocab, num_programs):
  num_rows, vocab = logits_ref.shape

  @pl.loop(pl.program_id(0), pl.cdiv(num_rows, block_tokens), step=num_programs)
  def _(block):
    rows, row_mask = _rows(block, block_tokens, num_rows)
    targets = _load_rows(targets_ref, rows, row_mask, -1)
    dloss = _load_rows(dloss_ref, rows, row_mask, 0.0)
    loss, lse, locator = _row_stats(logits_ref, rows, row_mask, targets, block_vocab=block_vocab, z_loss=z_loss,
                                    label_smoothing=label_smoothing, with_argmax=True,
                                    eviction_policy="evict_last")
    coefficients = _grad_coefficients(targets, lse, dloss, jnp.zeros_like(lse), vocab, z_loss, label_smoothing)
    argmax = _write_grad(logits_ref, dlogits_ref, rows, row_mask, targets, lse, coefficients,
                         block_vocab=block_vocab, reverse=True, argmax_locator=locator)
    _store_stats(rows, row_mask, loss_ref, lse_ref, argmax_ref, loss, lse, argmax)


def _launch(kernel, out_shape, num_tokens, block_tokens, block_vocab, num_warps, options, name,
            num_programs=None):
  """One program per block of tokens, or num_programs looping over them (the kernel then takes num_programs)."""
  constants = dict(z_loss=options.z_loss, label_smoothing=options.label_smoothing, block_tokens=block_tokens,
                   block_vocab=block_vocab)
  if num_programs is not None:
    constants["num_programs"] = num_programs
  return pl.pallas_call(
      functools.partial(kernel, **constants), out_shape=out_shape,
      grid=(num_programs or pl.cdiv(num_tokens, block_tokens),),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=options.block_sizes.num_stages),
      interpret=options.interpret, name=name)


def forward(logits, targets, options, with_argmax):
  """(loss, lse, argmax or None)."""
  bs = options.block_sizes
  num_tokens = logits.shape[0]
  outs = _launch(_fwd_kernel, stats_shapes(num_tokens, with_argmax), num_tokens, bs.block_tokens, bs.block_vocab,
                 bs.num_warps, options, "cross_entropy_fwd")(logits, targets)
  return tuple(outs) + ((None,) if not with_argmax else ())


def backward(logits, targets, lse, dloss, dlse, options):
  """dlogits."""
  bs = options.block_sizes
  out_shape = jax.ShapeDtypeStruct(logits.shape, logits.dtype)
  return _launch(_bwd_kernel, out_shape, logits.shape[0], bs.bwd_block_tokens, bs.bwd_block_vocab,
                 bs.bwd_num_warps, options, "cross_entropy_bwd")(
                     logits, targets, lse, dloss.astype(jnp.float32), dlse.astype(jnp.float32))


def fused(logits, targets, dloss, dlogits_dtype, options):
  """(loss, lse, argmax, dlogits in dlogits_dtype)."""
  bs = options.block_sizes
  num_tokens = logits.shape[0]
  out_shape = stats_shapes(num_tokens) + (jax.ShapeDtypeStruct(logits.shape, dlogits_dtype),)
  return _launch(_fused_kernel, out_shape, num_tokens, 1, bs.fused_block_vocab, bs.fused_num_warps, options,
                 "cross_entropy_fused", fused_num_programs(bs, num_tokens))(
                     logits, targets, dloss.astype(jnp.float32))
