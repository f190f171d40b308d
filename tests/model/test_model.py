"""Model-level tests that need no Hugging Face: size, positions, packing, padding, jit, dtypes (init: test_init.py)."""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fat5_jax.config import POSITION_ENCODINGS, from_config_dict, model_config
from fat5_jax.model import T5, count_parameters


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """The comparisons here assume float32 dots; on a GPU XLA's default is TF32 (errors near 1e-3)."""
  with jax.default_matmul_precision("highest"):
    yield

TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, fire_L=8.0, dtype="float32",
            param_dtype="float32")


def _tiny(**overrides):
  config = model_config(**{**TINY, **overrides})
  return config, T5(config, rngs=nnx.Rngs(0))


@nnx.jit
def _run(model, *args, **kwargs):
  """One compiled call: much faster on CPU than running the model op by op."""
  return model(*args, **kwargs)


def _tokens(rng, *shape):
  return jnp.asarray(rng.integers(2, TINY["vocab_size"], shape), jnp.int32)


def test_small_fr_has_fat5_parameter_count():
  config = from_config_dict(importlib.import_module("configs.small_fr").get_config()).model
  abstract = nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0)))  # no allocation
  assert count_parameters(abstract) == 146_832_896


@pytest.mark.parametrize("kind", POSITION_ENCODINGS)
def test_packed_row_equals_examples_alone(kind):
  """Two examples packed in one row (segment ids, per-segment positions) compute what each computes alone, for
  every position encoding, in the encoder and the decoder; the logits are finite."""
  _, model = _tiny(position_encoding_type=kind)
  rng = np.random.default_rng(1)
  inputs, targets = [_tokens(rng, 6), _tokens(rng, 6)], [_tokens(rng, 4), _tokens(rng, 4)]  # one shape alone
  pad = lambda n: jnp.full((n,), 7, jnp.int32)  # padding tokens that must not matter

  def packed(parts, num_pad):
    ids = jnp.concatenate([*parts, pad(num_pad)])[None]
    segments = jnp.concatenate([jnp.full((len(p),), s + 1) for s, p in enumerate(parts)] + [jnp.zeros(num_pad)])
    positions = jnp.concatenate([jnp.arange(len(p)) for p in parts] + [jnp.zeros(num_pad)])
    return ids, segments.astype(jnp.int32)[None], positions.astype(jnp.int32)[None]

  ids, enc_seg, enc_pos = packed(inputs, 2)
  dec, dec_seg, dec_pos = packed(targets, 1)
  logits = _run(model, ids, dec, encoder_segment_ids=enc_seg, encoder_positions=enc_pos, decoder_segment_ids=dec_seg,
                 decoder_positions=dec_pos)
  alone = _run(model, jnp.stack(inputs), jnp.stack(targets))  # each example in its own row
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_allclose(logits[0, :8].reshape(alone.shape), alone, atol=2e-5, rtol=2e-5)
  if kind != "fire":  # relative encodings: segment ids alone give the same distances (the trainer's fast path)
    without_positions = _run(model, ids, dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)
    np.testing.assert_allclose(without_positions[0, :8], logits[0, :8], atol=2e-5, rtol=2e-5)


def test_padding_does_not_change_real_positions():
  _, model = _tiny()
  rng = np.random.default_rng(2)
  ids, dec = _tokens(rng, 1, 9), _tokens(rng, 1, 6)
  padded_ids = jnp.concatenate([ids, _tokens(rng, 1, 4)], axis=1)
  padded_dec = jnp.concatenate([dec, _tokens(rng, 1, 3)], axis=1)
  mask = jnp.arange(13)[None] < 9
  dec_mask = jnp.arange(9)[None] < 6
  padded = _run(model, padded_ids, padded_dec, mask, dec_mask)
  np.testing.assert_allclose(padded[:, :6], _run(model, ids, dec), atol=2e-5, rtol=2e-5)


