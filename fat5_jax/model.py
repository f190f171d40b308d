"""T5 v1.1 / FAT5 encoder-decoder in Flax NNX.

Pre-norm blocks with T5's RMSNorm, no linear biases, a relative position encoding computed once per stack, and an
lm_head that is untied by default. Initialization follows Hugging Face's `T5PreTrainedModel._init_weights`
(std of each weight given beside it). Linear kernels are stored [in, out]; `fat5_jax.hf` transposes them.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from pallas_kernels.rms_norm import default_impl as fastest_rms_norm_impl
from fat5_jax import positions
from fat5_jax.attention import AttentionBias, dot_product_attention, index_positions
from fat5_jax.config import ModelConfig

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gated-gelu": lambda x: jax.nn.gelu(x, approximate=True),  # HF's gelu_new: the tanh approximation
    "relu": jax.nn.relu, "gated-relu": jax.nn.relu,
    "silu": jax.nn.silu, "gated-silu": jax.nn.silu,
}


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


def resolve_kernel_impl(requested: str, fastest_on_gpu: str) -> str:
  """The kernel to run for `model.kernel_impl`: `auto` is the family's faster kernel on the H100 on GPU, else xla."""
  on_gpu = jax.default_backend() == "gpu"
  if requested == "auto":
    return fastest_on_gpu if on_gpu else "xla"
  if requested == "triton" and not on_gpu:
    raise ValueError("model.kernel_impl='triton' needs a GPU (jax-triton); use pallas (interpreted off GPU) or xla")
  return requested


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, impl: str = "xla") -> jax.Array:
  """T5 RMSNorm: no mean, no bias, variance in float32; returns x's dtype. `impl`: xla, pallas or triton."""
  if impl != "xla":
    return pallas_kernels.rms_norm(x, weight, eps, impl=impl)
  xf = x.astype(jnp.float32)
  normalized = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (normalized * weight.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, config: ModelConfig):
    self.weight = nnx.Param(jnp.full((config.d_model,), config.initializer_factor, config.param_dtype))  # std: const
    self.eps = config.layer_norm_epsilon
    self.impl = resolve_kernel_impl(config.kernel_impl, fastest_rms_norm_impl())

  def __call__(self, x):
    return rms_norm(x, self.weight[...], self.eps, self.impl)


class Attention(nnx.Module):
  """Multi-head attention without biases; q, k, v, o as in Hugging Face's `T5Attention`."""

  def __init__(self, config: ModelConfig, *, causal: bool, rotary: bool, rngs: nnx.Rngs):
    c, inner, dtype = config.initializer_factor, config.num_heads * config.d_kv, config.param_dtype
    self.q = _normal(rngs, (config.d_model, inner), c * (config.d_model * config.d_kv) ** -0.5, dtype)
    self.k = _normal(rngs, (config.d_model, inner), c * config.d_model ** -0.5, dtype)
    self.v = _normal(rngs, (config.d_model, inner), c * config.d_model ** -0.5, dtype)
    self.o = _normal(rngs, (inner, config.d_model), c * inner ** -0.5, dtype)
    self.config, self.causal, self.rotary = config, causal, rotary

  def __call__(self, x, kv_input, *, bias: Optional[AttentionBias], q_segment_ids, kv_segment_ids, q_positions,
               kv_positions):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    heads = lambda t, w: (t @ w[...].astype(dtype)).reshape(*t.shape[:2], cfg.num_heads, cfg.d_kv)
    q, k, v = heads(x, self.q), heads(kv_input, self.k), heads(kv_input, self.v)
    if self.rotary:  # a relative encoding: index positions rotate packed segments correctly too
      rope = lambda t, pos, ids: positions.apply_rope(t, index_positions(ids) if pos is None else pos,
                                                      fraction=cfg.rope_fraction, base=cfg.rope_base)
      q, k = rope(q, q_positions, q_segment_ids), rope(k, kv_positions, kv_segment_ids)
    out = dot_product_attention(q, k, v, bias=bias, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                q_positions=q_positions, kv_positions=kv_positions, causal=self.causal,
                                scale=cfg.attention_scale, impl=cfg.attention_impl)
    return out.reshape(*out.shape[:2], -1) @ self.o[...].astype(dtype)


