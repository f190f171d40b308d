"""T5 v1.1 / FAT5 encoder-decoder in Flax NNX.

Pre-norm blocks with T5's RMSNorm, no linear biases, a relative position encoding computed once per stack, and an
lm_head that is untied by default. A fresh model draws every weight as FAT5's `FlashT5PreTrainedModel._init_weights`
does (the std of each weight beside it, times `initializer_factor`), which is Hugging Face's T5 init except for two
weights: the untied lm_head (d_model**-0.5, not 1.0: the initial logits have unit scale and the loss starts at
ln(vocab)) and the feed-forward `wo` (d_model**-0.5, not d_ff**-0.5). Imported checkpoints bypass this init.
Linear kernels are stored [in, out]; `fat5_jax.hf` transposes them.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fat5_jax import positions
from fat5_jax.config import ModelConfig
from fat5_jax.ops import REFERENCE, AttentionBias, ops_for
from fat5_jax.positions import apply_rope, index_positions

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gated-gelu": lambda x: jax.nn.gelu(x, approximate=True),  # HF's gelu_new: the tanh approximation
    "relu": jax.nn.relu, "gated-relu": jax.nn.relu,
    "silu": jax.nn.silu, "gated-silu": jax.nn.silu,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_activation(activation, gate, linear):
  """activation(gate) * linear in float32, rounded once to their dtype (gate and linear: one shape, one dtype): the
  gated feed-forward's hidden layer.

  Its gradient saves only the two inputs and recomputes the activation and its derivative in the backward's one
  elementwise pass, which writes both inputs' gradients. Differentiated as written, the tanh GELU times the gate
  leaves about six more [tokens, d_ff] intermediates (products, the tanh) for the compiler to keep or fuse away.
  The inputs are two matmuls' outputs, not one [gate | linear] product: its cotangent would be one tensor, which
  XLA:GPU fills by copying both gradients into it."""
  return (activation(gate.astype(jnp.float32)) * linear.astype(jnp.float32)).astype(gate.dtype)


def _gated_activation_forward(activation, gate, linear):
  return gated_activation(activation, gate, linear), (gate, linear)


def _gated_activation_backward(activation, residuals, cotangent):
  gate, linear = residuals
  # The recomputation reads the cotangent (times zero: exact where it is finite, NaN where it is not, which the
  # step's non-finite guard skips anyway). Else XLA merges it with the forward's as a common subexpression, or
  # schedules it in the forward beside the matmul it reads (an optimization barrier, as jax.checkpoint puts on its
  # recomputations, stops only the first), and holds its intermediates until here.
  cotangent = cotangent.astype(jnp.float32)
  activated, activation_vjp = jax.vjp(activation, gate.astype(jnp.float32) + 0 * cotangent)
  (dgate,) = activation_vjp(cotangent * linear.astype(jnp.float32))
  return dgate.astype(gate.dtype), (cotangent * activated).astype(linear.dtype)


gated_activation.defvjp(_gated_activation_forward, _gated_activation_backward)


# What each `train.remat` policy rematerializes: the parts of the model run as checkpoints that save only their
# inputs (jax.checkpoint_policies.nothing_saveable), everything inside them recomputed in the backward pass.
# attention: each attention sub-block (RMSNorm, q/k/v projections, RoPE, the attention op, output projection) of
# self- and cross-attention; block: each block; full: each stack, and inside it each block, so that the stack's
# recomputation holds only block inputs (the blocks' forward then runs three times).
REMAT_PARTS = {"none": (), "attention": ("attention",), "block": ("block",), "full": ("stack", "block")}


def _checkpointed(fn, remat: str, part: str):
  """`fn`, a checkpoint saving only its inputs when the `remat` policy rematerializes `part`, else `fn` itself."""
  if part not in REMAT_PARTS[remat]:
    return fn
  return nnx.remat(fn, policy=jax.checkpoint_policies.nothing_saveable)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


class Embedding(nnx.Module):
  """The token embedding [vocab, d_model] shared by the encoder, the decoder and a tied lm_head.

  Rows are gathered from the table upcast to float32, then cast to the compute dtype: the gradient's scatter-add,
  which adds one row per occurrence of a token (thousands for a frequent token in a micro-batch), then runs in
  float32 and a bf16 table's gradient is rounded once per use, not at every addition.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.embedding = _normal(rngs, (config.vocab_size, config.d_model), config.initializer_factor * 1.0,
                             config.param_dtype)  # std: factor
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.float32_table(), ids, axis=0).astype(self.dtype)

  def float32_table(self) -> jax.Array:
    return self.embedding[...].astype(jnp.float32)


