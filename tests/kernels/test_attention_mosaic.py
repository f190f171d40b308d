"""The Mosaic GPU attention (`attention/mosaic.py`) against the float32 jnp reference: out and lse of the forward,
dq, dk, dv and the T5 table gradient of the backward (against jax.vjp, with fresh random cotangents for out and the
lse), on fresh random bf16 inputs, with and without the T5 bias, causal or not, with segment ids; and the compiled
variants of its kernels lowered for CUDA (on any machine).

Off GPU the kernel runs in Mosaic GPU's interpreter, which fills every output with NaN before the kernel runs, so
an element the kernel forgets to write shows up as non-finite (FAT5_INTERPRET as in `checks.py`; compiled, the
kernel needs a Hopper GPU).
"""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params",
                    reason="this jax has no Mosaic GPU interpreter (jax >= 0.10)")

# pylint: disable=wrong-import-position
from pallas_kernels import attention, common
from pallas_kernels.attention import mosaic, reference, tuning
from pallas_kernels.attention.config import Config, kernel_inputs
from pallas_kernels.attention.tuning import BlockSizes
from tests.kernels.checks import (INTERPRET, ON_GPU, compile_each_interpreted_kernel_once, poison_device_memory,
                                 relative_error)

INTERPRETED = INTERPRET is True or (INTERPRET is None and not ON_GPU)
# bf16 inputs: p is rounded to bf16 for the p.v product and out is bf16 (2**-9 relative each); the lse is float32.
OUT_TOL, LSE_TOL = 5e-3, 1e-5
# The backward also rounds ds to bf16 for its products, and dq, dk, dv are bf16 (measured: <= 7e-3).
GRAD_TOL = 1e-2

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
    # a key mask (Hugging Face's attention_mask: query ids of 1, key ids of the mask): tiles before the row's first
    # block with a hidden key unmasked
    "t5_key_mask": (64, False, jnp.float32, 40, "key_mask", (64, 64)),
    "t5_key_mask_causal": (64, True, jnp.float32, 40, "key_mask", (64, 64)),
}
BATCH, HEADS, LENGTH = 1, 2, 256


@pytest.fixture(autouse=True, scope="module")
def _compile_each_interpreted_kernel_once():
  """Each interpreted kernel compiled once for the whole module (`checks.compile_each_interpreted_kernel_once`)."""
  with compile_each_interpreted_kernel_once():
    yield


