"""What a deep model's attention costs to compile: trace, lowering and XLA compile of the gradient of `--layers`
chained Mosaic GPU attention calls (T5 bias, key mask, bf16, small_fr's heads), with the kernels' lowering shared by
the layers, as `flash_attention` runs them (one jitted call, one MLIR function called once per layer), and without
(`unshared`: every layer lowers and carries its own copy of the kernels' modules).

Each configuration runs in a process of its own, so that no cache of JAX's or jaxlib's serves it. Off a GPU the
calls are only lowered for CUDA (no compile): the Mosaic calls and the size of the lowered program still show
whether the layers share the kernels.

  python -m benchmarks.attention_compile --layers 1,6 --out $OUT/attention_compile.json   # H200, ~2 min
  python -m benchmarks.attention_compile --layers 1,3 --out /tmp/attention_compile.json    # CPU, ~20 s
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from pallas_kernels import attention
from pallas_kernels.attention.config import Config

BATCH, LENGTH, HEADS, HEAD_DIM = 8, 2048, 6, 64
COLUMNS = ("layers", "lowering", "trace_s", "lower_s", "compile_s", "mosaic_calls", "stablehlo_mb")


def one_run(layers: int, shared: bool) -> dict:
  """Trace, lower (for CUDA) and, on a GPU, compile the gradient of `layers` chained attention calls."""
  blocks = attention.default_block_sizes(HEAD_DIM, False, jnp.bfloat16, capability=(9, 0), q_len=LENGTH,
                                         backend="mosaic")  # Hopper's, on any machine
  cfg = Config(bias_mode="t5", causal=False, scale=1.0, has_segments=True, key_mask=True, has_positions=False,
               blocks=blocks, interpret=False, backend="mosaic", num_buckets=32, bidirectional=True,
               max_distance=128)
  call = attention._attention if shared else attention._attention.__wrapped__  # pylint: disable=protected-access

  def loss(x, table, ids):
    for _ in range(layers):
      x = call(cfg, x, x, x, table, None, None, ids, ids, None, None)[0]
    return x.astype(jnp.float32).sum()

  x = jnp.zeros((BATCH, LENGTH, HEADS, HEAD_DIM), jnp.bfloat16)
  table, ids = jnp.zeros((32, HEADS), jnp.float32), jnp.ones((BATCH, LENGTH), jnp.int32)
  start = time.perf_counter()
  traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, table, ids)
  traced_at = time.perf_counter()
  lowered = traced.lower(lowering_platforms=("cuda",))
  lowered_at = time.perf_counter()
  compile_s = None
  if jax.default_backend() == "gpu":
    lowered.compile()
    compile_s = time.perf_counter() - lowered_at
  text = lowered.as_text()
  return {"layers": layers, "lowering": "shared" if shared else "unshared", "trace_s": traced_at - start,
          "lower_s": lowered_at - traced_at, "compile_s": compile_s, "mosaic_calls": text.count("mosaic_gpu_v2"),
          "stablehlo_mb": len(text) / 1e6}


def plot(results: dict, path: str):
  """Trace + lowering and XLA compile seconds per configuration (compile only where measured)."""
  runs = [r for r in results["results"] if "error" not in r]
  names = [f"{r['layers']} layer{'s' * (r['layers'] > 1)}, {r['lowering']}" for r in runs]
  series = {"trace + lowering (s)": [r["trace_s"] + r["lower_s"] for r in runs],
            "XLA compile (s)": [r["compile_s"] or 0.0 for r in runs]}
  common.save_bar_chart(path, "Compile time of chained Mosaic attention (forward + backward)", names, series,
                        ylabel="seconds")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", default="1,6", help="comma-separated layer counts, each run shared and unshared")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # "layers,shared|unshared": one run, printed as JSON
  args = common.parse_args(parser, "attention_compile", plot)
  if args is None:
    return
  if args.one:
    layers, lowering = args.one.split(",")
    print(json.dumps(one_run(int(layers), lowering == "shared")), flush=True)
    return
  environment = common.subprocess_environment()
  results = {"batch": BATCH, "length": LENGTH, "heads": HEADS, "head_dim": HEAD_DIM, "results": []}
  for layers in (int(n) for n in args.layers.split(",")):
    for lowering in ("unshared", "shared"):
      command = [sys.executable, "-m", "benchmarks.attention_compile", "--one", f"{layers},{lowering}"]
      run = {"layers": layers, "lowering": lowering, **common.json_line_of(command, cwd=common.CHECKOUT,
                                                                           env=environment)}
      results["results"].append(run)
      common.write_results(args.out, results)
  common.print_table(results["results"], COLUMNS)
  plot(results, args.plot)


if __name__ == "__main__":
  main()