class RMSNorm(nnx.Module):
  def __init__(self, config: ModelConfig):
    self.weight = nnx.Param(jnp.full((config.d_model,), config.initializer_factor, config.param_dtype))  # std: const
    self.eps = config.layer_norm_epsilon
    self.ops = ops_for(config)

  def __call__(self, x):
    return self.ops.rms_norm(x, self.weight[...], self.eps)

  def with_residual(self, x):
    """(x, the normed x) for a pre-norm sub-block: build the residual sum on the x returned, and the kernels add
    its two gradients inside the norm's backward (`Ops.rms_norm`)."""
    return self.ops.rms_norm(x, self.weight[...], self.eps, with_residual=True)


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
    q = self.queries(x, q_positions, q_segment_ids)
    k, v = self.keys_values(kv_input, kv_positions, kv_segment_ids)
    return self.attend(q, k, v, bias=bias, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       q_positions=q_positions, kv_positions=kv_positions, causal=self.causal,
                       ops=ops_for(self.config))

  def _heads(self, x, weight):
    cfg = self.config
    return (x @ weight[...].astype(cfg.dtype)).reshape(*x.shape[:2], cfg.num_heads, cfg.d_kv)

  def _rotate(self, x, positions, segment_ids):
    if not self.rotary:
      return x
    # A relative encoding: index positions rotate packed segments correctly too.
    positions = index_positions(segment_ids) if positions is None else positions
    return apply_rope(x, positions, fraction=self.config.rope_fraction, base=self.config.rope_base)

  def queries(self, x, positions, segment_ids):
    return self._rotate(self._heads(x, self.q), positions, segment_ids)

  def keys_values(self, x, positions, segment_ids):
    """[B, S, H, D] keys (rotated under RoPE) and values: what a decoding cache holds."""
    return self._rotate(self._heads(x, self.k), positions, segment_ids), self._heads(x, self.v)

  def attend(self, q, k, v, *, causal: bool, ops, **masks_and_bias):
    out = ops.attention(q, k, v, causal=causal, scale=self.config.attention_scale, **masks_and_bias)
    return out.reshape(*out.shape[:2], -1) @ self.o[...].astype(self.config.dtype)


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
    # std: FAT5 reads (d_ff, d_model) from torch's [out, in] weight of `wo`, so it draws d_model**-0.5 where Hugging
    # Face draws d_ff**-0.5; we start where FAT5's models started.
    self.wo = _normal(rngs, (config.d_ff, config.d_model), c * config.d_model ** -0.5, dtype)
    self.activation = ACTIVATIONS[config.feed_forward_proj]
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x):
    dense = lambda w: x @ w[...].astype(self.dtype)
    if self.gated:
      hidden = gated_activation(self.activation, dense(self.wi_0), dense(self.wi_1))
    else:
      hidden = self.activation(dense(self.wi))
    return self.dropout(hidden) @ self.wo[...].astype(self.dtype)


