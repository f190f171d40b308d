"""Position encodings of a T5 stack: one module per stack, computed once and shared by all its layers.

Each returns an `AttentionBias` (how positions enter the attention logits) and, for RoPE, rotates q and k.
Distances are always measured with the per-segment positions, so packed examples never see each other's offsets.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fat5_jax.config import ModelConfig
from fat5_jax.ops import AttentionBias


def index_positions(segment_ids: jax.Array) -> jax.Array:
  """Positions 0..S-1 of every row: within a contiguous segment their differences are the true distances."""
  return jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
  """The geometric slopes of ALiBi (Press et al.), extended to head counts that are not powers of two."""
  def powers(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  closest = 2 ** math.floor(math.log2(num_heads))
  slopes = powers(closest)
  if closest < num_heads:
    slopes += powers(2 * closest)[0::2][: num_heads - closest]
  return tuple(slopes)


class RelativeBias(nnx.Module):
  """T5's bucketed relative bias: a [num_buckets, heads] table (Hugging Face's `relative_attention_bias`)."""

  def __init__(self, config: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
    std = config.initializer_factor * config.d_model ** -0.5  # FAT5 and Hugging Face
    self.relative_attention_bias = nnx.Param(
        std * jax.random.normal(rngs.params(), (config.relative_attention_num_buckets, config.num_heads),
                                jnp.dtype(config.param_dtype)))
    self.bidirectional = bidirectional
    self.max_distance = config.relative_attention_max_distance

  def __call__(self, q_positions, kv_positions) -> AttentionBias:
    # One float32 table for all the layers of the stack: every layer's gradient (a scatter-add over Sq x Sk pairs in
    # the reference, float32 partial sums in the kernels) adds into it in float32, rounded to a bf16 table once.
    return AttentionBias(kind="t5", table=self.relative_attention_bias[...].astype(jnp.float32),
                         bidirectional=self.bidirectional, max_distance=self.max_distance)


class Alibi(nnx.Module):
  """ALiBi: -slope * distance with the standard slopes; asymmetric gives keys after the query their own set."""

  def __init__(self, config: ModelConfig):
    before = alibi_slopes(config.num_heads)
    # Asymmetric: the slopes of twice the heads at even places, half a step steeper than `before`'s.
    after = alibi_slopes(2 * config.num_heads)[0::2] if config.alibi_mode == "asymmetric" else before
    self.slopes = (before, after)

  def __call__(self, q_positions, kv_positions) -> AttentionBias:
    return AttentionBias(kind="alibi", slopes=jnp.asarray(self.slopes, jnp.float32))


class Fire(nnx.Module):
  """FIRE (Li et al., 2023): bias = MLP(psi(|i - j|) / psi(max(L, i))), psi(x) = log(c x + 1), c and L learned.

  The normalized distance keeps the sign of (i - j), so that in the bidirectional encoder keys on either side of
  the query get different biases.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dtype, width = jnp.dtype(config.param_dtype), config.fire_mlp_width
    # FAT5's FIRE MLP (torch Linear(1, width) then Linear(width, heads)) keeps PyTorch's default init: uniform in
    # +-fan_in**-0.5, weights and biases alike (our second layer has no bias).
    uniform = lambda shape, fan_in: nnx.Param(
        jax.random.uniform(rngs.params(), shape, dtype, -1.0, 1.0) * jnp.asarray(fan_in ** -0.5, dtype))
    self.mlp_in = uniform((width,), 1)
    self.mlp_in_bias = uniform((width,), 1)
    self.mlp_out = uniform((width, config.num_heads), width)
    self.log_c = nnx.Param(jnp.asarray(math.log(config.fire_c), dtype))
    self.threshold = nnx.Param(jnp.asarray(config.fire_L, dtype))

  def __call__(self, q_positions, kv_positions) -> AttentionBias:
    c = jnp.exp(self.log_c[...].astype(jnp.float32))
    q = q_positions.astype(jnp.float32)[:, :, None]
    relative = q - kv_positions.astype(jnp.float32)[:, None, :]  # i - j, [B, Sq, Sk]
    psi = lambda x: jnp.log(c * x + 1.0)
    normalized = jnp.sign(relative) * psi(jnp.abs(relative)) / psi(
        jnp.maximum(jnp.abs(self.threshold[...].astype(jnp.float32)), q))
    hidden = jax.nn.relu(normalized[..., None] * self.mlp_in[...] + self.mlp_in_bias[...])
    bias = hidden.astype(jnp.float32) @ self.mlp_out[...].astype(jnp.float32)  # [B, Sq, Sk, H]
    return AttentionBias(kind="full", bias=jnp.moveaxis(bias, -1, 1))


def make_position_module(config: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
  """The position module of one stack, or None when positions enter only through RoPE or not at all."""
  kind = config.position_encoding_type
  if kind == "t5":
    return RelativeBias(config, bidirectional=bidirectional, rngs=rngs)
  if kind == "alibi":
    return Alibi(config)
  if kind == "fire":
    return Fire(config, rngs=rngs)
  return None


def apply_rope(x: jax.Array, positions: jax.Array, *, fraction: float, base: float) -> jax.Array:
  """Rotary embedding on the first `fraction` of each head (rotate-half layout); x [B, S, H, D]."""
  rotary = int(x.shape[-1] * fraction) // 2 * 2
  half = rotary // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, S, 1, half]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2, rest = x[..., :half], x[..., half:rotary], x[..., rotary:]
  x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  return jnp.concatenate([rotated, rest], axis=-1)
