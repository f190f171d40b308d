"""The Triton attention kernels, compiled for Hopper on a CPU, keep two programs per SM at D=64.

A kernel's shared memory decides how many of its programs share an SM. Float32 band tiles pipelined three stages
deep once took the forward from 96 to 128 KiB at the sm90 blocks: one program per SM, and 382 -> 289 TFLOP/s at
S=4,096 on the H200, with every value still right (benchmarks/notes_attention.md). The dq kernel is closest to the
limit: 112.5 of the 113 KiB two programs may take each (jax-triton's 16-byte pointer hints let the pipeliner stage
more loads); at 4 backward stages it takes 145 KiB, and it ran 39% slower at S=8,192 on the H200 (5.59 against 4.01
ms, benchmarks/results/attention_blocks_8192_h200.json). `triton.compile` targets any architecture without a GPU, so
these tests hold the budget the speed depends on, and every row of the block table within its devices' limit.
"""

import json
import os
import subprocess
import sys

import pytest

from pallas_kernels.attention import tuning
from pallas_kernels.attention.tuning import KB, SHARED_MEMORY_PER_BLOCK, default_block_sizes

pytest.importorskip("triton")

# Two programs per SM: an H100 / H200 SM has 228 KiB of shared memory and reserves 1 KiB per program.
TWO_PROGRAMS_SM90 = (SHARED_MEMORY_PER_BLOCK[(9, 0)] + KB) // 2 - KB

# Runs in a fresh process: the test session loads the kernels into Triton's interpreter, which cannot compile.
# Reads a JSON list of jobs [kernel, compute capability, head_dim, seq_len, block_q, block_k, warps, stages] and
# prints the shared memory of each, compiled as jax-triton compiles them (16-byte pointer hints) with segment ids
# and a key mask (the most loads) and a float32 band table (the largest tiles).
_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pallas_kernels.attention import triton as kernels
from pallas_kernels.attention.buckets import band_shifts

float32 = ("band_ptr", "ends_ptr", "lse_ptr", "delta_ptr", "slots_ptr")
shared = []
for name, capability, head_dim, seq_len, block_q, block_k, num_warps, num_stages in json.loads(sys.argv[1]):
  first, step, count = band_shifts(128, block_q, block_k)
  kernel = getattr(kernels, f"_attention_{name}_kernel")
  names = kernel.arg_names  # positions and pointers come from the kernel's own signature
  pointers = {arg: "*fp32" if arg in float32 else "*i32" if arg.endswith(("_seg_ptr", "_range_ptr")) else "*bf16"
              for arg in names if arg.endswith("_ptr")}
  constants = dict(Q_LEN=seq_len, KV_LEN=seq_len, HEADS=8, HEAD_DIM=head_dim, BLOCK_Q=block_q, BLOCK_K=block_k,
                   SCALE=0.125, SCALE2=0.18, T5=True, CAUSAL=False, HAS_SEGMENTS=True, KEY_MASK=True,
                   BAND_FIRST=first, BAND_STEP=step, BAND_COUNT=count, PRECISION="tf32",
                   WRAPS=kernels._wraps(block_q, block_k))
  constants = {arg: value for arg, value in constants.items() if arg in names}
  source = ASTSource(kernel, {arg: pointers.get(arg, "constexpr") for arg in names},
                     constexprs={(names.index(arg),): value for arg, value in constants.items()},
                     attrs={(names.index(arg),): [["tt.divisibility", 16]] for arg in pointers})
  compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
  shared.append(compiled.metadata.shared)
print(json.dumps(shared))
"""
KERNELS = ("fwd", "dq", "dkv")


def _jobs(capability, head_dim, seq_len):
  """The three kernels at the table's blocks for a device of `capability`: [kernel, cc, head_dim, ...] each."""
  blocks = default_block_sizes(head_dim, interpret=False, capability=capability, q_len=seq_len, backend="triton")
  cc = 10 * capability[0] + capability[1]
  return [[kernel, cc, head_dim, seq_len,
           *((blocks.block_q, blocks.block_k, blocks.num_warps, blocks.num_stages) if kernel == "fwd" else
             (blocks.block_q_bwd, blocks.block_k_bwd, blocks.num_warps_bwd, blocks.num_stages_bwd))]
          for kernel in KERNELS]


def _shared_memory(jobs, tmp_path):
  env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
  env["TRITON_CACHE_DIR"] = str(tmp_path)  # the GPU host's default cache dir was not writable from a test worker
  result = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_each_t5_kernel_keeps_two_programs_per_sm_on_hopper(tmp_path):
  jobs = _jobs((9, 0), 64, 512) + _jobs((9, 0), 64, 4096)
  too_large = [f"{job[0]} at S={job[3]}: {shared / KB:.1f} KiB"
               for job, shared in zip(jobs, _shared_memory(jobs, tmp_path)) if not 0 < shared <= TWO_PROGRAMS_SM90]
  assert not too_large, f"over {TWO_PROGRAMS_SM90 / KB:.1f} KiB, one program per SM: {too_large}"


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (8, 6)])
def test_every_table_entry_compiles_within_its_devices_shared_memory(capability, tmp_path):
  # head_dim 32 rows hold head_dim 64's blocks (half the tiles); sm90's head_dim 64 is held to two programs above.
  assert all(tuning._BLOCK_TABLE[key][32] == tuning._BLOCK_TABLE[key][64]  # pylint: disable=protected-access
             for key in tuning._BLOCK_TABLE)  # pylint: disable=protected-access
  head_dims = (128,) if capability == (9, 0) else (64, 128)
  jobs = [job for head_dim in head_dims for job in _jobs(capability, head_dim, 4096)]
  limit = SHARED_MEMORY_PER_BLOCK[capability]
  too_large = [f"{job[0]} at D={job[2]}: {shared / KB:.1f} KiB"
               for job, shared in zip(jobs, _shared_memory(jobs, tmp_path)) if not 0 < shared <= limit]
  assert not too_large, f"sm{capability[0]}{capability[1]} gives a program {limit / KB:.0f} KiB: {too_large}"
