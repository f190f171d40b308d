"""Cached decoding: one token at a time through the key/value cache computes what the full decoder computes."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fat5_jax.config import POSITION_ENCODINGS, model_config
from fat5_jax.generate import greedy_decode
from fat5_jax.model import T5


def _model(kind, seed=0, **overrides):
  config = model_config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=3,
                        position_encoding_type=kind, dtype="float32", **overrides)
  return T5(config, rngs=nnx.Rngs(seed))


def _inputs(seed):
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(rng.integers(2, 50, (2, 9)), jnp.int32)
  mask = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)  # the second row is padded
  return rng, inputs, mask


@pytest.mark.parametrize("kind", POSITION_ENCODINGS)
def test_decode_steps_match_the_full_decoder(kind):
  model = _model(kind)
  rng, inputs, mask = _inputs(1)
  decoder_inputs = jnp.asarray(rng.integers(2, 50, (2, 7)), jnp.int32)
  full = model(inputs, decoder_inputs, attention_mask=mask)
  cache = model.init_cache(model.encode(inputs, mask), mask, max_length=10)  # longer than used: unwritten slots
  steps = []
  for i in range(decoder_inputs.shape[1]):
    logits, cache = model.decode_step(decoder_inputs[:, i], i, cache, mask)
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, axis=1), full, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("kind", ["t5", "rope"])
def test_greedy_decode_matches_argmax_of_the_full_decoder(kind):
  model = _model(kind, seed=2, tie_word_embeddings=True)
  _, inputs, mask = _inputs(3)
  generated = np.asarray(greedy_decode(model, inputs, mask, max_length=6))
  # Reference: re-run the whole decoder on the prefix at every step, as FAT5 does.
  prefix = jnp.zeros((2, 1), jnp.int32)
  for _ in range(6):
    next_token = jnp.argmax(model(inputs, prefix, attention_mask=mask)[:, -1], axis=-1).astype(jnp.int32)
    prefix = jnp.concatenate([prefix, next_token[:, None]], axis=1)
  expected = np.asarray(prefix[:, 1:])
  for row in range(2):  # after an EOS the reference keeps going; greedy_decode pads
    eos = np.flatnonzero(expected[row] == model.config.eos_token_id)
    end = eos[0] + 1 if eos.size else expected.shape[1]
    np.testing.assert_array_equal(generated[row, :end], expected[row, :end])
    assert (generated[row, end:] == model.config.pad_token_id).all()


def test_greedy_decode_pads_after_eos():
  first = np.asarray(greedy_decode(_model("t5", seed=4), *_inputs(5)[1:], max_length=6))
  eos = int(first[0, 2])  # make the third token of row 0 the end of sequence: same weights, other eos id
  stopped = np.asarray(greedy_decode(_model("t5", seed=4, eos_token_id=eos), *_inputs(5)[1:], max_length=6))
  end = int(np.flatnonzero(first[0] == eos)[0]) + 1
  np.testing.assert_array_equal(stopped[0, :end], first[0, :end])
  assert (stopped[0, end:] == 0).all() and end < 6
