"""Block sizes of the attention kernels per GPU, keyed by what bounds them: the shared memory of one block.

The table is keyed by compute capability (major, minor), because the minor number changes the shared memory:
sm80 (A100) and sm87 give a block 163 KB, sm86 / sm89 (A10G, L4, RTX 30xx / 40xx) 99 KB, sm90 (H100, H200) 227 KB
(CUDA programming guide, "Technical specifications per compute capability"). A device takes the row with the
most shared memory that it has too; a device missing from SHARED_MEMORY_PER_BLOCK takes the 99 KB row.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.common import device_capability

KB = 1024
# Opt-in shared memory per block, by compute capability.
SHARED_MEMORY_PER_BLOCK = {(8, 0): 163 * KB, (8, 6): 99 * KB, (8, 7): 163 * KB, (8, 9): 99 * KB,
                           (9, 0): 227 * KB, (10, 0): 227 * KB, (12, 0): 99 * KB}
_SMALLEST = min(SHARED_MEMORY_PER_BLOCK.values())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and Triton launch parameters; every block is a power of two >= 16 (Triton's smallest dot)."""
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
      value = getattr(self, name)
      if value < 16 or value & (value - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two >= 16; got {value}")


# Rows by compute capability, then head_dim. sm90: tuned on an H100 for the Triton kernels, the default on GPU
# (benchmarks/notes_attention.md); the Pallas kernels use the same. sm80: the H100 blocks but smaller head_dim 128
# tiles, never measured on an A100. sm86: the sm80 blocks with smaller head_dim 128 backward tiles, to fit 99 KB;
# not measured on such a GPU either.
_BLOCK_TABLE = {
    (8, 0): {32: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3), 64: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3),
             128: BlockSizes(64, 64, 64, 64, 4, 2, 8, 2)},
    (8, 6): {32: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3), 64: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3),
             128: BlockSizes(64, 64, 64, 32, 4, 2, 4, 2)},
    (9, 0): {32: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3), 64: BlockSizes(128, 64, 64, 64, 4, 3, 4, 3),
             128: BlockSizes(128, 64, 64, 64, 8, 3, 4, 2)},
}
# Rows of at most SHORT_ROWS queries take forward q blocks of at most SHORT_ROWS_BLOCK_Q for head_dim <= 64: at 512
# tokens 128-row blocks leave four programs per (row, head), and 64-row ones ran the forward 8-18% faster on the
# H200 (B=128, H=8, D=64: T5 bias 0.421 -> 0.364 ms, causal 0.409 -> 0.336, no bias 0.223 -> 0.205); at 1,024 the
# two were level on the H100 (293 vs 299 TFLOP/s), at 4,096 128 rows win (414 vs 390).
SHORT_ROWS, SHORT_ROWS_BLOCK_Q = 512, 64
# Mosaic GPU (mosaic.py), compiled or interpreted: every block a multiple of 64, a warpgroup's wgmma rows; forward
# 64-row q blocks (one per consumer warpgroup) and 128-key blocks as JAX's attention_mgpu takes them. At head_dim
# 128, 64-key blocks: the forward's two slots of k, v and of a float32 band tile per consumer took 291 KiB of
# shared memory at 128 keys (the limit is 227). On the H200 the forward measured 0.84-0.92x cuDNN's forward without
# bias at D=64 (S=1,024 to 4,096) and 1.02-1.18x the Triton forward; forward + backward 1.03-1.08x the Triton
# kernels' at D=64, 1.22-1.39x at D=128 (benchmarks/notes_attention.md). Backward blocks 64 x 64 at both head dims:
# the dk/dv kernel (two kv blocks per program, a band tile per consumer and slot) overflows shared memory with
# 128-row or 128-key blocks at D=128, and at D=64 with a float32 table and segment ids; the dq kernel fits them at
# D=64 but not at D=128 (329,872 and 328,848 bytes with a float32 table; `mosaic._check_shared_memory` refuses
# them). At D=64, 128 x 64 backward blocks (128-query tiles streamed through the dk/dv kernel) ran the T5 forward +
# backward 4% faster at S=4,096 and level at 1,024 (H200); not the default, as with a float32 table and segment ids
# the dq kernel overflows there (233,648 bytes). 64 x 128 ones were slower (benchmarks/notes_attention.md). At D=64
# and 64 x 64 the backward runs fused (one kernel, 184,448 bytes), which no larger blocks fit.
_MOSAIC_BLOCKS = BlockSizes(64, 128, 64, 64)
_MOSAIC_WIDE_HEAD_BLOCKS = BlockSizes(64, 64, 64, 64)
_MOSAIC_INTERPRET_BLOCKS = BlockSizes(64, 64, 64, 64)
# Interpreters (CPU): small tiles, so short test sequences still span several blocks and a padded tail.
_INTERPRET_BLOCKS = BlockSizes(32, 32, 32, 32)