class Block(nnx.Module):
  """One pre-norm layer: self-attention, cross-attention (decoder only, no position bias), feed-forward."""

  def __init__(self, config: ModelConfig, *, is_decoder: bool, rngs: nnx.Rngs, remat: str = "none"):
    self.self_attention_norm = RMSNorm(config)
    rotary = config.position_encoding_type == "rope"
    self.self_attention = Attention(config, causal=is_decoder, rotary=rotary, rngs=rngs)
    if is_decoder:
      self.cross_attention_norm = RMSNorm(config)
      self.cross_attention = Attention(config, causal=False, rotary=False, rngs=rngs)
    self.mlp_norm = RMSNorm(config)
    self.mlp = FeedForward(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.is_decoder, self.remat = is_decoder, remat

  def __call__(self, x, *, bias, segment_ids, positions, encoded=None, encoder_segment_ids=None):
    # Each sub-block adds to the x its norm returns (RMSNorm.with_residual), not to its own input.
    attend = _checkpointed(_attention_sub_block, self.remat, "attention")
    x, out = attend(self.self_attention_norm, self.self_attention, x, None, dict(
        bias=bias, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_positions=positions,
        kv_positions=positions))
    x = x + self.dropout(out)
    if self.is_decoder:
      # No position bias across stacks: positions would only slow the flash kernel down.
      x, out = attend(self.cross_attention_norm, self.cross_attention, x, encoded, dict(
          bias=None, q_segment_ids=segment_ids, kv_segment_ids=encoder_segment_ids, q_positions=None,
          kv_positions=None))
      x = x + self.dropout(out)
    x, h = self.mlp_norm.with_residual(x)
    return x + self.dropout(self.mlp(h))

  def decode_step(self, x, cache: dict, *, step, bias, encoder_segment_ids):
    """Decoder layer for one new token per row, x [B, 1, d], at position `step`: writes its key and value into the
    cache (`k`, `v` [B, max_length, H, D]) and attends to what is written and to the encoder (`cross_k`, `cross_v`)."""
    batch, max_length = cache["k"].shape[:2]
    ones = jnp.ones((batch, 1), jnp.int32)
    position = jnp.full((batch, 1), step, jnp.int32)
    cache_positions = index_positions(jnp.zeros((batch, max_length), jnp.int32))
    h = self.self_attention_norm(x)
    k, v = self.self_attention.keys_values(h, position, ones)
    write = lambda buffer, new: jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), step, axis=1)
    cache = dict(cache, k=write(cache["k"], k), v=write(cache["v"], v))
    x = x + self.self_attention.attend(
        self.self_attention.queries(h, position, ones), cache["k"], cache["v"], bias=bias, q_segment_ids=ones,
        kv_segment_ids=(cache_positions <= step).astype(jnp.int32), q_positions=position,
        kv_positions=cache_positions, causal=False, ops=REFERENCE)
    h = self.cross_attention_norm(x)
    x = x + self.cross_attention.attend(
        self.cross_attention.queries(h, position, ones), cache["cross_k"], cache["cross_v"], bias=None,
        q_segment_ids=ones, kv_segment_ids=encoder_segment_ids, q_positions=None, kv_positions=None, causal=False,
        ops=REFERENCE)
    return x + self.mlp(self.mlp_norm(x)), cache


def _attention_sub_block(norm: RMSNorm, attention: Attention, x, kv_input, masks_and_bias: dict):
  """(x for the residual sum, attention over the normed `x`): self-attention when `kv_input` is None, else over
  `kv_input` (the encoder)."""
  x, h = norm.with_residual(x)
  return x, attention(h, h if kv_input is None else kv_input, **masks_and_bias)


class Stack(nnx.Module):
  """Encoder or decoder: blocks sharing one position encoding, then a final norm."""

  def __init__(self, config: ModelConfig, *, is_decoder: bool, rngs: nnx.Rngs, remat: str = "none"):
    num_layers = config.num_decoder_layers if is_decoder else config.num_layers
    self.position = positions.make_position_module(config, bidirectional=not is_decoder, rngs=rngs)
    self.blocks = nnx.List([Block(config, is_decoder=is_decoder, rngs=rngs, remat=remat) for _ in range(num_layers)])
    self.final_norm = RMSNorm(config)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.remat = remat

  def __call__(self, x, *, segment_ids, positions, **cross_inputs):
    if self.position is None:
      bias = None
    else:
      bias_positions = index_positions(segment_ids) if positions is None else positions
      bias = self.position(bias_positions, bias_positions)
    run_block = _checkpointed(lambda block, x, inputs: block(x, **inputs), self.remat, "block")

    def run_blocks(blocks, x, inputs):
      for block in blocks:
        x = run_block(block, x, inputs)
      return x

    inputs = dict(bias=bias, segment_ids=segment_ids, positions=positions, **cross_inputs)
    x = _checkpointed(run_blocks, self.remat, "stack")(self.blocks, self.dropout(x), inputs)
    return self.dropout(self.final_norm(x))


