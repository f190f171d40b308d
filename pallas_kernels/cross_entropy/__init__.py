"""Cross-entropy + z-loss + label smoothing as GPU kernels, and the chunked lm_head loss built on them.

Per token i with logits x [V] and target t:
  lse  = log(sum_j exp(x_j))
  loss = (1 - ls) * (lse - x_t) + ls * (lse - mean_j x_j) + z_loss * lse**2
Label smoothing spreads its mass uniformly over all V classes (as optax and PyTorch do). Tokens whose target is
negative are ignored: their loss is 0 and has zero gradient (their lse is still returned). A target >= V is a
caller bug that cannot raise under jit: it is treated like an ignored token too, silently, so check targets
upstream (the data pipeline) if that matters. The caller averages over real tokens (`chunked_lm_head_cross_entropy`
returns sums, and the weights decide what counts).

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

Numerics: the kernels read logits of any float dtype and do all their arithmetic in float32 (loss, lse, and the
softmax of the gradient); loss and lse are float32, dlogits is rounded once to its output dtype. Their error is
that of float32 (tests: 1e-5 relative on float32 logits). Logits rounded to bf16 before they get here already
carry an error of up to 2**-9 of each logit, which no kernel can undo: `chunked_lm_head_cross_entropy` therefore
hands the kernels the matmul's float32 logits.

Backends: "pallas" (pallas.py) and "triton" (triton.py), the same kernels twice behind `backends.Kernels`;
`reference.py` is the jnp version. Choosing between them is the caller's business. Each backend loads on first
use, so importing this package loads neither compiler.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.cross_entropy import backends
from pallas_kernels.cross_entropy.backends import check_loss_options
from pallas_kernels.cross_entropy.chunked import chunked_lm_head_cross_entropy
from pallas_kernels.cross_entropy.reference import LossSums
from pallas_kernels.cross_entropy.tuning import BlockSizes

__all__ = ["BlockSizes", "LossSums", "check_loss_options", "chunked_lm_head_cross_entropy", "cross_entropy",
           "cross_entropy_and_grad"]


def cross_entropy(logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0, label_smoothing: float = 0.0,
                  block_sizes: BlockSizes | None = None, backend: str = "pallas",
                  interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-token float32 (loss, lse) for logits [N, V] and int targets [N]; loss includes z_loss * lse**2.

  Computed in float32 from the logits as given (pass float32 logits for float32 accuracy); dlogits has the dtype
  of logits, rounded once from float32.

  Differentiable in `logits` through both outputs (a forward and a backward kernel). Targets < 0 or >= V are
  ignored: loss 0, no loss gradient.
  backend: "pallas" or "triton".
  interpret: None runs the compiled kernels on a GPU and the interpreter (Pallas' or Triton's) anywhere else.
  """
  _check_logits(logits, targets)
  options = backends.make_options(z_loss, label_smoothing, block_sizes, backend, interpret)
  return _cross_entropy(logits, targets.astype(jnp.int32), options)


def cross_entropy_and_grad(logits: jax.Array, targets: jax.Array, dloss: jax.Array, *, z_loss: float = 0.0,
                           label_smoothing: float = 0.0, block_sizes: BlockSizes | None = None,
                           backend: str = "pallas", interpret: bool | None = None):
  """Per-token (loss, lse, argmax) and d(sum(dloss * loss))/d(logits) in one kernel, for a loss cotangent known
  in advance (e.g. the loss weights / token count): about one read and one write of the logits instead of the
  forward's read plus the backward's read and write. Computed in float32; dlogits has the dtype of logits,
  rounded once; argmax is int32 (first maximum). Targets < 0 or >= V are ignored (loss 0, no gradient). Not
  differentiable itself (it returns the gradient).
  backend: "xla" (the jnp reference, no kernel), "pallas" or "triton".
  interpret: None runs the compiled kernels on a GPU and the interpreter (Pallas' or Triton's) anywhere else.
  """
  _check_logits(logits, targets)
  if dloss.shape != targets.shape:
    raise ValueError(f"dloss must have shape {targets.shape}, got {dloss.shape}")
  options = backends.make_options(z_loss, label_smoothing, block_sizes, backend, interpret,
                                  backends.CHUNKED_BACKENDS)
  return backends.value_and_grad(logits, targets.astype(jnp.int32), dloss.astype(jnp.float32), logits.dtype,
                                 options)


def _check_logits(logits, targets):
  if logits.ndim != 2 or not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be floating [N, V], got {logits.dtype}{list(logits.shape)}")
  if targets.shape != logits.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be int [{logits.shape[0]}], got {targets.dtype}{list(targets.shape)}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(logits, targets, options):
  loss, lse, _ = backends.kernels(options).forward(logits, targets, options, with_argmax=False)
  return loss, lse


def _cross_entropy_fwd(logits, targets, options):
  loss, lse, _ = backends.kernels(options).forward(logits, targets, options, with_argmax=False)
  return (loss, lse), (logits, targets, lse)


def _cross_entropy_bwd(options, residuals, cotangents):
  logits, targets, lse = residuals
  dloss, dlse = cotangents
  return backends.kernels(options).backward(logits, targets, lse, dloss, dlse, options), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
