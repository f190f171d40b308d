"""Attention benchmark: our flash kernels with the T5 bias inside them against materialized-bias and bias-free
baselines.

Methods, all measured in one run on the same random inputs (bf16, B x S x H x D):
- ours_t5:        pallas_kernels.attention.flash_attention(backend="triton") with rpe_table (bias computed in the
                  kernel): the raw Triton kernels
- ours_t5_pallas: the same with backend="pallas" (the Pallas kernels)
- ours_t5_mosaic: the same with backend="mosaic" (the Pallas Mosaic GPU kernels, Hopper only)
- ours_none:      ours (Triton) without bias
- ours_none_mosaic: ours (Mosaic GPU) without bias: against mgpu_none, what our kernel's skeleton costs apart from
                  the bias
- xla_t5:         the jnp reference (pallas_kernels.attention.reference.attention: the [1, H, S, S] bias
                  materialized from the table), under jit
- cudnn_t5:       jax.nn.dot_product_attention(implementation="cudnn") with that materialized bias
- cudnn_none:     cuDNN without bias
- pallas_none:    JAX's own Pallas attention (jax.experimental.pallas.ops.gpu.attention.mha), no bias
- mgpu_none:      JAX's own Mosaic GPU attention for Hopper (jax.experimental.pallas.ops.gpu.attention_mgpu:
                  warp-specialized, TMA, wgmma; FlashAttention-3's design), no bias: 64-row q blocks, 128-key
                  blocks, 2 stages, 64 x 64 backward blocks; Hopper only (elsewhere its row records the error).
                  Its shared memory buffers are float16 in jax 0.11.2 (bf16 inputs fail), so it runs on float16
                  copies of the inputs, made outside the timing: wgmma takes both 16-bit types at the same rate
- ours_t5_packed[_positions]: ours on rows packed with 4 segments, without / with per-segment positions (same
                  result; TFLOP/s counted as for unpacked rows; with positions only Pallas runs), only when named
                  in --methods
- ours_t5_documents: ours on rows packed with documents of 64 to 1,024 tokens (seeded, the same in every row),
                  ours_t5_one_segment: the same kernels on rows that are one segment (segment ids, nothing to
                  skip): the cost of packed rows without tile skipping. Only when named in --methods; TFLOP/s
                  counted as for unpacked rows, and `tiles_run` records the fraction of tiles the ranges keep.
- ours_t5_key_mask: ours with a key mask of ones (kv_mask, as the model passes unpacked rows): the keys alone are
                  masked, against ours_t5_one_segment's per-pair ids; ours_t5_key_mask_padded: the last tenth of
                  each row's keys hidden (TFLOP/s counted as for full rows). ours_t5_mosaic_key_mask[_padded]: the
                  same on the Mosaic GPU kernels. Only when named in --methods
- ours_none_key_mask, ours_none_mosaic_key_mask: Triton and Mosaic GPU without bias, with a key mask of ones: the
                  model's cross-attention on unpacked rows (T5 has no bias there). Only when named in --methods

`--query-len Q` gives every row Q queries over its S keys (cross-attention: a decoder's tokens over the encoder's;
not causal), counted 4*B*Q*S*H*D forward.

Forward and forward+backward (jax.vjp with a random cotangent; gradients of q, k, v and the table). Times are
`common.time_ms` medians over three input sets in rotation. TFLOP/s: forward 4*B*S^2*H*D (halved when causal),
forward+backward 3.5x that. `--memory` runs B=1, H=8, D=64 forward+backward up to S=32768 and records XLA's compiled
memory (arguments + outputs + temporaries) for ours and the materialized paths (and whether they run).

  python -m benchmarks.attention [--seq-lens 512 1024] [--head-dims 64] [--memory] [--out results.json]
  python -m benchmarks.attention --seq-lens 512 --batch 128 --heads 8 --head-dims 64 --causal no \
    --table-dtype bfloat16                       # the small_fr step's attention: bf16 table, so bf16 band tiles
  python -m benchmarks.attention --plot-from benchmarks/results/attention.json   # only redraw the PNGs
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, profile_step
from pallas_kernels.attention import BlockSizes, default_block_sizes, flash_attention, reference
from pallas_kernels.attention.config import segment_block_ranges

NUM_BUCKETS, MAX_DISTANCE = 32, 128
METHODS = ("ours_t5", "ours_t5_pallas", "ours_t5_mosaic", "ours_none", "ours_none_mosaic", "xla_t5", "cudnn_t5",
           "cudnn_none", "pallas_none", "mgpu_none")


def methods(causal, block_sizes=None):
  from jax.experimental.pallas.ops.gpu import attention as jax_pallas  # pylint: disable=import-outside-toplevel
  t5 = dict(rpe_bidirectional=not causal, rpe_max_distance=MAX_DISTANCE, causal=causal)

  def ours_t5(q, k, v, table, backend="triton", **extra):
    return flash_attention(q, k, v, rpe_table=table, block_sizes=block_sizes, backend=backend, **t5, **extra)

  def ours_none(q, k, v, table, backend="triton", **extra):
    del table
    return flash_attention(q, k, v, causal=causal, block_sizes=block_sizes, backend=backend, **extra)

  def xla_t5(q, k, v, table):
    return reference.attention(q, k, v, rpe_table=table, **t5)

  def cudnn_t5(q, k, v, table):
    bias = reference.dense_bias(None, None, q_len=q.shape[1], kv_len=k.shape[1], rpe_table=table,
                                rpe_bidirectional=not causal, rpe_max_distance=MAX_DISTANCE)
    return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), is_causal=causal,
                                        implementation="cudnn")

  def cudnn_none(q, k, v, table):
    del table
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

  def pallas_none(q, k, v, table):
    del table
    return jax_pallas.mha(q, k, v, segment_ids=None, causal=causal)

  def mgpu_none(q, k, v, table):
    del table
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=import-outside-toplevel
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
                                         block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    return attention_mgpu.attention(q, k, v, config)

  def packed(q, with_positions):
    """Four segments per row, with or without (equivalent) per-segment positions."""
    batch, seq_len = q.shape[:2]
    index = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    ids = index // (seq_len // 4) + 1
    extra = dict(q_positions=index % (seq_len // 4), kv_positions=index % (seq_len // 4)) if with_positions else {}
    return dict(segments(q, ids), **extra)

  def segments(q, ids):
    ids = jnp.broadcast_to(ids, q.shape[:2])
    return dict(q_segment_ids=ids, kv_segment_ids=ids)

  return dict(
      ours_t5=ours_t5, ours_t5_pallas=functools.partial(ours_t5, backend="pallas"),
      ours_t5_mosaic=functools.partial(ours_t5, backend="mosaic"), ours_none=ours_none,
      ours_none_mosaic=functools.partial(ours_none, backend="mosaic"), xla_t5=xla_t5,
      cudnn_t5=cudnn_t5, cudnn_none=cudnn_none, pallas_none=pallas_none, mgpu_none=mgpu_none,
      ours_t5_packed=lambda q, k, v, t: ours_t5(q, k, v, t, **packed(q, False)),
      ours_t5_packed_positions=lambda q, k, v, t: ours_t5(q, k, v, t, backend="pallas", **packed(q, True)),
      ours_t5_documents=lambda q, k, v, t: ours_t5(q, k, v, t, **segments(q, document_ids(q.shape[1]))),
      ours_t5_one_segment=lambda q, k, v, t: ours_t5(q, k, v, t, **segments(q, jnp.ones(q.shape[1], jnp.int32))),
      ours_t5_key_mask=lambda q, k, v, t: ours_t5(q, k, v, t, kv_mask=ones(k)),
      ours_t5_key_mask_padded=lambda q, k, v, t: ours_t5(q, k, v, t, kv_mask=right_padded(k.shape[:2])),
      ours_t5_mosaic_key_mask=lambda q, k, v, t: ours_t5(q, k, v, t, backend="mosaic", kv_mask=ones(k)),
      ours_t5_mosaic_key_mask_padded=lambda q, k, v, t: ours_t5(q, k, v, t, backend="mosaic",
                                                                kv_mask=right_padded(k.shape[:2])),
      ours_none_key_mask=lambda q, k, v, t: ours_none(q, k, v, t, kv_mask=ones(k)),
      ours_none_mosaic_key_mask=lambda q, k, v, t: ours_none(q, k, v, t, backend="mosaic", kv_mask=ones(k)))


def ones(k):
  """A key mask that hides nothing, for keys k [B, S, H, D]."""
  return jnp.ones(k.shape[:2], bool)


def right_padded(shape):
  """A key mask of rows whose last tenth is padding."""
  return jnp.broadcast_to(jnp.arange(shape[1]) < shape[1] - shape[1] // 10, shape)


def document_ids(seq_len, seed=0):
  """Segment ids of a row packed with documents of 64 to 1,024 tokens, the last one cut at the row's end."""
  sizes = np.random.default_rng(seed).integers(64, 1025, seq_len // 64 + 1)
  return jnp.asarray(np.repeat(np.arange(1, len(sizes) + 1), sizes)[:seq_len], jnp.int32)


def tiles_run(seq_len, blocks):
  """The fraction of the forward's tiles that packed documents keep (segment_block_ranges)."""
  ids = document_ids(seq_len)[None]
  kv_range, _ = segment_block_ranges(ids, ids, blocks.block_q, blocks.block_k)
  return float(jnp.sum(kv_range[..., 1] - kv_range[..., 0]) / ((seq_len // blocks.block_q) *
                                                                (seq_len // blocks.block_k)))


def make_inputs(key, batch, seq_len, heads, head_dim, sets=3, table_dtype=jnp.float32, q_len=None):
  q_len = q_len or seq_len
  out = []
  for key in jax.random.split(key, sets):
    kq, kk, kv, kt, kc = jax.random.split(key, 5)
    shape, q_shape = (batch, seq_len, heads, head_dim), (batch, q_len, heads, head_dim)
    out.append(dict(q=jax.random.normal(kq, q_shape, jnp.bfloat16), k=jax.random.normal(kk, shape, jnp.bfloat16),
                    v=jax.random.normal(kv, shape, jnp.bfloat16),
                    table=(0.5 * jax.random.normal(kt, (NUM_BUCKETS, heads))).astype(table_dtype),
                    ct=jax.random.normal(kc, q_shape, jnp.bfloat16)))
  return out


def fwd_bwd(fn):
  def run(q, k, v, table, ct):
    out, vjp = jax.vjp(fn, q, k, v, table)
    return out, vjp(ct)
  return run


# Methods whose kernels take only float16 inputs (see the docstring).
FLOAT16_ONLY = ("mgpu_none",)


def _args(s, mode, name):
  names = ("q", "k", "v", "table") + (("ct",) if mode == "fwd_bwd" else ())
  cast = jnp.float16 if name in FLOAT16_ONLY else jnp.bfloat16
  return tuple(s[n] if n == "table" else s[n].astype(cast) for n in names)


def is_oom(err):
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def bench_config(batch, heads, head_dim, seq_len, causal, names, block_sizes=None, table_dtype=jnp.float32,
                 kernel_times=False, q_len=None):
  q_len = q_len or seq_len
  sets = make_inputs(jax.random.PRNGKey(seq_len + head_dim + causal), batch, seq_len, heads, head_dim,
                     table_dtype=table_dtype, q_len=q_len)
  flops_fwd = 4 * batch * q_len * seq_len * heads * head_dim / (2 if causal else 1)
  rows = []
  for name, fn in methods(causal, block_sizes).items():
    if name not in names:
      continue
    row = dict(method=name, batch=batch, heads=heads, head_dim=head_dim, seq_len=seq_len, q_len=q_len,
               causal=causal, blocks=blocks_label(block_sizes))
    if name == "ours_t5_documents":
      row["tiles_run"] = tiles_run(seq_len, block_sizes or default_block_sizes(head_dim, interpret=False,
                                                                               q_len=seq_len))
    for mode, f, flops in (("fwd", fn, flops_fwd), ("fwd_bwd", fwd_bwd(fn), 3.5 * flops_fwd)):
      try:
        t = common.time_ms(jax.jit(f), [_args(s, mode, name) for s in sets])
        row[f"{mode}_ms"], row[f"{mode}_spread"] = t["median_ms"], (t["max_ms"] - t["min_ms"]) / t["median_ms"]
        row[f"{mode}_tflops"] = flops / t["median_ms"] / 1e9
        if kernel_times and mode == "fwd_bwd":
          row["kernel_ms"] = profile_step.kernel_ms(jax.jit(f), _args(sets[0], mode, name))
      except Exception as err:  # noqa: BLE001  (a baseline failing must not stop the run)
        row[f"{mode}_error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:300]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def blocks_label(blocks):
  """BlockSizes as the comma-separated form --blocks takes; "default" for the device's table."""
  return ",".join(str(v) for v in dataclasses.astuple(blocks)) if blocks else "default"


def accuracy_check():
  """ours vs the float32 reference on bf16 inputs: relative errors of out and of the four gradients."""
  s = make_inputs(jax.random.PRNGKey(7), 2, 1000, 4, 64, sets=1)[0]
  result = {}
  for backend, causal in itertools.product(("triton", "pallas"), (False, True)):
    kw = dict(rpe_bidirectional=not causal, rpe_max_distance=MAX_DISTANCE, causal=causal)
    grads = []
    for fn in (functools.partial(flash_attention, backend=backend), reference.attention):
      out, vjp = jax.vjp(lambda q, k, v, t, fn=fn: fn(q, k, v, rpe_table=t, **kw), s["q"], s["k"], s["v"],
                         s["table"])
      grads.append((out, *vjp(s["ct"])))
    errs = [common.relative_error(a, b) for a, b in zip(*grads)]
    result[f"{backend}_{'causal' if causal else 'bidirectional'}"] = dict(zip(("out", "dq", "dk", "dv", "dtable"),
                                                                              errs))
  print("accuracy (rel. L2 error vs float32 reference, bf16 inputs):", json.dumps(result), flush=True)
  return result


def memory_sweep(seq_lens):
  """B=1, H=8, D=64 forward+backward: compiled memory and whether it runs, ours vs the materialized paths."""
  rows = []
  for seq_len in seq_lens:
    s = make_inputs(jax.random.PRNGKey(seq_len), 1, seq_len, 8, 64, sets=1)[0]
    for name, fn in methods(False).items():
      if name not in ("ours_t5", "xla_t5", "cudnn_t5"):
        continue
      row = dict(method=name, seq_len=seq_len, batch=1, heads=8, head_dim=64)
      try:
        memory = common.compiled_memory(fwd_bwd(fn), *_args(s, "fwd_bwd", name))
        row["compiled_bytes"] = sum(memory.values())
        row["temp_bytes"] = memory["temp_bytes"]
        t = common.time_ms(jax.jit(fwd_bwd(fn)), [_args(s, "fwd_bwd", name)], samples=3, calls=2)
        row["fwd_bwd_ms"], row["runs"] = t["median_ms"], True
      except Exception as err:  # noqa: BLE001
        row["runs"] = False
        row["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:300]}"
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def kernels_label(row):
  """The attention kernels' ms per forward + backward call, e.g. "fwd 0.28 dq 0.51 dkv 0.55"."""
  short = lambda name: name.replace("_attention_", "").replace("_kernel", "")
  return " ".join(f"{short(k)} {ms:.3g}" for k, ms in row.get("kernel_ms", {}).items() if "attention" in k)


def ratios(rows):
  """Per configuration, ours_t5 against the baselines (TFLOP/s ratios)."""
  by_key = {}
  for r in rows:
    by_key.setdefault((r["head_dim"], r["seq_len"], r["causal"]), {}).setdefault(r["method"], r)  # first blocks
  out = []
  for (d, s, c), g in sorted(by_key.items()):
    ratio = lambda a, b, mode: (g[a][f"{mode}_tflops"] / g[b][f"{mode}_tflops"]
                                if a in g and b in g and f"{mode}_tflops" in g[a] and f"{mode}_tflops" in g[b]
                                else "-")
    out.append(dict(head_dim=d, seq_len=s, causal=c, fwd_vs_cudnn_none=ratio("ours_t5", "cudnn_none", "fwd"),
                    fwd_bwd_vs_pallas_none=ratio("ours_t5", "pallas_none", "fwd_bwd"),
                    fwd_bwd_vs_cudnn_t5=ratio("ours_t5", "cudnn_t5", "fwd_bwd"),
                    fwd_bwd_vs_mgpu_none=ratio("ours_t5", "mgpu_none", "fwd_bwd"),
                    mosaic_fwd_vs_cudnn_none=ratio("ours_t5_mosaic", "cudnn_none", "fwd")))
  return out


def plot(results, path):
  """TFLOP/s per sequence length (`path`) and, when measured, compiled memory (`path` with _memory for _tflops or
  added: benchmarks/attention_tflops.png and benchmarks/attention_memory.png as in the README)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows, memory = results["rows"], results.get("memory", [])
  device = results.get("environment", results).get("device", "")  # older results kept it at the top
  if rows:
    panels = sorted({(r["head_dim"], r["causal"]) for r in rows})  # those measured
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    for col, (d, causal) in enumerate(panels):
      for row, mode in enumerate(("fwd", "fwd_bwd")):
        ax = axes[row][col]
        for name in METHODS:
          pts = sorted((r["seq_len"], r[f"{mode}_tflops"]) for r in rows if r["method"] == name
                       and r["head_dim"] == d and r["causal"] == causal and f"{mode}_tflops" in r)
          if pts:
            ax.plot(*zip(*pts), marker="o", label=name, linewidth=2.5 if name == "ours_t5" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={d}, {'causal' if causal else 'not causal'}, {'fwd' if mode == 'fwd' else 'fwd+bwd'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Attention, B={rows[0]['batch']}, H={rows[0]['heads']}, bf16, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
  if memory:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in ("ours_t5", "xla_t5", "cudnn_t5"):
      pts = sorted((r["seq_len"], r["compiled_bytes"] / 2**30, r["runs"]) for r in memory
                   if r["method"] == name and "compiled_bytes" in r)
      if pts:
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        failed = [p for p in pts if not p[2]]
        if failed:
          ax.scatter([p[0] for p in failed], [p[1] for p in failed], marker="x", s=120, color=line.get_color(),
                     label=f"{name}: out of memory", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length (B=1, H=8, D=64)")
    ax.set_ylabel("compiled memory, fwd+bwd (GiB)")
    ax.set_title("Memory: arguments + outputs + temporaries")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    stem = path[:-4] if path.endswith(".png") else path
    memory_path = (stem[:-len("_tflops")] if stem.endswith("_tflops") else stem) + "_memory.png"
    fig.savefig(memory_path, dpi=110)
    print(f"wrote {memory_path}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
  parser.add_argument("--query-len", type=int, help="queries per row, over each --seq-lens keys (cross-attention; "
                                                    "default: as many as keys)")
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--blocks", nargs="+", default=["default"], metavar="BQ,BK,BQ_BWD,BK_BWD,W,S,W_BWD,S_BWD",
                      help="BlockSizes(block_q, block_k, block_q_bwd, block_k_bwd, warps, stages, warps_bwd, "
                           "stages_bwd) to run, comma-separated, or `default` (the device's table); several: a sweep, "
                           "each configuration measured in turn on the same inputs")
  parser.add_argument("--kernel-times", action="store_true",
                      help="also record each kernel's device time per forward + backward call, from a profiler "
                           "trace (the forward, dq and dk/dv kernels apart)")
  parser.add_argument("--memory", action="store_true", help="also run the B=1, H=8, D=64 memory sweep")
  parser.add_argument("--memory-seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
  parser.add_argument("--skip-accuracy", action="store_true")
  parser.add_argument("--table-dtype", choices=["float32", "bfloat16"], default="float32",
                      help="the T5 table's dtype: bfloat16 as in a model with bf16 parameters (small_fr), whose band "
                           "tiles the kernels then stream in bf16")
  args = common.parse_args(parser, "attention", plot)
  if args is None:
    return
  if args.query_len and args.causal != "no":
    parser.error("--query-len measures cross-attention, which is not causal: add --causal no")
  block_configs = [None if b == "default" else BlockSizes(*map(int, b.split(","))) for b in args.blocks]
  results = dict(block_sizes=args.blocks, table_dtype=args.table_dtype, rows=[])
  if not args.skip_accuracy:
    results["accuracy"] = accuracy_check()
  causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
  for head_dim in args.head_dims:
    for causal in causals:
      for seq_len, block_sizes in itertools.product(args.seq_lens, block_configs):
        results["rows"] += bench_config(args.batch, args.heads, head_dim, seq_len, causal, args.methods,
                                        block_sizes, jnp.dtype(args.table_dtype), args.kernel_times,
                                        args.query_len)
        common.write_results(args.out, results)  # keep what ran if a later configuration dies
  if args.memory:
    results["memory"] = memory_sweep(args.memory_seq_lens)
  common.write_results(args.out, results)
  plot(results, args.plot)
  if results["rows"]:
    common.print_table([dict(r, kernels=kernels_label(r)) for r in results["rows"]],
                       ["head_dim", "q_len", "seq_len", "causal", "method", "blocks", "fwd_tflops", "fwd_bwd_tflops",
                        "fwd_ms", "fwd_bwd_ms"] + (["kernels"] if args.kernel_times else []))
    common.print_table(ratios(results["rows"]), ["head_dim", "seq_len", "causal", "fwd_vs_cudnn_none",
                                                 "fwd_bwd_vs_pallas_none", "fwd_bwd_vs_cudnn_t5",
                                                 "fwd_bwd_vs_mgpu_none", "mosaic_fwd_vs_cudnn_none"])
  for r in results.get("memory", []):
    print(f"memory S={r['seq_len']} {r['method']}: runs={r['runs']} compiled={r.get('compiled_bytes', 0) / 2**30:.2f}"
          f" GiB {r.get('error', '')}")


if __name__ == "__main__":
  main()
