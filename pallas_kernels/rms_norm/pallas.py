"""RMSNorm as Pallas kernels (Triton lowering; Pallas' interpreter off GPU). triton.py holds the same kernels in
raw Triton, helper for helper: change both.

Each forward program normalizes a block of whole rows held in registers (the width padded to a power of two and
masked), so a row is read once. The backward recomputes the inverse RMS from x (it saves nothing beyond x and the
weight), writes dx, to which it adds x's gradient from the residual stream when given (`rms_norm_with_residual`),
and reduces the weight gradient without atomics: a fixed number of programs stride over the row blocks, each
accumulates its partial sum in registers and writes one row of a [programs, width] float32 buffer, which the caller
sums.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.rms_norm.tuning import BlockSizes, bwd_num_programs


def _row_tile(row_start, num_rows, width, block_rows, block_cols, masked):
  """Row/column indices of a [block_rows, block_cols] tile and its in-bounds mask (None when `masked` is False:
  the tiles cover the array exactly, and masking would cost instructions for nothing)."""
  rows = row_start + jnp.arange(block_rows)
  cols = jnp.arange(block_cols)
  mask = (rows[:, None] < num_rows) & (cols[None, :] < width) if masked else None
  return rows[:, None], cols[None, :], mask


def _load(ref, rows, cols, mask):
  return plgpu.load(ref.at[rows, cols], mask=mask, other=None if mask is None else 0.0).astype(jnp.float32)


def _inverse_rms(x, width, eps):
  return lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / width + eps)


def _fwd_kernel(x_ref, w_ref, y_ref, *, eps, block_rows, block_cols):
  num_rows, width = x_ref.shape
  masked = num_rows % block_rows or width != block_cols
  rows, cols, mask = _row_tile(pl.program_id(0) * block_rows, num_rows, width, block_rows, block_cols, masked)
  x = _load(x_ref, rows, cols, mask)
  w = plgpu.load(w_ref.at[cols], mask=cols < width, other=0.0).astype(jnp.float32)
  y = x * _inverse_rms(x, width, eps) * w
  plgpu.store(y_ref.at[rows, cols], y.astype(y_ref.dtype), mask=mask)


def _bwd_kernel(x_ref, w_ref, dy_ref, dx_residual_ref, dx_ref, dw_ref, *, eps, block_rows, block_cols, num_programs,
                has_residual_grad):
  num_rows, width = x_ref.shape
  pid = pl.program_id(0)
  col_mask = jnp.arange(block_cols) < width
  w = plgpu.load(w_ref.at[jnp.arange(block_cols)], mask=col_mask, other=0.0).astype(jnp.float32)
  num_blocks = pl.cdiv(num_rows, block_rows)
  masked = num_rows % block_rows or width != block_cols or num_blocks % num_programs

  def body(i, dw_acc):
    # Programs stride over row blocks so that each one's partial weight gradient covers many rows.
    rows, cols, mask = _row_tile((pid + i * num_programs) * block_rows, num_rows, width, block_rows,
                                 block_cols, masked)
    x = _load(x_ref, rows, cols, mask)
    dy = _load(dy_ref, rows, cols, mask)
    rstd = _inverse_rms(x, width, eps)
    x_hat = x * rstd
    g = dy * w[None, :]
    dx = (g - x_hat * (jnp.sum(g * x_hat, axis=1, keepdims=True) / width)) * rstd
    if has_residual_grad:  # x's gradient from the residual stream joins the norm's before the one rounding
      dx += _load(dx_residual_ref, rows, cols, mask)
    plgpu.store(dx_ref.at[rows, cols], dx.astype(dx_ref.dtype), mask=mask)
    return dw_acc + jnp.sum(dy * x_hat, axis=0)

  dw = lax.fori_loop(0, pl.cdiv(num_blocks, num_programs), body, jnp.zeros((block_cols,), jnp.float32))
  plgpu.store(dw_ref.at[pid, jnp.arange(block_cols)], dw, mask=col_mask)


def forward(x: jax.Array, weight: jax.Array, eps: float, block_sizes: BlockSizes, interpret: bool) -> jax.Array:
  """y [rows, width] in x's dtype."""
  bs = block_sizes
  num_rows, width = x.shape
  kernel = functools.partial(_fwd_kernel, eps=eps, block_rows=bs.block_rows,
                             block_cols=common.next_power_of_2(width))
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(pl.cdiv(num_rows, bs.block_rows),),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret, name="rms_norm_fwd")(x, weight)


def backward(x: jax.Array, weight: jax.Array, dy: jax.Array, dx_residual: jax.Array | None, eps: float,
             block_sizes: BlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """(dx, plus dx_residual when given; partial weight gradients [programs, width] float32)."""
  bs = block_sizes
  num_rows, width = x.shape
  num_programs = bwd_num_programs(bs, num_rows)
  kernel = functools.partial(_bwd_kernel, eps=eps, block_rows=bs.bwd_block_rows,
                             block_cols=common.next_power_of_2(width), num_programs=num_programs,
                             has_residual_grad=dx_residual is not None)
  out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((num_programs, width), jnp.float32))
  # Without a residual gradient the kernel never reads that ref; dy stands in for it.
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(num_programs,),
      compiler_params=plgpu.CompilerParams(num_warps=bs.bwd_num_warps, num_stages=bs.num_stages),
      interpret=interpret, name="rms_norm_bwd")(x, weight, dy, dy if dx_residual is None else dx_residual)
