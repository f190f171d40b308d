"""Flash attention with T5's bucketed relative bias computed inside the kernel.

`flash_attention(q, k, v, ...)` takes q [B, Sq, H, D], k and v [B, Sk, H, D] and one optional bias:
- `rpe_table` [num_buckets, H] (Hugging Face's `relative_attention_bias`): the bias of a pair is the table entry of
  the bucket of its relative position key - query. The kernels read a per-head vector indexed by the distance
  clipped to +-max_distance (`buckets.py`); no [Sq, Sk] tensor exists, forward or backward.
- `alibi_slopes` [H] (symmetric, -slope*|d|) or [2, H] (slopes for keys before / after the query).
- `bias` [B or 1, H or 1, Sq, Sk], any additive bias (FIRE...), with its gradient (this one is quadratic).

Masks: `causal` (key index <= query index, on raw indices: with per-segment positions this equals causality by position
inside each segment) and `q_segment_ids` / `kv_segment_ids` (a query sees keys of its own segment; 0 is padding), or
`kv_mask` [B, Sk] (False: a key no query sees; Hugging Face's `attention_mask`): the same as query ids of 1 and key ids
of the mask, so padding queries attend too, and the Triton kernels mask only the keys, without comparing ids per pair. A
query that sees no key returns zeros, an lse of -inf and zero gradients. Relative distances use `kv_positions -
q_positions` when given (packed rows), else key index - query index. Positions slow the kernel (about 1.4x forward, 2.3x
backward on packed rows): when they are per-segment aranges of contiguous segments, leave them out, the result is the
same.

Packed rows: the kernels skip the tiles whose q block and kv block share no segment (`config.segment_block_ranges`),
so a row packed with short documents costs about the sum of their squares, not the square of the row (the Pallas dq
kernel still visits every tile of a full bias, whose gradient it writes whole).

Two backends run the same algorithm: `pallas.py` (every case) and `triton.py` (raw Triton, faster on Hopper: no
bias or the T5 bias without positions). The caller chooses (`fat5_jax.ops`); `triton_supports` says whether
Triton can. Off a GPU both run in their interpreters. Each loads only when chosen, so importing this module loads
neither Pallas' Triton lowering nor Triton. A third, `mosaic.py` (Pallas Mosaic GPU: TMA and wgmma, Hopper only;
the cases Triton runs, with 16-bit inputs and head_dim 64 or 128), is chosen by name (the model's `auto` takes it at
head_dim 64 and 128 on Hopper from 1,024 tokens, where it measured faster).

Sequence lengths that are not multiples of the blocks are padded here and masked in the kernel. Softmax runs in
base 2 (the logits and bias are scaled by log2(e) once), in float32, with the log-sum-exp saved for the backward.
The jnp reference is `reference.attention`.

Numerics: q.k and p.v accumulate in float32 (tf32 for float32 inputs on a GPU), the softmax is float32, and p and
ds are cast to the inputs' dtype for their matmuls. The T5 bias of every pair, near the diagonal (band tiles) or
far from it, is float32(table entry) * log2(e) in float32: within 2**-23 relative of the exact bias, whatever the
table's dtype (a 16-bit table is read exactly; tests/kernels/test_attention.py measures <= 1e-7 near and far).
The Mosaic GPU kernels start q.k's float32 accumulator at the entry divided by the scale near the diagonal, so
there the bias is rounded with the logit (float32), not apart.
Bias gradients (table, slopes) accumulate in float32 over every tile and row, per program and then across
programs, and are cast to the table's (slopes') dtype once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.attention.buckets import check_buckets, relative_position_bucket
from pallas_kernels.attention.config import HEAD_DIMS, Config, kernel_inputs, key_mask_ids, validate
from pallas_kernels.attention.tuning import BlockSizes, default_block_sizes

BACKENDS = (*common.BACKENDS, "mosaic")

__all__ = ["HEAD_DIMS", "BlockSizes", "default_block_sizes", "flash_attention", "relative_position_bucket",
           "triton_supports"]


def triton_supports(*, alibi_slopes=None, bias=None, q_positions=None) -> bool:
  """Whether backend="triton" runs this case: no bias or the T5 table, and no positions."""
  return alibi_slopes is None and bias is None and q_positions is None


def _backend(cfg: Config):
  """The kernel module of cfg.backend, imported on first use (each backend's import is heavy or GPU-bound)."""
  if cfg.backend == "triton":
    return common.load_triton_kernels("pallas_kernels.attention.triton", cfg.interpret)
  if cfg.backend == "mosaic":
    from pallas_kernels.attention import mosaic  # pylint: disable=import-outside-toplevel
    return mosaic
  from pallas_kernels.attention import pallas  # pylint: disable=import-outside-toplevel
  return pallas


def _forward(cfg, q, k, v, table, slopes, bias, q_seg, kv_seg, q_pos, kv_pos):
  t5, slopes2 = kernel_inputs(cfg, table, slopes, cfg.blocks.block_q, cfg.blocks.block_k)
  return _backend(cfg).forward(cfg, q, k, v, t5, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos)


def _backward(cfg, q, k, v, table, slopes, bias, q_seg, kv_seg, q_pos, kv_pos, out, lse2, dout, dlse2):
  t5, slopes2 = kernel_inputs(cfg, table, slopes, cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd)
  # d lse / d logits = p, so an lse cotangent only shifts delta (natural-log units on both).
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32)) - dlse2 * common.LOG2E
  dq, dk, dv, parts = _backend(cfg).backward(cfg, q, k, v, t5, slopes2, bias, q_seg, kv_seg, q_pos, kv_pos, dout,
                                             lse2, delta)
  # The bias gradients, summed from per-program parts (deterministic: no atomics).
  dtable = dslopes = dbias = None
  if cfg.bias_mode == "t5":
    dtable = jnp.sum(parts, axis=(0, 2))[:, :cfg.num_buckets].T.astype(table.dtype)
  elif cfg.bias_mode == "alibi":
    dslopes = jnp.sum(parts, axis=(0, 2)).T.astype(slopes.dtype)
  elif cfg.bias_mode == "full":
    axes = tuple(a for a, kept in ((0, cfg.bias_batched), (1, cfg.bias_headed)) if not kept)
    dbias = jnp.sum(parts, axis=axes, keepdims=True).astype(bias.dtype)
  return dq, dk, dv, dtable, dslopes, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, table, slopes, bias, q_seg, kv_seg, q_pos, kv_pos):
  """(out, lse in base 2 with +inf for rows that see no key) on block-padded inputs."""
  return tuple(_forward(cfg, q, k, v, table, slopes, bias, q_seg, kv_seg, q_pos, kv_pos))


