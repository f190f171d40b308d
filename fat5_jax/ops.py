"""The one seam between the model / trainer and the kernels: which code runs each op is decided here, once per
model config (`model.attention_impl`, `model.kernel_backend`), and every kernel call goes through here.

| kernel_backend | on a GPU | off a GPU |
|---|---|---|
| auto | Triton kernels (attention cases Triton lacks: Pallas) | the jnp references (xla) |
| pallas / triton | those kernels, compiled | their interpreters: exact, slow (said once) |
| xla | the jnp references | the jnp references |

`auto` follows what measured fastest on the H100 and H200 (benchmarks/README.md): the Triton kernels for attention
and the fused lm_head loss, and for RMSNorm too, where Pallas measured slightly faster at width 512 but runs on
JAX's deprecated Pallas-Triton lowering. Flash attention runs only with `attention_impl=flash`; `xla` and `cudnn`
materialize the bias. The kernels' jnp references are the `xla` path, so there is one definition of each op.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp

from fat5_jax import losses
from fat5_jax.config import ModelConfig
from pallas_kernels.attention import flash_attention, reference as attention_reference, triton_supports
from pallas_kernels.cross_entropy import chunked_lm_head_cross_entropy
from pallas_kernels.rms_norm import reference as rms_norm_reference, rms_norm as rms_norm_kernel

FASTEST_ON_GPU = "triton"


@dataclasses.dataclass(frozen=True)
class AttentionBias:
  """How positions enter the logits of one stack's attention (computed once per stack, shared by its layers).

  kind: "t5" (table [num_buckets, H], bucketed by key - query), "alibi" (slopes [2, H] for keys before / after the
  query) or "full" (bias [B or 1, H, Sq, Sk], e.g. FIRE).
  """
  kind: str
  table: Optional[jax.Array] = None
  bidirectional: bool = True
  max_distance: int = 128
  slopes: Optional[jax.Array] = None
  bias: Optional[jax.Array] = None

  def as_kwargs(self) -> dict:
    """The bias as the keyword arguments of flash attention and of its reference."""
    if self.kind == "t5":
      return dict(rpe_table=self.table, rpe_bidirectional=self.bidirectional, rpe_max_distance=self.max_distance)
    if self.kind == "alibi":
      return dict(alibi_slopes=self.slopes)
    return dict(bias=self.bias)


@dataclasses.dataclass(frozen=True)
class Ops:
  """The implementations chosen for one model config.

  attention: xla | cudnn | flash. backend: xla | pallas | triton, the resolved kernel backend of every op.
  attention_fallback: the backend for attention cases the Triton kernels lack (ALiBi, FIRE, explicit positions)
  when `auto` chose Triton; None when the backend was asked for by name (such a case is then an error).
  """
  attention_impl: str = "xla"
  backend: str = "xla"
  attention_fallback: Optional[str] = None

  def attention(self, q, k, v, *, bias: Optional[AttentionBias], q_segment_ids, kv_segment_ids, q_positions,
                kv_positions, causal: bool, scale: float) -> jax.Array:
    """q [B, Sq, H, D], k and v [B, Sk, H, D] -> [B, Sq, H, D]. Segment ids (0 = padding) confine each query to
    keys of its own segment; a query with no visible key returns zeros. Positions None mean index differences."""
    kwargs = dict(causal=causal, scale=scale, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions, **({} if bias is None else bias.as_kwargs()))
    if self.attention_impl == "flash" and self.backend != "xla":
      backend = self.backend
      if backend == "triton" and self.attention_fallback and not triton_supports(
          alibi_slopes=kwargs.get("alibi_slopes"), bias=kwargs.get("bias"), q_positions=q_positions):
        backend = self.attention_fallback
      return flash_attention(q, k, v, backend=backend, **kwargs)
    if self.attention_impl == "cudnn":
      return _cudnn_attention(q, k, v, **kwargs)
    return attention_reference.attention(q, k, v, **kwargs)

  def rms_norm(self, x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """T5 RMSNorm: no mean, no bias, variance in float32; returns x's dtype."""
    if self.backend == "xla":
      return rms_norm_reference.rms_norm(x, weight, eps)
    return rms_norm_kernel(x, weight, eps, backend=self.backend)

  def lm_head_loss(self, hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, *,
                   z_loss: float, label_smoothing: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`losses.cross_entropy_loss` of the logits `hidden [B, T, d] @ kernel [d, V]`, same returns. The kernels
    run over chunks of tokens and never hold more than one chunk of logits, forward or backward."""
    if self.backend == "xla":
      return losses.cross_entropy_loss(hidden @ kernel, targets, weights, z_loss=z_loss,
                                       label_smoothing=label_smoothing)
    weights = weights.astype(jnp.float32)
    sums = chunked_lm_head_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), kernel, targets.reshape(-1), weights.reshape(-1), z_loss=z_loss,
        label_smoothing=label_smoothing, backend=self.backend)
    return sums.loss, {"loss": sums.loss, "z_loss": sums.z_loss, "correct": sums.correct,
                       "tokens": jnp.sum(weights)}


# The references, whatever the config says: decoding one token at a time with a cache.
REFERENCE = Ops()


@functools.lru_cache(maxsize=None)
def ops_for(config: ModelConfig) -> Ops:
  """The implementations `config` asks for on this machine (decided once per config)."""
  on_gpu = jax.default_backend() == "gpu"
  backend = config.kernel_backend
  if backend == "auto":
    backend = FASTEST_ON_GPU if on_gpu else "xla"
  elif backend != "xla" and not on_gpu:
    _say_interpreted(backend)
  fallback = "pallas" if config.kernel_backend == "auto" and backend == "triton" else None
  return Ops(attention_impl=config.attention_impl, backend=backend, attention_fallback=fallback)


@functools.lru_cache(maxsize=None)
def _say_interpreted(backend: str) -> None:
  logging.warning("model.kernel_backend=%s off a GPU runs the kernels in %s's interpreter: exact but slow "
                  "(kernel_backend=auto or xla runs the jnp references)", backend, backend.capitalize())


def _cudnn_attention(q, k, v, *, causal, scale, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                     **bias_kwargs):
  """jax.nn.dot_product_attention(implementation="cudnn") with the materialized bias (GPU, bf16 / fp16)."""
  bias = attention_reference.dense_bias(q_positions, kv_positions, q_len=q.shape[1], kv_len=k.shape[1],
                                        batch=q.shape[0], **bias_kwargs)
  mask = attention_reference.mask(q_segment_ids, kv_segment_ids, causal=causal)
  out = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask,
                                     scale=scale, implementation="cudnn")
  return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
