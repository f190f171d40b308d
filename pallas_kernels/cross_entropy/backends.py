"""The seam between the public functions and the kernel backends: the checked options (the one place they are
validated), the launcher interface that pallas.py and triton.py both implement, and the loss of one chunk of
logits on any backend ("xla" being the jnp reference)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.cross_entropy import reference
from pallas_kernels.cross_entropy.tuning import BlockSizes

BACKENDS = common.BACKENDS
CHUNKED_BACKENDS = ("xla",) + BACKENDS  # "xla": the reference per chunk, no kernel


@dataclasses.dataclass(frozen=True)
class Options:
  """Static arguments of every kernel launch (hashable: they key jit caches)."""

  z_loss: float
  label_smoothing: float
  block_sizes: BlockSizes
  backend: str
  interpret: bool


def check_loss_options(z_loss: float, label_smoothing: float) -> None:
  """Raise ValueError unless z_loss >= 0 and 0 <= label_smoothing < 1 (NaN fails both)."""
  if not (z_loss >= 0 and 0 <= label_smoothing < 1):
    raise ValueError(f"need z_loss >= 0 and label_smoothing in [0, 1), got z_loss={z_loss} and "
                     f"label_smoothing={label_smoothing}")


def make_options(z_loss: float, label_smoothing: float, block_sizes: BlockSizes | None, backend: str,
                 interpret: bool | None, backends: tuple[str, ...] = BACKENDS) -> Options:
  """Checked options; "xla" runs no kernel, so it never interprets."""
  check_loss_options(z_loss, label_smoothing)
  if backend not in backends:
    raise ValueError(f"backend must be one of {backends}, got {backend!r}")
  block_sizes = block_sizes or BlockSizes()
  block_sizes.validate()
  interpret = False if backend == "xla" else common.resolve_interpret(interpret)
  return Options(float(z_loss), float(label_smoothing), block_sizes, backend, interpret)


class Kernels(Protocol):
  """The launchers each backend module (pallas.py, triton.py) defines, on logits [N, V] and int32 targets [N]."""

  def forward(self, logits: jax.Array, targets: jax.Array, options: Options,
              with_argmax: bool) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Per-token float32 (loss, lse) and the int32 first argmax (None unless with_argmax)."""

  def backward(self, logits: jax.Array, targets: jax.Array, lse: jax.Array, dloss: jax.Array, dlse: jax.Array,
               options: Options) -> jax.Array:
    """dlogits (the logits' dtype) for the cotangents of loss and lse."""

  def fused(self, logits: jax.Array, targets: jax.Array, dloss: jax.Array, dlogits_dtype: jnp.dtype,
            options: Options) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(loss, lse, argmax, dlogits) for a loss cotangent known in advance, in one kernel; dlogits is computed in
    float32 and rounded once to dlogits_dtype."""


def kernels(options: Options) -> Kernels:
  """The launchers of `options.backend`, imported on first use (only the chosen backend's compiler is loaded)."""
  if options.backend == "triton":
    return common.load_triton_kernels("pallas_kernels.cross_entropy.triton", options.interpret)
  from pallas_kernels.cross_entropy import pallas  # pylint: disable=import-outside-toplevel
  return pallas


def value(logits: jax.Array, targets: jax.Array, options: Options) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss, lse, argmax) of a chunk of logits."""
  if options.backend == "xla":
    loss, lse = reference.cross_entropy(logits, targets, z_loss=options.z_loss,
                                        label_smoothing=options.label_smoothing)
    return loss, lse, jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return kernels(options).forward(logits, targets, options, with_argmax=True)


def value_and_grad(logits: jax.Array, targets: jax.Array, dloss: jax.Array, dlogits_dtype: jnp.dtype,
                   options: Options) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(loss, lse, argmax, dlogits) of a chunk of logits, dlogits (in dlogits_dtype) for the per-token loss
  cotangent `dloss`."""
  if options.backend == "xla":
    loss_fn = functools.partial(reference.cross_entropy, targets=targets, z_loss=options.z_loss,
                                label_smoothing=options.label_smoothing)
    (loss, lse), vjp = jax.vjp(loss_fn, logits)
    (dlogits,) = vjp((dloss, jnp.zeros_like(lse)))
    return loss, lse, jnp.argmax(logits, axis=-1).astype(jnp.int32), dlogits.astype(dlogits_dtype)
  return kernels(options).fused(logits, targets, dloss, dlogits_dtype, options)
