"""Attention benchmark: our flash kernel with the T5 bias inside it against materialized-bias and bias-free baselines.

Methods, all measured in one run on the same random inputs (bf16, B x S x H x D):
- ours_t5:       pallas_kernels.flash_attention with rpe_table (bias computed in the kernel); on a GPU its default
                 impl, the raw Triton kernels (triton_attention.py)
- ours_t5_pallas: the same with impl="pallas" (the Pallas kernels)
- ours_none:     ours without bias
- xla_t5:        plain XLA with the [1, H, S, S] bias materialized from the table
- cudnn_t5:      jax.nn.dot_product_attention(implementation="cudnn") with that materialized bias
- cudnn_none:    cuDNN without bias
- pallas_none:   JAX's own Pallas attention (jax.experimental.pallas.ops.gpu.attention.mha), no bias
- ours_t5_packed[_positions]: ours on rows packed with 4 segments, without / with per-segment positions (same
                 result; TFLOP/s counted as for unpacked rows), only when named in --methods

Forward and forward+backward (jax.vjp with a random cotangent; gradients of q, k, v and the table). Times are the
median of repeats after warm-up, three input sets in rotation. TFLOP/s: forward 4*B*S^2*H*D (halved when causal),
forward+backward 3.5x that. `--memory` runs B=1, H=8, D=64 forward+backward up to S=32768 and records XLA's
compiled memory (arguments + outputs + temporaries) for ours and the materialized paths (and whether they run).

  python benchmarks/attention.py --out results.json [--seq-lens 512 1024] [--head-dims 64] [--memory]
  python benchmarks/attention.py --plot benchmarks/results/attention_*.json   # the PNGs under benchmarks/
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import relative_error  # pylint: disable=wrong-import-position
from pallas_kernels.flash_attention import (  # pylint: disable=wrong-import-position
    BlockSizes, flash_attention, relative_position_bucket)

NUM_BUCKETS, MAX_DISTANCE = 32, 128
METHODS = ("ours_t5", "ours_t5_pallas", "ours_none", "xla_t5", "cudnn_t5", "cudnn_none", "pallas_none")


def materialized_bias(table, seq_len, causal):
  relative = jnp.arange(seq_len)[None, :] - jnp.arange(seq_len)[:, None]
  buckets = relative_position_bucket(relative, not causal, NUM_BUCKETS, MAX_DISTANCE)
  return jnp.moveaxis(table[buckets], -1, 0)[None]  # [1, H, S, S]


def xla_attention(q, k, v, table, causal):
  seq_len = q.shape[1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits + materialized_bias(table, seq_len, causal).astype(jnp.float32)
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones((seq_len, seq_len), bool)), logits, -1e30)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def methods(causal, block_sizes=None):
  from jax.experimental.pallas.ops.gpu import attention as jax_pallas

  def ours_t5(q, k, v, table, **extra):
    return flash_attention(q, k, v, rpe_table=table, rpe_bidirectional=not causal, rpe_max_distance=MAX_DISTANCE,
                           causal=causal, block_sizes=block_sizes, **extra)

  def ours_none(q, k, v, table):
    return flash_attention(q, k, v, causal=causal, block_sizes=block_sizes)

  def cudnn_t5(q, k, v, table):
    bias = materialized_bias(table, q.shape[1], causal).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal, implementation="cudnn")

  def cudnn_none(q, k, v, table):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

  def pallas_none(q, k, v, table):
    return jax_pallas.mha(q, k, v, segment_ids=None, causal=causal)

  def packed(q, with_positions):
    """Four segments per row, with or without (equivalent) per-segment positions."""
    batch, seq_len = q.shape[:2]
    index = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    ids = index // (seq_len // 4) + 1
    extra = dict(q_positions=index % (seq_len // 4), kv_positions=index % (seq_len // 4)) if with_positions else {}
    return dict(q_segment_ids=ids, kv_segment_ids=ids, **extra)

  return dict(
      ours_t5=ours_t5, ours_t5_pallas=functools.partial(ours_t5, impl="pallas"), ours_none=ours_none,
      xla_t5=lambda q, k, v, t: xla_attention(q, k, v, t, causal), cudnn_t5=cudnn_t5, cudnn_none=cudnn_none,
      pallas_none=pallas_none,
      ours_t5_packed=lambda q, k, v, t: ours_t5(q, k, v, t, **packed(q, False)),
      ours_t5_packed_positions=lambda q, k, v, t: ours_t5(q, k, v, t, **packed(q, True)))


def make_inputs(key, batch, seq_len, heads, head_dim, sets=3):
  out = []
  for key in jax.random.split(key, sets):
    kq, kk, kv, kt, kc = jax.random.split(key, 5)
    shape = (batch, seq_len, heads, head_dim)
    out.append(dict(q=jax.random.normal(kq, shape, jnp.bfloat16), k=jax.random.normal(kk, shape, jnp.bfloat16),
                    v=jax.random.normal(kv, shape, jnp.bfloat16),
                    table=0.5 * jax.random.normal(kt, (NUM_BUCKETS, heads), jnp.float32),
                    ct=jax.random.normal(kc, shape, jnp.bfloat16)))
  return out


def fwd_fn(fn):
  return jax.jit(fn)


def fwd_bwd_fn(fn):
  def run(q, k, v, table, ct):
    out, vjp = jax.vjp(fn, q, k, v, table)
    return out, vjp(ct)
  return jax.jit(run)


def time_ms(call, input_sets, repeats=5, sample_ms=40.0):
  jax.block_until_ready(call(input_sets[0]))  # compile + warm-up
  start = time.perf_counter()
  jax.block_until_ready(call(input_sets[1]))
  once_ms = (time.perf_counter() - start) * 1e3
  inner = int(min(20, max(1, sample_ms // once_ms)))  # calls per sample: about sample_ms of work
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    outs = [call(input_sets[i % len(input_sets)]) for i in range(inner)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - start) * 1e3 / inner)
  return statistics.median(samples), (max(samples) - min(samples)) / statistics.median(samples)


def is_oom(err):
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "Out of memory" in text


def bench_config(batch, heads, head_dim, seq_len, causal, names, block_sizes=None):
  sets = make_inputs(jax.random.PRNGKey(seq_len + head_dim + causal), batch, seq_len, heads, head_dim)
  flops_fwd = 4 * batch * seq_len ** 2 * heads * head_dim / (2 if causal else 1)
  rows = []
  for name, fn in methods(causal, block_sizes).items():
    if name not in names:
      continue
    row = dict(method=name, batch=batch, heads=heads, head_dim=head_dim, seq_len=seq_len, causal=causal)
    for mode, wrap, flops in (("fwd", fwd_fn, flops_fwd), ("fwd_bwd", fwd_bwd_fn, 3.5 * flops_fwd)):
      f = wrap(fn)
      call = ((lambda s, f=f: f(s["q"], s["k"], s["v"], s["table"])) if mode == "fwd"
              else (lambda s, f=f: f(s["q"], s["k"], s["v"], s["table"], s["ct"])))
      try:
        ms, spread = time_ms(call, sets)
        row[f"{mode}_ms"], row[f"{mode}_spread"] = ms, spread
        row[f"{mode}_tflops"] = flops / ms / 1e9
      except Exception as err:  # noqa: BLE001  (a baseline failing must not stop the run)
        row[f"{mode}_error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:300]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def accuracy_check():
  """ours vs the float32 reference on bf16 inputs: relative errors of out and of the four gradients."""
  from pallas_kernels.flash_attention import flash_attention_reference
  s = make_inputs(jax.random.PRNGKey(7), 2, 1000, 4, 64, sets=1)[0]
  result = {}
  for impl, causal in itertools.product(("triton", "pallas"), (False, True)):
    kw = dict(rpe_bidirectional=not causal, rpe_max_distance=MAX_DISTANCE, causal=causal)
    grads = []
    for fn in (functools.partial(flash_attention, impl=impl), flash_attention_reference):
      out, vjp = jax.vjp(lambda q, k, v, t: fn(q, k, v, rpe_table=t, **kw), s["q"], s["k"], s["v"], s["table"])
      grads.append((out, *vjp(s["ct"])))
    errs = [relative_error(a, b) for a, b in zip(*grads)]
    result[f"{impl}_{'causal' if causal else 'bidirectional'}"] = dict(zip(("out", "dq", "dk", "dv", "dtable"), errs))
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
      f = fwd_bwd_fn(fn)
      try:
        compiled = f.lower(s["q"], s["k"], s["v"], s["table"], s["ct"]).compile()
        mem = compiled.memory_analysis()
        row["compiled_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                    + mem.temp_size_in_bytes)
        row["temp_bytes"] = int(mem.temp_size_in_bytes)
        ms, _ = time_ms(lambda x: compiled(x["q"], x["k"], x["v"], x["table"], x["ct"]), [s, s], repeats=3)
        row["fwd_bwd_ms"], row["runs"] = ms, True
      except Exception as err:  # noqa: BLE001
        row["runs"] = False
        row["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:300]}"
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def print_table(rows):
  by_key = {}
  for r in rows:
    by_key.setdefault((r["head_dim"], r["seq_len"], r["causal"]), {})[r["method"]] = r
  names = [n for n in METHODS if any(n in g for g in by_key.values())]
  print("\nTFLOP/s fwd / fwd+bwd (B=%d, H=%d, bf16)" % (rows[0]["batch"], rows[0]["heads"]))
  print("| D | S | causal | " + " | ".join(names) + " | ours_t5 fwd / cudnn_none | ours_t5 f+b / pallas_none | "
        "ours_t5 f+b / cudnn_t5 |")
  print("|" + "---|" * (len(names) + 6))
  fmt = lambda r, m: "%.0f" % r[m + "_tflops"] if r and m + "_tflops" in r else (r or {}).get(m + "_error", "-")[:8]
  ratio = lambda a, b, m1, m2: ("%.2f" % (a[m1 + "_tflops"] / b[m2 + "_tflops"])
                                if a and b and m1 + "_tflops" in a and m2 + "_tflops" in b else "-")
  for (d, s, c), g in sorted(by_key.items()):
    cells = [f"{fmt(g.get(n), 'fwd')} / {fmt(g.get(n), 'fwd_bwd')}" for n in names]
    print(f"| {d} | {s} | {'yes' if c else 'no'} | " + " | ".join(cells) + " | "
          + " | ".join([ratio(g.get("ours_t5"), g.get("cudnn_none"), "fwd", "fwd"),
                        ratio(g.get("ours_t5"), g.get("pallas_none"), "fwd_bwd", "fwd_bwd"),
                        ratio(g.get("ours_t5"), g.get("cudnn_t5"), "fwd_bwd", "fwd_bwd")]) + " |")


def plot(json_paths, out_dir):
  """TFLOP/s per sequence length (attention_tflops.png) and compiled memory (attention_memory.png) from results."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  results = [json.load(open(p)) for p in json_paths]
  rows = [r for res in results for r in res["rows"]]
  memory = [r for res in results for r in res.get("memory", [])]
  head_dims = sorted({r["head_dim"] for r in rows})
  panels = [(d, c) for d in head_dims for c in (False, True)]
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
  fig.suptitle(f"Attention, B={rows[0]['batch']}, H={rows[0]['heads']}, bf16, {results[0]['device']}")
  fig.tight_layout()
  fig.savefig(f"{out_dir}/attention_tflops.png", dpi=110)
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
    fig.savefig(f"{out_dir}/attention_memory.png", dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--plot", nargs="+", metavar="JSON", help="only draw the PNGs from these result files")
  parser.add_argument("--plot-dir", default="benchmarks")
  parser.add_argument("--out")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--blocks", type=int, nargs=8, default=None,
                      help="override BlockSizes(block_q, block_k, block_q_bwd, block_k_bwd, warps, stages, "
                           "warps_bwd, stages_bwd)")
  parser.add_argument("--memory", action="store_true", help="also run the B=1, H=8, D=64 memory sweep")
  parser.add_argument("--memory-seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
  parser.add_argument("--skip-accuracy", action="store_true")
  args = parser.parse_args()
  if args.plot:
    plot(args.plot, args.plot_dir)
    return
  if not args.out:
    parser.error("--out is required to run the benchmark")
  block_sizes = BlockSizes(*args.blocks) if args.blocks else None
  result = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(["python"] + sys.argv), block_sizes=args.blocks, rows=[])
  if not args.skip_accuracy:
    result["accuracy"] = accuracy_check()
  causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
  for head_dim in args.head_dims:
    for causal in causals:
      for seq_len in args.seq_lens:
        result["rows"] += bench_config(args.batch, args.heads, head_dim, seq_len, causal, args.methods,
                                       block_sizes)
        with open(args.out, "w") as f:
          json.dump(result, f, indent=1)
  if args.memory:
    result["memory"] = memory_sweep(args.memory_seq_lens)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  if result["rows"]:
    print_table(result["rows"])
  for r in result.get("memory", []):
    print(f"memory S={r['seq_len']} {r['method']}: runs={r['runs']} compiled={r.get('compiled_bytes', 0) / 2**30:.2f}"
          f" GiB {r.get('error', '')}")


if __name__ == "__main__":
  main()