class FeedForward(nnx.Module):
  """Gated (wi_0 activated times wi_1, e.g. GEGLU) or plain (wi) feed-forward, then wo."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c, dtype = config.initializer_factor, config.param_dtype
    self.gated = config.feed_forward_proj.startswith("gated-")
    if self.gated:
      self.wi_0 = _normal(rngs, (config.d_model, config.d_ff), c * config.d_model ** -0.5, dtype)
      self.wi_1 = _normal(rngs, (config.d_model, config.d_ff), c * config.d_model ** -0.5, dtype)
    else:
      self.wi = _normal(rngs, (config.d_model, config.d_ff), c * config.d_model ** -0.5, dtype)
    self.wo = _normal(rngs, (config.d_ff, config.d_model), c * config.d_ff ** -0.5, dtype)
    self.activation = ACTIVATIONS[config.feed_forward_proj]
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x):
    dense = lambda w: x @ w[...].astype(self.dtype)
    hidden = self.activation(dense(self.wi_0)) * dense(self.wi_1) if self.gated else self.activation(dense(self.wi))
    return self.dropout(hidden) @ self.wo[...].astype(self.dtype)


class Block(nnx.Module):
  """One pre-norm layer: self-attention, cross-attention (decoder only, no position bias), feed-forward."""

  def __init__(self, config: ModelConfig, *, is_decoder: bool, rngs: nnx.Rngs):
    self.self_attention_norm = RMSNorm(config)
    rotary = config.position_encoding_type == "rope"
    self.self_attention = Attention(config, causal=is_decoder, rotary=rotary, rngs=rngs)
    if is_decoder:
      self.cross_attention_norm = RMSNorm(config)
      self.cross_attention = Attention(config, causal=False, rotary=False, rngs=rngs)
    self.mlp_norm = RMSNorm(config)
    self.mlp = FeedForward(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.is_decoder = is_decoder

  def __call__(self, x, *, bias, segment_ids, positions, encoded=None, encoder_segment_ids=None,
               encoder_positions=None):
    h = self.self_attention_norm(x)
    x = x + self.dropout(self.self_attention(h, h, bias=bias, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                             q_positions=positions, kv_positions=positions))
    if self.is_decoder:
      h = self.cross_attention_norm(x)
      x = x + self.dropout(self.cross_attention(
          h, encoded, bias=None, q_segment_ids=segment_ids, kv_segment_ids=encoder_segment_ids,
          q_positions=positions, kv_positions=encoder_positions))
    return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Stack(nnx.Module):
  """Encoder or decoder: blocks sharing one position encoding, then a final norm."""

  def __init__(self, config: ModelConfig, *, is_decoder: bool, rngs: nnx.Rngs):
    num_layers = config.num_decoder_layers if is_decoder else config.num_layers
    self.position = positions.make_position_module(config, bidirectional=not is_decoder, rngs=rngs)
    self.blocks = nnx.List([Block(config, is_decoder=is_decoder, rngs=rngs) for _ in range(num_layers)])
    self.final_norm = RMSNorm(config)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, x, *, segment_ids, positions, **cross_inputs):
    if self.position is None:
      bias = None
    else:
      bias_positions = index_positions(segment_ids) if positions is None else positions
      bias = self.position(bias_positions, bias_positions)
    x = self.dropout(x)
    for block in self.blocks:
      x = block(x, bias=bias, segment_ids=segment_ids, positions=positions, **cross_inputs)
    return self.dropout(self.final_norm(x))


def _segment_ids(tokens, mask, segment_ids):
  """Default for unpacked rows: one segment of the non-masked tokens."""
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens, jnp.int32) if mask is None else mask.astype(jnp.int32)
  return segment_ids


class T5(nnx.Module):
  """Encoder-decoder T5, called like Hugging Face's `T5ForConditionalGeneration` and returning logits.

  Packed rows pass `*_segment_ids` (0 = padding). Per-segment `*_positions` are needed only when a segment's
  positions are not its indices minus its start (e.g. non-contiguous segments), or for FIRE, whose normalizer
  reads the absolute query position; otherwise leave them out: index differences give the same distances, and the
  flash kernel runs faster without them.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config.initializer_factor
    self.shared = nnx.Embed(config.vocab_size, config.d_model, param_dtype=jnp.dtype(config.param_dtype),
                            dtype=jnp.dtype(config.dtype), embedding_init=nnx.initializers.normal(c * 1.0),
                            rngs=rngs)  # std: factor
    self.encoder = Stack(config, is_decoder=False, rngs=rngs)
    self.decoder = Stack(config, is_decoder=True, rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _normal(rngs, (config.d_model, config.vocab_size), c * 1.0, config.param_dtype)  # std: factor

  def encode(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None):
    segment_ids = _segment_ids(input_ids, attention_mask, segment_ids)
    return self.encoder(self.shared(input_ids), segment_ids=segment_ids, positions=positions)

  def decode(self, decoder_input_ids, encoded, *, attention_mask=None, decoder_attention_mask=None,
             encoder_segment_ids=None, encoder_positions=None, decoder_segment_ids=None, decoder_positions=None):
    """Final decoder hidden states [B, T, d_model], before the lm_head."""
    encoder_segment_ids = _segment_ids(encoded[..., 0], attention_mask, encoder_segment_ids)
    segment_ids = _segment_ids(decoder_input_ids, decoder_attention_mask, decoder_segment_ids)
    return self.decoder(self.shared(decoder_input_ids), segment_ids=segment_ids, positions=decoder_positions,
                        encoded=encoded, encoder_segment_ids=encoder_segment_ids,
                        encoder_positions=encoder_positions)

  def lm_head_kernel(self) -> jax.Array:
    """[d_model, vocab] in the compute dtype; tied heads carry Hugging Face's d_model**-0.5 output rescaling."""
    dtype = jnp.dtype(self.config.dtype)
    if self.config.tie_word_embeddings:
      return (self.shared.embedding[...].T * self.config.d_model ** -0.5).astype(dtype)
    return self.lm_head[...].astype(dtype)

  def __call__(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None, *,
               encoder_segment_ids=None, encoder_positions=None, decoder_segment_ids=None, decoder_positions=None):
    encoded = self.encode(input_ids, attention_mask, segment_ids=encoder_segment_ids, positions=encoder_positions)
    hidden = self.decode(decoder_input_ids, encoded, attention_mask=attention_mask,
                         decoder_attention_mask=decoder_attention_mask, encoder_segment_ids=encoder_segment_ids,
                         encoder_positions=encoder_positions, decoder_segment_ids=decoder_segment_ids,
                         decoder_positions=decoder_positions)
    return hidden @ self.lm_head_kernel()


def parameters(model: nnx.Module) -> dict:
  """The parameters as a nested dict of arrays (the layout of checkpoints and of the optimizer)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def count_parameters(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(parameters(model)))
