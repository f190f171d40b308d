"""Flash attention against its materialized reference: outputs, lse and every gradient, on fresh random inputs.

Interpret mode on CPU (default). On a GPU the same module runs the compiled kernels: FAT5_INTERPRET=0 forces the
Triton lowering, FAT5_INTERPRET=1 the interpreter; unset means interpret off GPU only.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import (flash_attention, flash_attention_reference,
                                            relative_position_bucket)
from tests.kernels.checks import INTERPRET, ON_GPU, poison_device_memory, relative_error

# float32 in the interpreter is exact up to rounding; the GPU's float32 dots run in tf32.
TOL = 5e-3 if ON_GPU and INTERPRET is not True else 1e-4


def _assert_close(tree, ref_tree, tol):
  chex.assert_trees_all_equal_shapes(tree, ref_tree)
  chex.assert_tree_all_finite(tree)
  for (path, x), ref in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref_tree)):
    err = relative_error(x, ref)
    assert err < tol, (jax.tree_util.keystr(path), err)


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


def _packed_ids(rng, batch, length):
  """Segment ids 1, 2, ... of random lengths followed by padding (0), and per-segment positions."""
  ids, positions = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32)
  for row in range(batch):
    start, segment = 0, 1
    while start < length - length // 5:  # leave a padded tail
      size = int(rng.integers(1, length // 2))
      end = min(start + size, length - length // 5)
      ids[row, start:end], positions[row, start:end] = segment, np.arange(end - start)
      start, segment = end, segment + 1
  return jnp.asarray(ids), jnp.asarray(positions)


CASES = {
    # name: (q_len, kv_len, head_dim, causal, bias kind, segments, extra kwargs)
    "plain": (37, 37, 32, False, None, False, {}),
    "t5_bidirectional": (200, 200, 64, False, "t5", False, dict(rpe_max_distance=40)),
    "t5_causal": (333, 333, 32, True, "t5", False, dict(rpe_bidirectional=False, rpe_max_distance=128)),
    "t5_head_dim_128": (150, 150, 128, False, "t5", False, dict(rpe_max_distance=40)),
    "t5_packed": (200, 200, 32, False, "t5", True, dict(rpe_max_distance=24)),
    "t5_packed_causal": (160, 160, 32, True, "t5", True, dict(rpe_bidirectional=False, rpe_max_distance=24)),
    "alibi_symmetric_causal": (100, 100, 32, True, "alibi1", False, {}),
    "alibi_asymmetric_packed": (100, 100, 32, False, "alibi2", True, {}),
    "full_bias_heads": (70, 70, 32, False, "full_h", False, {}),
    "full_bias_batch_causal": (70, 70, 32, True, "full_b", False, {}),
    "cross": (90, 200, 64, False, None, True, {}),
}


def _inputs(seed, case):
  q_len, kv_len, head_dim, causal, bias_kind, segments, extra = CASES[case]
  batch, heads = 2, 2
  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
  k = jax.random.normal(keys[1], (batch, kv_len, heads, head_dim))
  v = jax.random.normal(keys[2], (batch, kv_len, heads, head_dim))
  kwargs = dict(causal=causal, scale=float(head_dim ** -0.5) if case == "cross" else 1.0, **extra)
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
  if segments:
    q_ids, q_pos = _packed_ids(rng, batch, q_len)
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
  return out, lse, grads


def _kernel(*args, **kwargs):
  return flash_attention(*args, interpret=INTERPRET, **kwargs)


def _without_positions(kwargs):
  """The same call with segment ids alone (per-segment positions give the same result)."""
  return {k: v for k, v in kwargs.items() if k not in ("q_positions", "kv_positions")}


def _fresh_seed(case):
  return abs(hash(case)) % 1000 + int(np.random.default_rng().integers(1 << 20))  # fresh inputs every run


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case):
  qkv, bias, kwargs, cts = _inputs(_fresh_seed(case), case)
  _check(_run(_kernel, qkv, bias, kwargs, cts), _run(flash_attention_reference, qkv, bias, kwargs, cts), kwargs)


@pytest.mark.parametrize("case", ["t5_packed", "t5_packed_causal", "alibi_asymmetric_packed"])
def test_packed_segment_ids_alone_match_per_segment_positions(case):
  """The trainer's fast path: contiguous segments whose positions restart at 0 need no positions."""
  qkv, bias, kwargs, cts = _inputs(_fresh_seed(case), case)
  _check(_run(_kernel, qkv, bias, _without_positions(kwargs), cts),
         _run(flash_attention_reference, qkv, bias, kwargs, cts), kwargs)


