"""The one seam between the model / trainer and the kernels: which code runs each op is decided here, once per
model config (`model.attention_impl`, `model.kernel_backend`; under `auto`, attention's kernel once per call shape),
and every kernel call goes through here.

| kernel_backend | on a GPU | off a GPU |
|---|---|---|
| auto | Triton kernels (attention: Pallas where Triton lacks it, Mosaic GPU at head_dim 64 and 128 on Hopper) | xla |
| pallas / triton | those kernels, compiled | their interpreters: exact, slow (said once) |
| xla | the jnp references | the jnp references |

`auto` follows what measured fastest on the H100 and H200 (benchmarks/README.md): the Triton kernels for attention
and the fused lm_head loss, and for RMSNorm too, where Pallas measured slightly faster at width 512 but runs on
JAX's deprecated Pallas-Triton lowering; for attention at head_dim 64 and 128 on Hopper, from 1,024 tokens, the
Mosaic GPU kernels (`_auto_attention_backend`). Flash attention runs only with `attention_impl=flash`; `xla` and `cudnn`
materialize the bias. The kernels' jnp references are the `xla` path, so there is one definition of each op.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp

from jax.sharding import NamedSharding, PartitionSpec as P

from fat5_jax import losses
from fat5_jax.config import ModelConfig
from fat5_jax.sharding import BATCH_AXES
from pallas_kernels import common
from pallas_kernels.attention import flash_attention, reference as attention_reference, triton_supports
from pallas_kernels.attention.config import key_mask_ids
from pallas_kernels.cross_entropy import chunked_lm_head_cross_entropy
from pallas_kernels.rms_norm import (reference as rms_norm_reference, rms_norm as rms_norm_kernel,
                                     rms_norm_with_residual)

FASTEST_ON_GPU = "triton"
# Where `auto` runs the Mosaic GPU attention instead (Hopper, 16-bit inputs, the cases Triton runs). On the H200 its
# forward + backward ran 1.22-1.39x as fast as the Triton kernels at head_dim 128 and 1.12-1.20x at head_dim 64
# (1,024 to 8,192 tokens, with or without a key mask), and the small_fr step at 8,192 and 16,384 encoder tokens
# 1.11x and 1.14x as fast (benchmarks/README.md). The decoder's cross-attention (512 queries, no bias, a key mask)
# 1.06x, 1.08x and 1.19x over 1,024, 2,048 and 8,192 keys. At 512 x 512 (the 512-token step) Triton leads on rows
# without a mask (1.26 against 1.33 ms forward + backward, B=128, H=8) and packed rows are unmeasured, so fewer keys
# stay on Triton.
MOSAIC_HEAD_DIMS, MOSAIC_FROM_QUERIES, MOSAIC_FROM_KEYS = (64, 128), 512, 1024
ROWS = P(BATCH_AXES)  # split by rows (the leading dimension) over every device of the mesh


def _scoped(method):
  """Runs an op under a name scope of the op's name, which its kernels (forward and backward) carry in the compiled
  program's metadata: benchmarks/profile_step.py sorts device time by it."""
  @functools.wraps(method)
  def scoped(*args, **kwargs):
    with jax.named_scope(method.__name__):
      return method(*args, **kwargs)
  return scoped