def _segment_ids(rng, length):
  """[1, length]: segments 1, 2, ... of random lengths (some shorter than a block), then a padded tail (0)."""
  ids = np.zeros((1, length), np.int32)
  start, segment = 0, 1
  while start < length - length // 8:
    end = min(start + int(rng.integers(8, length // 3)), length - length // 8)
    ids[0, start:end] = segment
    start, segment = end, segment + 1
  return jnp.asarray(ids)


def _case(case, seed, interpret, table_dtype=None):
  """(config, inputs q, k, v, table, segment ids, reference keyword arguments) of a case (its table in table_dtype
  if given)."""
  head_dim, causal, case_table_dtype, max_distance, segments, (bq, bk) = CASES[case]
  table_dtype = case_table_dtype if table_dtype is None or case_table_dtype is None else table_dtype
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v = (jax.random.normal(key, (BATCH, LENGTH, HEADS, head_dim)).astype(jnp.bfloat16) for key in keys[:3])
  ids = (None, None)  # (query ids, key ids)
  if segments == "key_mask":  # keys hidden from a point inside a block on
    visible = int(np.random.default_rng(seed).integers(LENGTH // 2, LENGTH - 8))
    ids = (jnp.ones((1, LENGTH), jnp.int32), jnp.asarray(np.arange(LENGTH)[None] < visible, jnp.int32))
  elif segments:
    ids = (_segment_ids(np.random.default_rng(seed), LENGTH),) * 2
  bias, t5_kwargs, ref_kwargs = "none", {}, {}
  table = None
  if table_dtype is not None:
    bias = "t5"
    table = jax.random.normal(keys[3], (32, HEADS)).astype(table_dtype)
    t5_kwargs = dict(num_buckets=32, bidirectional=not causal, max_distance=max_distance)
    ref_kwargs = dict(rpe_bidirectional=not causal, rpe_max_distance=max_distance)
  cfg = Config(bias_mode=bias, causal=causal, scale=1.0, has_segments=bool(segments), has_positions=False,
               blocks=BlockSizes(bq, bk, bq, bk), interpret=interpret, backend="mosaic",
               key_mask=segments == "key_mask", **t5_kwargs)
  return cfg, (q, k, v, table, ids), dict(causal=causal, q_segment_ids=ids[0], kv_segment_ids=ids[1], **ref_kwargs)


def _forward(cfg):
  def kernel(q, k, v, table, ids):
    t5, _ = kernel_inputs(cfg, table, None, cfg.blocks.block_q, cfg.blocks.block_k)
    return mosaic.forward(cfg, q, k, v, t5, q_seg=ids[0], kv_seg=ids[1])

  return jax.jit(kernel)


def _gradients(cfg):
  """The backward as `attention._backward` runs it, from the forward's out and lse2: (dq, dk, dv, dtable or None)."""
  def kernel(q, k, v, table, ids, out, lse2, dout, dlse2):
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32)) - dlse2 * common.LOG2E
    t5, _ = kernel_inputs(cfg, table, None, cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd)
    dq, dk, dv, parts = mosaic.backward(cfg, q, k, v, t5, None, None, *ids, None, None, dout, lse2, delta)
    return dq, dk, dv, None if parts is None else jnp.sum(parts, axis=(0, 2))[:, :cfg.num_buckets].T

  return jax.jit(kernel)


def _run(case, seed):
  cfg, (q, k, v, table, ids), ref_kwargs = _case(case, seed, INTERPRETED)
  poison_device_memory()
  out, lse2 = _forward(cfg)(q, k, v, table, ids)
  wide = lambda x: x.astype(jnp.float32)
  ref_out, ref_lse = reference.attention(wide(q), wide(k), wide(v), rpe_table=None if table is None else wide(table),
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
  if ids[0] is not None and not case.startswith("t5_key_mask"):  # packed rows end with padding
    assert empty.any()
    np.testing.assert_array_equal(out[np.asarray(ids[0]) == 0], 0.0)
  assert np.isfinite(lse2[~empty]).all()
  lse_error = relative_error(lse2[~empty] * common.LN2, ref_lse[~empty])
  assert lse_error < LSE_TOL, lse_error
  out_error = relative_error(out, ref_out)
  assert out_error < OUT_TOL, out_error


@pytest.mark.parametrize("case", ["causal", "t5_packed_causal"])
def test_forward_with_an_odd_number_of_q_blocks(case, monkeypatch):
  """Three 64-row q blocks: the last program's second consumer warpgroup has no q block of its own and only walks
  the first one's kv loop (waits for its copies and releases their slots)."""
  monkeypatch.setattr(f"{__name__}.LENGTH", 3 * 64)
  test_forward_matches_reference(case)


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_reference(case):
  cfg, (q, k, v, table, ids), ref_kwargs = _case(case, seed=len(case), interpret=INTERPRETED)
  wide = lambda x: x.astype(jnp.float32)
  reference_fn = lambda q, k, v, table: reference.attention(q, k, v, rpe_table=table, return_lse=True, **ref_kwargs)
  (ref_out, ref_lse), vjp = jax.vjp(reference_fn, wide(q), wide(k), wide(v), None if table is None else wide(table))
  keys = jax.random.split(jax.random.PRNGKey(len(case) + 1))
  dout = jax.random.normal(keys[0], ref_out.shape).astype(q.dtype)
  # An lse cotangent too (delta's second term), none on the rows that see no key (their lse is -inf).
  dlse = jnp.where(jnp.isneginf(ref_lse), 0.0, jax.random.normal(keys[1], ref_lse.shape))
  refs = vjp((wide(dout), dlse))
  # The reference's forward in the kernel's conventions (bf16 out; lse2 = lse / ln(2), +inf where no key is seen):
  # the forward has its own tests, and interpreting it again here would double this test's time.
  out = ref_out.astype(q.dtype)
  lse2 = jnp.where(jnp.isneginf(ref_lse), jnp.inf, ref_lse * common.LOG2E)
  poison_device_memory()
  # lse = lse2 * ln(2): the cotangent of the kernel's lse2 is dlse * ln(2).
  grads = _gradients(cfg)(q, k, v, table, ids, out, lse2, dout, dlse * common.LN2)
  assert (grads[3] is None) == (table is None)
  for name, grad, ref in zip(("dq", "dk", "dv", "dtable"), grads, refs):
    if ref is None:
      continue
    grad = np.asarray(grad, np.float32)
    chex.assert_shape(grad, ref.shape)
    chex.assert_tree_all_finite(grad)
    if ids[0] is not None and name != "dtable":  # padding: no query, no key, no gradient
      np.testing.assert_array_equal(grad[np.asarray(ids[0 if name == "dq" else 1]) == 0], 0.0)
    error = relative_error(grad, ref)
    assert error < GRAD_TOL, (name, error)


@pytest.mark.parametrize("case", ["t5", "t5_packed_causal"])
def test_backward_with_an_odd_number_of_blocks(case, monkeypatch):
  """Three 64-row q blocks and three 64-key kv blocks: the last program of the dq kernel (of the dk/dv kernel) has
  one q block (kv block), its second consumer warpgroup none, and only walks the first one's kv loop (q loop):
  waits for its copies and releases their slots."""
  monkeypatch.setattr(f"{__name__}.LENGTH", 3 * 64)
  test_backward_matches_reference(case)


@pytest.mark.parametrize("case", ["plain", "t5_causal", "t5_head_dim_128", "t5_bf16_table", "t5_packed_causal",
                                  "t5_key_mask_causal", "t5_tall_q_blocks", "t5_wide_kv_blocks"])
def test_compiled_kernels_lower_for_cuda(case):
  """The compiled variants of the kernels (with what the interpreter cannot run: layouts, operands read transposed
  by wgmma, p and ds in registers, TMA reductions, the dq Ref) go through the Pallas -> Mosaic GPU lowering, down to
  NVVM operations (wgmma, TMA, mbarriers), on a CPU: this catches unsupported layouts, operands and shared memory
  overflows without a GPU. The backward is fused at D=64 with 64 x 64 blocks, two kernels where that overflows."""
  cfg, args, _ = _case(case, seed=0, interpret=False)
  q = args[0]
  lse = jnp.zeros((BATCH, HEADS, LENGTH), jnp.float32)

  @jax.jit
  def forward_and_backward(q, k, v, table, ids, dout, dlse2):
    out, lse2 = _forward(cfg)(q, k, v, table, ids)
    return _gradients(cfg)(q, k, v, table, ids, out, lse2, dout, dlse2)

  text = forward_and_backward.trace(*args, q, lse).lower(lowering_platforms=("cuda",)).as_text()
  assert "attention_fwd" in text  # the name profiles show (the fused backward, which takes a Ref, is `new_body`)
  two_kernels = case in ("t5_head_dim_128", "t5_tall_q_blocks", "t5_wide_kv_blocks")
  for name in ("attention_dq", "attention_dkv"):
    assert (name in text) == two_kernels, (name, two_kernels)


@pytest.mark.parametrize("shared", [True, False])
def test_layers_share_one_lowering_of_the_kernels(shared):
  """Three layers' attention (forward and backward, lowered for CUDA) call one copy of the kernels: a Mosaic call
  carries its whole kernel module, and a copy per layer multiplied the training step's lowering and compile time
  (benchmarks/README.md). Unshared (the custom_vjp itself, not its jitted call), every layer lowers its own."""
  cfg, (q, k, v, table, ids), _ = _case("t5", seed=0, interpret=False)
  call = attention._attention if shared else attention._attention.__wrapped__  # pylint: disable=protected-access

  def loss(x, table):
    for _ in range(3):
      x = call(cfg, x, k, v, table, None, None, *ids, None, None)[0]
    return x.astype(jnp.float32).sum()

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(q, table).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu_v2") == (2 if shared else 6)  # the forward and the fused backward


def test_fused_backward_lowers_inside_a_scan_a_checkpoint_and_a_shard_map():
  """The fused backward's dq accumulator is a Ref the kernel updates in place: it lowers for CUDA where the training
  step runs it, inside the micro-batch `lax.scan`, under `jax.checkpoint` (`train.remat`) and in the seam's
  `shard_map`."""
  cfg, (q, k, v, table, ids), _ = _case("t5", seed=0, interpret=False)
  lse = jnp.zeros((BATCH, HEADS, LENGTH), jnp.float32)
  dq = jax.checkpoint(lambda x: _gradients(cfg)(x, k, v, table, ids, x, lse, x, lse)[0])

  def micro_batches(qs):
    return jax.lax.scan(lambda total, x: (total + dq(x).astype(jnp.float32).sum(), None), 0.0, qs)[0]

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  sharded = jax.shard_map(micro_batches, mesh=mesh, in_specs=spec, out_specs=jax.sharding.PartitionSpec(),
                          check_vma=False)
  text = jax.jit(sharded).trace(jnp.stack([q, q])).lower(lowering_platforms=("cuda",)).as_text()
  assert "attention_dkv" not in text and text.count("mosaic_gpu") >= 1  # the fused kernel, not the two


@pytest.mark.parametrize("head_dim", mosaic.HEAD_DIMS)
def test_compiled_forward_fits_shared_memory_at_default_blocks(head_dim):
  """The compiled forward at the blocks `tuning` gives it, with a float32 table (a band tile per consumer
  warpgroup and slot), lowers for CUDA: its shared memory fits (the lowering checks the limit)."""
  blocks = tuning.default_block_sizes(head_dim, interpret=False, backend="mosaic")
  cfg = Config(bias_mode="t5", causal=False, scale=1.0, has_segments=False, has_positions=False, blocks=blocks,
               interpret=False, backend="mosaic", num_buckets=32, bidirectional=True, max_distance=128)
  q = jnp.zeros((BATCH, 2 * LENGTH, HEADS, head_dim), jnp.bfloat16)
  table = jnp.zeros((32, HEADS), jnp.float32)
  text = _forward(cfg).trace(q, q, q, table, (None, None)).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("head_dim", mosaic.HEAD_DIMS)
def test_compiled_backward_fits_shared_memory_at_default_blocks(head_dim):
  """The compiled backward at the blocks `tuning` gives it, with a float32 table and segment ids (the warp-specialized
  dk/dv kernel holds two kv blocks and a band tile per consumer and slot), lowers for CUDA: its shared memory fits."""
  blocks = tuning.default_block_sizes(head_dim, interpret=False, backend="mosaic")
  cfg = Config(bias_mode="t5", causal=False, scale=1.0, has_segments=True, has_positions=False, blocks=blocks,
               interpret=False, backend="mosaic", num_buckets=32, bidirectional=True, max_distance=128)
  q = jnp.zeros((BATCH, 2 * LENGTH, HEADS, head_dim), jnp.bfloat16)
  table = jnp.zeros((32, HEADS), jnp.float32)
  ids = (jnp.ones((BATCH, 2 * LENGTH), jnp.int32),) * 2
  lse = jnp.zeros((BATCH, HEADS, 2 * LENGTH), jnp.float32)
  text = _gradients(cfg).trace(q, q, q, table, ids, q, lse, q, lse).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 2, text.count("mosaic_gpu")


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("blocks", [(128, 64), (64, 128)])
def test_backward_refuses_blocks_that_overflow_shared_memory(blocks, interpret):
  """128-row (128-key) backward blocks at D=128 with a float32 table: the dk/dv kernel's resident k and v tiles, its
  q and do slots and its band tiles (one per consumer and slot) overflow shared memory, fused or not. `backward`
  says so, naming the blocks, when traced (Mosaic GPU's own error comes at compilation), interpreted too."""
  cfg, args, _ = _case("t5_head_dim_128", seed=0, interpret=interpret)
  cfg = dataclasses.replace(cfg, blocks=BlockSizes(64, 64, *blocks))
  lse = jnp.zeros((BATCH, HEADS, LENGTH), jnp.float32)
  message = (f"dk/dv kernel needs 329,872 bytes of shared memory at block_q_bwd={blocks[0]}, "
             f"block_k_bwd={blocks[1]} (head_dim 128, a float32 T5 table), more than the 232,448 available: use "
             "smaller backward blocks (64 is the smallest)")
  with pytest.raises(ValueError, match=re.escape(message)) as refused:
    _gradients(cfg).trace(*args, args[0], lse, args[0], lse)
  assert "bfloat16" not in str(refused.value)  # a bfloat16 table would not fit either: not suggested


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
