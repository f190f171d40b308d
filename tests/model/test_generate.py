"""Cached decoding computes what the full decoder computes; greedy and beam search equal transformers' `generate` on
our exported weights; sampling draws from the tempered, top-k / top-p restricted distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fat5_jax import hf
from fat5_jax.config import POSITION_ENCODINGS, model_config
from fat5_jax.generate import generate, greedy_decode
from fat5_jax.model import T5, from_parameters


def _model(kind, seed=0, **overrides):
  config = model_config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=3,
                        position_encoding_type=kind, dtype="float32", **overrides)
  return T5(config, rngs=nnx.Rngs(seed))


@nnx.jit
def _full_decoder(model, inputs, decoder_inputs, mask):
  """The model's logits in one compiled call: running it op by op on a CPU takes seconds per new shape."""
  return model(inputs, decoder_inputs, attention_mask=mask)


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
  full = _full_decoder(model, inputs, decoder_inputs, mask)
  # max_length longer than used: unwritten slots.
  cache = nnx.jit(lambda model: model.init_cache(model.encode(inputs, mask), mask, max_length=10))(model)
  # The step index is traced: one compilation for every step.
  decode_step = nnx.jit(lambda model, token, i, cache: model.decode_step(token, i, cache, mask))
  steps = []
  for i in range(decoder_inputs.shape[1]):
    logits, cache = decode_step(model, decoder_inputs[:, i], i, cache)
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
    next_token = jnp.argmax(_full_decoder(model, inputs, prefix, mask)[:, -1], axis=-1).astype(jnp.int32)
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


# ---------------------------------------------------------------------------------------------------------------
# Against transformers, and sampling

VOCAB, NEW_TOKENS = 24, 8


@pytest.fixture(scope="module")
def peaky():
  """A small random model whose logits are far apart (no near-ties that float differences between JAX and PyTorch
  could flip), with EOS likely enough that rows end early, at different steps for different settings; and 3 inputs
  of 7, 4 and 2 tokens (right-padded)."""
  config = model_config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
                        num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                        dropout_rate=0.0, dtype="float32")
  model = T5(config, rngs=nnx.Rngs(1))
  model.lm_head.set_value((model.lm_head[...] * 4.0).at[:, config.eos_token_id].multiply(1.5))
  ids = np.random.default_rng(0).integers(2, VOCAB, (3, 7))
  mask = (np.arange(7) < np.array([[7], [4], [2]])).astype(np.int32)
  return config, model, ids * mask, mask