def _attention_fwd(cfg, *args):
  out, lse2 = _forward(cfg, *args)
  return (out, lse2), (*args, out, lse2)


def _attention_bwd(cfg, residuals, cotangents):
  *args, out, lse2 = residuals
  dout, dlse2 = cotangents
  dq, dk, dv, dtable, dslopes, dbias = _backward(cfg, *args, out, lse2, dout, dlse2)
  return dq, dk, dv, dtable, dslopes, dbias, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
# Jitted, so that a model's layers share one lowering of the kernels (one MLIR function, called once per layer)
# rather than each lowering and compiling its own copy: a Mosaic GPU call carries its whole kernel module. Six
# layers' Mosaic forward + backward on the H200: lowering 22.8 -> 3.4 s, XLA compile 36.8 -> 8.8 s.
_attention = jax.jit(_attention, static_argnums=0)


def _pad_axis(x, axis, length):
  if x is None or x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def _fit_blocks(blocks: BlockSizes, q_len: int, kv_len: int, smallest: int) -> BlockSizes:
  """Shrink blocks for short sequences, never under `smallest` (16: Triton's smallest dot; 64: a wgmma's rows)."""
  fit = lambda block, length: max(smallest, min(block, common.next_power_of_2(length)))
  return dataclasses.replace(
      blocks, block_q=fit(blocks.block_q, q_len), block_k=fit(blocks.block_k, kv_len),
      block_q_bwd=fit(blocks.block_q_bwd, q_len), block_k_bwd=fit(blocks.block_k_bwd, kv_len))


