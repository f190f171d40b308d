"""Cross-entropy in plain jnp: the one reference of the kernels (and what runs when no kernel is chosen)."""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp


class LossSums(NamedTuple):
  """Sums over tokens, weighted by the per-token loss weights (ignored tokens count 0)."""

  loss: jax.Array  # sum of w * per-token loss, z-loss included: the only differentiable field
  z_loss: jax.Array  # sum of w * z_loss * lse**2 (a metric; its gradient is inside `loss`)
  correct: jax.Array  # sum of w * [argmax(logits) == target]


def cross_entropy(logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0,
                  label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Per-token (loss, lse) in float32 (float64 stays float64), with the kernels' semantics (see the package
  docstring): targets < 0, and targets >= V, are ignored tokens with loss 0."""
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  vocab = x.shape[-1]
  valid = (targets >= 0) & (targets < vocab)
  lse = jax.nn.logsumexp(x, axis=-1)
  target_logit = jnp.take_along_axis(x, jnp.where(valid, targets, 0)[:, None], axis=-1)[:, 0]
  loss = ((1 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - jnp.mean(x, axis=-1))
          + z_loss * lse * lse)
  return jnp.where(valid, loss, 0.0), lse


def token_weights(targets: jax.Array, weights: jax.Array | None, vocab: int) -> jax.Array:
  """Float32 per-token loss weights (None: 1), 0 on ignored tokens whatever their weight."""
  valid = (targets >= 0) & (targets < vocab)
  w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  return jnp.where(valid, w, 0.0)


def lm_head_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                          weights: jax.Array | None = None, *, z_loss: float = 0.0,
                          label_smoothing: float = 0.0) -> LossSums:
  """`chunked_lm_head_cross_entropy` with the full [N, V] logits materialized (the XLA baseline): the logits are
  the float32 accumulation of the matmul, not rounded to hidden's dtype, as in the chunked loss."""
  logits = jnp.dot(hidden, kernel.astype(hidden.dtype),
                   preferred_element_type=jnp.promote_types(hidden.dtype, jnp.float32))
  loss, lse = cross_entropy(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)
  w = token_weights(targets, weights, logits.shape[-1])
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return LossSums(jnp.sum(w * loss), lax.stop_gradient(jnp.sum(w * z_loss * lse * lse)),
                  lax.stop_gradient(jnp.sum(w * correct)))
