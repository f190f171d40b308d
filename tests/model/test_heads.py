"""The encoder heads' losses and gradients against plain jnp restatements, on small random data with padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fat5_jax import heads
from fat5_jax.config import model_config

CONFIG = model_config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=1, num_decoder_layers=1,
                      dtype="float32", attention_impl="xla", kernel_backend="xla")
ROWS, LENGTH, LABELS = 4, 10, 5
LENGTHS = np.array([10, 7, 3, 6])  # real tokens per row; the rest is padding


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  segment_ids = (np.arange(LENGTH)[None, :] < LENGTHS[:, None]).astype(np.int32)
  tokens = rng.integers(2, CONFIG.vocab_size, (ROWS, LENGTH)) * segment_ids
  return {"encoder_input_tokens": jnp.asarray(tokens, jnp.int32), "encoder_segment_ids": jnp.asarray(segment_ids)}


def _params(head):
  return heads.init_parameters(CONFIG, head, LABELS, seed=1)


def _encoded(params, head, batch):
  """The encoder's output, computed by the model itself: what the heads restate starts after it."""
  model = heads.from_parameters(CONFIG, head, LABELS, params)
  model.eval()
  return model.encoder(model.shared(batch["encoder_input_tokens"]), segment_ids=batch["encoder_segment_ids"],
                       positions=None)


def _log_softmax_pick(logits, labels):
  return jnp.take_along_axis(logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True),
                             labels[..., None], axis=-1)[..., 0]


def _head_loss(params, head, batch):
  model = heads.from_parameters(CONFIG, head, LABELS, params)
  model.eval()
  return heads.head_loss(model, batch)


def _check_against(head, batch, restated):
  params = _params(head)
  # Compiled: op by op, the forward and backward passes take seconds each on a CPU.
  (loss, sums), grads = jax.jit(jax.value_and_grad(lambda p: _head_loss(p, head, batch), has_aux=True))(params)
  expected, expected_grads = jax.jit(jax.value_and_grad(lambda p: restated(p, batch)))(params)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(sums["loss"], expected, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  return sums, grads


def test_classification_mean_pools_real_tokens_to_unit_rms_and_ignores_padded_rows():
  batch = dict(_batch(), labels=jnp.array([0, 3, 4, 1]), label_weights=jnp.array([1.0, 1.0, 0.0, 1.0]))

  def restated(params, batch):
    hidden = _encoded(params, "classification", batch)
    pooled = jnp.stack([hidden[row, :LENGTHS[row]].mean(axis=0) for row in range(ROWS)])
    pooled = pooled / jnp.sqrt(jnp.mean(pooled ** 2, axis=-1, keepdims=True) + CONFIG.layer_norm_epsilon)
    logits = pooled @ params["head_kernel"] + params["head_bias"]
    return -jnp.sum(batch["label_weights"] * _log_softmax_pick(logits, batch["labels"]))

  sums, _ = _check_against("classification", batch, restated)
  assert float(sums["tokens"]) == 3.0


def test_classification_logits_do_not_depend_on_padding():
  params, batch = _params("classification"), _batch()
  model = heads.from_parameters(CONFIG, "classification", LABELS, params)
  model.eval()
  logits = model(batch["encoder_input_tokens"], batch["encoder_segment_ids"])
  assert logits.shape == (ROWS, LABELS) and logits.dtype == jnp.float32
  garbage = jnp.where(batch["encoder_segment_ids"] > 0, batch["encoder_input_tokens"], 7)  # other pad tokens
  np.testing.assert_allclose(model(garbage, batch["encoder_segment_ids"]), logits, rtol=1e-5, atol=1e-6)


def test_token_classification_loss_per_real_token():
  batch = _batch()
  labels = jnp.asarray(np.random.default_rng(1).integers(0, LABELS, (ROWS, LENGTH)), jnp.int32)
  batch.update(labels=labels, label_weights=batch["encoder_segment_ids"].astype(jnp.float32))

  def restated(params, batch):
    logits = _encoded(params, "token_classification", batch) @ params["head_kernel"] + params["head_bias"]
    return -jnp.sum(batch["label_weights"] * _log_softmax_pick(logits, batch["labels"]))

  sums, _ = _check_against("token_classification", batch, restated)
  assert float(sums["tokens"]) == LENGTHS.sum()


def test_question_answering_span_loss_excludes_padding():
  batch = dict(_batch(), start_positions=jnp.array([2, 0, 1, 5]), end_positions=jnp.array([4, 6, 2, 5]),
               label_weights=jnp.ones((ROWS,)))

  def restated(params, batch):
    logits = _encoded(params, "question_answering", batch) @ params["head_kernel"] + params["head_bias"]
    total = 0.0
    for row in range(ROWS):  # a softmax over the row's real tokens only
      real = logits[row, :LENGTHS[row]]
      for column, target in ((0, batch["start_positions"][row]), (1, batch["end_positions"][row])):
        total -= 0.5 * jax.nn.log_softmax(real[:, column])[target]
    return total

  _check_against("question_answering", batch, restated)


def test_encoder_parameters_come_from_a_pretrained_t5():
  from fat5_jax import model as model_lib
  t5 = model_lib.parameters(model_lib.T5(CONFIG, rngs=nnx.Rngs(3)))
  params = heads.init_parameters(CONFIG, "classification", LABELS, seed=0, pretrained=t5)
  assert set(params) == {"shared", "encoder", "head_kernel", "head_bias"}
  for got, want in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(t5["encoder"])):
    np.testing.assert_array_equal(got, want)


def test_unknown_head_is_refused():
  with pytest.raises(ValueError, match="not one of"):
    heads.EncoderWithHead(CONFIG, "seq2seq", LABELS, rngs=nnx.Rngs(0))