def flash_attention(q, k, v, *, rpe_table=None, rpe_bidirectional: bool = True, rpe_max_distance: int = 128,
                    alibi_slopes=None, bias=None, causal: bool = False, q_segment_ids=None, kv_segment_ids=None,
                    kv_mask=None, q_positions=None, kv_positions=None, scale: float = 1.0, return_lse: bool = False,
                    block_sizes: BlockSizes | None = None, backend: str = "pallas", interpret: bool | None = None):
  """Attention over q [B, Sq, H, D], k and v [B, Sk, H, D] -> out [B, Sq, H, D] (and lse [B, H, Sq] if asked).

  See the module docstring for the bias kinds and masks, and for the numerics: the T5 bias is float32(rpe_table) *
  log2(e) rounded once in float32 in every tile (2**-23 relative), and its gradient is accumulated in float32 and
  returned in rpe_table's dtype. Differentiable in q, k, v, rpe_table, alibi_slopes and bias (and through the
  lse). backend: "pallas", "triton" (see `triton_supports`) or "mosaic" (the same cases with 16-bit inputs and
  head_dim 64 or 128; Hopper). interpret: None runs the kernels compiled on a GPU
  and in their interpreter anywhere else.
  """
  q_segment_ids, kv_segment_ids = key_mask_ids(q, k, kv_mask, q_segment_ids, kv_segment_ids)
  validate(q, k, v, rpe_table, alibi_slopes, bias, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
  if q.shape[3] not in HEAD_DIMS:
    raise ValueError(f"head_dim must be one of {HEAD_DIMS}; got {q.shape[3]}")
  if not scale > 0:  # the kernels take row maxima of q.k before scaling
    raise ValueError(f"scale must be positive; got {scale}")
  common.check_backend(backend, BACKENDS)
  if backend != "pallas" and not triton_supports(alibi_slopes=alibi_slopes, bias=bias, q_positions=q_positions):
    raise ValueError(f"backend={backend!r} takes no alibi_slopes, bias or positions; use backend='pallas'")
  interpret = common.resolve_interpret(interpret)
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError("compiled attention kernels (interpret=False) need a GPU")
  if interpret and backend == "triton" and q.dtype == jnp.bfloat16:
    raise ValueError("Triton's interpreter multiplies bfloat16 as raw 16-bit integers, which gives wrong results: "
                     "off a GPU, give backend='triton' float32 inputs or use backend='pallas'")
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  blocks = _fit_blocks(block_sizes or default_block_sizes(head_dim, interpret, q.dtype, q_len=q_len, backend=backend),
                       q_len, kv_len, smallest=64 if backend == "mosaic" else 16)
  q_block = max(blocks.block_q, blocks.block_q_bwd)
  kv_block = max(blocks.block_k, blocks.block_k_bwd)
  q_pad, kv_pad = -(-q_len // q_block) * q_block, -(-kv_len // kv_block) * kv_block

  bias_mode, extra = "none", {}
  if rpe_table is not None:
    check_buckets(rpe_table.shape[0], rpe_bidirectional, rpe_max_distance)
    bias_mode, extra = "t5", dict(num_buckets=rpe_table.shape[0], bidirectional=rpe_bidirectional,
                                  max_distance=rpe_max_distance)
  elif alibi_slopes is not None:
    bias_mode = "alibi"
    if alibi_slopes.ndim == 1:
      alibi_slopes = jnp.stack([alibi_slopes, alibi_slopes])
  elif bias is not None:
    bias_mode, extra = "full", dict(bias_batched=bias.shape[0] > 1, bias_headed=bias.shape[1] > 1)
    bias = _pad_axis(_pad_axis(bias, 2, q_pad), 3, kv_pad)

  # Padded keys must be hidden: without segment ids, a key mask of the real keys.
  if q_segment_ids is None and kv_pad != kv_len:
    kv_mask = jnp.ones((batch, kv_len), bool)
    q_segment_ids, kv_segment_ids = key_mask_ids(q, k, kv_mask, None, None)
  cfg = Config(bias_mode=bias_mode, causal=causal, scale=float(scale), has_segments=q_segment_ids is not None,
               key_mask=kv_mask is not None,
               has_positions=q_positions is not None, blocks=blocks, interpret=interpret, backend=backend,
               **extra)
  as_int = lambda x, length: None if x is None else _pad_axis(x.astype(jnp.int32), 1, length)
  out, lse2 = _attention(
      cfg, _pad_axis(q, 1, q_pad), _pad_axis(k, 1, kv_pad), _pad_axis(v, 1, kv_pad), rpe_table, alibi_slopes,
      bias, as_int(q_segment_ids, q_pad), as_int(kv_segment_ids, kv_pad), as_int(q_positions, q_pad),
      as_int(kv_positions, kv_pad))
  out = out[:, :q_len]
  if not return_lse:
    return out
  lse2 = lse2[:, :, :q_len]
  return out, jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * common.LN2)
