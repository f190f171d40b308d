"""Flash attention, every backend, against the float64 jnp reference: outputs, lse and every gradient (q, k, v and
the table / slopes / bias) on fresh random inputs and random cotangents, at lengths that are not multiples of the
blocks.

Off GPU both backends run in their interpreters, which poison every output first (Pallas' interpret mode, and
`common.triton_call` for Triton), so an element a kernel forgets to write shows up. On a GPU the same module runs
the compiled kernels (FAT5_INTERPRET=0 forces them, =1 the interpreters; unset means interpret off GPU only).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import (HEAD_DIMS, BlockSizes, default_block_sizes, flash_attention,
                                      relative_position_bucket, triton_supports)
from pallas_kernels.attention import reference, tuning
from pallas_kernels.attention.config import segment_block_ranges
from tests.kernels.checks import (INTERPRET, ON_GPU, compile_each_interpreted_kernel_once, poison_device_memory,
                                 relative_error)

# float32 in the interpreters is exact up to rounding; the GPU's float32 dots run in tf32.
TOL = 5e-3 if ON_GPU and INTERPRET is not True else 1e-4
BACKENDS = ("pallas", "triton")
INTERPRETED = INTERPRET is True or (INTERPRET is None and not ON_GPU)


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance",
                         [(True, 32, 128), (False, 32, 128), (True, 64, 256), (False, 16, 20), (True, 128, 1000)])
def test_relative_position_bucket_matches_hugging_face(bidirectional, num_buckets, max_distance):
  torch = pytest.importorskip("torch")
  t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
  relative = np.concatenate([np.arange(-3000, 3001), [-10**6, -65537, 65537, 10**6]])
  expected = t5.T5Attention._relative_position_bucket(
      torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
  got = relative_position_bucket(jnp.asarray(relative, jnp.int32), bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(np.asarray(got), expected.numpy())


def _packed_ids(rng, batch, length, longest=None):
  """Segment ids 1, 2, ... of random lengths (1 to `longest`, default length / 2) followed by padding (0), and
  per-segment positions."""
  ids, positions = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32)
  for row in range(batch):
    start, segment = 0, 1
    while start < length - length // 5:  # leave a padded tail
      size = int(rng.integers(1, longest or length // 2))
      end = min(start + size, length - length // 5)
      ids[row, start:end], positions[row, start:end] = segment, np.arange(end - start)
      start, segment = end, segment + 1
  return jnp.asarray(ids), jnp.asarray(positions)


# With interpreter blocks of 32 and max_distance well under the length, the T5 cases walk all three regions of
# the kv (and q) loops: far left, band, far right (only far left when causal). Lengths that are not multiples of
# the blocks are padded, and the padding masked; the "aligned" cases run the tiles that need no mask, the GPU's
# fast path.
CASES = {
    # name: (batch, heads, q_len, kv_len, head_dim, causal, bias kind, segments, extra kwargs)
    "plain": (2, 2, 37, 37, 32, False, None, False, {}),
    "causal": (1, 2, 100, 100, 32, True, None, False, {}),
    "t5_bidirectional": (2, 2, 200, 200, 64, False, "t5", False, dict(rpe_max_distance=40)),
    "t5_causal": (1, 2, 200, 200, 32, True, "t5", False, dict(rpe_bidirectional=False, rpe_max_distance=40)),
    "t5_aligned": (2, 1, 128, 128, 32, False, "t5", False, dict(rpe_max_distance=24)),
    "t5_aligned_causal": (1, 2, 128, 128, 64, True, "t5", False, dict(rpe_bidirectional=False,
                                                                       rpe_max_distance=24)),
    "t5_head_dim_128": (1, 2, 150, 150, 128, False, "t5", False, dict(rpe_max_distance=40)),
    "t5_packed": (2, 2, 200, 200, 32, False, "t5", True, dict(rpe_max_distance=24)),
    "t5_packed_causal": (2, 1, 160, 160, 32, True, "t5", True, dict(rpe_bidirectional=False, rpe_max_distance=24)),
    # Segments of at most 20 tokens in 32-token blocks: most tiles share no segment and are skipped.
    "t5_packed_short": (2, 2, 250, 250, 32, False, "t5", 20, dict(rpe_max_distance=24)),
    # kv_mask (Hugging Face's attention_mask): every query sees the real keys; a tail of padding and a hole of 40
    # keys in the middle, so that some tiles hold real and hidden keys and one holds hidden keys only (_inputs).
    "t5_key_mask": (2, 2, 190, 190, 32, False, "t5", "mask", dict(rpe_max_distance=24)),
    "t5_key_mask_causal": (1, 2, 190, 190, 32, True, "t5", "mask", dict(rpe_bidirectional=False,
                                                                         rpe_max_distance=24)),
    "key_mask_cross": (2, 2, 70, 190, 64, False, None, "mask", {}),
    # Key masks on block edges: a row of real keys only (no tile masked), one whose real keys end at a block edge.
    "t5_key_mask_aligned": (2, 2, 128, 128, 32, False, "t5", "mask", dict(rpe_max_distance=24)),
    "t5_cross": (2, 1, 70, 150, 32, False, "t5", False, dict(rpe_max_distance=20)),
    "cross": (2, 2, 90, 200, 64, False, None, True, {}),
    "alibi_symmetric_causal": (2, 2, 100, 100, 32, True, "alibi1", False, {}),
    "alibi_asymmetric_packed": (2, 2, 100, 100, 32, False, "alibi2", True, {}),
    "full_bias_heads": (2, 2, 70, 70, 32, False, "full_h", False, {}),
    "full_bias_batch_causal": (2, 2, 70, 70, 32, True, "full_b", False, {}),
}
TRITON_LACKS = {"alibi1": "ALiBi slopes", "alibi2": "ALiBi slopes", "full_h": "full bias",
                "full_b": "full bias"}


def _inputs(seed, case):
  batch, heads, q_len, kv_len, head_dim, causal, bias_kind, segments, extra = CASES[case]
  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
  k = jax.random.normal(keys[1], (batch, kv_len, heads, head_dim))
  v = jax.random.normal(keys[2], (batch, kv_len, heads, head_dim))
  kwargs = dict(causal=causal, scale=float(head_dim ** -0.5) if "cross" in case else 1.0, **extra)
  bias = None
  if bias_kind == "t5":
    bias = ("rpe_table", jax.random.normal(keys[3], (32, heads)))
  elif bias_kind == "alibi1":
    bias = ("alibi_slopes", jax.random.uniform(keys[3], (heads,), minval=0.01, maxval=0.5))
  elif bias_kind == "alibi2":
    bias = ("alibi_slopes", jax.random.uniform(keys[3], (2, heads), minval=0.01, maxval=0.5))
  elif bias_kind == "full_h":
    bias = ("bias", jax.random.normal(keys[3], (1, heads, q_len, kv_len)))
  elif bias_kind == "full_b":
    bias = ("bias", jax.random.normal(keys[3], (batch, 1, q_len, kv_len)))
  if case == "t5_key_mask_aligned":
    kwargs.update(kv_mask=jnp.arange(kv_len) < jnp.array([[kv_len], [64]]))
  elif segments == "mask":
    index = jnp.arange(kv_len)
    tail_and_hole = (index < kv_len - kv_len // 5) & ((index < 60) | (index >= 100))
    # Rows differ: the second keeps its first 50 keys, or none in t5_key_mask (its queries see no key: zeros).
    second = index < (0 if case == "t5_key_mask" else 50)
    kwargs.update(kv_mask=jnp.stack([tail_and_hole, second][:batch]))
  elif segments:
    q_ids, q_pos = _packed_ids(rng, batch, q_len, longest=None if segments is True else segments)
    if q_len == kv_len:
      kv_ids, kv_pos = q_ids, q_pos
    else:
      kv_ids, kv_pos = _packed_ids(rng, batch, kv_len)
      q_ids = jnp.minimum(q_ids, jnp.max(kv_ids, axis=1, keepdims=True))  # every query segment has keys...
      q_ids = q_ids.at[:, 3].set(0)  # ...except one padding query inside the row
    kwargs.update(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_positions=q_pos, kv_positions=kv_pos)
  out_ct = jax.random.normal(keys[4], q.shape)
  lse_ct = jax.random.normal(keys[5], (batch, heads, q_len))
  return (q, k, v), bias, kwargs, (out_ct, lse_ct)


def _run(fn, qkv, bias, kwargs, cts):
  """out, lse and the gradients of a random linear function of both (lse of empty rows excluded)."""
  def loss(qkv, bias_value):
    extra = {} if bias is None else {bias[0]: bias_value}
    out, lse = fn(*qkv, return_lse=True, **kwargs, **extra)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out * cts[0]) + jnp.sum(finite_lse * cts[1]), (out, lse)
  poison_device_memory()
  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(qkv, None if bias is None else bias[1])
  return jax.tree.map(np.asarray, (out, lse, grads))


def _reference(qkv, bias, kwargs, cts):
  """_run of the jnp reference in float64: inputs, cotangents and every intermediate."""
  with jax.enable_x64(True):
    wide = lambda x: jnp.asarray(np.asarray(x, np.float64)) if jnp.issubdtype(x.dtype, jnp.floating) else x
    qkv, cts = jax.tree.map(wide, (qkv, cts))
    bias = None if bias is None else (bias[0], wide(bias[1]))
    return _run(reference.attention, qkv, bias, {k: wide(v) if isinstance(v, jax.Array) else v
                                                 for k, v in kwargs.items()}, cts)


def _kernel(backend):
  return lambda *args, **kwargs: flash_attention(*args, backend=backend, interpret=INTERPRET, **kwargs)


def _without_positions(kwargs):
  """The same call with segment ids alone (per-segment positions of contiguous segments give the same result)."""
  return {k: v for k, v in kwargs.items() if k not in ("q_positions", "kv_positions")}


def _fresh_seed(case):
  return abs(hash(case)) % 1000 + int(np.random.default_rng().integers(1 << 20))  # fresh inputs every run


def _check(result, expected, kwargs, tol=TOL):
  (out, lse, grads), (ref_out, ref_lse, ref_grads) = result, expected
  # lse is -inf exactly where a query sees no key; elsewhere finite and close.
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  finite = np.isfinite(ref_lse)
  chex.assert_trees_all_equal_shapes((out, grads), (ref_out, ref_grads))
  chex.assert_tree_all_finite((out, lse[finite], grads))
  tree, ref_tree = (out, lse[finite], grads), (ref_out, ref_lse[finite], ref_grads)
  for (path, x), ref in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref_tree)):
    err = relative_error(x, ref)
    assert err < tol, (jax.tree_util.keystr(path), err)
  if "q_segment_ids" in kwargs:  # padding queries: zero output and zero gradient
    padding = np.asarray(kwargs["q_segment_ids"]) == 0
    assert padding.any()
    np.testing.assert_array_equal(out[padding], 0.0)
    np.testing.assert_array_equal(grads[0][0][padding], 0.0)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case):
  """Triton runs packed rows with segment ids alone, against the reference with per-segment positions."""
  bias_kind = CASES[case][6]
  if backend == "triton" and bias_kind in TRITON_LACKS:
    pytest.skip(f"the Triton kernels take no {TRITON_LACKS[bias_kind]} (backend='pallas' runs it)")
  qkv, bias, kwargs, cts = _inputs(_fresh_seed(case), case)
  call_kwargs = _without_positions(kwargs) if backend == "triton" else kwargs
  _check(_run(_kernel(backend), qkv, bias, call_kwargs, cts), _reference(qkv, bias, kwargs, cts), kwargs)


@pytest.mark.parametrize("case", ["t5_packed_causal", "alibi_asymmetric_packed"])
def test_pallas_segment_ids_alone_match_per_segment_positions(case):
  """The trainer's fast path: contiguous segments whose positions restart at 0 need no positions (Triton runs
  every packed case this way in test_matches_reference)."""
  qkv, bias, kwargs, cts = _inputs(_fresh_seed(case), case)
  _check(_run(_kernel("pallas"), qkv, bias, _without_positions(kwargs), cts), _reference(qkv, bias, kwargs, cts),
         kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_float32_reference(backend):
  qkv, bias, kwargs, _ = _inputs(int(np.random.default_rng().integers(1 << 20)), "t5_causal")
  if backend == "triton" and INTERPRETED:  # its tl.dot would multiply the raw bits: refused, not wrong
    with pytest.raises(ValueError, match="float32 inputs or use backend='pallas'"):
      _kernel(backend)(*(x.astype(jnp.bfloat16) for x in qkv), rpe_table=bias[1], **kwargs)
    return
  out = _kernel(backend)(*(x.astype(jnp.bfloat16) for x in qkv), rpe_table=bias[1], **kwargs)
  expected = reference.attention(*qkv, rpe_table=bias[1], **kwargs)
  assert out.dtype == jnp.bfloat16
  assert relative_error(out, expected) < 2e-2


# Each case runs both Mosaic kernels in the interpreter, 8 s with each kernel compiled once (25 s compiled for each
# warpgroup of each program): on a CPU the one case with padding, segment ids and Sq != Sk; test_attention_mosaic.py
# runs the kernels themselves on every feature there.
@pytest.mark.parametrize("case", ["t5_bidirectional", "t5_aligned_causal", "t5_head_dim_128", "cross"])
def test_mosaic_backend_matches_reference(case):
  """backend="mosaic" (16-bit inputs, head_dim 64 or 128) through the public function: out, lse and every gradient
  against the float64 reference on the same bf16 inputs, at bf16 accuracy."""
  if INTERPRETED and case != "cross":
    pytest.skip("interpreted, the public function's Mosaic path runs the cross case only (cost)")
  qkv, bias, kwargs, cts = _inputs(_fresh_seed(case), case)
  qkv = tuple(x.astype(jnp.bfloat16) for x in qkv)
  with compile_each_interpreted_kernel_once():
    result = _run(_kernel("mosaic"), qkv, bias, _without_positions(kwargs), cts)
  _check(result, _reference(qkv, bias, kwargs, cts), kwargs, tol=3e-2)


@pytest.mark.parametrize("table_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_t5_bias_is_rounded_alike_near_and_far_from_the_diagonal(backend, table_dtype):
  """Each query sees exactly one key (segment ids) and q = 0, so its lse is the bias of that pair as the kernel
  computed it. Pairs near the diagonal (band tiles) and far from it (far tiles) both match the float64 table
  within float32 rounding (the docstring's bound), for a bf16 and a float32 table with bf16 q, k, v (bf16 band
  tiles of the scaled bias were 2**-9 off near the diagonal only); float32 ones in Triton's interpreter, which
  refuses bf16."""
  length, heads, head_dim, max_distance = 150, 2, 32, 8  # interpreter blocks of 32: band tiles reach |d| < 72
  dtype = jnp.float32 if backend == "triton" and INTERPRETED else jnp.bfloat16
  keys = jax.random.split(jax.random.PRNGKey(_fresh_seed("t5_rounding")), 3)
  magnitude = jax.random.uniform(keys[0], (16, heads), minval=2.0, maxval=20.0)  # exact relative errors
  table = jnp.where(jax.random.bernoulli(keys[1], 0.5, (16, heads)), magnitude, -magnitude).astype(table_dtype)
  key_of_query = length - 1 - np.arange(length)  # distances 149, 147, ..., -149: near and far pairs
  q_ids = jnp.arange(1, length + 1, dtype=jnp.int32)[None]
  kv_ids = jnp.zeros((1, length), jnp.int32).at[0, key_of_query].set(q_ids[0])
  q = jnp.zeros((1, length, heads, head_dim), dtype)
  k, v = jax.random.normal(keys[2], (2, 1, length, heads, head_dim)).astype(dtype)
  poison_device_memory()
  out, lse = _kernel(backend)(q, k, v, rpe_table=table, rpe_max_distance=max_distance, q_segment_ids=q_ids,
                              kv_segment_ids=kv_ids, return_lse=True)
  distance = key_of_query - np.arange(length)
  expected = np.asarray(table, np.float64)[np.asarray(relative_position_bucket(
      jnp.asarray(distance), True, 16, max_distance))].T  # [H, length]
  error = np.abs(np.asarray(lse[0], np.float64) - expected) / np.abs(expected)
  near, far = np.abs(distance) < max_distance, np.abs(distance) >= max_distance + 64
  assert near.sum() >= 4 and far.sum() >= 4
  assert error[:, near].max() < 1e-6 and error[:, far].max() < 1e-6, (error[:, near].max(), error[:, far].max())
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(v[0, key_of_query]))  # p is exactly 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_t5_table_gradient_accumulates_in_float32(backend):
  """A bf16 table's gradient sums p over every pair of a bucket (the lse cotangent is 1 on 2 x 512 rows): each
  far bucket gathers hundreds of positive terms, which a bf16 accumulator would stop adding to; the kernels sum
  in float32 and round once."""
  # Triton's interpreter multiplies bf16 bits in tl.dot: there the inputs are float32, the table bf16.
  dtype = jnp.float32 if backend == "triton" and INTERPRETED else jnp.bfloat16
  batch, length, heads, head_dim = 2, 500, 1, 32
  keys = jax.random.split(jax.random.PRNGKey(_fresh_seed("t5_table_gradient")), 5)
  q, k, v = ((0.3 * jax.random.normal(key, (batch, length, heads, head_dim))).astype(dtype) for key in keys[:3])
  table = jax.random.normal(keys[3], (32, heads)).astype(jnp.bfloat16)
  kwargs = dict(rpe_max_distance=64)
  cts = (jax.random.normal(keys[4], q.shape), jnp.ones((batch, heads, length)))
  _, _, (_, dtable) = _run(_kernel(backend), (q, k, v), ("rpe_table", table), kwargs, cts)
  _, _, (_, ref_dtable) = _reference((q, k, v), ("rpe_table", table), kwargs, cts)
  assert dtable.dtype == jnp.bfloat16
  assert np.abs(ref_dtable).max() > 200  # hundreds of terms in a bucket (fresh inputs: 300-700 typically)
  assert relative_error(dtable, ref_dtable) < 1e-2


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=jnp.ones((1, 16, 2, 16))), "k and v must be"),
    (dict(k=jnp.ones((16, 2, 32))), r"\[B, S, H, D\]"),
    (dict(rpe_table=jnp.ones((32, 3))), "rpe_table"),
    (dict(alibi_slopes=jnp.ones((3, 2))), "alibi_slopes"),
    (dict(q_segment_ids=jnp.ones((1, 15), jnp.int32), kv_segment_ids=jnp.ones((1, 16), jnp.int32)), "must be"),
    (dict(rpe_table=jnp.ones((32, 2)), alibi_slopes=jnp.ones((2,))), "at most one"),
    (dict(q_segment_ids=jnp.ones((1, 16), jnp.int32)), "both"),
    (dict(kv_mask=jnp.ones((1, 15), bool)), r"kv_mask must be \[1, 16\]"),
    (dict(kv_mask=jnp.ones((1, 16), bool), q_segment_ids=jnp.ones((1, 16), jnp.int32),
          kv_segment_ids=jnp.ones((1, 16), jnp.int32)), "segment ids or kv_mask, not both"),
    (dict(bias=jnp.ones((1, 2, 16, 8))), "bias"),
    (dict(rpe_table=jnp.ones((32, 2)), rpe_max_distance=8), "max_distance"),
    (dict(scale=-0.125), "scale must be positive"),  # the kernel takes row maxima before scaling
    (dict(backend="cuda"), "backend must be one of"),
    (dict(backend="triton", alibi_slopes=jnp.ones((2,))), "backend='triton' takes no alibi_slopes"),
    (dict(backend="mosaic", bias=jnp.ones((1, 2, 16, 16))), "backend='mosaic' takes no"),
    (dict(backend="triton", bias=jnp.ones((1, 2, 16, 16))), "backend='triton' takes no"),
    (dict(backend="triton", q_positions=jnp.zeros((1, 16), jnp.int32),
          kv_positions=jnp.zeros((1, 16), jnp.int32)), "backend='triton' takes no"),
])
def test_bad_input_raises(kwargs, match):
  q = jnp.ones((1, 16, 2, 32))
  k = kwargs.pop("k", q)
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, k, **kwargs)
  if not {"backend", "scale"} & set(kwargs):  # the reference checks the inputs alike (any scale is fine there)
    with pytest.raises(ValueError, match=match):
      reference.attention(q, k, k, **kwargs)


def test_head_dim_is_restricted_by_the_kernels_only():
  q = jnp.ones((1, 16, 2, 48))
  assert 48 not in HEAD_DIMS
  with pytest.raises(ValueError, match="head_dim"):
    flash_attention(q, q, q)
  assert reference.attention(q, q, q).shape == q.shape  # the model's XLA path takes any head_dim


@pytest.mark.skipif(ON_GPU, reason="only off a GPU")
def test_compiled_kernels_need_a_gpu():
  q = jnp.ones((1, 16, 2, 32))
  with pytest.raises(ValueError, match="need a GPU"):
    flash_attention(q, q, q, interpret=False)


def test_triton_supports():
  slopes, positions = jnp.ones((2,)), jnp.zeros((1, 16), jnp.int32)
  assert triton_supports() and triton_supports(alibi_slopes=None, bias=None, q_positions=None)
  assert not triton_supports(alibi_slopes=slopes)
  assert not triton_supports(bias=jnp.ones((1, 1, 16, 16)))
  assert not triton_supports(q_positions=positions)


@pytest.mark.parametrize("layout", ["packed", "random"])
def test_segment_block_ranges_cover_every_visible_tile_and_skip_the_rest_of_packed_rows(layout):
  """Every tile holding a visible pair (same nonzero segment) lies in its block's range; on packed rows (ids in
  order, then padding) the ranges are exactly the span of those tiles, so the kernels skip all the others."""
  rng = np.random.default_rng(0)
  bq, bk, q_len, kv_len = 32, 16, 256, 192
  if layout == "packed":
    q_ids = _packed_ids(rng, 3, q_len, longest=40)[0]
    kv_ids = _packed_ids(rng, 3, kv_len, longest=40)[0]
  else:  # ids in any order, zeros anywhere: ranges stay correct, if wider
    q_ids, kv_ids = (jnp.asarray(rng.integers(0, 6, (3, n)), jnp.int32) for n in (q_len, kv_len))
  kv_range, q_range = segment_block_ranges(q_ids, kv_ids, bq, bk)
  q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
  visible = (q_ids[:, :, None] == kv_ids[:, None, :]) & (kv_ids[:, None, :] != 0)
  tiles = visible.reshape(3, q_len // bq, bq, kv_len // bk, bk).any(axis=(2, 4))  # [B, q blocks, kv blocks]
  for ranges, seen in ((np.asarray(kv_range), tiles), (np.asarray(q_range), tiles.swapaxes(1, 2))):
    blocks = np.arange(seen.shape[2])
    inside = (ranges[..., :1] <= blocks) & (blocks < ranges[..., 1:])
    assert not (seen & ~inside).any()
    if layout == "packed":
      first = np.where(seen.any(-1), seen.argmax(-1), 0)
      end = np.where(seen.any(-1), seen.shape[2] - seen[..., ::-1].argmax(-1), 0)
      np.testing.assert_array_equal(ranges, np.stack([first, end], -1))
      assert inside.mean() < 0.4  # most tiles skipped
  if layout == "random":
    assert (np.asarray(kv_range) == [0, kv_len // bk]).all()  # every block holds every id: nothing skipped


def test_reference_bias_and_mask_shapes():
  """The pieces the cuDNN path takes: without positions the bias is shared by the batch."""
  table, slopes = jnp.ones((32, 3)), jnp.ones((2, 3))
  positions_q, positions_kv = jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 7), jnp.int32)
  assert reference.dense_bias(None, None, q_len=5, kv_len=7) is None
  assert reference.dense_bias(None, None, q_len=5, kv_len=7, rpe_table=table).shape == (1, 3, 5, 7)
  assert reference.dense_bias(positions_q, positions_kv, batch=2, rpe_table=table).shape == (2, 3, 5, 7)
  alibi = reference.dense_bias(None, None, q_len=5, kv_len=7, alibi_slopes=slopes)
  assert alibi.shape == (1, 3, 5, 7) and alibi.dtype == jnp.float32
  with pytest.raises(ValueError, match="batch"):
    reference.dense_bias(positions_q, positions_kv, batch=3, rpe_table=table)
  with pytest.raises(ValueError, match="q_len"):
    reference.dense_bias(None, None, rpe_table=table)
  assert reference.mask(None, None, causal=True, q_len=5, kv_len=7).shape == (1, 1, 5, 7)
  segments = jnp.ones((2, 5), jnp.int32)
  assert reference.mask(segments, segments, causal=False).shape == (2, 1, 5, 5)
  with pytest.raises(ValueError, match="q_len"):
    reference.mask(None, None, causal=False)


def test_every_block_table_entry_fits_its_devices_shared_memory():
  for key, by_head_dim in tuning._BLOCK_TABLE.items():  # pylint: disable=protected-access
    for head_dim, blocks in by_head_dim.items():
      used = tuning.shared_memory_bytes(blocks, head_dim)
      assert used <= tuning.SHARED_MEMORY_PER_BLOCK[key], (key, head_dim, used)


@pytest.mark.parametrize("capability,key", [((9, 0), (9, 0)), ((8, 0), (8, 0)), ((8, 6), (8, 6)), ((8, 9), (8, 6)),
                                            ((8, 7), (8, 0)), ((10, 0), (9, 0)), ((12, 0), (8, 6)), ((7, 5), (8, 6))])
def test_devices_get_the_row_of_their_shared_memory(capability, key):
  assert tuning.table_key(capability) == key
  for head_dim in HEAD_DIMS:
    blocks = default_block_sizes(head_dim, interpret=False, capability=capability)
    assert tuning.shared_memory_bytes(blocks, head_dim) <= tuning.SHARED_MEMORY_PER_BLOCK.get(capability, 99 * 1024)


def test_float32_inputs_get_smaller_forward_tiles():
  """float32 tiles take twice the shared memory of the bf16 ones the table is for."""
  for head_dim in HEAD_DIMS:
    blocks = default_block_sizes(head_dim, interpret=False, dtype=jnp.float32, capability=(9, 0))
    assert blocks.block_q <= 64 and blocks.num_stages == 2


def test_short_rows_get_smaller_forward_q_blocks():
  long_rows = default_block_sizes(64, interpret=False, capability=(9, 0), q_len=4096)
  short_rows = default_block_sizes(64, interpret=False, capability=(9, 0), q_len=512)
  assert long_rows.block_q == 128 and short_rows.block_q == 64
  assert short_rows == dataclasses.replace(long_rows, block_q=64)  # the backward's blocks stay
  assert default_block_sizes(128, interpret=False, capability=(9, 0), q_len=512).block_q == 128


def test_block_sizes_must_be_powers_of_two():
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(48, 64, 64, 64)
