"""Greedy decoding with a key/value cache: each step runs the decoder on one new token per row."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fat5_jax.model import T5


@functools.partial(nnx.jit, static_argnames=("max_length",))
def greedy_decode(model: T5, input_ids, attention_mask, *, max_length: int):
  """Most likely continuation, [B, max_length] token ids; positions after EOS hold the pad id."""
  cfg = model.config
  batch = input_ids.shape[0]
  cache = model.init_cache(model.encode(input_ids, attention_mask), attention_mask, max_length)
  tokens = jnp.full((batch, max_length + 1), cfg.pad_token_id, jnp.int32).at[:, 0].set(cfg.decoder_start_token_id)

  def step(i, carry):
    tokens, cache, done = carry
    logits, cache = model.decode_step(tokens[:, i], i, cache, attention_mask)
    next_token = jnp.where(done, cfg.pad_token_id, jnp.argmax(logits.astype(jnp.float32), axis=-1)).astype(jnp.int32)
    return tokens.at[:, i + 1].set(next_token), cache, done | (next_token == cfg.eos_token_id)

  tokens, _, _ = jax.lax.fori_loop(0, max_length, step, (tokens, cache, jnp.zeros((batch,), bool)))
  return tokens[:, 1:]
