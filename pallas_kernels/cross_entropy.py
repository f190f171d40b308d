"""Fused cross-entropy + z-loss + label smoothing as Pallas kernels (Triton lowering), and the chunked lm_head loss.

Per token i with logits x [V] and target t:
  lse  = log(sum_j exp(x_j))
  loss = (1 - ls) * (lse - x_t) + ls * (lse - mean_j x_j) + z_loss * lse**2
Label smoothing spreads its mass uniformly over all V classes (as optax and PyTorch do). Tokens whose target is
negative are ignored: their loss is 0 and their loss has zero gradient (their lse is still returned). A target
>= V is a caller bug that cannot raise under jit; it is treated like an ignored token. The caller averages over
real tokens (see `chunked_lm_head_cross_entropy`, which returns sums and the weights decide what counts).

Kernels (one program per block of tokens, looping over vocab blocks so that any V works, 32,128, 32,768 and
mT5's 250,112 included):
- forward: one pass over the row: online max / sum-exp, the sum of the logits (for smoothing), the target logit
  and the block holding the first maximum; the argmax (for accuracy) comes from one more read of that block
  (one per-block comparison instead of three per-element operations and two per-element accumulators). Writes
  loss, lse, argmax.
- backward: one pass from the saved lse: dlogits = c1 * softmax - c2 * onehot(t) - c3 with per-row scalars
  c1 = dloss * (1 + 2 z lse) + dlse, c2 = dloss * (1 - ls), c3 = dloss * ls / V.
- fused: the forward pass and then the backward pass for a cotangent known in advance (the per-token loss
  weights), row after row. `chunked_lm_head_cross_entropy` uses it. Its second read of a row must hit L2 for the
  pair to cost one HBM read and one write of the logits, so the kernel is persistent: a few programs per core
  loop over the rows (with one program per row, ~1000 resident 64 KiB rows overflow the 50 MB L2), the first
  read asks L2 to keep the row, the second and the gradient writes ask it to drop them, and the second pass runs
  backwards, starting with the blocks read last, looking for the argmax in the block that holds it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.common import LN2, LOG2E, resolve_interpret

IMPLS = ("pallas", "triton")
CHUNKED_IMPLS = ("xla",) + IMPLS


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per program and vocab block of the forward, backward and fused kernels; the fused kernel runs
  fused_programs_per_core programs per GPU core (streaming multiprocessor), each looping over blocks of rows."""

  block_tokens: int = 1
  block_vocab: int = 4096
  num_warps: int = 4
  bwd_block_tokens: int = 1
  bwd_block_vocab: int = 4096
  bwd_num_warps: int = 8
  fused_block_vocab: int = 8192
  fused_num_warps: int = 4
  fused_programs_per_core: int = 6
  num_stages: int = 2

  def validate(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value < 1 or "block" in field.name and value & (value - 1):
        kind = "a power of two" if "block" in field.name else "positive"
        raise ValueError(f"BlockSizes.{field.name} must be {kind}, got {value}")


def default_impl() -> str:
  """The faster kernel implementation on the H100: jax-triton, level with Pallas on the forward and forward +
  backward, 16% ahead on the fused kernel that the training loss uses (benchmarks/results/cross_entropy.json)."""
  return "triton"


class LossSums(NamedTuple):
  """Sums over tokens, weighted by the per-token loss weights (ignored tokens count 0)."""

  loss: jax.Array  # sum of w * per-token loss, z-loss included: the only differentiable field
  z_loss: jax.Array  # sum of w * z_loss * lse**2 (a metric; its gradient is inside `loss`)
  correct: jax.Array  # sum of w * [argmax(logits) == target]


def cross_entropy_reference(logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0,
                            label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Plain jnp per-token (loss, lse), in float32 (float64 stays float64), same semantics as the kernels."""
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  vocab = x.shape[-1]
  valid = (targets >= 0) & (targets < vocab)
  lse = jax.nn.logsumexp(x, axis=-1)
  target_logit = jnp.take_along_axis(x, jnp.where(valid, targets, 0)[:, None], axis=-1)[:, 0]
  loss = ((1 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - jnp.mean(x, axis=-1))
          + z_loss * lse * lse)
  return jnp.where(valid, loss, 0.0), lse


def lm_head_cross_entropy_reference(hidden, kernel, targets, weights=None, *, z_loss=0.0,
                                    label_smoothing=0.0) -> LossSums:
  """`chunked_lm_head_cross_entropy` with the full [N, V] logits materialized (the XLA baseline)."""
  logits = jnp.dot(hidden, kernel.astype(hidden.dtype),
                   preferred_element_type=_accumulation_dtype(hidden.dtype)).astype(hidden.dtype)
  loss, lse = cross_entropy_reference(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)
  w = _token_weights(targets, weights, logits.shape[-1])
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return LossSums(jnp.sum(w * loss), lax.stop_gradient(jnp.sum(w * z_loss * lse * lse)),
                  lax.stop_gradient(jnp.sum(w * correct)))


def cross_entropy(logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0, label_smoothing: float = 0.0,
                  block_sizes: BlockSizes | None = None, impl: str = "pallas",
                  interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-token float32 (loss, lse) for logits [N, V] and int targets [N]; loss includes z_loss * lse**2.

  Differentiable in `logits` through both outputs. impl: "pallas" or "triton" (raw Triton via jax-triton, GPU
  only). interpret: None means interpret on CPU, compile on GPU.
  """
  _check_logits(logits, targets)
  options = _make_options(z_loss, label_smoothing, block_sizes, impl, interpret, IMPLS)
  return _cross_entropy(logits, targets.astype(jnp.int32), options)


def cross_entropy_and_grad(logits: jax.Array, targets: jax.Array, dloss: jax.Array, *, z_loss: float = 0.0,
                           label_smoothing: float = 0.0, block_sizes: BlockSizes | None = None,
                           impl: str = "pallas", interpret: bool | None = None):
  """Per-token (loss, lse, argmax) and d(sum(dloss * loss))/d(logits) in one kernel, for a loss cotangent known
  in advance (e.g. the loss weights / token count): about one read and one write of the logits instead of the
  forward's read plus the backward's read and write. dlogits has the dtype of logits; argmax is int32 (first
  maximum). impl: "xla", "pallas" or "triton". Not differentiable itself (it returns the gradient).
  """
  _check_logits(logits, targets)
  if dloss.shape != targets.shape:
    raise ValueError(f"dloss must have shape {targets.shape}, got {dloss.shape}")
  options = _make_options(z_loss, label_smoothing, block_sizes, impl, interpret, CHUNKED_IMPLS)
  return _chunk_value_and_grad(logits, targets.astype(jnp.int32), dloss.astype(jnp.float32), options)


def chunked_lm_head_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                                  weights: jax.Array | None = None, *, z_loss: float = 0.0,
                                  label_smoothing: float = 0.0, chunk_size: int = 8192, impl: str = "pallas",
                                  block_sizes: BlockSizes | None = None,
                                  interpret: bool | None = None) -> LossSums:
  """Loss of the lm_head `hidden [N, d] @ kernel [d, V]` without materializing the [N, V] logits.

  Tokens go through in chunks of `chunk_size` (the last one padded): each chunk's logits are computed, reduced by
  the fused kernel and dropped, so memory grows with one chunk, not with N. Under differentiation the forward
  pass already computes the gradients (the loss cotangent is a scalar, and the per-token weights are known), so
  the backward pass only scales them: no recomputation of the logits. Logits and their gradient use
  `hidden.dtype`; the kernel gradient is accumulated in float32.

  weights: float [N] per-token loss weights (None: 1); tokens with target < 0 count 0 whatever their weight.
  impl: "xla" (jnp per chunk, any backend), "pallas" or "triton".
  Returns LossSums(loss, z_loss, correct); divide by the number of real tokens for the mean.
  """
  if hidden.ndim != 2 or kernel.ndim != 2 or hidden.shape[1] != kernel.shape[0]:
    raise ValueError(f"need hidden [N, d] and kernel [d, V], got {hidden.shape} and {kernel.shape}")
  if targets.shape != hidden.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be int [{hidden.shape[0]}], got {targets.dtype}{list(targets.shape)}")
  if weights is not None and weights.shape != targets.shape:
    raise ValueError(f"weights must have shape {targets.shape}, got {weights.shape}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  options = _make_options(z_loss, label_smoothing, block_sizes, impl, interpret, CHUNKED_IMPLS)
  w = _token_weights(targets, weights, kernel.shape[1])
  sums = _chunked(hidden, kernel, targets.astype(jnp.int32), w, options, min(chunk_size, hidden.shape[0]),
                  jnp.dtype(kernel.dtype))
  return LossSums(*sums)


@dataclasses.dataclass(frozen=True)
class _Options:
  z_loss: float
  label_smoothing: float
  block_sizes: BlockSizes
  impl: str
  interpret: bool


def _check_logits(logits, targets):
  if logits.ndim != 2 or not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be floating [N, V], got {logits.dtype}{list(logits.shape)}")
  if targets.shape != logits.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be int [{logits.shape[0]}], got {targets.dtype}{list(targets.shape)}")


def _make_options(z_loss, label_smoothing, block_sizes, impl, interpret, impls) -> _Options:
  """Checked options; the xla impl runs no kernel, so it never interprets."""
  if z_loss < 0 or not 0 <= label_smoothing < 1:
    raise ValueError(f"need z_loss >= 0 and label_smoothing in [0, 1), got {z_loss} and {label_smoothing}")
  if impl not in impls:
    raise ValueError(f"impl must be one of {impls}, got {impl!r}")
  block_sizes = block_sizes or BlockSizes()
  block_sizes.validate()
  interpret = False if impl == "xla" else resolve_interpret(interpret, impl)
  return _Options(float(z_loss), float(label_smoothing), block_sizes, impl, interpret)


def _accumulation_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _token_weights(targets, weights, vocab):
  valid = (targets >= 0) & (targets < vocab)
  w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  return jnp.where(valid, w, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Per-token loss: custom_vjp over the forward and backward kernels.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(logits, targets, options):
  loss, lse, _ = _kernels(options).forward(logits, targets, options, with_argmax=False)
  return loss, lse


def _cross_entropy_fwd(logits, targets, options):
  loss, lse, _ = _kernels(options).forward(logits, targets, options, with_argmax=False)
  return (loss, lse), (logits, targets, lse)


def _cross_entropy_bwd(options, residuals, cotangents):
  logits, targets, lse = residuals
  dloss, dlse = cotangents
  return _kernels(options).backward(logits, targets, lse, dloss, dlse, options), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _kernels(options):
  """The module holding forward / backward / fused launchers for `options.impl`."""
  if options.impl == "triton":
    from pallas_kernels import triton_kernels  # pylint: disable=import-outside-toplevel
    return triton_kernels.CrossEntropyKernels
  return _PallasKernels


# ----------------------------------------------------------------------------------------------------------------
# Chunked lm_head + loss.


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
  acc_dtype = _accumulation_dtype(dtype)
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
    logits = jnp.dot(h, w_mat, preferred_element_type=acc_dtype).astype(dtype)
    if with_grads:
      loss, lse, argmax, dlogits = _chunk_value_and_grad(logits, t, w, options)
      dh = jnp.dot(dlogits, w_mat.T, preferred_element_type=acc_dtype).astype(dtype)
      dkernel = dkernel + jnp.dot(h.T, dlogits, preferred_element_type=acc_dtype)
    else:
      (loss, lse, argmax), dh = _chunk_value(logits, t, options), None
    chunk_sums = (jnp.sum(w * loss), jnp.sum(w * options.z_loss * lse * lse),
                  jnp.sum(jnp.where(argmax == t, w, 0.0)))
    return (tuple(a + b for a, b in zip(sums, chunk_sums)), dkernel), dh

  zero = jnp.zeros((), jnp.float32)
  dkernel = jnp.zeros(kernel.shape, acc_dtype) if with_grads else None
  (sums, dkernel), dh = lax.scan(step, ((zero, zero, zero), dkernel), xs)
  if not with_grads:
    return sums, None
  return sums, (dh.reshape(-1, d_model)[:num_tokens], dkernel)


def _chunk_value(logits, targets, options):
  """(loss, lse, argmax) of one chunk."""
  if options.impl == "xla":
    loss, lse = cross_entropy_reference(logits, targets, z_loss=options.z_loss,
                                        label_smoothing=options.label_smoothing)
    return loss, lse, jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return _kernels(options).forward(logits, targets, options, with_argmax=True)


def _chunk_value_and_grad(logits, targets, dloss, options):
  """(loss, lse, argmax, dlogits) of one chunk, dlogits for the per-token loss cotangent `dloss`."""
  if options.impl == "xla":
    reference = functools.partial(cross_entropy_reference, targets=targets, z_loss=options.z_loss,
                                  label_smoothing=options.label_smoothing)
    (loss, lse), vjp = jax.vjp(reference, logits)
    (dlogits,) = vjp((dloss, jnp.zeros_like(lse)))
    return loss, lse, jnp.argmax(logits, axis=-1).astype(jnp.int32), dlogits.astype(logits.dtype)
  return _kernels(options).fused(logits, targets, dloss, options)


# ----------------------------------------------------------------------------------------------------------------
# Pallas kernels.


def _rows(block, block_tokens, num_rows):
  """The rows of block number `block`, and their mask (None when the block size divides the rows: no masking
  cost)."""
  rows = block * block_tokens + jnp.arange(block_tokens)
  return rows, (rows < num_rows if num_rows % block_tokens else None)


def _tile_mask(rows, row_mask, cols, vocab):
  """In-bounds mask of a [rows, cols] tile, None when nothing is out of bounds."""
  col_mask = cols < vocab if vocab % cols.shape[0] else None
  shape = (rows.shape[0], cols.shape[0])
  if row_mask is None:
    return None if col_mask is None else jnp.broadcast_to(col_mask[None, :], shape)
  if col_mask is None:
    return jnp.broadcast_to(row_mask[:, None], shape)
  return row_mask[:, None] & col_mask[None, :]


def _load_tile(logits_ref, rows, cols, mask, other, eviction_policy=None):
  x = plgpu.load(logits_ref.at[rows[:, None], cols[None, :]], mask=mask, other=None if mask is None else other,
                 eviction_policy=eviction_policy)
  return x.astype(jnp.float32)


def _load_rows(ref, rows, row_mask, other):
  return plgpu.load(ref.at[rows], mask=row_mask, other=None if row_mask is None else other)


def _stats_init(block_tokens, block_vocab, with_argmax, with_logit_sum):
  tile = (block_tokens, block_vocab)
  # A finite start keeps exp2(running_max - new_max) a number on masked rows (all -inf).
  carry = {"max": jnp.full((block_tokens,), jnp.finfo(jnp.float32).min), "sum_exp": jnp.zeros(tile, jnp.float32)}
  if with_logit_sum:
    carry["logit_sum"] = jnp.zeros(tile, jnp.float32)
  if with_argmax:
    carry["best_block"] = jnp.zeros((block_tokens,), jnp.int32)
  return carry


def _stats_update(carry, x, block, mask):
  """Online update with vocab block number `block` (masked entries -inf). Accumulators stay per element, so a
  block costs one cross-thread reduction (the max); the rest are reduced once at the end. For the argmax only
  the block holding the first maximum is tracked (strict >): the index inside it is found on a later read."""
  x2 = x * LOG2E
  block_max = jnp.max(x2, axis=1)
  new_max = jnp.maximum(carry["max"], block_max)
  out = {"max": new_max, "sum_exp": (carry["sum_exp"] * jnp.exp2(carry["max"] - new_max)[:, None]
                                     + jnp.exp2(x2 - new_max[:, None]))}
  if "logit_sum" in carry:
    out["logit_sum"] = carry["logit_sum"] + (x if mask is None else jnp.where(mask, x, 0.0))
  if "best_block" in carry:
    out["best_block"] = jnp.where(block_max > carry["max"], block, carry["best_block"])
  return out


def _stats_finish(carry, target_logit, valid, vocab, z_loss, label_smoothing):
  """(loss, lse, argmax locator or None) from the accumulators; the locator is (block of the first maximum,
  maximum of logits * log2(e))."""
  lse = (carry["max"] + jnp.log2(jnp.sum(carry["sum_exp"], axis=1))) * LN2
  loss = (1 - label_smoothing) * (lse - target_logit) + z_loss * lse * lse
  if "logit_sum" in carry:
    loss += label_smoothing * (lse - jnp.sum(carry["logit_sum"], axis=1) / vocab)
  locator = (carry["best_block"], carry["max"]) if "best_block" in carry else None
  return jnp.where(valid, loss, 0.0), lse, locator


def _first_max(x, cols, row_max2, vocab):
  """Per row, the first column whose logit * log2(e) equals the row's maximum (computed the same way in the
  first pass, so the comparison is exact); vocab where there is none."""
  return jnp.min(jnp.where(x * LOG2E == row_max2[:, None], cols, vocab), axis=1)


def _argmax(logits_ref, rows, row_mask, locator, block_vocab):
  """First argmax per row, from one more read of the block that holds the maximum."""
  best_block, row_max2 = locator
  vocab = logits_ref.shape[1]
  cols = best_block[:, None] * block_vocab + jnp.arange(block_vocab)[None, :]
  mask = (cols < vocab) if row_mask is None else (cols < vocab) & row_mask[:, None]
  x = plgpu.load(logits_ref.at[rows[:, None], cols], mask=mask, other=float("-inf"))
  return _first_max(x.astype(jnp.float32), cols, row_max2, vocab)


def _target_logit(logits_ref, rows, row_mask, targets):
  vocab = logits_ref.shape[1]
  valid = (targets >= 0) & (targets < vocab)
  if row_mask is not None:
    valid &= row_mask
  target_logit = plgpu.load(logits_ref.at[rows, jnp.where(valid, targets, 0)], mask=valid, other=0.0)
  return target_logit.astype(jnp.float32), valid


def _row_stats(logits_ref, rows, row_mask, targets, *, block_vocab, z_loss, label_smoothing, with_argmax,
               eviction_policy=None):
  """Loop over the rows' vocab blocks: (loss, lse, argmax locator or None)."""
  vocab = logits_ref.shape[1]

  def body(j, carry):
    cols = j * block_vocab + jnp.arange(block_vocab)
    mask = _tile_mask(rows, row_mask, cols, vocab)
    x = _load_tile(logits_ref, rows, cols, mask, float("-inf"), eviction_policy)
    return _stats_update(carry, x, j, mask)

  carry = lax.fori_loop(0, pl.cdiv(vocab, block_vocab), body,
                        _stats_init(rows.shape[0], block_vocab, with_argmax, label_smoothing > 0))
  target_logit, valid = _target_logit(logits_ref, rows, row_mask, targets)
  return _stats_finish(carry, target_logit, valid, vocab, z_loss, label_smoothing)


def _grad_coefficients(targets, lse, dloss, dlse, vocab, z_loss, label_smoothing):
  """Per-row c1, c2, c3 of dlogits = c1 * softmax - c2 * onehot(target) - c3."""
  dloss = jnp.where((targets >= 0) & (targets < vocab), dloss, 0.0)
  c1 = dloss * (1 + 2 * z_loss * lse) + dlse
  return c1[:, None], (dloss * (1 - label_smoothing))[:, None], (dloss * (label_smoothing / vocab))[:, None]


def _grad_block(x, cols, targets, lse, coefficients):
  c1, c2, c3 = coefficients
  softmax = jnp.exp2(x * LOG2E - (lse * LOG2E)[:, None])
  return c1 * softmax - jnp.where(cols[None, :] == targets[:, None], c2, 0.0) - c3


def _write_grad(logits_ref, dlogits_ref, rows, row_mask, targets, lse, coefficients, *, block_vocab,
                reverse=False, argmax_locator=None):
  """Loop over the rows' vocab blocks writing dlogits (last block first if `reverse`). Neither the logits nor
  their gradient are read again: both ask L2 to evict them first. With an argmax locator, returns the first
  argmax, looked for in the block that holds it."""
  vocab = logits_ref.shape[1]
  num_blocks = pl.cdiv(vocab, block_vocab)

  def body(j, argmax):
    block = num_blocks - 1 - j if reverse else j
    cols = block * block_vocab + jnp.arange(block_vocab)
    mask = _tile_mask(rows, row_mask, cols, vocab)
    x = _load_tile(logits_ref, rows, cols, mask, 0.0, "evict_first")
    d = _grad_block(x, cols, targets, lse, coefficients)
    plgpu.store(dlogits_ref.at[rows[:, None], cols[None, :]], d.astype(dlogits_ref.dtype), mask=mask,
                eviction_policy="evict_first")
    if argmax_locator is None:
      return argmax
    best_block, row_max2 = argmax_locator
    here = best_block == block
    return lax.cond(jnp.max(here.astype(jnp.int32)) > 0,
                    lambda: jnp.where(here, _first_max(x, cols[None, :], row_max2, vocab), argmax),
                    lambda: argmax)

  return lax.fori_loop(0, num_blocks, body, jnp.zeros(rows.shape, jnp.int32))


def _store_stats(rows, row_mask, loss_ref, lse_ref, argmax_ref, loss, lse, argmax):
  plgpu.store(loss_ref.at[rows], loss, mask=row_mask)
  plgpu.store(lse_ref.at[rows], lse, mask=row_mask)
  if argmax_ref is not None:
    plgpu.store(argmax_ref.at[rows], argmax, mask=row_mask)


def _fwd_kernel(logits_ref, targets_ref, loss_ref, lse_ref, argmax_ref=None, *, z_loss, label_smoothing,
                block_tokens, block_vocab):
  rows, row_mask = _rows(pl.program_id(0), block_tokens, logits_ref.shape[0])
  targets = _load_rows(targets_ref, rows, row_mask, -1)
  loss, lse, locator = _row_stats(logits_ref, rows, row_mask, targets, block_vocab=block_vocab, z_loss=z_loss,
                                  label_smoothing=label_smoothing, with_argmax=argmax_ref is not None)
  argmax = None if locator is None else _argmax(logits_ref, rows, row_mask, locator, block_vocab)
  _store_stats(rows, row_mask, loss_ref, lse_ref, argmax_ref, loss, lse, argmax)


def _bwd_kernel(logits_ref, targets_ref, lse_ref, dloss_ref, dlse_ref, dlogits_ref, *, z_loss, label_smoothing,
                block_tokens, block_vocab):
  rows, row_mask = _rows(pl.program_id(0), block_tokens, logits_ref.shape[0])
  targets = _load_rows(targets_ref, rows, row_mask, -1)
  lse = _load_rows(lse_ref, rows, row_mask, 0.0)
  coefficients = _grad_coefficients(targets, lse, _load_rows(dloss_ref, rows, row_mask, 0.0),
                                    _load_rows(dlse_ref, rows, row_mask, 0.0), logits_ref.shape[1], z_loss,
                                    label_smoothing)
  _write_grad(logits_ref, dlogits_ref, rows, row_mask, targets, lse, coefficients, block_vocab=block_vocab)


def _fused_kernel(logits_ref, targets_ref, dloss_ref, loss_ref, lse_ref, argmax_ref, dlogits_ref, *, z_loss,
                  label_smoothing, block_tokens, block_vocab, num_programs):
  num_rows, vocab = logits_ref.shape

  @pl.loop(pl.program_id(0), pl.cdiv(num_rows, block_tokens), step=num_programs)
  def _(block):
    rows, row_mask = _rows(block, block_tokens, num_rows)
    targets = _load_rows(targets_ref, rows, row_mask, -1)
    dloss = _load_rows(dloss_ref, rows, row_mask, 0.0)
    loss, lse, locator = _row_stats(logits_ref, rows, row_mask, targets, block_vocab=block_vocab, z_loss=z_loss,
                                    label_smoothing=label_smoothing, with_argmax=True,
                                    eviction_policy="evict_last")
    coefficients = _grad_coefficients(targets, lse, dloss, jnp.zeros_like(lse), vocab, z_loss, label_smoothing)
    argmax = _write_grad(logits_ref, dlogits_ref, rows, row_mask, targets, lse, coefficients,
                         block_vocab=block_vocab, reverse=True, argmax_locator=locator)
    _store_stats(rows, row_mask, loss_ref, lse_ref, argmax_ref, loss, lse, argmax)


def stats_shapes(num_tokens, with_argmax=True):
  shapes = (jax.ShapeDtypeStruct((num_tokens,), jnp.float32), jax.ShapeDtypeStruct((num_tokens,), jnp.float32))
  return shapes + ((jax.ShapeDtypeStruct((num_tokens,), jnp.int32),) if with_argmax else ())


def fused_num_programs(block_sizes, num_tokens):
  """Programs of the persistent fused kernel: fused_programs_per_core per GPU core (1 core off the GPU), at most
  one per row."""
  cores = getattr(jax.devices()[0], "core_count", None) or 1
  return min(block_sizes.fused_programs_per_core * cores, num_tokens)


def _launch(kernel, out_shape, num_tokens, block_tokens, block_vocab, num_warps, options, name,
            num_programs=None):
  """One program per block of tokens, or num_programs looping over them (the kernel then takes num_programs)."""
  constants = dict(z_loss=options.z_loss, label_smoothing=options.label_smoothing, block_tokens=block_tokens,
                   block_vocab=block_vocab)
  if num_programs is not None:
    constants["num_programs"] = num_programs
  return pl.pallas_call(
      functools.partial(kernel, **constants), out_shape=out_shape,
      grid=(num_programs or pl.cdiv(num_tokens, block_tokens),),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=options.block_sizes.num_stages),
      interpret=options.interpret, name=name)


class _PallasKernels:
  """Launchers of the Pallas kernels (triton_kernels.CrossEntropyKernels has the same interface)."""

  @staticmethod
  def forward(logits, targets, options, with_argmax):
    """(loss, lse, argmax or None)."""
    bs = options.block_sizes
    num_tokens = logits.shape[0]
    outs = _launch(_fwd_kernel, stats_shapes(num_tokens, with_argmax), num_tokens, bs.block_tokens,
                   bs.block_vocab, bs.num_warps, options, "cross_entropy_fwd")(logits, targets)
    return tuple(outs) + ((None,) if not with_argmax else ())

  @staticmethod
  def backward(logits, targets, lse, dloss, dlse, options):
    bs = options.block_sizes
    num_tokens = logits.shape[0]
    out_shape = jax.ShapeDtypeStruct(logits.shape, logits.dtype)
    return _launch(_bwd_kernel, out_shape, num_tokens, bs.bwd_block_tokens, bs.bwd_block_vocab,
                   bs.bwd_num_warps, options, "cross_entropy_bwd")(
                       logits, targets, lse, dloss.astype(jnp.float32), dlse.astype(jnp.float32))

  @staticmethod
  def fused(logits, targets, dloss, options):
    num_tokens = logits.shape[0]
    out_shape = stats_shapes(num_tokens) + (jax.ShapeDtypeStruct(logits.shape, logits.dtype),)
    bs = options.block_sizes
    return _launch(_fused_kernel, out_shape, num_tokens, 1, bs.fused_block_vocab, bs.fused_num_warps, options,
                   "cross_entropy_fused", fused_num_programs(bs, num_tokens))(
                       logits, targets, dloss.astype(jnp.float32))
