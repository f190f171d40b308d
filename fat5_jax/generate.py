"""Greedy decoding (no key/value cache yet: every step re-runs the decoder over the fixed-size buffer)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fat5_jax.model import T5


@functools.partial(nnx.jit, static_argnames=("max_length",))
def greedy_decode(model: T5, input_ids, attention_mask, *, max_length: int):
  """Most likely continuation, [B, max_length] token ids; positions after EOS hold the pad id.

  The decoder is causal, so the tokens not yet written (pad) never influence the position being predicted.
  """
  cfg = model.config
  batch = input_ids.shape[0]
  encoded = model.encode(input_ids, attention_mask)
  head = model.lm_head_kernel()
  tokens = jnp.full((batch, max_length + 1), cfg.pad_token_id, jnp.int32).at[:, 0].set(cfg.decoder_start_token_id)

  def step(i, carry):
    tokens, done = carry
    hidden = model.decode(tokens[:, :-1], encoded, attention_mask=attention_mask)
    next_token = jnp.argmax(hidden[:, i].astype(jnp.float32) @ head.astype(jnp.float32), axis=-1).astype(jnp.int32)
    next_token = jnp.where(done, cfg.pad_token_id, next_token)
    return tokens.at[:, i + 1].set(next_token), done | (next_token == cfg.eos_token_id)

  tokens, _ = jax.lax.fori_loop(0, max_length, step, (tokens, jnp.zeros((batch,), bool)))
  return tokens[:, 1:]