def _segment_ids(tokens, mask, segment_ids):
  """Packed rows' segment ids as given, else unpacked rows' token mask (bool: every query sees the real keys,
  `Ops.attention`)."""
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
  return segment_ids


class T5(nnx.Module):
  """Encoder-decoder T5, called like Hugging Face's `T5ForConditionalGeneration` and returning logits.

  Packed rows pass `*_segment_ids` (0 = padding); unpacked rows pass masks, or boolean segment ids (True = token), with
  which the attention masks keys only (padding positions then compute outputs that nothing reads). Per-segment
  `*_positions` are needed only when a segment's positions are not its indices minus its start (e.g. non-contiguous
  segments), or for FIRE, whose normalizer reads the absolute query position; otherwise leave them out: index
  differences give the same distances, and the flash kernel runs faster without them.

  `remat` (`train.remat`, REMAT_PARTS) chooses what the backward pass recomputes rather than keeps; it changes no
  value.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none"):
    self.config = config
    c = config.initializer_factor
    self.shared = Embedding(config, rngs=rngs)
    self.encoder = Stack(config, is_decoder=False, rngs=rngs, remat=remat)
    self.decoder = Stack(config, is_decoder=True, rngs=rngs, remat=remat)
    if not config.tie_word_embeddings:
      # std: FAT5's d_model**-0.5 (Hugging Face's 1.0 made the initial logits ~sqrt(d_model) times too large).
      self.lm_head = _normal(rngs, (config.d_model, config.vocab_size), c * config.d_model ** -0.5,
                             config.param_dtype)

  def encode(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None):
    segment_ids = _segment_ids(input_ids, attention_mask, segment_ids)
    return self.encoder(self.shared(input_ids), segment_ids=segment_ids, positions=positions)

  def decode(self, decoder_input_ids, encoded, *, attention_mask=None, decoder_attention_mask=None,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None):
    """Final decoder hidden states [B, T, d_model], before the lm_head."""
    encoder_segment_ids = _segment_ids(encoded[..., 0], attention_mask, encoder_segment_ids)
    segment_ids = _segment_ids(decoder_input_ids, decoder_attention_mask, decoder_segment_ids)
    return self.decoder(self.shared(decoder_input_ids), segment_ids=segment_ids, positions=decoder_positions,
                        encoded=encoded, encoder_segment_ids=encoder_segment_ids)

  def lm_head_kernel(self) -> jax.Array:
    """[d_model, vocab] in the compute dtype; tied heads carry Hugging Face's d_model**-0.5 output rescaling."""
    dtype = jnp.dtype(self.config.dtype)
    if self.config.tie_word_embeddings:
      # Scaled in float32 and rounded once, whatever the table's dtype.
      return (self.shared.float32_table().T * self.config.d_model ** -0.5).astype(dtype)
    return self.lm_head[...].astype(dtype)

  def init_cache(self, encoded, attention_mask, max_length: int) -> list[dict]:
    """Per decoder layer: room for `max_length` self-attention keys and values, and the cross-attention ones."""
    encoder_segment_ids = _segment_ids(encoded[..., 0], attention_mask, None)
    cache = []
    for block in self.decoder.blocks:
      cross_k, cross_v = block.cross_attention.keys_values(encoded, None, encoder_segment_ids)
      empty = jnp.zeros((encoded.shape[0], max_length, *cross_k.shape[2:]), cross_k.dtype)
      cache.append({"k": empty, "v": empty, "cross_k": cross_k, "cross_v": cross_v})
    return cache

  def decode_step(self, tokens, step, cache: list[dict], attention_mask=None):
    """Logits [B, vocab] following `tokens` [B] placed at decoder position `step`, and the updated cache.

    Feeding the decoder inputs one at a time gives the logits `__call__` computes for them all at once.
    """
    encoder_segment_ids = _segment_ids(cache[0]["cross_k"][..., 0, 0], attention_mask, None)
    batch, max_length = cache[0]["k"].shape[:2]
    bias = None
    if self.decoder.position is not None:
      bias = self.decoder.position(jnp.full((batch, 1), step, jnp.int32),
                                   index_positions(jnp.zeros((batch, max_length), jnp.int32)))
    x, new_cache = self.shared(tokens[:, None]), []
    for block, layer_cache in zip(self.decoder.blocks, cache):
      x, layer_cache = block.decode_step(x, layer_cache, step=step, bias=bias,
                                         encoder_segment_ids=encoder_segment_ids)
      new_cache.append(layer_cache)
    return (self.decoder.final_norm(x) @ self.lm_head_kernel())[:, 0], new_cache

  def __call__(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None, *,
               encoder_segment_ids=None, encoder_positions=None, decoder_segment_ids=None, decoder_positions=None):
    encoded = self.encode(input_ids, attention_mask, segment_ids=encoder_segment_ids, positions=encoder_positions)
    hidden = self.decode(decoder_input_ids, encoded, attention_mask=attention_mask,
                         decoder_attention_mask=decoder_attention_mask, encoder_segment_ids=encoder_segment_ids,
                         decoder_segment_ids=decoder_segment_ids, decoder_positions=decoder_positions)
    return hidden @ self.lm_head_kernel()