def shared_memory_bytes(blocks: BlockSizes, head_dim: int, itemsize: int = 2) -> int:
  """An estimate of the shared memory of the largest of the three kernels' tiles, for `itemsize`-byte inputs: the
  check for the Pallas lowering of the table's blocks, which only a GPU can compile.

  Counted: the tiles a program keeps (q; q and dout; k and v) once, the tiles its loop streams (k and v; q and
  dout) once per pipeline stage, and one float32 [bq, bk] tile (probabilities or their gradient changing layout).
  Not a bound of what Triton allocates: with jax-triton's 16-byte pointer hints its pipeliner stages more loads,
  and the raw Triton dq kernel at the sm90 D=64 entry takes 112.5 KiB where this says 80. The raw Triton kernels
  are compiled for each row's architecture on a CPU instead (tests/kernels/test_attention_shared_memory.py).
  """
  def kernel(resident_rows, streamed_rows, stages, bq, bk):  # rows of [rows, head_dim] tiles
    return (resident_rows + stages * streamed_rows) * head_dim * itemsize + 4 * bq * bk

  bq, bk = blocks.block_q, blocks.block_k
  forward = kernel(bq, 2 * bk, blocks.num_stages, bq, bk)  # q; k and v
  bq, bk, stages = blocks.block_q_bwd, blocks.block_k_bwd, blocks.num_stages_bwd
  dq = kernel(2 * bq, 2 * bk, stages, bq, bk)  # q and dout; k and v
  dkv = kernel(2 * bk, 2 * bq, stages, bq, bk)  # k and v; q and dout
  return max(forward, dq, dkv)


def table_key(capability: tuple[int, int]) -> tuple[int, int]:
  """The row for a device: the table key with the most shared memory that the device has too."""
  limit = SHARED_MEMORY_PER_BLOCK.get(tuple(capability), _SMALLEST)
  fitting = [key for key in _BLOCK_TABLE if SHARED_MEMORY_PER_BLOCK[key] <= limit]
  return max(fitting, key=lambda key: (SHARED_MEMORY_PER_BLOCK[key], key))


def default_block_sizes(head_dim: int, interpret: bool, dtype=jnp.bfloat16,
                        capability: tuple[int, int] | None = None, q_len: int | None = None,
                        backend: str = "pallas") -> BlockSizes:
  """The blocks for this device (or `capability`), head_dim, input dtype, (if given) query length and backend."""
  if backend == "mosaic":
    if interpret:
      return _MOSAIC_INTERPRET_BLOCKS
    return _MOSAIC_WIDE_HEAD_BLOCKS if head_dim > 64 else _MOSAIC_BLOCKS
  if interpret:
    return _INTERPRET_BLOCKS
  blocks = _BLOCK_TABLE[table_key(capability or device_capability())][head_dim]
  if q_len is not None and q_len <= SHORT_ROWS and head_dim <= 64:
    blocks = dataclasses.replace(blocks, block_q=min(blocks.block_q, SHORT_ROWS_BLOCK_Q))
  if jnp.dtype(dtype).itemsize == 4:  # float32 tiles take twice the shared memory (tests, debugging)
    blocks = dataclasses.replace(blocks, block_q=min(blocks.block_q, 64),
                                 block_k=min(blocks.block_k, 32 if head_dim == 128 else 64), num_stages=2)
  return blocks
