"""Batched generation with a key/value cache: greedy, sampling (temperature, top-k, top-p) and beam search.

Every step runs the decoder on one new token per row (per beam with beam search) inside a `while_loop` over
fixed-shape buffers, which stops once every row is done. Rows that have emitted EOS emit the pad id.

Beam search follows transformers' vectorized `_beam_search` (v4.50 and later) step for step, so that its outputs
equal `T5ForConditionalGeneration.generate(num_beams=..., length_penalty=..., early_stopping=...)` on our exported
weights: each step keeps the best 2 * num_beams continuations over all beams, continues the best num_beams of them
that did not end, and offers those of the best num_beams that ended (EOS, or the last step) to the finished
hypotheses, scored sum(log p) / length**length_penalty, the length counting generated tokens and EOS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fat5_jax.model import T5

# transformers' score of the beams that do not exist yet at the first step: only the first beam's tokens compete.
_ABSENT_BEAM_SCORE = -1e9


def _options_error(*, max_length, num_beams, num_return_sequences, early_stopping, do_sample, temperature, top_k,
                   top_p, rng) -> str | None:
  if max_length < 1 or num_beams < 1 or num_return_sequences < 1:
    return f"max_length={max_length}, num_beams={num_beams}, num_return_sequences={num_return_sequences}: all >= 1"
  if num_return_sequences > num_beams and not (do_sample and num_beams == 1):
    return (f"num_return_sequences={num_return_sequences} > num_beams={num_beams}: beam search returns at most its "
            "beams, greedy decoding one sequence per row")
  if not (isinstance(early_stopping, bool) or early_stopping == "never"):
    return f"early_stopping={early_stopping!r}: True, False or 'never'"
  if do_sample and rng is None:
    return "do_sample=True needs a PRNG key (rng=jax.random.key(...))"
  if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
    return f"temperature={temperature} (> 0), top_k={top_k} (>= 0, 0 = off), top_p={top_p} (in (0, 1])"
  return None


def _warp(log_probs, *, temperature: float, top_k: int, top_p: float, min_tokens_to_keep: int):
  """transformers' sampling warpers in their order (temperature, top-k, then top-p on the tempered distribution):
  tokens outside the kept set get -inf; each keeps at least `min_tokens_to_keep` tokens."""
  if temperature != 1.0:
    log_probs = log_probs / temperature
  if top_k:
    kth_best = jax.lax.top_k(log_probs, min(max(top_k, min_tokens_to_keep), log_probs.shape[-1]))[0][..., -1:]
    log_probs = jnp.where(log_probs < kth_best, -jnp.inf, log_probs)
  if top_p < 1.0:
    # Nucleus: the most likely tokens until their mass reaches top_p (the first one always kept).
    descending = -jnp.sort(-log_probs, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    kept = jnp.maximum(jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True),
                       min_tokens_to_keep)
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
    log_probs = jnp.where(log_probs < threshold, -jnp.inf, log_probs)
  return log_probs


def _repeated_cache(model: T5, input_ids, attention_mask, copies: int, max_length: int):
  """The decoding cache of each row repeated `copies` times (beams, or samples of one input), rows of one input
  next to each other, and the repeated attention mask: the encoder runs once per input."""
  repeat = lambda x: jnp.repeat(x, copies, axis=0)
  encoded = model.encode(input_ids, attention_mask)
  attention_mask = repeat(attention_mask)
  return model.init_cache(repeat(encoded), attention_mask, max_length), attention_mask


def _next_token_log_probs(model: T5, tokens, step, cache, attention_mask):
  logits, cache = model.decode_step(tokens, step, cache, attention_mask)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cache


def _greedy_or_sample(model: T5, input_ids, attention_mask, *, max_length, num_return_sequences, do_sample, warp,
                      rng):
  cfg = model.config
  cache, attention_mask = _repeated_cache(model, input_ids, attention_mask, num_return_sequences, max_length)
  rows = attention_mask.shape[0]
  tokens = jnp.full((rows, max_length + 1), cfg.pad_token_id, jnp.int32).at[:, 0].set(cfg.decoder_start_token_id)

  def step(carry):
    i, tokens, cache, done = carry
    log_probs, cache = _next_token_log_probs(model, tokens[:, i], i, cache, attention_mask)
    if do_sample:
      next_token = jax.random.categorical(jax.random.fold_in(rng, i), warp(log_probs), axis=-1)
    else:
      next_token = jnp.argmax(log_probs, axis=-1)
    next_token = jnp.where(done, cfg.pad_token_id, next_token).astype(jnp.int32)
    return i + 1, tokens.at[:, i + 1].set(next_token), cache, done | (next_token == cfg.eos_token_id)

  running = lambda carry: (carry[0] < max_length) & ~jnp.all(carry[3])
  _, tokens, _, _ = jax.lax.while_loop(running, step, (0, tokens, cache, jnp.zeros((rows,), bool)))
  return tokens[:, 1:]


def _beam_search(model: T5, input_ids, attention_mask, *, max_length, num_beams, num_return_sequences,
                 length_penalty, early_stopping, do_sample, warp, rng):
  cfg = model.config
  batch, beams, candidates = input_ids.shape[0], num_beams, 2 * num_beams  # one EOS id: 2 beams per kept one
  cache, attention_mask = _repeated_cache(model, input_ids, attention_mask, beams, max_length)
  gather = lambda x, index: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)
  empty = jnp.full((batch, beams, max_length + 1), cfg.pad_token_id, jnp.int32)
  state = dict(
      step=0, cache=cache,
      running=empty.at[:, :, 0].set(cfg.decoder_start_token_id),
      running_scores=jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(_ABSENT_BEAM_SCORE),
      finished=empty, finished_scores=jnp.full((batch, beams), -jnp.inf, jnp.float32),
      is_finished=jnp.zeros((batch, beams), bool),
      # transformers' "is_early_stop_heuristic_unsatisfied": can a running beam still beat the worst finished one?
      improvable=jnp.ones((batch,), bool))

  def row_done(state):
    full = jnp.all(state["is_finished"], axis=1) & (early_stopping is True)
    return ~state["improvable"] | full

  def step(state):
    i = state["step"]
    log_probs, cache = _next_token_log_probs(model, state["running"][:, :, i].reshape(-1), i, state["cache"],
                                             attention_mask)
    if do_sample:
      log_probs = warp(log_probs)
    vocab = log_probs.shape[-1]
    totals = (log_probs.reshape(batch, beams, vocab) + state["running_scores"][:, :, None]).reshape(batch, -1)
    if do_sample:  # Gumbel top-k: `candidates` draws without replacement from softmax(totals), as torch.multinomial
      _, drawn = jax.lax.top_k(totals + jax.random.gumbel(jax.random.fold_in(rng, i), totals.shape), candidates)
      scores, order = jax.lax.top_k(jnp.take_along_axis(totals, drawn, axis=1), candidates)
      index = jnp.take_along_axis(drawn, order, axis=1)
    else:
      scores, index = jax.lax.top_k(totals, candidates)
    source_beam, token = index // vocab, (index % vocab).astype(jnp.int32)
    sequences = gather(state["running"], source_beam).at[:, :, i + 1].set(token)
    ended = (token == cfg.eos_token_id) | (i + 1 == max_length)

    # The best beams that go on; the cache follows them.
    continuing = jnp.where(ended, -jnp.inf, scores)
    running_scores, kept = jax.lax.top_k(continuing, beams)
    origin = (jnp.arange(batch)[:, None] * beams + gather(source_beam, kept)).reshape(-1)
    cache = [dict(layer, k=layer["k"][origin], v=layer["v"][origin]) for layer in cache]

    # Only the best `beams` candidates may finish (the others are there so that `beams` can go on), and only in
    # rows still open.
    offered = ended & (jnp.arange(candidates) < beams) & ~row_done(state)[:, None]
    offered_scores = jnp.where(offered, scores / (i + 1.0) ** length_penalty, -jnp.inf)
    merged_scores = jnp.concatenate([state["finished_scores"], offered_scores], axis=1)
    finished_scores, best = jax.lax.top_k(merged_scores, beams)
    finished = gather(jnp.concatenate([state["finished"], sequences], axis=1), best)
    is_finished = gather(jnp.concatenate([state["is_finished"], offered], axis=1), best)

    # transformers' heuristic: the best running score at its current length (at max_length for "never" with a
    # positive penalty, where longer can only score better) against the worst finished one.
    if early_stopping == "never" and length_penalty > 0:
      best_length = max_length
    else:
      best_length = i + 1.0
    best_possible = running_scores[:, :1] / best_length ** length_penalty
    worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _ABSENT_BEAM_SCORE)
    improvable = state["improvable"] & jnp.any(best_possible > worst_finished, axis=1)
    return dict(step=i + 1, cache=cache, running=gather(sequences, kept), running_scores=running_scores,
                finished=finished, finished_scores=finished_scores, is_finished=is_finished, improvable=improvable)

  going_on = lambda state: (state["step"] < max_length) & ~jnp.all(row_done(state))
  state = jax.lax.while_loop(going_on, step, state)
  return state["finished"][:, :num_return_sequences, 1:].reshape(batch * num_return_sequences, max_length)


@functools.partial(nnx.jit, static_argnames=("max_length", "num_beams", "num_return_sequences", "length_penalty",
                                             "early_stopping", "do_sample", "temperature", "top_k", "top_p"))
def generate(model: T5, input_ids, attention_mask, *, max_length: int, num_beams: int = 1,
             num_return_sequences: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, rng=None):
  """Token ids [B * num_return_sequences, max_length] generated after `input_ids` [B, S] (`attention_mask` [B, S]:
  1 = token, 0 = padding), the sequences of one input next to each other, best first; after EOS, the pad id.

  max_length: new tokens at most (transformers' max_new_tokens).
  num_beams: 1 = greedy decoding, or sampling with `do_sample`; more = beam search, as transformers':
    `length_penalty` (a hypothesis scores sum(log p) / length**length_penalty: > 0 favours longer ones) and
    `early_stopping` (True: a row stops once it has num_beams finished hypotheses; False: once transformers'
    heuristic says no running beam can beat them; "never": only when none could, at any length). With `do_sample`,
    beam sampling (the continuations are drawn, as transformers' does).
  num_return_sequences: the best sequences of beam search (<= num_beams), or independent samples per input.
  do_sample, temperature, top_k (0 = all tokens), top_p (1.0 = all): sampling from the tempered distribution
    restricted to its top_k most likely tokens, then to the smallest set of them holding top_p of its mass, with
    the PRNG key `rng` (the same key, the same sequences).

  The options are static: each new combination compiles once. Scores are float32 log-softmaxes of the logits.
  """
  error = _options_error(max_length=max_length, num_beams=num_beams, num_return_sequences=num_return_sequences,
                         early_stopping=early_stopping, do_sample=do_sample, temperature=temperature, top_k=top_k,
                         top_p=top_p, rng=rng)
  if error:
    raise ValueError(error)
  # As transformers: beam sampling keeps two tokens per beam at least.
  warp = functools.partial(_warp, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_tokens_to_keep=1 if num_beams == 1 else 2)
  if num_beams == 1:
    return _greedy_or_sample(model, input_ids, attention_mask, max_length=max_length,
                             num_return_sequences=num_return_sequences, do_sample=do_sample, warp=warp, rng=rng)
  return _beam_search(model, input_ids, attention_mask, max_length=max_length, num_beams=num_beams,
                      num_return_sequences=num_return_sequences, length_penalty=length_penalty,
                      early_stopping=early_stopping, do_sample=do_sample, warp=warp, rng=rng)


def greedy_decode(model: T5, input_ids, attention_mask, *, max_length: int):
  """Most likely continuation, [B, max_length] token ids; positions after EOS hold the pad id."""
  return generate(model, input_ids, attention_mask, max_length=max_length)
