"""FAT5's encoder-only fine-tuning heads: T5's encoder under a dense layer, and their losses.

- classification: the encoder's output mean-pooled over each row's real tokens (segment id > 0) and scaled to unit
  RMS, a dense layer to the labels; cross-entropy per example.
- token_classification: a dense layer on every token; cross-entropy per token.
- question_answering: a dense layer to a start and an end logit per token; the span loss is the mean of the start
  and end cross-entropies over the row's real tokens (padding can be neither).

The modules are named as in `model.T5` (`shared`, `encoder`), so a pretrained T5's parameters of those names fit
as they are. Logits and losses are float32 whatever the compute dtype. Losses return *sums* and metric sums with a
"tokens" count (examples, or labelled tokens), the contract of `optim.accumulate_gradients` and
`losses.normalize_metrics`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fat5_jax.config import ModelConfig
from fat5_jax.model import Embedding, Stack

ENCODER_HEADS = ("classification", "token_classification", "question_answering")
# Batch keys each head reads besides encoder_input_tokens and encoder_segment_ids.
LABEL_KEYS = {"classification": ("labels", "label_weights"), "token_classification": ("labels", "label_weights"),
              "question_answering": ("start_positions", "end_positions", "label_weights")}


class EncoderWithHead(nnx.Module):
  """T5's embedding and encoder, and a dense head (kernel [d_model, outputs] and bias) over its output."""

  def __init__(self, config: ModelConfig, head: str, num_labels: int, *, rngs: nnx.Rngs):
    if head not in ENCODER_HEADS:
      raise ValueError(f"head {head!r} is not one of {', '.join(ENCODER_HEADS)}")
    outputs = 2 if head == "question_answering" else num_labels
    self.config, self.head_type = config, head
    self.shared = Embedding(config, rngs=rngs)
    self.encoder = Stack(config, is_decoder=False, rngs=rngs)
    # std d_model**-0.5: the head's input has unit RMS (pooled features are rescaled), so the initial logits do too.
    self.head_kernel = nnx.Param(config.initializer_factor * config.d_model ** -0.5 * jax.random.normal(
        rngs.params(), (config.d_model, outputs), jnp.float32).astype(config.param_dtype))
    self.head_bias = nnx.Param(jnp.zeros((outputs,), config.param_dtype))

  def __call__(self, input_ids, segment_ids) -> jax.Array:
    """float32 logits: [B, labels] (classification), [B, S, labels] (token_classification), [B, S, 2] (start, end:
    question_answering)."""
    hidden = self.encoder(self.shared(input_ids), segment_ids=segment_ids, positions=None).astype(jnp.float32)
    if self.head_type == "classification":
      real = (segment_ids > 0).astype(jnp.float32)[..., None]
      hidden = jnp.sum(hidden * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)
      # Unit RMS whatever the encoder's final norm weights: a pretrained encoder's are fitted to the decoder (tiny_fr:
      # RMS 0.29) and averaging shrinks the vector again, so without this AdamW's fixed-size steps on the head move
      # its logits several times slower from a pretrained encoder than from a fresh one (issue 16).
      eps = self.config.layer_norm_epsilon
      hidden = hidden * jax.lax.rsqrt(jnp.mean(jnp.square(hidden), axis=-1, keepdims=True) + eps)
    return hidden @ self.head_kernel[...].astype(jnp.float32) + self.head_bias[...].astype(jnp.float32)


def _cross_entropy(logits, labels):
  """Per position -log softmax(logits)[label], float32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _sums(losses, correct, weights) -> tuple[jax.Array, dict]:
  weights = weights.astype(jnp.float32)
  loss_sum = jnp.sum(weights * losses)
  return loss_sum, {"loss": loss_sum, "correct": jnp.sum(weights * correct.astype(jnp.float32)),
                    "tokens": jnp.sum(weights)}


def classification_loss(logits, labels, weights) -> tuple[jax.Array, dict]:
  """Cross-entropy of logits [..., labels] against int labels [...], weighted (0: padding, ignored)."""
  return _sums(_cross_entropy(logits, labels), jnp.argmax(logits, axis=-1) == labels, weights)


def span_loss(logits, segment_ids, start_positions, end_positions, weights) -> tuple[jax.Array, dict]:
  """Mean of the start and end cross-entropies per example; logits [B, S, 2], positions [B]; "correct" counts
  exact spans."""
  masked = jnp.where((segment_ids > 0)[..., None], logits.astype(jnp.float32), -1e30)
  start, end = masked[..., 0], masked[..., 1]
  losses = 0.5 * (_cross_entropy(start, start_positions) + _cross_entropy(end, end_positions))
  correct = (jnp.argmax(start, axis=-1) == start_positions) & (jnp.argmax(end, axis=-1) == end_positions)
  return _sums(losses, correct, weights)


def logits_loss(head: str, logits, batch: dict) -> tuple[jax.Array, dict]:
  """(loss sum, metric sums) of a head's logits on a batch holding LABEL_KEYS[head]."""
  if head == "question_answering":
    return span_loss(logits, batch["encoder_segment_ids"], batch["start_positions"], batch["end_positions"],
                     batch["label_weights"])
  return classification_loss(logits, batch["labels"], batch["label_weights"])


def head_loss(model: EncoderWithHead, batch: dict) -> tuple[jax.Array, dict]:
  """(loss sum, metric sums) of the model's head on a batch holding LABEL_KEYS[head]."""
  return logits_loss(model.head_type, model(batch["encoder_input_tokens"], batch["encoder_segment_ids"]), batch)


_SKELETONS: dict = {}  # (config, head, num_labels, seed) -> (graph, dropout streams), built once per process


def from_parameters(config: ModelConfig, head: str, num_labels: int, params, seed: int = 0) -> EncoderWithHead:
  """An EncoderWithHead holding `params` (a nested dict of arrays), built without drawing random weights; its
  dropout streams are seeded with `seed`. As `model.from_parameters`, for the jitted steps that call it."""
  key = (config, head, num_labels, seed)
  if key not in _SKELETONS:
    build = lambda: EncoderWithHead(config, head, num_labels, rngs=nnx.Rngs(params=seed, dropout=seed))
    graphdef = nnx.split(nnx.eval_shape(build), nnx.Param, ...)[0]
    with jax.ensure_compile_time_eval():  # concrete dropout keys even when called inside a trace
      rest = jax.jit(lambda: nnx.to_pure_dict(nnx.split(build(), nnx.Param, ...)[2]))()
    _SKELETONS[key] = graphdef, rest
  graphdef, rest = _SKELETONS[key]
  return nnx.merge(graphdef, params, rest)


def init_parameters(config: ModelConfig, head: str, num_labels: int, seed: int, pretrained: dict | None = None):
  """A fresh head's parameters (nested dict); with `pretrained` (a T5's parameters), its embedding and encoder."""
  params = nnx.to_pure_dict(nnx.state(EncoderWithHead(config, head, num_labels, rngs=nnx.Rngs(seed)), nnx.Param))
  if pretrained is not None:
    params.update(shared=pretrained["shared"], encoder=pretrained["encoder"])
  return params
