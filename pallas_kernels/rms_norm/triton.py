"""RMSNorm as raw Triton kernels: the algorithm, block sizes and launch shapes of pallas.py (see its docstring),
helper for helper; change both.

Launched through `common.triton_call`: jax-triton on a GPU, Triton's interpreter off it. Load this module with
`common.load_triton_kernels` (the interpreter must be chosen before `@triton.jit` runs). Row offsets are int64, so
arrays past 2**31 elements work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from pallas_kernels import common
from pallas_kernels.rms_norm.tuning import BlockSizes, bwd_num_programs


@triton.jit
def _row_tile(row_start, NUM_ROWS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_ROWS: tl.constexpr,
              BLOCK_COLS: tl.constexpr):
  """Element offsets of a [BLOCK_ROWS, BLOCK_COLS] tile, its columns and its in-bounds mask."""
  rows = row_start + tl.arange(0, BLOCK_ROWS)
  cols = tl.arange(0, BLOCK_COLS)
  mask = (rows[:, None] < NUM_ROWS) & (cols[None, :] < WIDTH)
  return rows[:, None].to(tl.int64) * WIDTH + cols[None, :], cols, mask


@triton.jit
def _load(pointers, mask, MASKED: tl.constexpr):
  if MASKED:  # unmasked when the tiles cover the array exactly: masks would cost instructions for nothing
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
  return tl.load(pointers).to(tl.float32)


@triton.jit
def _store(pointers, value, mask, MASKED: tl.constexpr):
  if MASKED:
    tl.store(pointers, value.to(pointers.dtype.element_ty), mask=mask)
  else:
    tl.store(pointers, value.to(pointers.dtype.element_ty))


@triton.jit
def _inverse_rms(x, WIDTH: tl.constexpr, EPS: tl.constexpr):
  return tl.rsqrt(tl.sum(x * x, axis=1) / WIDTH + EPS)[:, None]


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, NUM_ROWS: tl.constexpr, WIDTH: tl.constexpr, EPS: tl.constexpr,
                BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, MASKED: tl.constexpr):
  offsets, cols, mask = _row_tile(tl.program_id(0) * BLOCK_ROWS, NUM_ROWS, WIDTH, BLOCK_ROWS, BLOCK_COLS)
  x = _load(x_ptr + offsets, mask, MASKED)
  w = tl.load(w_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
  y = x * _inverse_rms(x, WIDTH, EPS) * w[None, :]
  _store(y_ptr + offsets, y, mask, MASKED)


@triton.jit
def _bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_residual_ptr, dx_ptr, dw_ptr, NUM_ROWS: tl.constexpr, WIDTH: tl.constexpr,
                EPS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                NUM_ITERS: tl.constexpr, NUM_STAGES: tl.constexpr, HAS_RESIDUAL_GRAD: tl.constexpr,
                MASKED: tl.constexpr):
  pid = tl.program_id(0)
  cols = tl.arange(0, BLOCK_COLS)
  w = tl.load(w_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
  dw = tl.zeros([BLOCK_COLS], dtype=tl.float32)
  # tl.range with stages: Triton then prefetches the next rows of x and dy (cp.async) while this one is computed;
  # a plain range loop has no dot, and Triton 3.6 does not pipeline it (one synchronous load per row).
  for i in tl.range(0, NUM_ITERS, num_stages=NUM_STAGES):
    # Programs stride over row blocks so that each one's partial weight gradient covers many rows.
    offsets, _, mask = _row_tile((pid + i * NUM_PROGRAMS) * BLOCK_ROWS, NUM_ROWS, WIDTH, BLOCK_ROWS,
                                 BLOCK_COLS)
    x = _load(x_ptr + offsets, mask, MASKED)
    dy = _load(dy_ptr + offsets, mask, MASKED)
    rstd = _inverse_rms(x, WIDTH, EPS)
    x_hat = x * rstd
    g = dy * w[None, :]
    dx = (g - x_hat * (tl.sum(g * x_hat, axis=1) / WIDTH)[:, None]) * rstd
    if HAS_RESIDUAL_GRAD:  # x's gradient from the residual stream joins the norm's before the one rounding
      dx += _load(dx_residual_ptr + offsets, mask, MASKED)
    _store(dx_ptr + offsets, dx, mask, MASKED)
    dw += tl.sum(dy * x_hat, axis=0)
  tl.store(dw_ptr + pid * WIDTH + cols, dw, mask=cols < WIDTH)


def forward(x: jax.Array, weight: jax.Array, eps: float, block_sizes: BlockSizes, interpret: bool) -> jax.Array:
  """y [rows, width] in x's dtype."""
  bs = block_sizes
  num_rows, width = x.shape
  block_cols = common.next_power_of_2(width)
  return common.triton_call(
      x, weight, kernel=_fwd_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      grid=(triton.cdiv(num_rows, bs.block_rows),), num_warps=bs.num_warps, num_stages=bs.num_stages,
      interpret=interpret, NUM_ROWS=num_rows, WIDTH=width, EPS=eps, BLOCK_ROWS=bs.block_rows, BLOCK_COLS=block_cols,
      MASKED=bool(num_rows % bs.block_rows or width != block_cols))


def backward(x: jax.Array, weight: jax.Array, dy: jax.Array, dx_residual: jax.Array | None, eps: float,
             block_sizes: BlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """(dx, plus dx_residual when given; partial weight gradients [programs, width] float32)."""
  bs = block_sizes
  num_rows, width = x.shape
  block_cols = common.next_power_of_2(width)
  num_blocks = triton.cdiv(num_rows, bs.bwd_block_rows)
  num_programs = bwd_num_programs(bs, num_rows)
  out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((num_programs, width), jnp.float32))
  # Without a residual gradient the kernel never reads that pointer; dy stands in for it.
  return common.triton_call(
      x, weight, dy, dy if dx_residual is None else dx_residual, kernel=_bwd_kernel, out_shape=out_shape,
      grid=(num_programs,), num_warps=bs.bwd_num_warps, num_stages=bs.num_stages, interpret=interpret,
      NUM_ROWS=num_rows, WIDTH=width, EPS=eps, BLOCK_ROWS=bs.bwd_block_rows, BLOCK_COLS=block_cols,
      NUM_PROGRAMS=num_programs, NUM_ITERS=triton.cdiv(num_blocks, num_programs), NUM_STAGES=bs.num_stages,
      HAS_RESIDUAL_GRAD=dx_residual is not None,
      MASKED=bool(num_rows % bs.bwd_block_rows or width != block_cols or num_blocks % num_programs))