@functools.partial(jax.tree_util.register_dataclass, data_fields=("table", "slopes", "bias"),
                   meta_fields=("kind", "bidirectional", "max_distance"))
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

  def specs(self) -> "AttentionBias":
    """Its partition specs under a batch-splitting mesh: tables and slopes replicated, a per-row bias split."""
    per_row = self.bias is not None and self.bias.shape[0] > 1
    return dataclasses.replace(self, table=P(), slopes=P(), bias=ROWS if per_row else P())

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
  when `auto` chose Triton, whose attention calls then each take `_auto_attention_backend`; None when the backend
  was asked for by name (a case it lacks is then an error).
  """
  attention_impl: str = "xla"
  backend: str = "xla"
  attention_fallback: Optional[str] = None

  @_scoped
  def attention(self, q, k, v, *, bias: Optional[AttentionBias], q_segment_ids, kv_segment_ids, q_positions,
                kv_positions, causal: bool, scale: float) -> jax.Array:
    """q [B, Sq, H, D], k and v [B, Sk, H, D] -> [B, Sq, H, D]. Integer segment ids (0 = padding) confine each
    query to keys of its own segment; a query with no visible key returns zeros. Boolean ids on both sides are
    unpacked rows' token masks: every query sees the keys marked True (padding queries too; their outputs are
    not used), which the Triton kernels apply to the keys alone, faster than comparing ids per pair. Positions
    None mean index differences."""
    rows = (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    mesh = _row_splitting_mesh()
    if mesh is None or not self._runs_kernel():
      return _constrain_rows(self._attention(*_constrain_rows(rows, mesh), bias=bias, causal=causal, scale=scale),
                             mesh)
    per_device = lambda rows, bias: self._attention(*rows, bias=bias, causal=causal, scale=scale)
    bias_specs = None if bias is None else bias.specs()
    return _per_device(per_device, mesh, in_specs=(ROWS, bias_specs), out_specs=ROWS)(rows, bias)

  def _runs_kernel(self) -> bool:
    """Whether attention runs a Pallas / Triton kernel, which XLA cannot split over devices by itself."""
    return self.attention_impl == "flash" and self.backend != "xla"

  def _attention(self, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, bias, causal, scale):
    kwargs = dict(causal=causal, scale=scale, **_masks(q_segment_ids, kv_segment_ids), q_positions=q_positions,
                  kv_positions=kv_positions, **({} if bias is None else bias.as_kwargs()))
    if self._runs_kernel():
      backend = self.backend
      if self.attention_fallback:
        backend = _auto_attention_backend(q, k, kwargs, self.attention_fallback)
      return flash_attention(q, k, v, backend=backend, **kwargs)
    if self.attention_impl == "cudnn":
      return _cudnn_attention(q, k, v, **kwargs)
    return attention_reference.attention(q, k, v, **kwargs)

  @_scoped
  def rms_norm(self, x: jax.Array, weight: jax.Array, eps: float, *, with_residual: bool = False):
    """T5 RMSNorm: no mean, no bias, variance in float32; returns x's dtype.

    with_residual: returns (x, y) for a pre-norm block, whose residual sum is built on the returned x; the kernels
    then add x's gradient from the residual stream inside the norm's backward kernel (`rms_norm_with_residual`),
    where autodiff would add it in a separate pass. The xla path returns x itself and leaves that add to autodiff.
    """
    mesh = _row_splitting_mesh()
    if self.backend == "xla":
      x = _constrain_rows(x, mesh)
      y = _constrain_rows(rms_norm_reference.rms_norm(x, weight, eps), mesh)
      return (x, y) if with_residual else y
    kernel = rms_norm_with_residual if with_residual else rms_norm_kernel
    per_device = lambda x, weight: kernel(x, weight, eps, backend=self.backend)
    out_specs = (ROWS, ROWS) if with_residual else ROWS
    return _per_device(per_device, mesh, in_specs=(ROWS, P()), out_specs=out_specs)(x, weight)

  @_scoped
  def lm_head_loss(self, hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, *,
                   z_loss: float, label_smoothing: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`losses.cross_entropy_loss` of the logits `hidden [B, T, d] @ kernel [d, V]`, same returns. The kernels
    run over chunks of tokens and never hold more than one chunk of logits, forward or backward."""
    mesh = _row_splitting_mesh()
    if self.backend == "xla":
      logits = jnp.matmul(_constrain_rows(hidden, mesh), kernel, preferred_element_type=jnp.float32)
      return losses.cross_entropy_loss(logits, targets, weights, z_loss=z_loss, label_smoothing=label_smoothing)

    def per_device(hidden, kernel, targets, weights):
      sums = chunked_lm_head_cross_entropy(
          hidden.reshape(-1, hidden.shape[-1]), kernel, targets.reshape(-1), weights.reshape(-1), z_loss=z_loss,
          label_smoothing=label_smoothing, backend=self.backend)
      sums = {"loss": sums.loss, "z_loss": sums.z_loss, "correct": sums.correct, "tokens": jnp.sum(weights)}
      return sums if mesh is None else jax.lax.psum(sums, BATCH_AXES)

    args = (hidden, kernel, targets, weights.astype(jnp.float32))
    sums = _per_device(per_device, mesh, in_specs=(ROWS, P(), ROWS, ROWS), out_specs=P())(*args)
    return sums["loss"], sums


