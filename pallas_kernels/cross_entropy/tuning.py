"""Cross-entropy block sizes, the launch counts they derive from the device, and the output shapes both backends
launch with.

The defaults are the best of the sweeps on the H100 (benchmarks/results/cross_entropy_sweep.json). Nothing is
keyed by compute capability: a program keeps [block_tokens, block_vocab] float32 accumulators in registers and uses
no shared-memory tiles, so the same block sizes fit every GPU; only the fused kernel's program count scales with the
device, per core.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import common


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per program and vocab block of the forward, backward and fused kernels; the fused kernel runs
  fused_programs_per_core programs per GPU core (streaming multiprocessor), each looping over blocks of rows."""

  block_tokens: int = 1
  block_vocab: int = 4096
  num_warps: int = 4
  bwd_block_tokens: int = 1
  bwd_block_vocab: int = 4096
  bwd_num_warps: int = 8
  fused_block_vocab: int = 8192
  fused_num_warps: int = 4
  fused_programs_per_core: int = 6  # 792 programs on the H100's 132 SMs
  num_stages: int = 2

  def validate(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value < 1 or "block" in field.name and value & (value - 1):
        kind = "a power of two" if "block" in field.name else "positive"
        raise ValueError(f"BlockSizes.{field.name} must be {kind}, got {value}")


def fused_num_programs(block_sizes: BlockSizes, num_tokens: int) -> int:
  """Programs of the persistent fused kernel: fused_programs_per_core per core, at most one per row (it runs one
  row at a time)."""
  return min(block_sizes.fused_programs_per_core * common.core_count(), num_tokens)


def stats_shapes(num_tokens: int, with_argmax: bool = True) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Per-token float32 loss and lse, and the int32 argmax when asked for."""
  shapes = (jax.ShapeDtypeStruct((num_tokens,), jnp.float32), jax.ShapeDtypeStruct((num_tokens,), jnp.float32))
  return shapes + ((jax.ShapeDtypeStruct((num_tokens,), jnp.int32),) if with_argmax else ())
