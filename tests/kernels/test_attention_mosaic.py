"""The Mosaic GPU attention forward (`attention/mosaic.py`) against the float32 jnp reference: out and lse, on fresh
random bf16 inputs, with and without the T5 bias, causal or not, with segment ids; and its compiled variant lowered
for CUDA (on any machine).

Off GPU the kernel runs in Mosaic GPU's interpreter, which fills every output with NaN before the kernel runs, so
an element the kernel forgets to write shows up as non-finite (FAT5_INTERPRET as in `checks.py`; compiled, the
kernel needs a Hopper GPU).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params",
                    reason="this jax has no Mosaic GPU interpreter (jax >= 0.10)")

# pylint: disable=wrong-import-position
from pallas_kernels import common
from pallas_kernels.attention import mosaic, reference
from pallas_kernels.attention.config import Config, kernel_inputs
from pallas_kernels.attention.tuning import BlockSizes
from tests.kernels.checks import INTERPRET, ON_GPU, poison_device_memory, relative_error

INTERPRETED = INTERPRET is True or (INTERPRET is None and not ON_GPU)
# bf16 inputs: p is rounded to bf16 for the p.v product and out is bf16 (2**-9 relative each); the lse is float32.
OUT_TOL, LSE_TOL = 5e-3, 1e-5

# 256 tokens in 64-row blocks: with max_distance 40 every q block has far-left, band and far-right kv blocks
# (interior blocks all three); with 128, five band tiles per q block.
CASES = {
    # name: (head_dim, causal, table dtype or None, max_distance, segments, (block_q, block_k))
    "plain": (64, False, None, 0, False, (64, 64)),
    "causal": (64, True, None, 0, False, (64, 64)),
    "t5": (64, False, jnp.float32, 40, False, (64, 64)),
    "t5_head_dim_128": (128, False, jnp.float32, 128, False, (64, 64)),
    "t5_bf16_table": (64, False, jnp.bfloat16, 40, False, (64, 64)),
    "t5_causal": (64, True, jnp.float32, 40, False, (64, 64)),
    "t5_wide_kv_blocks": (64, True, jnp.float32, 40, False, (64, 128)),
    "t5_tall_q_blocks": (64, True, jnp.float32, 40, False, (128, 64)),
    "t5_packed": (64, False, jnp.float32, 40, True, (64, 64)),
    "t5_packed_causal": (64, True, jnp.float32, 40, True, (64, 64)),
    "packed": (128, False, None, 0, True, (64, 64)),
}
BATCH, HEADS, LENGTH = 1, 2, 256


def _segment_ids(rng, length):
  """[1, length]: segments 1, 2, ... of random lengths (some shorter than a block), then a padded tail (0)."""
  ids = np.zeros((1, length), np.int32)
  start, segment = 0, 1
  while start < length - length // 8:
    end = min(start + int(rng.integers(8, length // 3)), length - length // 8)
    ids[0, start:end] = segment
    start, segment = end, segment + 1
  return jnp.asarray(ids)


def _case(case, seed, interpret):
  """(kernel, its inputs, reference keyword arguments) of a case."""
  head_dim, causal, table_dtype, max_distance, segments, (bq, bk) = CASES[case]
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v = (jax.random.normal(key, (BATCH, LENGTH, HEADS, head_dim)).astype(jnp.bfloat16) for key in keys[:3])
  ids = _segment_ids(np.random.default_rng(seed), LENGTH) if segments else None
  bias, t5_kwargs, ref_kwargs = "none", {}, {}
  table = None
  if table_dtype is not None:
    bias = "t5"
    table = jax.random.normal(keys[3], (32, HEADS)).astype(table_dtype)
    t5_kwargs = dict(num_buckets=32, bidirectional=not causal, max_distance=max_distance)
    ref_kwargs = dict(rpe_table=table.astype(jnp.float32), rpe_bidirectional=not causal,
                      rpe_max_distance=max_distance)
  cfg = Config(bias_mode=bias, causal=causal, scale=1.0, has_segments=segments, has_positions=False,
               blocks=BlockSizes(bq, bk, bq, bk), interpret=interpret, backend="mosaic", **t5_kwargs)

  def kernel(q, k, v, table, ids):
    t5, _ = kernel_inputs(cfg, table, None, bq, bk)
    return mosaic.forward(cfg, q, k, v, t5, q_seg=ids, kv_seg=ids)

  return jax.jit(kernel), (q, k, v, table, ids), dict(causal=causal, **ref_kwargs)


def _run(case, seed):
  kernel, (q, k, v, table, ids), ref_kwargs = _case(case, seed, INTERPRETED)
  poison_device_memory()
  out, lse2 = kernel(q, k, v, table, ids)
  wide = lambda x: x.astype(jnp.float32)
  ref_out, ref_lse = reference.attention(wide(q), wide(k), wide(v), q_segment_ids=ids, kv_segment_ids=ids,
                                         return_lse=True, **ref_kwargs)
  return (np.asarray(out, np.float32), np.asarray(lse2)), (np.asarray(ref_out), np.asarray(ref_lse)), ids


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case):
  (out, lse2), (ref_out, ref_lse), ids = _run(case, seed=len(case))
  chex.assert_equal_shape((out, ref_out))
  chex.assert_shape(lse2, ref_lse.shape)
  chex.assert_tree_all_finite(out)
  # A query that sees no key (padding): lse +inf (the Triton backward's convention), out 0.
  empty = np.isneginf(ref_lse)
  np.testing.assert_array_equal(np.isposinf(lse2), empty)
  if ids is not None:
    assert empty.any()
    np.testing.assert_array_equal(out[np.asarray(ids) == 0], 0.0)
  assert np.isfinite(lse2[~empty]).all()
  lse_error = relative_error(lse2[~empty] * common.LN2, ref_lse[~empty])
  assert lse_error < LSE_TOL, lse_error
  out_error = relative_error(out, ref_out)
  assert out_error < OUT_TOL, out_error


@pytest.mark.parametrize("case", ["t5_causal", "t5_head_dim_128", "t5_bf16_table", "t5_packed_causal",
                                  "t5_tall_q_blocks"])
def test_compiled_kernel_lowers_for_cuda(case):
  """The compiled variant (with what the interpreter cannot run: layouts, k transposed by wgmma, p in registers)
  goes through the Pallas -> Mosaic GPU lowering, down to NVVM operations (wgmma, TMA, mbarriers), on a CPU: this
  catches unsupported layouts, operands and shared memory overflows without a GPU."""
  kernel, args, _ = _case(case, seed=0, interpret=False)
  text = kernel.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_rejects_what_it_does_not_support():
  cfg = Config(bias_mode="alibi", causal=False, scale=1.0, has_segments=False, has_positions=False,
               blocks=BlockSizes(64, 64, 64, 64), interpret=True, backend="mosaic")
  plain = dataclasses.replace(cfg, bias_mode="none")
  q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  mosaic.check(q, q, plain)
  with pytest.raises(ValueError, match="no bias or the T5 bias"):
    mosaic.check(q, q, cfg)
  with pytest.raises(ValueError, match="multiples of 64"):
    mosaic.check(q, q, dataclasses.replace(plain, blocks=BlockSizes(32, 32, 32, 32)))
  with pytest.raises(ValueError, match="lengths that are multiples"):
    mosaic.check(q, jnp.zeros((1, 96, 1, 64), jnp.bfloat16), plain)
  with pytest.raises(ValueError, match="head_dim"):
    mosaic.check(jnp.zeros((1, 64, 1, 32), jnp.bfloat16), jnp.zeros((1, 64, 1, 32), jnp.bfloat16), plain)
  with pytest.raises(ValueError, match="16-bit"):
    mosaic.check(q.astype(jnp.float32), q.astype(jnp.float32), plain)
