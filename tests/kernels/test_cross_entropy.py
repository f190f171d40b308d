"""Cross-entropy and the chunked lm_head loss on every backend against float64 NumPy references.

Backends: "xla" (`reference.cross_entropy`, or the "xla" backend of the fused and chunked functions, which runs the
reference per chunk), "pallas" and "triton". Off a GPU the kernels run in their interpreters, which poison every
output first (Pallas' interpreter, and `common.triton_call` for Triton's), so an element a kernel forgets fails;
FAT5_INTERPRET=0 on a GPU compiles them, poisons freed device memory instead, and adds mT5's vocabulary. Shapes are
not multiples of the blocks, and the fused kernel's cases pretend to run on a GPU with one core, so that its
persistent programs loop over several rows.
"""

import dataclasses
import importlib
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.cross_entropy import (BlockSizes, LossSums, check_loss_options, chunked_lm_head_cross_entropy,
                                          cross_entropy, cross_entropy_and_grad, reference)
from pallas_kernels.cross_entropy.backends import Kernels
from pallas_kernels.cross_entropy.tuning import fused_num_programs
from tests.kernels.checks import INTERPRET, ON_GPU, poison_device_memory, relative_error

BACKENDS = ("xla", "pallas", "triton")
ON_GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="too slow for the interpreters")
# bf16 outputs: one rounding (Triton's interpreter rounds float32 -> bf16 toward zero where the GPU rounds to
# nearest: up to one ulp, 2**-8 relative).
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}
SMALL_BLOCKS = BlockSizes(block_tokens=4, block_vocab=256, bwd_block_tokens=2, bwd_block_vocab=128,
                          fused_block_vocab=128)
# Masked rows (all -inf) take log2(0) in Triton's interpreter, as they do on the GPU; their results are not stored.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")


def _float64_reference(logits, targets, *, z_loss, label_smoothing, dloss=None, dlse=None):
  """Per-token loss and lse in float64, and dlogits for the cotangents (dloss, dlse) when given. Targets outside
  [0, V) are ignored: loss 0, no loss gradient."""
  x = np.asarray(logits, np.float64)
  targets = np.asarray(targets)
  num_tokens, vocab = x.shape
  valid = (targets >= 0) & (targets < vocab)
  row_max = x.max(axis=1, keepdims=True)
  lse = (row_max + np.log(np.exp(x - row_max).sum(axis=1, keepdims=True)))[:, 0]
  target_logit = x[np.arange(num_tokens), np.where(valid, targets, 0)]
  loss = ((1 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - x.mean(axis=1))
          + z_loss * lse * lse)
  loss = np.where(valid, loss, 0.0)
  if dloss is None:
    return loss, lse
  dloss = np.where(valid, np.asarray(dloss, np.float64), 0.0)
  softmax = np.exp(x - lse[:, None])
  one_hot = valid[:, None] & (np.arange(vocab)[None, :] == targets[:, None])
  dlogits = ((dloss * (1 + 2 * z_loss * lse) + np.asarray(dlse, np.float64))[:, None] * softmax
             - (dloss * (1 - label_smoothing))[:, None] * one_hot - (dloss * label_smoothing / vocab)[:, None])
  return loss, lse, dlogits


def _targets(key, num_tokens, vocab):
  """Random targets with about a fifth ignored (-1, -100 like PyTorch, or >= vocab)."""
  k1, k2, k3 = jax.random.split(key, 3)
  targets = jax.random.randint(k1, (num_tokens,), 0, vocab)
  ignored = jax.random.uniform(k2, (num_tokens,)) < 0.2
  return jnp.where(ignored, jax.random.choice(k3, jnp.array([-1, -100, vocab, vocab + 7]), (num_tokens,)), targets)


