"""RMSNorm block sizes, and the launch counts they derive from the device.

The defaults are the best of the sweeps on the H100 (benchmarks/results/rms_norm_sweep.json). Nothing is keyed by
compute capability: a program holds a few padded rows in registers and uses no shared-memory tiles, so the same
block sizes fit every GPU; only the backward's program count scales with the device, per core.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import common

MAX_WIDTH = 16384  # one padded row lives in registers: wider rows would spill


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows per program and launch shape of the forward and backward kernels. The backward launches
  bwd_programs_per_core programs per GPU core (streaming multiprocessor); each writes one row of partial weight
  gradients."""

  block_rows: int = 4
  num_warps: int = 4
  bwd_block_rows: int = 1
  bwd_num_warps: int = 4
  bwd_programs_per_core: int = 8  # 1056 programs on the H100's 132 SMs
  num_stages: int = 2

  @classmethod
  def for_width(cls, width: int) -> BlockSizes:
    """The best of the sweeps on the H100 at widths 512 and 1024: about 2K elements per forward program, one row
    per backward step, more backward programs for narrow rows (16 per SM: 2112 on the H100)."""
    padded = common.next_power_of_2(width)
    return cls(block_rows=max(1, 2048 // padded), num_warps=8 if padded <= 512 or padded > 2048 else 4,
               bwd_block_rows=1, bwd_num_warps=4 if padded <= 2048 else 8,
               bwd_programs_per_core=16 if padded <= 512 else 8)

  def validate(self):
    for name in ("block_rows", "bwd_block_rows"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two, got {value}")
    if min(self.num_warps, self.bwd_num_warps, self.bwd_programs_per_core, self.num_stages) < 1:
      raise ValueError(f"BlockSizes needs positive warps, stages and programs, got {self}")


def bwd_num_programs(block_sizes: BlockSizes, num_rows: int) -> int:
  """Programs of the backward kernel: bwd_programs_per_core per core, at most one per block of rows."""
  num_blocks = -(-num_rows // block_sizes.bwd_block_rows)
  return min(block_sizes.bwd_programs_per_core * common.core_count(), num_blocks)
