"""Cross-entropy kernels (Pallas, and raw Triton on GPU) and the chunked lm_head loss against float64 references.

CPU runs the Pallas kernels in interpret mode (outputs start as NaN there, so an unwritten element fails). On a
GPU, FAT5_INTERPRET=0 compiles them, the jax-triton variant and mT5's vocabulary run too, and freed device memory
is filled with NaN before each call.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import pytest

from tests.kernels.checks import INTERPRET, ON_GPU, poison_device_memory, relative_error
from pallas_kernels.cross_entropy import (BlockSizes, chunked_lm_head_cross_entropy, cross_entropy,
                                          cross_entropy_and_grad, cross_entropy_reference,
                                          lm_head_cross_entropy_reference)

ON_GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
IMPLS = ["pallas", pytest.param("triton", marks=ON_GPU_ONLY)]
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}
SMALL_BLOCKS = BlockSizes(block_tokens=4, block_vocab=256, bwd_block_tokens=2, bwd_block_vocab=128)


def _targets(key, num_tokens, vocab):
  """Random targets with about a fifth ignored (-1, or -100 like PyTorch)."""
  k1, k2, k3 = jax.random.split(key, 3)
  targets = jax.random.randint(k1, (num_tokens,), 0, vocab)
  ignored = jax.random.uniform(k2, (num_tokens,)) < 0.2
  return jnp.where(ignored, jax.random.choice(k3, jnp.array([-1, -100]), (num_tokens,)), targets)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_tokens,vocab,dtype,z_loss,label_smoothing,block_sizes", [
    (32, 1024, jnp.float32, 1e-4, 0.0, SMALL_BLOCKS),  # no masking
    (37, 1000, jnp.float32, 1e-3, 0.1, SMALL_BLOCKS),
    (37, 3000, jnp.bfloat16, 1e-2, 0.1, SMALL_BLOCKS),
    (29, 32128, jnp.bfloat16, 1e-4, 0.0, None),
    pytest.param(300, 250112, jnp.bfloat16, 1e-4, 0.1, None, marks=ON_GPU_ONLY),
])
def test_matches_float64_reference(impl, num_tokens, vocab, dtype, z_loss, label_smoothing, block_sizes):
  keys = jax.random.split(jax.random.key(num_tokens + vocab), 4)
  logits = (4.0 * jax.random.normal(keys[0], (num_tokens, vocab))).astype(dtype)
  targets = _targets(keys[1], num_tokens, vocab)
  dloss, dlse = jax.random.normal(keys[2], (2, num_tokens))
  kwargs = dict(z_loss=z_loss, label_smoothing=label_smoothing)
  poison_device_memory()
  (loss, lse), vjp = jax.vjp(
      lambda x: cross_entropy(x, targets, block_sizes=block_sizes, impl=impl, interpret=INTERPRET, **kwargs),
      logits)
  poison_device_memory()
  (dlogits,) = vjp((dloss, dlse))
  with jax.enable_x64(True):
    (ref_loss, ref_lse), ref_vjp = jax.vjp(lambda x: cross_entropy_reference(x, targets, **kwargs),
                                           logits.astype(jnp.float64))
    (ref_dlogits,) = ref_vjp((dloss.astype(jnp.float64), dlse.astype(jnp.float64)))
    chex.assert_type([loss, lse, dlogits], [jnp.float32, jnp.float32, dtype])
    chex.assert_shape([loss, lse, dlogits], [(num_tokens,), (num_tokens,), (num_tokens, vocab)])
    chex.assert_tree_all_finite((loss, lse, dlogits))
    assert bool(jnp.all(jnp.where(targets < 0, loss == 0, loss > 0)))
    for name, actual, expected in [("loss", loss, ref_loss), ("lse", lse, ref_lse),
                                   ("dlogits", dlogits, ref_dlogits)]:
      err = relative_error(actual, expected)
      assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e} >= {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("impl", ["xla", "pallas", pytest.param("triton", marks=ON_GPU_ONLY)])
# Vocab 777: a loop over vocab blocks, or one block. Off the GPU the persistent kernel runs 4 or 3 programs (one
# "core"), so programs loop over different numbers of the 21 rows; the GPU case gives 2 or 3 rows to a program.
@pytest.mark.parametrize("num_tokens,vocab,fused_block_vocab,fused_programs_per_core", [
    (21, 777, 128, 4), (21, 777, 1024, 3), pytest.param(1500, 32000, 4096, 4, marks=ON_GPU_ONLY)])
def test_cross_entropy_and_grad_matches_reference_vjp(impl, num_tokens, vocab, fused_block_vocab,
                                                      fused_programs_per_core):
  keys = jax.random.split(jax.random.key(num_tokens), 3)
  logits = (4.0 * jax.random.normal(keys[0], (num_tokens, vocab))).astype(jnp.bfloat16)
  targets = _targets(keys[1], num_tokens, vocab).at[0].set(jnp.argmax(logits[0]))
  dloss = jax.random.uniform(keys[2], (num_tokens,))
  kwargs = dict(z_loss=1e-3, label_smoothing=0.1)
  poison_device_memory()
  block_sizes = dataclasses.replace(SMALL_BLOCKS, fused_block_vocab=fused_block_vocab,
                                    fused_programs_per_core=fused_programs_per_core)
  loss, lse, argmax, dlogits = cross_entropy_and_grad(logits, targets, dloss, block_sizes=block_sizes, impl=impl,
                                                      interpret=INTERPRET, **kwargs)
  with jax.enable_x64(True):
    (ref_loss, ref_lse), ref_vjp = jax.vjp(lambda x: cross_entropy_reference(x, targets, **kwargs),
                                           logits.astype(jnp.float64))
    (ref_dlogits,) = ref_vjp((dloss.astype(jnp.float64), jnp.zeros(num_tokens, jnp.float64)))
    chex.assert_type([loss, lse, argmax, dlogits], [jnp.float32, jnp.float32, jnp.int32, jnp.bfloat16])
    chex.assert_trees_all_equal(argmax, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    for actual, expected in [(loss, ref_loss), (lse, ref_lse), (dlogits, ref_dlogits)]:
      assert relative_error(actual, expected) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_argmax_is_the_first_maximum(impl):
  """Ties inside a vocab block, across blocks and on block edges (blocks of 128 or 256): the forward kernel (one
  more read of the block holding the maximum) and the fused one (found in its gradient pass) both report the
  first maximum, like jnp.argmax."""
  keys = jax.random.split(jax.random.key(5), 2)
  logits = jax.random.normal(keys[0], (6, 700)).astype(jnp.bfloat16)
  for row, cols in enumerate([[5, 600], [300, 301], [699], [0, 699], [130, 260, 390], [127, 128]]):
    logits = logits.at[row, jnp.array(cols)].set(10.0)
  first = jnp.argmax(logits, axis=-1)
  block_sizes = dataclasses.replace(SMALL_BLOCKS, fused_block_vocab=128)
  _, _, argmax, _ = cross_entropy_and_grad(logits, first, jax.random.uniform(keys[1], (6,)), impl=impl,
                                           block_sizes=block_sizes, interpret=INTERPRET)
  chex.assert_trees_all_equal(argmax, first.astype(jnp.int32))
  # The chunked loss without gradients runs the forward kernel; an identity hidden state makes its logits exact.
  sums = chunked_lm_head_cross_entropy(jnp.eye(6, dtype=jnp.bfloat16), logits, first, chunk_size=6, impl=impl,
                                       block_sizes=block_sizes, interpret=INTERPRET)
  assert float(sums.correct) == 6.0


def test_ignored_tokens_have_no_loss_gradient():
  logits = jax.random.normal(jax.random.key(3), (9, 300))
  targets = jnp.array([5, -1, 7, -100, 0, 299, -1, 2, 3])
  dlogits = jax.grad(lambda x: jnp.sum(cross_entropy(x, targets, z_loss=1e-3, block_sizes=SMALL_BLOCKS,
                                                     interpret=INTERPRET)[0]))(logits)
  chex.assert_trees_all_equal(dlogits[targets < 0], jnp.zeros((3, 300)))
  assert bool(jnp.all(jnp.abs(dlogits[targets >= 0]).sum(-1) > 0))


def _lm_head_inputs(seed, num_tokens, d_model, vocab, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(keys[0], (num_tokens, d_model)).astype(dtype)
  kernel = jax.random.normal(keys[1], (d_model, vocab)) / d_model ** 0.5 * 3
  targets = _targets(keys[2], num_tokens, vocab)
  # Make some predictions right so that the accuracy count is not trivially 0.
  logits = jnp.dot(hidden, kernel.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
  targets = jnp.where(jnp.arange(num_tokens) % 3 == 0, jnp.argmax(logits, -1), targets)
  weights = jax.random.uniform(keys[3], (num_tokens,), minval=0.5, maxval=2.0)
  return hidden, kernel, targets, weights


@pytest.mark.parametrize("impl", ["xla", "pallas", pytest.param("triton", marks=ON_GPU_ONLY)])
@pytest.mark.parametrize("num_tokens,chunk_size,dtype", [(37, 16, jnp.float32), (40, 8, jnp.bfloat16)])
def test_chunked_lm_head_matches_materialized(impl, num_tokens, chunk_size, dtype):
  d_model, vocab = 32, 700
  hidden, kernel, targets, weights = _lm_head_inputs(num_tokens, num_tokens, d_model, vocab, dtype)
  kwargs = dict(z_loss=1e-3, label_smoothing=0.1)

  def chunked(hidden, kernel):
    return chunked_lm_head_cross_entropy(hidden, kernel, targets, weights, chunk_size=chunk_size, impl=impl,
                                         block_sizes=SMALL_BLOCKS, interpret=INTERPRET, **kwargs)

  with jax.default_matmul_precision("highest"):  # no TF32 on GPU: the float32 case checks the loss, not the matmul
    poison_device_memory()
    sums = jax.jit(chunked)(hidden, kernel)
    poison_device_memory()
    grads = jax.jit(jax.grad(lambda h, k: chunked(h, k).loss, argnums=(0, 1)))(hidden, kernel)
  with jax.enable_x64(True):
    def reference(hidden, kernel):
      return lm_head_cross_entropy_reference(hidden, kernel, targets, weights, **kwargs)

    h64, k64 = hidden.astype(jnp.float64), kernel.astype(jnp.float64)
    ref_sums = reference(h64, k64)
    ref_grads = jax.grad(lambda h, k: reference(h, k).loss, argnums=(0, 1))(h64, k64)
    chex.assert_type(list(grads), [dtype, jnp.float32])
    chex.assert_tree_all_finite((sums, grads))
    tol = TOLERANCE[dtype]
    assert relative_error(sums.loss, ref_sums.loss) < tol
    assert relative_error(sums.z_loss, ref_sums.z_loss) < tol
    assert float(sums.correct) > 0
    # The argmax of rounded logits may differ from float64's on near-ties: allow one token.
    assert abs(float(sums.correct) - float(ref_sums.correct)) <= 2.0
    for name, actual, expected in zip(("dhidden", "dkernel"), grads, ref_grads):
      err = relative_error(actual, expected)
      assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def test_chunked_metrics_have_exact_accuracy_count():
  hidden, kernel, targets, weights = _lm_head_inputs(0, 24, 16, 300, jnp.float32)
  sums = chunked_lm_head_cross_entropy(hidden, kernel, targets, weights, chunk_size=10, block_sizes=SMALL_BLOCKS,
                                       interpret=INTERPRET)
  logits = hidden @ kernel
  expected = jnp.sum(jnp.where(jnp.argmax(logits, -1) == targets, weights, 0.0))
  chex.assert_trees_all_close(sums.correct, expected, rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=jnp.zeros(5, jnp.int32)), "targets"),
    (dict(logits=jnp.zeros((4, 8), jnp.int32)), "floating"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(impl="xla"), "impl"),
])
def test_bad_input_raises(kwargs, message):
  args = dict(logits=jnp.ones((4, 8)), targets=jnp.zeros(4, jnp.int32)) | kwargs
  with pytest.raises(ValueError, match=message):
    cross_entropy(args.pop("logits"), args.pop("targets"), interpret=True, **args)


@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel=jnp.ones((9, 8))), "kernel"),
    (dict(weights=jnp.ones(3)), "weights"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(impl="cuda"), "impl"),
])
def test_chunked_bad_input_raises(kwargs, message):
  args = dict(hidden=jnp.ones((4, 16)), kernel=jnp.ones((16, 8)), targets=jnp.zeros(4, jnp.int32)) | kwargs
  with pytest.raises(ValueError, match=message):
    chunked_lm_head_cross_entropy(args.pop("hidden"), args.pop("kernel"), args.pop("targets"), interpret=True,
                                  **args)
