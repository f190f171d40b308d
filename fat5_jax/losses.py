"""Cross-entropy with z-loss and label smoothing over real target tokens, and the metrics a run logs.

Per target token, with lse = log(sum(exp(logits))):

  loss = (1 - ls) * (lse - logit[target]) + ls * (lse - mean(logits)) + z_loss * lse^2

(label smoothing as cross-entropy against (1 - ls) * one_hot + ls / vocab; z-loss keeps lse near 0). Everything is
computed in float32 whatever the logits' dtype. Functions return *sums* weighted by `weights` (0 for padding, 1 for
a real target): the trainer adds sums over micro-batches and devices and divides once, with `normalize_metrics`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.cross_entropy import reference
from pallas_kernels.cross_entropy.backends import check_loss_options


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array, *, z_loss: float = 1e-4,
                       label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the per-token loss, and metric sums.

  Args:
    logits: [batch, length, vocab], any float dtype (bf16 from the model); upcast to float32 inside.
    targets: [batch, length] ints in [0, vocab) wherever the weight is not 0.
    weights: [batch, length] floats, the decoder loss weights (0 on padding).
    z_loss: weight of lse^2 (FAT5 / T5: 1e-4).
    label_smoothing: in [0, 1).

  Returns:
    (loss_sum, metrics) where metrics holds float32 sums: "loss" (= loss_sum, z-loss included), "z_loss",
    "correct" (weighted count of argmax hits) and "tokens" (sum of weights).
  """
  if logits.ndim != 3 or targets.shape != logits.shape[:2] or weights.shape != targets.shape:
    raise ValueError(f"cross_entropy_loss: need logits [B, T, V], targets and weights [B, T]; got logits "
                     f"{logits.shape}, targets {targets.shape}, weights {weights.shape}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"cross_entropy_loss: targets must be integers, got {targets.dtype}")
  check_loss_options(z_loss, label_smoothing)
  flat_loss, lse = reference.cross_entropy(logits.reshape(-1, logits.shape[-1]).astype(jnp.float32),
                                           targets.reshape(-1), z_loss=z_loss, label_smoothing=label_smoothing)
  loss, z_term = flat_loss.reshape(targets.shape), z_loss * jnp.square(lse).reshape(targets.shape)
  correct = jnp.argmax(logits, axis=-1) == targets
  weights = weights.astype(jnp.float32)
  weighted_sum = lambda x: jnp.sum(weights * x)
  loss_sum = weighted_sum(loss)
  metrics = {"loss": loss_sum, "z_loss": weighted_sum(z_term), "correct": weighted_sum(correct.astype(jnp.float32)),
             "tokens": jnp.sum(weights)}
  return loss_sum, metrics


def normalize_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-token means from metric sums: every entry divided by "tokens"; "correct" becomes "accuracy"; "tokens"
  stays the count. Zero tokens give zeros."""
  if "tokens" not in sums:
    raise ValueError(f"normalize_metrics: the sums need a 'tokens' entry, got {sorted(sums)}")
  tokens = jnp.asarray(sums["tokens"], jnp.float32)
  mean = lambda x: jnp.where(tokens > 0, x / jnp.maximum(tokens, 1e-9), 0.0)
  out = {("accuracy" if k == "correct" else k): mean(v) for k, v in sums.items() if k != "tokens"}
  out["tokens"] = tokens
  return out