def _assert_close(name, actual, expected, tol):
  err = relative_error(actual, expected)
  assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens,vocab,dtype,z_loss,label_smoothing,block_sizes", [
    (32, 1024, jnp.float32, 1e-4, 0.05, SMALL_BLOCKS),  # no masking
    (37, 1000, jnp.float32, 1e-3, 0.1, SMALL_BLOCKS),
    (37, 3000, jnp.bfloat16, 1e-2, 0.1, SMALL_BLOCKS),
    (29, 32128, jnp.bfloat16, 1e-4, 0.0, None),  # T5's vocabulary, the default blocks
    pytest.param(300, 250112, jnp.bfloat16, 1e-4, 0.1, None, marks=ON_GPU_ONLY),  # mT5's
])
def test_forward_and_backward_match_float64(backend, num_tokens, vocab, dtype, z_loss, label_smoothing,
                                            block_sizes):
  keys = jax.random.split(jax.random.key(num_tokens + vocab), 4)
  logits = (4.0 * jax.random.normal(keys[0], (num_tokens, vocab))).astype(dtype)
  targets = _targets(keys[1], num_tokens, vocab)
  dloss, dlse = jax.random.normal(keys[2], (2, num_tokens))
  kwargs = dict(z_loss=z_loss, label_smoothing=label_smoothing)
  if backend == "xla":
    op = lambda x: reference.cross_entropy(x, targets, **kwargs)
  else:
    op = lambda x: cross_entropy(x, targets, block_sizes=block_sizes, backend=backend, interpret=INTERPRET,
                                 **kwargs)
  poison_device_memory()
  (loss, lse), vjp = jax.vjp(op, logits)
  poison_device_memory()
  (dlogits,) = vjp((dloss, dlse))
  chex.assert_type([loss, lse, dlogits], [jnp.float32, jnp.float32, dtype])
  chex.assert_shape([loss, lse, dlogits], [(num_tokens,), (num_tokens,), (num_tokens, vocab)])
  chex.assert_tree_all_finite((loss, lse, dlogits))
  valid = (targets >= 0) & (targets < vocab)
  assert bool(jnp.all(jnp.where(valid, loss > 0, loss == 0)))
  expected = _float64_reference(logits, targets, dloss=dloss, dlse=dlse, **kwargs)
  for name, actual, want in zip(("loss", "lse", "dlogits"), (loss, lse, dlogits), expected):
    _assert_close(name, actual, want, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_have_no_loss_gradient(backend):
  """Targets < 0 and targets >= V (a caller bug that cannot raise under jit) are ignored alike."""
  logits = jax.random.normal(jax.random.key(3), (9, 256))  # rows masked in the last block, vocab blocks not
  targets = jnp.array([5, -1, 7, -100, 0, 255, 256, 2, 1000])
  op = (lambda x: reference.cross_entropy(x, targets, z_loss=1e-3)) if backend == "xla" else (
      lambda x: cross_entropy(x, targets, z_loss=1e-3, block_sizes=SMALL_BLOCKS, backend=backend,
                              interpret=INTERPRET))
  loss, lse = op(logits)
  dlogits = jax.grad(lambda x: jnp.sum(op(x)[0]))(logits)
  ignored = (targets < 0) | (targets >= 256)
  chex.assert_trees_all_equal(loss[ignored], jnp.zeros(4))
  chex.assert_trees_all_equal(dlogits[ignored], jnp.zeros((4, 256)))
  assert bool(jnp.all(jnp.abs(dlogits[~ignored]).sum(-1) > 0))
  chex.assert_trees_all_close(lse, jax.nn.logsumexp(logits, axis=-1), rtol=1e-6)  # lse still returned


@pytest.mark.parametrize("backend", BACKENDS)
# Vocab 777: a loop over vocab blocks, or one block. On a one-core "GPU" the persistent kernel runs 4 or 3
# programs, which loop over different numbers of the 21 rows; with 132 cores each row has its own program. The GPU
# case gives 2 or 3 rows to a program.
@pytest.mark.parametrize("num_tokens,vocab,fused_block_vocab,fused_programs_per_core,cores", [
    (21, 777, 128, 4, 1), (21, 777, 1024, 3, 1), (21, 777, 256, 6, 132),
    pytest.param(1500, 32000, 4096, 4, None, marks=ON_GPU_ONLY)])
def test_fused_matches_float64(backend, num_tokens, vocab, fused_block_vocab, fused_programs_per_core, cores,
                               monkeypatch):
  if cores is not None:
    monkeypatch.setattr(common, "core_count", lambda: cores)
  keys = jax.random.split(jax.random.key(num_tokens + fused_block_vocab), 3)
  logits = (4.0 * jax.random.normal(keys[0], (num_tokens, vocab))).astype(jnp.bfloat16)
  targets = _targets(keys[1], num_tokens, vocab).at[0].set(jnp.argmax(logits[0]))
  dloss = jax.random.uniform(keys[2], (num_tokens,))
  kwargs = dict(z_loss=1e-3, label_smoothing=0.1)
  block_sizes = dataclasses.replace(SMALL_BLOCKS, fused_block_vocab=fused_block_vocab,
                                    fused_programs_per_core=fused_programs_per_core)
  poison_device_memory()
  loss, lse, argmax, dlogits = cross_entropy_and_grad(logits, targets, dloss, block_sizes=block_sizes,
                                                      backend=backend, interpret=INTERPRET, **kwargs)
  chex.assert_type([loss, lse, argmax, dlogits], [jnp.float32, jnp.float32, jnp.int32, jnp.bfloat16])
  chex.assert_trees_all_equal(argmax, jnp.argmax(logits, axis=-1).astype(jnp.int32))
  expected = _float64_reference(logits, targets, dloss=dloss, dlse=np.zeros(num_tokens), **kwargs)
  for name, actual, want in zip(("loss", "lse", "dlogits"), (loss, lse, dlogits), expected):
    _assert_close(name, actual, want, 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_is_the_first_maximum(backend):
  """Ties inside a vocab block, across blocks and on block edges (blocks of 128 or 256): the forward kernel (one
  more read of the block holding the maximum) and the fused one (found in its gradient pass) both report the
  first maximum, like jnp.argmax."""
  keys = jax.random.split(jax.random.key(5), 2)
  logits = jax.random.normal(keys[0], (6, 700)).astype(jnp.bfloat16)
  for row, cols in enumerate([[5, 600], [300, 301], [699], [0, 699], [130, 260, 390], [127, 128]]):
    logits = logits.at[row, jnp.array(cols)].set(10.0)
  first = jnp.argmax(logits, axis=-1)
  kwargs = dict(backend=backend, block_sizes=SMALL_BLOCKS, interpret=INTERPRET)
  _, _, argmax, _ = cross_entropy_and_grad(logits, first, jax.random.uniform(keys[1], (6,)), **kwargs)
  chex.assert_trees_all_equal(argmax, first.astype(jnp.int32))
  # The chunked loss without gradients runs the forward kernel; an identity hidden state makes its logits exact.
  sums = chunked_lm_head_cross_entropy(jnp.eye(6, dtype=jnp.bfloat16), logits, first, chunk_size=6, **kwargs)
  assert float(sums.correct) == 6.0


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


def _lm_head_float64(hidden, kernel, targets, weights, *, z_loss, label_smoothing):
  """LossSums and the gradients of its loss in hidden and kernel, in float64 from the materialized logits."""
  h, k = np.asarray(hidden, np.float64), np.asarray(kernel, np.float64)
  vocab = k.shape[1]
  t = np.asarray(targets)
  w = np.where((t >= 0) & (t < vocab), np.asarray(weights, np.float64), 0.0)
  logits = h @ k
  loss, lse, dlogits = _float64_reference(logits, t, z_loss=z_loss, label_smoothing=label_smoothing, dloss=w,
                                          dlse=np.zeros(len(t)))
  sums = LossSums(np.sum(w * loss), np.sum(w * z_loss * lse * lse), np.sum(w * (logits.argmax(axis=1) == t)))
  return sums, (dlogits @ k.T, h.T @ dlogits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens,chunk_size,dtype", [(37, 16, jnp.float32), (40, 8, jnp.bfloat16)])
def test_chunked_lm_head_matches_float64(backend, num_tokens, chunk_size, dtype):
  """Weights, ignored targets, a last chunk padded (37 tokens in chunks of 16), under jit and grad."""
  d_model, vocab = 32, 700
  hidden, kernel, targets, weights = _lm_head_inputs(num_tokens, num_tokens, d_model, vocab, dtype)
  kwargs = dict(z_loss=1e-3, label_smoothing=0.1)

  def chunked(hidden, kernel):
    return chunked_lm_head_cross_entropy(hidden, kernel, targets, weights, chunk_size=chunk_size, backend=backend,
                                         block_sizes=SMALL_BLOCKS, interpret=INTERPRET, **kwargs)

  with jax.default_matmul_precision("highest"):  # no TF32 on GPU: the float32 case checks the loss, not the matmul
    poison_device_memory()
    sums = jax.jit(chunked)(hidden, kernel)
    poison_device_memory()
    grads = jax.jit(jax.grad(lambda h, k: chunked(h, k).loss, argnums=(0, 1)))(hidden, kernel)
  chex.assert_type(list(grads), [dtype, jnp.float32])
  chex.assert_tree_all_finite((sums, grads))
  ref_sums, ref_grads = _lm_head_float64(hidden, kernel, targets, weights, **kwargs)
  tol = TOLERANCE[dtype]
  _assert_close("loss", sums.loss, ref_sums.loss, tol)
  _assert_close("z_loss", sums.z_loss, ref_sums.z_loss, tol)
  assert float(sums.correct) > 0
  # The argmax of rounded logits may differ from float64's on near-ties: allow one token (weights <= 2).
  assert abs(float(sums.correct) - float(ref_sums.correct)) <= 2.0
  for name, actual, want in zip(("dhidden", "dkernel"), grads, ref_grads):
    _assert_close(name, actual, want, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_std", [5.0, 30.0])
def test_chunked_bf16_logits_enter_the_loss_in_float32(backend, logit_std):
  """bf16 hidden and kernel at realistic logit scales: loss and gradients match float64 logits of the same bf16
  values within the bounds of the docstring (1e-5 on the sums, 1e-2 on the gradients), which bf16-rounded logits
  miss."""
  num_tokens, d_model, vocab = 24, 32, 700  # vocab 700: masked tails in blocks of 128 and 256
  keys = jax.random.split(jax.random.key(int(logit_std)), 4)
  hidden = jax.random.normal(keys[0], (num_tokens, d_model)).astype(jnp.bfloat16)
  kernel = (logit_std * d_model ** -0.5 * jax.random.normal(keys[1], (d_model, vocab))).astype(jnp.bfloat16)
  targets = _targets(keys[2], num_tokens, vocab)
  weights = jax.random.uniform(keys[3], (num_tokens,), minval=0.5, maxval=2.0)
  kwargs = dict(z_loss=1e-4, label_smoothing=0.0)

  def chunked(hidden, kernel):
    return chunked_lm_head_cross_entropy(hidden, kernel, targets, weights, chunk_size=16, backend=backend,
                                         block_sizes=SMALL_BLOCKS, interpret=INTERPRET, **kwargs)

  poison_device_memory()
  sums = jax.jit(chunked)(hidden, kernel)
  poison_device_memory()
  grads = jax.jit(jax.grad(lambda h, k: chunked(h, k).loss, argnums=(0, 1)))(hidden, kernel)
  ref_sums, ref_grads = _lm_head_float64(hidden, kernel, targets, weights, **kwargs)
  logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
  assert 0.7 * logit_std < logits.std() < 1.3 * logit_std
  _assert_close("loss", sums.loss, ref_sums.loss, 1e-5)
  _assert_close("z_loss", sums.z_loss, ref_sums.z_loss, 1e-5)
  for name, actual, want in zip(("dhidden", "dkernel"), grads, ref_grads):
    _assert_close(name, actual, want, 1e-2)
  # The bound is tight enough to see logits rounded to bf16 before the loss (what this function did before).
  rounded = np.asarray(jnp.asarray(logits, jnp.float32).astype(jnp.bfloat16), np.float64)
  rounded_loss, _ = _float64_reference(rounded, targets, **kwargs)
  valid_weights = np.asarray(reference.token_weights(targets, weights, vocab), np.float64)
  assert relative_error(np.sum(valid_weights * rounded_loss), ref_sums.loss) > 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_accuracy_count_is_exact(backend):
  hidden, kernel, targets, weights = _lm_head_inputs(0, 24, 16, 300, jnp.float32)
  sums = chunked_lm_head_cross_entropy(hidden, kernel, targets, weights, chunk_size=10, block_sizes=SMALL_BLOCKS,
                                       backend=backend, interpret=INTERPRET)
  with jax.default_matmul_precision("highest"):
    logits = hidden @ kernel
  expected = jnp.sum(jnp.where(jnp.argmax(logits, -1) == targets, weights, 0.0))
  chex.assert_trees_all_close(sums.correct, expected, rtol=1e-6)


def test_reference_lm_head_matches_float64():
  hidden, kernel, targets, weights = _lm_head_inputs(1, 20, 16, 300, jnp.float32)
  kwargs = dict(z_loss=1e-3, label_smoothing=0.1)
  with jax.default_matmul_precision("highest"):
    sums = reference.lm_head_cross_entropy(hidden, kernel, targets, weights, **kwargs)
    grads = jax.grad(lambda h, k: reference.lm_head_cross_entropy(h, k, targets, weights, **kwargs).loss,
                     argnums=(0, 1))(hidden, kernel)
  ref_sums, ref_grads = _lm_head_float64(hidden, kernel, targets, weights, **kwargs)
  for actual, want in zip((*sums, *grads), (*ref_sums, *ref_grads)):
    _assert_close("reference", actual, want, 1e-5)


def test_block_sizes_are_the_h100_sweep_results(monkeypatch):
  """The defaults are what the H100 sweeps chose; the fused kernel runs 6 programs per SM: 792 on its 132."""
  monkeypatch.setattr(common, "core_count", lambda: 132)
  assert dataclasses.asdict(BlockSizes()) == dict(
      block_tokens=1, block_vocab=4096, num_warps=4, bwd_block_tokens=1, bwd_block_vocab=4096, bwd_num_warps=8,
      fused_block_vocab=8192, fused_num_warps=4, fused_programs_per_core=6, num_stages=2)
  assert fused_num_programs(BlockSizes(), 65536) == 792
  assert fused_num_programs(BlockSizes(), 100) == 100  # one row at a time: never more programs than rows


@pytest.mark.parametrize("backend", ["pallas", "triton"])
def test_backends_implement_the_kernels_protocol(backend):
  name = f"pallas_kernels.cross_entropy.{backend}"
  module = (common.load_triton_kernels(name, common.resolve_interpret(INTERPRET)) if backend == "triton"
            else importlib.import_module(name))
  for method in ("forward", "backward", "fused"):
    expected = list(inspect.signature(getattr(Kernels, method)).parameters)[1:]  # without self
    assert list(inspect.signature(getattr(module, method)).parameters) == expected, method


@pytest.mark.parametrize("z_loss,label_smoothing,ok", [
    (0.0, 0.0, True), (1e-4, 0.999, True), (-1e-4, 0.0, False), (0.0, 1.0, False), (0.0, -0.1, False),
    (float("nan"), 0.0, False), (0.0, float("nan"), False)])
def test_check_loss_options(z_loss, label_smoothing, ok):
  if ok:
    check_loss_options(z_loss, label_smoothing)
  else:
    with pytest.raises(ValueError, match="z_loss >= 0 and label_smoothing in"):
      check_loss_options(z_loss, label_smoothing)


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=jnp.zeros(5, jnp.int32)), "targets"),
    (dict(targets=jnp.zeros(4)), "targets"),
    (dict(logits=jnp.zeros((4, 8), jnp.int32)), "floating"),
    (dict(logits=jnp.zeros((4, 2, 8))), "floating"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(backend="xla"), "backend"),
    (dict(block_sizes=BlockSizes(block_vocab=100)), "power of two"),
    (dict(block_sizes=BlockSizes(num_warps=0)), "positive"),
])
def test_bad_input_raises(kwargs, message):
  args = dict(logits=jnp.ones((4, 8)), targets=jnp.zeros(4, jnp.int32)) | kwargs
  with pytest.raises(ValueError, match=message):
    cross_entropy(args.pop("logits"), args.pop("targets"), interpret=True, **args)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dloss=jnp.ones(5)), "dloss"),
    (dict(targets=jnp.zeros(3, jnp.int32)), "targets"),
    (dict(backend="cuda"), "backend"),
    (dict(label_smoothing=-0.5), "label_smoothing"),
])
def test_fused_bad_input_raises(kwargs, message):
  args = dict(logits=jnp.ones((4, 8)), targets=jnp.zeros(4, jnp.int32), dloss=jnp.ones(4)) | kwargs
  with pytest.raises(ValueError, match=message):
    cross_entropy_and_grad(args.pop("logits"), args.pop("targets"), args.pop("dloss"), interpret=True, **args)


@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel=jnp.ones((9, 8))), "kernel"),
    (dict(targets=jnp.zeros(4)), "targets"),
    (dict(weights=jnp.ones(3)), "weights"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(backend="cuda"), "backend"),
    (dict(z_loss=-1.0), "z_loss"),
])
def test_chunked_bad_input_raises(kwargs, message):
  args = dict(hidden=jnp.ones((4, 16)), kernel=jnp.ones((16, 8)), targets=jnp.zeros(4, jnp.int32)) | kwargs
  with pytest.raises(ValueError, match=message):
    chunked_lm_head_cross_entropy(args.pop("hidden"), args.pop("kernel"), args.pop("targets"), interpret=True,
                                  **args)