def test_jit_matches_eager():
  _, model = _tiny(num_layers=1, num_decoder_layers=1)
  rng = np.random.default_rng(3)
  ids, dec = _tokens(rng, 2, 8), _tokens(rng, 2, 5)
  jitted = _run(model, ids, dec)
  np.testing.assert_allclose(jitted, model(ids, dec), atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_runs_and_stays_close():
  _, model32 = _tiny()
  _, model16 = _tiny(dtype="bfloat16")  # same seed: same float32 parameters
  rng = np.random.default_rng(4)
  ids, dec = _tokens(rng, 2, 8), _tokens(rng, 2, 5)
  logits16, logits32 = _run(model16, ids, dec), np.asarray(_run(model32, ids, dec))
  assert logits16.dtype == jnp.bfloat16
  error = np.abs(np.asarray(logits16, np.float32) - logits32).max()
  assert error < 0.05 * np.abs(logits32).max(), error


def test_tied_head_rescales_decoder_output():
  config, model = _tiny(tie_word_embeddings=True)
  assert not hasattr(model, "lm_head")
  rng = np.random.default_rng(5)
  ids, dec = _tokens(rng, 2, 8), _tokens(rng, 2, 5)
  hidden = nnx.jit(lambda model: model.decode(dec, model.encode(ids)))(model)
  expected = hidden @ model.shared.embedding[...].T * config.d_model ** -0.5
  np.testing.assert_allclose(_run(model, ids, dec), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["pallas", "triton"])
@pytest.mark.parametrize("kind", ["t5", "alibi", "fire"])
def test_flash_kernels_match_xla_in_the_model(kind, backend):
  """Flash attention, RMSNorm and every other kernel of a backend (interpreted off GPU): same logits and parameter
  gradients as the jnp references."""
  if backend == "triton" and kind != "t5":
    pytest.skip("the Triton attention kernels cover no bias and the T5 bias only (a config error otherwise)")
  rng = np.random.default_rng(5)
  make = lambda impl, backend: T5(model_config(
      vocab_size=64, d_model=64, d_kv=32, d_ff=96, num_heads=2, num_layers=1, num_decoder_layers=1,
      position_encoding_type=kind, dtype="float32", attention_impl=impl, kernel_backend=backend),
      rngs=nnx.Rngs(3))
  enc_ids = jnp.asarray([[1] * 9 + [2] * 8 + [0] * 3, [1] * 20])
  enc_pos = jnp.asarray([list(range(9)) + list(range(8)) + [0] * 3, list(range(20))])
  dec_ids = jnp.asarray([[1] * 5 + [2] * 6, [1] * 11])
  dec_pos = jnp.asarray([list(range(5)) + list(range(6)), list(range(11))])
  inputs, decoder_inputs = _tokens(rng, 2, 20), _tokens(rng, 2, 11)
  cotangent = jnp.asarray(rng.normal(size=(2, 11, 64)), jnp.float32) * (dec_ids > 0)[..., None]

  def logits_and_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def projected(params):
      # Like the trainer: positions only where they change the result (FIRE reads absolute query positions).
      positions = kind == "fire"
      logits = nnx.merge(graphdef, params, rest)(
          inputs, decoder_inputs, encoder_segment_ids=enc_ids, decoder_segment_ids=dec_ids,
          encoder_positions=enc_pos if positions else None, decoder_positions=dec_pos if positions else None)
      return jnp.sum(logits * cotangent), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(projected, has_aux=True))(params)
    return logits * (dec_ids > 0)[..., None], nnx.to_pure_dict(grads)

  flash, xla = logits_and_grads(make("flash", backend)), logits_and_grads(make("xla", "xla"))
  tolerance = 2e-4 if jax.default_backend() == "cpu" else 2e-2
  chex.assert_trees_all_close(flash, xla, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("impl,backend", [("xla", "xla"), ("flash", "pallas"), ("flash", "triton")])
def test_token_masks_give_the_segment_ids_results_at_real_positions(impl, backend):
  """Unpacked rows as boolean ids (the attention masks keys only; padding queries attend too): the logits at real
  positions and the parameter gradients of a loss that ignores padding equal those of integer ids."""
  rng = np.random.default_rng(6)
  model = T5(model_config(**{**TINY, "d_kv": 32, "num_layers": 1, "num_decoder_layers": 1}, attention_impl=impl,
                          kernel_backend=backend), rngs=nnx.Rngs(4))
  enc_ids = jnp.asarray([[1] * 14 + [0] * 6, [1] * 20])
  dec_ids = jnp.asarray([[1] * 7 + [0] * 4, [1] * 11])
  inputs, decoder_inputs = _tokens(rng, 2, 20), _tokens(rng, 2, 11)
  cotangent = jnp.asarray(rng.normal(size=(2, 11, TINY["vocab_size"])), jnp.float32) * (dec_ids > 0)[..., None]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def logits_and_grads(encoder_ids, decoder_ids):
    def projected(params):
      logits = nnx.merge(graphdef, params, rest)(inputs, decoder_inputs, encoder_segment_ids=encoder_ids,
                                                  decoder_segment_ids=decoder_ids)
      return jnp.sum(logits * cotangent), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(projected, has_aux=True))(params)
    return logits * (dec_ids > 0)[..., None], nnx.to_pure_dict(grads)

  masks = logits_and_grads(enc_ids > 0, dec_ids > 0)
  chex.assert_trees_all_close(masks, logits_and_grads(enc_ids, dec_ids), rtol=1e-4, atol=1e-5)