@pytest.mark.skipif(not ON_GPU or INTERPRET is True, reason="raw Triton kernels run on a GPU only")
@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][4] in (None, "t5")))
def test_triton_matches_reference(case):
  """The raw Triton kernels (no bias or T5 bias, segment ids without positions) against the same reference."""
  qkv, bias, kwargs, cts = _inputs(_fresh_seed(case), case)
  triton = lambda *args, **kw: flash_attention(*args, impl="triton", **kw)
  _check(_run(triton, qkv, bias, _without_positions(kwargs), cts),
         _run(flash_attention_reference, qkv, bias, kwargs, cts), kwargs)


def _check(result, reference, kwargs):
  (out, lse, grads), (ref_out, ref_lse, ref_grads) = result, reference
  # lse is -inf exactly where a query sees no key; elsewhere finite and close.
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  finite = np.isfinite(np.asarray(ref_lse))
  _assert_close((out, np.asarray(lse)[finite], grads), (ref_out, np.asarray(ref_lse)[finite], ref_grads), TOL)
  if "q_segment_ids" in kwargs:  # padding queries: zero output and zero gradient
    padding = np.asarray(kwargs["q_segment_ids"]) == 0
    assert padding.any()
    np.testing.assert_array_equal(np.asarray(out)[padding], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0][0])[padding], 0.0)


def test_bf16_close_to_float32_reference():
  qkv, bias, kwargs, cts = _inputs(int(np.random.default_rng().integers(1 << 20)), "t5_bidirectional")
  out = _kernel(*(x.astype(jnp.bfloat16) for x in qkv), rpe_table=bias[1], **kwargs)
  ref = flash_attention_reference(*qkv, rpe_table=bias[1], **kwargs)
  assert out.dtype == jnp.bfloat16
  assert relative_error(out, ref) < 2e-2


@pytest.mark.parametrize("kwargs,match", [
    (dict(rpe_table=jnp.ones((32, 3))), "rpe_table"),
    (dict(rpe_table=jnp.ones((32, 2)), alibi_slopes=jnp.ones((2,))), "at most one"),
    (dict(q_segment_ids=jnp.ones((1, 16), jnp.int32)), "both"),
    (dict(bias=jnp.ones((1, 2, 16, 8))), "bias"),
    (dict(rpe_table=jnp.ones((32, 2)), rpe_max_distance=8), "max_distance"),
    (dict(scale=-0.125), "scale must be positive"),  # the kernel takes row maxima before scaling
    (dict(impl="cuda"), "impl must be one of"),
    (dict(impl="triton", alibi_slopes=jnp.ones((2,))), "takes no alibi_slopes"),
])
def test_bad_input_raises(kwargs, match):
  q = jnp.ones((1, 16, 2, 32))
  with pytest.raises(ValueError, match=match):
    flash_attention(q, q, q, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="only off a GPU")
def test_triton_impl_needs_a_gpu():
  q = jnp.ones((1, 16, 2, 32))
  with pytest.raises(ValueError, match="GPU only"):
    flash_attention(q, q, q, impl="triton")


def test_head_dim_must_be_supported():
  q = jnp.ones((1, 16, 2, 48))
  with pytest.raises(ValueError, match="head_dim"):
    flash_attention(q, q, q)
