"""T5 RMSNorm as GPU kernels, forward and backward: y = weight * x / sqrt(mean(x**2, -1) + eps).

The statistics are float32 and the output has x's dtype. Hugging Face's T5LayerNorm rounds the normalized x to the
weight dtype when the weight is half precision and then multiplies; here x, the statistics and the weight meet in
float32 and the product is rounded once to x's dtype, whatever the weight dtype (float32 parameters with bf16
activations, the usual mixed-precision setup, give bf16 out). That is one rounding fewer than HF's half-precision
path, and matches its float32 path exactly.

`rms_norm_with_residual` is the same op for a pre-norm block, `x + f(rms_norm(x))`: it also returns x, whose
gradient from the residual stream the backward kernel then adds to the norm's (`rms_norm` is that op without it).

Backends: "pallas" (pallas.py) and "triton" (triton.py), the same kernels twice; `reference.rms_norm` is the jnp
version. Choosing between them is the caller's business. Each backend loads on first use.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.rms_norm.tuning import MAX_WIDTH, BlockSizes

__all__ = ["MAX_WIDTH", "BlockSizes", "Kernels", "rms_norm", "rms_norm_with_residual"]


class Kernels(Protocol):
  """The launchers each backend module (pallas.py, triton.py) defines, on [rows, width] arrays."""

  def forward(self, x: jax.Array, weight: jax.Array, eps: float, block_sizes: BlockSizes,
              interpret: bool) -> jax.Array:
    """y in x's dtype."""

  def backward(self, x: jax.Array, weight: jax.Array, dy: jax.Array, dx_residual: jax.Array | None, eps: float,
               block_sizes: BlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """(dx in x's dtype, plus dx_residual when given, in float32 before the one rounding; partial weight gradients
    [programs, width] float32, summed by the caller)."""


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6, *, block_sizes: BlockSizes | None = None,
             backend: str = "pallas", interpret: bool | None = None) -> jax.Array:
  """RMSNorm over the last axis of `x` (any leading shape, width up to MAX_WIDTH) with a [width] weight.

  Differentiable in x and weight. Numerics: statistics, product and gradients in float32, each output rounded once
  (y and dx to x's dtype). The weight gradient sums over all rows in float32 (per backward program, then across
  programs) and is rounded once to the weight's dtype: with 4,096 bf16 rows it is within 1e-2 relative of the
  float64 sum (tests/kernels/test_rms_norm.py).
  block_sizes: None picks `BlockSizes.for_width(width)`.
  backend: "pallas" or "triton".
  interpret: None runs the compiled kernels on a GPU and the interpreter (Pallas' or Triton's) anywhere else.
  """
  return _apply(x, weight, eps, block_sizes, backend, interpret, with_residual=False)


def rms_norm_with_residual(x: jax.Array, weight: jax.Array, eps: float = 1e-6, *,
                           block_sizes: BlockSizes | None = None, backend: str = "pallas",
                           interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """(x, rms_norm(x, weight, eps)) for a pre-norm block `x + f(rms_norm(x))`: build the residual sum on the x
  returned here, so that x's two gradients (the residual stream's and the norm's) meet in this op's backward.

  Same values and arguments as `rms_norm`. The backward kernel adds the residual stream's gradient to the norm's
  dx in float32 and rounds the sum once to x's dtype, where autodiff would add the two after the kernel in a
  separate elementwise pass (a read and write of both) with x's dtype: one rounding fewer (bf16: the two differ by
  at most about one ulp).
  """
  return _apply(x, weight, eps, block_sizes, backend, interpret, with_residual=True)


def _apply(x, weight, eps, block_sizes, backend, interpret, *, with_residual: bool):
  width = x.shape[-1] if x.ndim else 0
  if x.ndim < 1 or weight.shape != (width,):
    raise ValueError(f"rms_norm needs x [..., width] and weight [width], got {x.shape} and {weight.shape}")
  if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(weight.dtype, jnp.floating)):
    raise ValueError(f"rms_norm needs floating inputs, got {x.dtype} and {weight.dtype}")
  if width > MAX_WIDTH:
    raise ValueError(f"rms_norm supports widths up to {MAX_WIDTH}, got {width}")
  common.check_backend(backend)
  block_sizes = block_sizes or BlockSizes.for_width(width)
  block_sizes.validate()
  out = _rms_norm(x.reshape(-1, width), weight, float(eps), block_sizes, backend,
                  common.resolve_interpret(interpret), with_residual)
  return jax.tree.map(lambda a: a.reshape(x.shape), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _rms_norm(x, weight, eps, block_sizes, backend, interpret, with_residual):
  return _rms_norm_fwd(x, weight, eps, block_sizes, backend, interpret, with_residual)[0]


def _rms_norm_fwd(x, weight, eps, block_sizes, backend, interpret, with_residual):
  y = _kernels(backend, interpret).forward(x, weight, eps, block_sizes, interpret)
  return ((x, y) if with_residual else y), (x, weight)


def _rms_norm_bwd(eps, block_sizes, backend, interpret, with_residual, residuals, cotangents):
  x, weight = residuals
  dx_residual, dy = cotangents if with_residual else (None, cotangents)
  dx, dw_partial = _kernels(backend, interpret).backward(x, weight, dy, dx_residual, eps, block_sizes, interpret)
  return dx, jnp.sum(dw_partial, axis=0).astype(weight.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _kernels(backend: str, interpret: bool) -> Kernels:
  """The backend's launchers, imported on first use (only the chosen backend's compiler is loaded)."""
  if backend == "triton":
    return common.load_triton_kernels("pallas_kernels.rms_norm.triton", interpret)
  from pallas_kernels.rms_norm import pallas  # pylint: disable=import-outside-toplevel
  return pallas
