"""The lm_head and its loss in chunks of tokens, without materializing the [N, V] logits."""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.cross_entropy import backends
from pallas_kernels.cross_entropy.reference import LossSums, token_weights
from pallas_kernels.cross_entropy.tuning import BlockSizes


def chunked_lm_head_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                                  weights: jax.Array | None = None, *, z_loss: float = 0.0,
                                  label_smoothing: float = 0.0, chunk_size: int = 8192, backend: str = "pallas",
                                  block_sizes: BlockSizes | None = None,
                                  interpret: bool | None = None) -> LossSums:
  """Loss of the lm_head `hidden [N, d] @ kernel [d, V]` without materializing the [N, V] logits.

  Tokens go through in chunks of `chunk_size` (the last one padded): each chunk's logits are computed, reduced by
  the fused kernel and dropped, so memory grows with one chunk, not with N. Under differentiation the forward
  pass already computes the gradients (the loss cotangent is a scalar, and the per-token weights are known), so
  the backward pass only scales them: no recomputation of the logits.

  Numerics: the matmul accumulates in float32 and its float32 logits enter log-sum-exp, the z-loss, the target
  logit, label smoothing and the argmax unrounded (a chunk of float32 logits, chunk_size * V * 4 bytes, is the
  memory this costs). The softmax gradient is computed in float32 and rounded once to `hidden.dtype` for the two
  gradient matmuls (as t5x's bf16 dense layers do), which accumulate in float32; the kernel gradient is summed
  over chunks in float32 and cast to kernel's dtype at the end. Measured bound (tests/kernels/
  test_cross_entropy.py), bf16 hidden and kernel, logits of standard deviation 5 to 30, against float64 logits of
  the same bf16 values: loss and z-loss sums within 1e-5 relative, gradients within 1e-2 relative (Frobenius
  norm; the bf16 roundings of dlogits and of the returned gradients).

  weights: float [N] per-token loss weights (None: 1); tokens with target < 0 or >= V count 0 whatever their
  weight.
  backend: "xla" (the jnp reference per chunk, no kernel), "pallas" or "triton".
  interpret: None runs the compiled kernels on a GPU and the interpreter (Pallas' or Triton's) anywhere else.
  Returns LossSums(loss, z_loss, correct); divide by the number of real tokens for the mean. Only `loss` is
  differentiable (in hidden and kernel).
  """
  if hidden.ndim != 2 or kernel.ndim != 2 or hidden.shape[1] != kernel.shape[0]:
    raise ValueError(f"need hidden [N, d] and kernel [d, V], got {hidden.shape} and {kernel.shape}")
  if targets.shape != hidden.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be int [{hidden.shape[0]}], got {targets.dtype}{list(targets.shape)}")
  if weights is not None and weights.shape != targets.shape:
    raise ValueError(f"weights must have shape {targets.shape}, got {weights.shape}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  options = backends.make_options(z_loss, label_smoothing, block_sizes, backend, interpret,
                                  backends.CHUNKED_BACKENDS)
  w = token_weights(targets, weights, kernel.shape[1])
  sums = _chunked(hidden, kernel, targets.astype(jnp.int32), w, options, min(chunk_size, hidden.shape[0]),
                  jnp.dtype(kernel.dtype))
  return LossSums(*sums)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(hidden, kernel, targets, weights, options, chunk_size, kernel_dtype):
  del kernel_dtype  # used by the backward pass only
  sums, _ = _chunk_scan(hidden, kernel, targets, weights, options, chunk_size, with_grads=False)
  return sums


def _chunked_fwd(hidden, kernel, targets, weights, options, chunk_size, kernel_dtype):
  del kernel_dtype
  return _chunk_scan(hidden, kernel, targets, weights, options, chunk_size, with_grads=True)


def _chunked_bwd(options, chunk_size, kernel_dtype, residuals, cotangents):
  del options, chunk_size
  dhidden, dkernel = residuals
  g = cotangents[0]  # z_loss and correct are metrics: their cotangents are dropped
  return ((g * dhidden).astype(dhidden.dtype), (g * dkernel).astype(kernel_dtype), None,
          jnp.zeros(dhidden.shape[:1], jnp.float32))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _chunk_scan(hidden, kernel, targets, weights, options, chunk_size, *, with_grads):
  """Loss sums over chunks of tokens; with_grads: also d(loss sum)/d(hidden) and /d(kernel), float32 for the
  kernel."""
  num_tokens, d_model = hidden.shape
  dtype = hidden.dtype
  acc_dtype = jnp.promote_types(dtype, jnp.float32)
  w_mat = kernel.astype(dtype)
  num_chunks = -(-num_tokens // chunk_size)
  pad = num_chunks * chunk_size - num_tokens
  if pad:  # padded tokens have weight 0 and target -1
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad), constant_values=-1)
    weights = jnp.pad(weights, (0, pad))
  xs = (hidden.reshape(num_chunks, chunk_size, d_model), targets.reshape(num_chunks, chunk_size),
        weights.reshape(num_chunks, chunk_size))

  def step(carry, chunk):
    sums, dkernel = carry
    h, t, w = chunk
    # The logits stay as the matmul accumulated them (float32): rounding them to bf16 would move each by up to
    # 2**-9 of its size before log-sum-exp, z-loss and the target logit. The kernels write dlogits in the
    # inputs' dtype, what the two gradient matmuls take (as t5x does).
    logits = jnp.dot(h, w_mat, preferred_element_type=acc_dtype)
    if with_grads:
      loss, lse, argmax, dlogits = backends.value_and_grad(logits, t, w, dtype, options)
      dh = jnp.dot(dlogits, w_mat.T, preferred_element_type=acc_dtype).astype(dtype)
      dkernel = dkernel + jnp.dot(h.T, dlogits, preferred_element_type=acc_dtype)
    else:
      (loss, lse, argmax), dh = backends.value(logits, t, options), None
    chunk_sums = (jnp.sum(w * loss), jnp.sum(w * options.z_loss * lse * lse),
                  jnp.sum(jnp.where(argmax == t, w, 0.0)))
    return (tuple(a + b for a, b in zip(sums, chunk_sums)), dkernel), dh

  zero = jnp.zeros((), jnp.float32)
  dkernel = jnp.zeros(kernel.shape, acc_dtype) if with_grads else None
  (sums, dkernel), dh = lax.scan(step, ((zero, zero, zero), dkernel), xs)
  if not with_grads:
    return sums, None
  return sums, (dh.reshape(-1, d_model)[:num_tokens], dkernel)