def _row_splitting_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """The mesh being traced under (the trainer sets it) when it splits rows over several devices, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(mesh.shape.get(axis, 1) == 1 for axis in BATCH_AXES):
    return None
  return mesh


def _per_device(fn, mesh: Optional[jax.sharding.AbstractMesh], *, in_specs, out_specs):
  """`fn` run by each device of a row-splitting mesh on its own rows (shard_map), or `fn` itself off one. XLA cannot
  split a Pallas or Triton call: left to it, every device would run the kernel on the whole batch. The kernels'
  outputs carry no note of which mesh axes they vary over, hence check_vma=False; the tests compare values and
  gradients with one device."""
  if mesh is None:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _constrain_rows(tree, mesh: Optional[jax.sharding.AbstractMesh]):
  """Keeps activations split by rows where XLA partitions the op itself: under FSDP it would otherwise gather
  activations rather than weights (t5x's activation sharding constraints). A no-op off a row-splitting mesh."""
  if mesh is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, ROWS)), tree)


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


def _auto_attention_backend(q, k, kwargs: dict, fallback: str) -> str:
  """`auto`'s attention kernel for one call: Triton's where it runs the case, else `fallback`; on Hopper the Mosaic
  GPU kernels for 16-bit inputs at MOSAIC_HEAD_DIMS from MOSAIC_FROM_QUERIES queries and MOSAIC_FROM_KEYS keys."""
  if not triton_supports(alibi_slopes=kwargs.get("alibi_slopes"), bias=kwargs.get("bias"),
                         q_positions=kwargs.get("q_positions")):
    return fallback
  if (common.device_capability()[0] == 9 and q.shape[3] in MOSAIC_HEAD_DIMS and jnp.dtype(q.dtype).itemsize == 2
      and q.shape[1] >= MOSAIC_FROM_QUERIES and k.shape[1] >= MOSAIC_FROM_KEYS):
    return "mosaic"
  return "triton"


@functools.lru_cache(maxsize=None)
def _say_interpreted(backend: str) -> None:
  logging.warning("model.kernel_backend=%s off a GPU runs the kernels in %s's interpreter: exact but slow "
                  "(kernel_backend=auto or xla runs the jnp references)", backend, backend.capitalize())


def _masks(q_segment_ids, kv_segment_ids) -> dict:
  """The attention call's masks: a key mask for two token masks (`Ops.attention`), else integer segment ids."""
  if q_segment_ids is not None and q_segment_ids.dtype == jnp.bool_ and kv_segment_ids.dtype == jnp.bool_:
    return dict(kv_mask=kv_segment_ids)
  as_ids = lambda ids: None if ids is None else ids.astype(jnp.int32)
  return dict(q_segment_ids=as_ids(q_segment_ids), kv_segment_ids=as_ids(kv_segment_ids))


def _cudnn_attention(q, k, v, *, causal, scale, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                     kv_mask=None, **bias_kwargs):
  """jax.nn.dot_product_attention(implementation="cudnn") with the materialized bias (GPU, bf16 / fp16)."""
  q_segment_ids, kv_segment_ids = key_mask_ids(q, k, kv_mask, q_segment_ids, kv_segment_ids)
  bias = attention_reference.dense_bias(q_positions, kv_positions, q_len=q.shape[1], kv_len=k.shape[1],
                                        batch=q.shape[0], **bias_kwargs)
  mask = attention_reference.mask(q_segment_ids, kv_segment_ids, causal=causal)
  out = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask,
                                     scale=scale, implementation="cudnn")
  return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
