"""T5 RMSNorm as a Pallas kernel (Triton lowering), forward and backward.

y = weight * x / sqrt(mean(x**2, -1) + eps), the statistics in float32.

Output dtype: the dtype of `x`. Hugging Face's T5LayerNorm rounds the normalized x to the weight dtype when the
weight is half precision and then multiplies; here x, the statistics and the weight meet in float32 and the
product is rounded once to x's dtype, whatever the weight dtype (float32 parameters with bf16 activations, the
usual mixed-precision setup, give bf16 out). That is one rounding fewer than HF's half-precision path, and
matches its float32 path exactly.

Each program holds whole rows in registers (the row width padded to a power of two and masked), so a row is
read once. The backward recomputes the inverse RMS from x (no residual beyond x and weight), writes dx, and
reduces the weight gradient without atomics: a fixed number of programs stride over the row blocks, each
accumulates its own partial sum in registers and writes one row of a [programs, width] float32 buffer, which
XLA then sums.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.common import resolve_interpret

MAX_WIDTH = 16384  # one padded row lives in registers: wider rows would spill
IMPLS = ("pallas", "triton")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows per program and launch shape of the forward and backward kernels."""

  block_rows: int = 4
  num_warps: int = 4
  bwd_block_rows: int = 1
  bwd_num_warps: int = 4
  bwd_programs: int = 1056  # 8 per H100 SM; the partial weight-gradient buffer has this many rows
  num_stages: int = 2

  @classmethod
  def for_width(cls, width: int) -> BlockSizes:
    """The best of the sweeps on the H100 at widths 512 and 1024 (benchmarks/results/rms_norm_sweep.json):
    about 2K elements per forward program, one row per backward step, more programs for narrow rows."""
    padded = pl.next_power_of_2(width)
    return cls(block_rows=max(1, 2048 // padded), num_warps=8 if padded <= 512 or padded > 2048 else 4,
               bwd_block_rows=1, bwd_num_warps=4 if padded <= 2048 else 8,
               bwd_programs=2112 if padded <= 512 else 1056)

  def validate(self):
    for name in ("block_rows", "bwd_block_rows"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two, got {value}")
    if self.bwd_programs < 1 or self.num_warps < 1 or self.bwd_num_warps < 1:
      raise ValueError(f"BlockSizes needs positive programs and warps, got {self}")


def default_impl() -> str:
  """The faster kernel implementation on the H100: Pallas, ahead of jax-triton at widths 512 and 1024, forward
  and backward (benchmarks/results/rms_norm_v1.json)."""
  return "pallas"


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Plain jnp RMSNorm with the same dtype rules as the kernel (float64 stays float64)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dtype)
  rstd = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * rstd * weight.astype(dtype)).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6, *, block_sizes: BlockSizes | None = None,
             impl: str = "pallas", interpret: bool | None = None) -> jax.Array:
  """RMSNorm over the last axis of `x` (any leading shape) with a [width] weight.

  impl: "pallas" (Pallas, Triton lowering) or "triton" (raw Triton through jax-triton, GPU only).
  interpret: run the Pallas kernels in interpret mode; None means interpret on CPU, compile on GPU.
  """
  width = x.shape[-1] if x.ndim else 0
  if x.ndim < 1 or weight.shape != (width,):
    raise ValueError(f"rms_norm needs x [..., width] and weight [width], got {x.shape} and {weight.shape}")
  if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(weight.dtype, jnp.floating)):
    raise ValueError(f"rms_norm needs floating inputs, got {x.dtype} and {weight.dtype}")
  if width > MAX_WIDTH:
    raise ValueError(f"rms_norm supports widths up to {MAX_WIDTH}, got {width}")
  if impl not in IMPLS:
    raise ValueError(f"rms_norm impl must be one of {IMPLS}, got {impl!r}")
  interpret = resolve_interpret(interpret, impl)
  block_sizes = block_sizes or BlockSizes.for_width(width)
  block_sizes.validate()
  y = _rms_norm(x.reshape(-1, width), weight, float(eps), block_sizes, impl, interpret)
  return y.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _rms_norm(x, weight, eps, block_sizes, impl, interpret):
  return _forward(x, weight, eps, block_sizes, impl, interpret)


def _rms_norm_fwd(x, weight, eps, block_sizes, impl, interpret):
  return _forward(x, weight, eps, block_sizes, impl, interpret), (x, weight)


def _rms_norm_bwd(eps, block_sizes, impl, interpret, residuals, dy):
  x, weight = residuals
  if impl == "triton":
    from pallas_kernels import triton_kernels  # pylint: disable=import-outside-toplevel
    dx, dw_partial = triton_kernels.rms_norm_bwd(x, weight, dy, eps, block_sizes)
  else:
    dx, dw_partial = _backward_pallas(x, weight, dy, eps, block_sizes, interpret)
  return dx, jnp.sum(dw_partial, axis=0).astype(weight.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _forward(x, weight, eps, block_sizes, impl, interpret):
  if impl == "triton":
    from pallas_kernels import triton_kernels  # pylint: disable=import-outside-toplevel
    return triton_kernels.rms_norm_fwd(x, weight, eps, block_sizes)
  return _forward_pallas(x, weight, eps, block_sizes, interpret)


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


def _bwd_kernel(x_ref, w_ref, dy_ref, dx_ref, dw_ref, *, eps, block_rows, block_cols, num_programs):
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
    plgpu.store(dx_ref.at[rows, cols], dx.astype(dx_ref.dtype), mask=mask)
    return dw_acc + jnp.sum(dy * x_hat, axis=0)

  dw = lax.fori_loop(0, pl.cdiv(num_blocks, num_programs), body, jnp.zeros((block_cols,), jnp.float32))
  plgpu.store(dw_ref.at[pid, jnp.arange(block_cols)], dw, mask=col_mask)


def _compiler_params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _forward_pallas(x, weight, eps, bs, interpret):
  num_rows, width = x.shape
  kernel = functools.partial(_fwd_kernel, eps=eps, block_rows=bs.block_rows,
                             block_cols=pl.next_power_of_2(width))
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(pl.cdiv(num_rows, bs.block_rows),),
      compiler_params=_compiler_params(bs.num_warps, bs.num_stages), interpret=interpret,
      name="rms_norm_fwd")(x, weight)


def _backward_pallas(x, weight, dy, eps, bs, interpret):
  num_rows, width = x.shape
  num_programs = min(bs.bwd_programs, pl.cdiv(num_rows, bs.bwd_block_rows))
  kernel = functools.partial(_bwd_kernel, eps=eps, block_rows=bs.bwd_block_rows,
                             block_cols=pl.next_power_of_2(width), num_programs=num_programs)
  out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype),
               jax.ShapeDtypeStruct((num_programs, width), jnp.float32))
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(num_programs,),
      compiler_params=_compiler_params(bs.bwd_num_warps, bs.num_stages), interpret=interpret,
      name="rms_norm_bwd")(x, weight, dy)