@pytest.fixture(scope="module")
def transformers_model(peaky, tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out_dir = str(tmp_path_factory.mktemp("hf"))
  hf.to_hf(peaky[0], peaky[1], out_dir)
  return torch, transformers.T5ForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()


def _pad_after_eos(rows, eos, pad, length):
  """transformers fills after EOS with EOS when pad is 0 (its `pad_token_id or eos_token_id`) and crops to the
  longest row: our layout (pad after EOS, `length` columns) to compare token for token."""
  out = np.full((rows.shape[0], length), pad, rows.dtype)
  for i, row in enumerate(rows):
    end = np.flatnonzero(row == eos)
    end = end[0] + 1 if end.size else len(row)
    out[i, :end] = row[:end]
  return out


BEAM_SETTINGS = {
    "greedy": dict(num_beams=1),
    "beam4": dict(num_beams=4),
    "beam4_short_early": dict(num_beams=4, length_penalty=0.5, early_stopping=True),
    "beam4_long": dict(num_beams=4, length_penalty=2.0),
    "beam4_never_negative": dict(num_beams=4, length_penalty=-1.0, early_stopping="never"),
    "beam4_all_returned_early": dict(num_beams=4, num_return_sequences=4, length_penalty=1.5, early_stopping=True),
}


def test_settings_reach_eos_and_disagree(peaky):
  """The comparisons below mean something: rows end at EOS, and the settings give different outputs."""
  _, model, ids, mask = peaky
  outputs = {name: np.asarray(generate(model, ids, mask, max_length=NEW_TOKENS, **options))
             for name, options in BEAM_SETTINGS.items()}
  best = [o[::o.shape[0] // 3].tobytes() for o in outputs.values()]  # the best sequence of each input
  assert len(set(best)) >= 5
  ended_early = {name for name, o in outputs.items() if (o[:, -1] == 0).any()}
  assert ended_early == set(BEAM_SETTINGS) - {"beam4_long"}


@pytest.mark.parametrize("setting", BEAM_SETTINGS)
def test_greedy_and_beam_search_equal_transformers(setting, peaky, transformers_model):
  config, model, ids, mask = peaky
  torch, reference = transformers_model
  options = BEAM_SETTINGS[setting]
  ours = np.asarray(generate(model, ids, mask, max_length=NEW_TOKENS, **options))
  with torch.no_grad():
    theirs = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=NEW_TOKENS, **options).numpy()
  assert (theirs[:, 0] == config.decoder_start_token_id).all()
  np.testing.assert_array_equal(ours, _pad_after_eos(theirs[:, 1:], config.eos_token_id, config.pad_token_id,
                                                     NEW_TOKENS))


@pytest.mark.parametrize("restriction", [dict(top_k=1), dict(top_p=1e-6)])
def test_sampling_from_the_most_likely_token_alone_is_greedy(restriction, peaky):
  _, model, ids, mask = peaky
  sampled = generate(model, ids, mask, max_length=NEW_TOKENS, do_sample=True, temperature=3.0,
                     rng=jax.random.key(0), **restriction)
  np.testing.assert_array_equal(sampled, greedy_decode(model, ids, mask, max_length=NEW_TOKENS))


def test_samples_stay_in_the_top_k_and_follow_the_key(peaky):
  config, model, ids, mask = peaky
  sample = lambda key: np.asarray(generate(model, ids, mask, max_length=NEW_TOKENS, do_sample=True, temperature=5.0,
                                           top_k=3, num_return_sequences=4, rng=jax.random.key(key)))
  first = sample(0)
  np.testing.assert_array_equal(sample(0), first)
  assert not np.array_equal(sample(1), first)
  # The full decoder on each sampled prefix: every token (up to EOS) is among its step's 3 most likely.
  rows = np.repeat(ids, 4, axis=0), np.repeat(mask, 4, axis=0)
  prefixes = np.concatenate([np.zeros((first.shape[0], 1), first.dtype), first[:, :-1]], axis=1)
  logits = np.asarray(_full_decoder(model, rows[0], prefixes, rows[1]))
  third_best = np.sort(logits, axis=-1)[..., -3]
  chosen = np.take_along_axis(logits, first[..., None], axis=-1)[..., 0]
  generated = np.cumsum(first == config.eos_token_id, axis=1) - (first == config.eos_token_id) == 0
  assert (chosen[generated] >= third_best[generated] - 1e-5).all()
  assert len(np.unique(first[generated])) > 3  # not greedy


@pytest.mark.parametrize("temperature, top_p", [(2.0, 1.0), (2.0, 0.8)])
def test_first_token_frequencies_follow_the_tempered_nucleus(temperature, top_p, peaky):
  _, model, ids, mask = peaky
  draws = 4000
  first = np.asarray(generate(model, ids[:1], mask[:1], max_length=1, do_sample=True, temperature=temperature,
                              top_p=top_p, num_return_sequences=draws, rng=jax.random.key(7)))[:, 0]
  logits = np.asarray(_full_decoder(model, ids[:1], np.zeros((1, 1), np.int32), mask[:1]))[0, 0] / temperature
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  descending = np.sort(probs)[::-1]
  kept = np.sum(np.cumsum(descending) - descending < top_p)
  probs = np.where(probs >= descending[kept - 1], probs, 0.0)
  probs /= probs.sum()
  assert (probs == 0).any() == (top_p < 1)  # the nucleus leaves tokens out
  frequencies = np.bincount(first, minlength=VOCAB) / draws
  assert (frequencies[probs == 0] == 0).all()
  np.testing.assert_allclose(frequencies, probs, atol=4 * np.sqrt(0.25 / draws))


def test_beam_sampling_follows_the_key(peaky):
  _, model, ids, mask = peaky
  sample = lambda key: np.asarray(generate(model, ids, mask, max_length=NEW_TOKENS, num_beams=4, do_sample=True,
                                           temperature=3.0, rng=jax.random.key(key)))
  first = sample(3)
  np.testing.assert_array_equal(sample(3), first)
  assert not np.array_equal(sample(4), first)


def test_sampling_without_a_key_is_refused(peaky):
  _, model, ids, mask = peaky
  with pytest.raises(ValueError, match="PRNG key"):
    generate(model, ids, mask, max_length=2, do_sample=True)


@pytest.mark.parametrize("attention_impl,growth", [("flash", "linear"), ("xla", "quadratic")])
def test_generation_memory_grows_linearly_with_the_input_through_the_flash_kernels(attention_impl, growth):
  """Generation from long inputs: with the flash kernels no [S, S] buffer exists (encoder or cache), so the compiled
  program's scratch memory grows by the same amount per added input token, to 16,384 tokens; the materialized
  attention's grows quadratically (the check can tell). Compiled only; the kernels are Pallas' interpreted ones."""
  config = model_config(vocab_size=256, d_model=64, d_kv=32, d_ff=128, num_heads=2, num_layers=1,
                        num_decoder_layers=1, attention_impl=attention_impl,
                        kernel_backend="pallas" if attention_impl == "flash" else "xla")
  params = nnx.to_pure_dict(nnx.state(T5(config, rngs=nnx.Rngs(0)), nnx.Param))
  run = jax.jit(lambda params, ids, mask: generate(from_parameters(config, params), ids, mask, max_length=8))
  lengths = (4096, 8192, 16384) if growth == "linear" else (1024, 2048, 4096)
  scratch = [run.lower(params, *[jax.ShapeDtypeStruct((1, n), jnp.int32)] * 2).compile().memory_analysis()
             .temp_size_in_bytes for n in lengths]
  second_over_first_step = (scratch[2] - scratch[1]) / (scratch[1] - scratch[0])  # doubling steps: 2 if linear
  if growth == "linear":
    assert 1.8 < second_over_first_step < 2.2, scratch
  else:
    assert second_over_first_step > 3.5, scratch
