"""The Triton attention forward, compiled for Hopper on a CPU, keeps two programs per SM at D=64.

A kernel's shared memory decides how many of its programs share an SM. Float32 band tiles pipelined three stages
deep once took the forward from 96 to 128 KiB at the sm90 blocks: one program per SM, and 382 -> 289 TFLOP/s at
S=4,096 on the H200, with every value still right (benchmarks/notes_attention.md). `triton.compile` targets sm90
without a GPU, so this test holds the budget the speed depends on.
"""

import json
import os
import subprocess
import sys

import pytest

from pallas_kernels.attention.tuning import KB, SHARED_MEMORY_PER_BLOCK, default_block_sizes

pytest.importorskip("triton")

# Two programs per SM: an H100 / H200 SM has 228 KiB of shared memory and reserves 1 KiB per program.
TWO_PROGRAMS_SM90 = (SHARED_MEMORY_PER_BLOCK[(9, 0)] + KB) // 2 - KB

# Runs in a fresh process: the test session loads the kernels into Triton's interpreter, which cannot compile.
_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pallas_kernels.attention import triton as kernels
from pallas_kernels.attention.buckets import band_shifts

seq_len, block_q, block_k, num_warps, num_stages = map(int, sys.argv[1:])
first, step, count = band_shifts(128, block_q, block_k)
pointers = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", band_ptr="*fp32", ends_ptr="*fp32", q_seg_ptr="*i32",
                kv_seg_ptr="*i32", kv_range_ptr="*i32", o_ptr="*bf16", lse_ptr="*fp32")
constants = dict(Q_LEN=seq_len, KV_LEN=seq_len, HEADS=8, HEAD_DIM=64, BLOCK_Q=block_q, BLOCK_K=block_k,
                 SCALE2=0.18, T5=True, CAUSAL=False, HAS_SEGMENTS=False, BAND_FIRST=first, BAND_STEP=step,
                 BAND_COUNT=count, PRECISION="tf32")
kernel = kernels._attention_fwd_kernel
names = kernel.arg_names  # positions come from the kernel's own signature
source = ASTSource(kernel, {name: pointers.get(name, "constexpr") for name in names},
                   constexprs={(names.index(name),): value for name, value in constants.items()},
                   attrs={(names.index(name),): [["tt.divisibility", 16]] for name in pointers})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
print(json.dumps(compiled.metadata.shared))
"""


@pytest.mark.parametrize("seq_len", [512, 4096])
def test_the_t5_forward_keeps_two_programs_per_sm_on_hopper(seq_len, tmp_path):
  blocks = default_block_sizes(64, interpret=False, capability=(9, 0), q_len=seq_len, backend="triton")
  env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
  env["TRITON_CACHE_DIR"] = str(tmp_path)  # the GPU host's default cache dir was not writable from a test worker
  args = [seq_len, blocks.block_q, blocks.block_k, blocks.num_warps, blocks.num_stages]
  result = subprocess.run([sys.executable, "-c", _COMPILE, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  shared = json.loads(result.stdout.strip().splitlines()[-1])
  assert 0 < shared <= TWO_PROGRAMS_SM90, f"{shared / KB:.0f} KiB at S={seq_len}, {blocks}"