def abstract_parameters(config: ModelConfig) -> nnx.State:
  """The parameter state of T5(config) as shapes and dtypes, without drawing any weight."""
  return nnx.state(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))), nnx.Param)


_SKELETONS: dict = {}  # (config, seed, remat) -> (graph, dropout streams) of from_parameters, built once per process


def from_parameters(config: ModelConfig, params, seed: int = 0, remat: str = "none") -> T5:
  """A T5 holding `params` (an nnx.State or a nested dict of arrays), built without drawing random weights.

  The graph and the non-parameter state (the dropout streams, seeded with `seed`) are made once per (config, seed,
  remat) and reused: the trainer calls this inside its jitted steps, at every trace.
  """
  key = config, seed, remat
  if key not in _SKELETONS:
    new = lambda: T5(config, rngs=nnx.Rngs(params=seed, dropout=seed), remat=remat)
    graphdef = nnx.split(nnx.eval_shape(new), nnx.Param, ...)[0]
    with jax.ensure_compile_time_eval():  # concrete keys even when the first call comes from inside a trace
      # Under jit the unused weight initialization is dropped: only the dropout keys are computed.
      rest = jax.jit(lambda: nnx.to_pure_dict(nnx.split(new(), nnx.Param, ...)[2]))()
    _SKELETONS[key] = graphdef, rest
  graphdef, rest = _SKELETONS[key]
  return nnx.merge(graphdef, params, rest)


def with_dropout(model: nnx.Module, dropout_key) -> nnx.Module:
  """`model` in training mode with dropout drawn from `dropout_key`, or deterministic when the key is None."""
  if dropout_key is None:
    model.eval()
  else:
    nnx.reseed(model, dropout=dropout_key)
  return model


def parameters(model: nnx.Module) -> dict:
  """The parameters as a nested dict of arrays (the layout of checkpoints and of the optimizer)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def count_parameters(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(parameters(model)))


def parameter_table(model: nnx.Module) -> list[tuple[str, int]]:
  """Parameters per module, the layers of a stack grouped (e.g. `encoder.blocks.*.mlp`)."""
  counts = {}
  for path, leaf in jax.tree.leaves_with_path(parameters(model)):
    keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    name = ".".join([*keys[:2], "*", *keys[3:4]] if keys[1:2] == ["blocks"] else keys[:2])
    counts[name] = counts.get(name, 0) + leaf.size
  return list(counts.items())
