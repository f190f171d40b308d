"""RMSNorm forward and backward: XLA (the jnp reference under jit) vs the Pallas and Triton kernels.

  python -m benchmarks.rms_norm [--sweep] [--rows 65536] [--widths 512 1024] [--backends xla pallas triton]

Bandwidth counts the bytes each pass must move: forward reads x and writes y, backward reads x and dy and writes
dx (the weight and its partial gradients are negligible). Copy bandwidth is measured in the same run, on 1 GiB and
on copies that move the same bytes as each pass (one [rows, width] tensor for the forward, 1.5 for the backward),
so that launch and tail costs, which weigh more on small tensors, count alike. Passes take 30-170 us, about as
long as a host dispatch, so these timings (and the same-bytes copies) run 8 calls on 8 input sets inside one
jitted program.
--sweep times several block sizes per kernel first and reports each kernel at its best.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import common
from pallas_kernels.rms_norm import BlockSizes, reference, rms_norm

FWD_SWEEP = [dict(block_rows=r, num_warps=w) for r in (1, 2, 4, 8) for w in (2, 4, 8)]
# 8 to 32 programs per core: 1056 to 4224 on the H100's 132 SMs.
BWD_SWEEP = [dict(bwd_block_rows=r, bwd_num_warps=w, bwd_programs_per_core=p)
             for r in (1, 2) for w in (2, 4, 8) for p in (8, 16, 24, 32)]
STAGES = [dict(num_stages=s) for s in (1, 2, 3)]


def _backend_fn(backend, block_sizes=None):
  if backend == "xla":
    return reference.rms_norm
  return lambda x, w: rms_norm(x, w, block_sizes=block_sizes, backend=backend, interpret=False)


def _timers(f):
  fwd = jax.jit(f)
  bwd = jax.jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy))
  both = jax.jit(lambda x, w, dy: (lambda y, vjp: (y, vjp(dy)))(*jax.vjp(f, x, w)))
  return fwd, bwd, both


def _kernel_launches(jitted, *args):
  """Kernel custom calls in the compiled program (shows that a backward timing runs no forward kernel)."""
  return jitted.lower(*args).compile().as_text().count("custom_call_target=")


def _inputs(rows, width, count):
  sets = []
  for i in range(count):
    kx, kw, kd = jax.random.split(jax.random.key(i), 3)
    x = jax.random.normal(kx, (rows, width), jnp.bfloat16)
    w = 1.0 + 0.1 * jax.random.normal(kw, (width,), jnp.float32)
    sets.append((x, w, common.random_like(kd, x)))
  return sets


def _check(f, inputs):
  x, w, dy = inputs[0]
  y, (dx, dw) = _timers(f)[2](x, w, dy)
  ry, (rdx, rdw) = _timers(reference.rms_norm)[2](x.astype(jnp.float32), w, dy.astype(jnp.float32))
  rel = common.relative_error
  return {"rel_err_y": rel(y, ry), "rel_err_dx": rel(dx, rdx), "rel_err_dw": rel(dw, rdw)}


def _sweep(backend, inputs, base):
  """Best forward and backward BlockSizes for this kernel, and every timing."""
  trials = []
  fwd_args = [a[:2] for a in inputs]
  best_fwd = min(FWD_SWEEP, key=lambda cfg: _record(
      trials, "fwd", cfg, jax.jit(_backend_fn(backend, dataclasses.replace(base, **cfg))), fwd_args))
  best_bwd = min(BWD_SWEEP, key=lambda cfg: _record(
      trials, "bwd", cfg, _timers(_backend_fn(backend, dataclasses.replace(base, **cfg)))[1], inputs))
  base = dataclasses.replace(base, **best_fwd, **best_bwd)
  best_stages = min(STAGES, key=lambda cfg: _record(
      trials, "bwd", cfg, _timers(_backend_fn(backend, dataclasses.replace(base, **cfg)))[1], inputs))
  return dataclasses.replace(base, **best_stages), trials


def _record(trials, kind, cfg, fn, args):
  try:
    t = common.time_ms_chained(fn, args, warmup=2, samples=5)["median_ms"]
  except Exception as e:  # pylint: disable=broad-except
    print(f"{kind} {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
    t = float("inf")
  trials.append({"pass": kind, **cfg, "ms": t})
  print(f"  {kind} {cfg}: {t:.4f} ms", flush=True)
  return t


def _backend(row):
  return row.get("backend", row.get("impl"))  # results written before the rename say "impl"


def plot(results, path):
  rows = results["results"]
  categories = [f"{p} {w}" for w in sorted({r["width"] for r in rows}) for p in ("fwd", "bwd")]
  series = {}
  for backend in dict.fromkeys(_backend(r) for r in rows):
    by_width = {r["width"]: r for r in rows if _backend(r) == backend}
    series[backend] = [by_width[int(c.split()[1])][f"{c.split()[0]}_TBps"] for c in categories]
  common.save_bar_chart(path, f"RMSNorm, {rows[0]['rows']} rows bf16: achieved bandwidth", categories, series,
                        "TB/s (bytes read + written)", {"copy 1 GiB": results["copy_TBps"]})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=65536)
  parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
  parser.add_argument("--backends", nargs="+", default=["xla", "pallas", "triton"],
                      help="xla: the jnp reference under jit")
  parser.add_argument("--sweep", action="store_true")
  args = common.parse_args(parser, "rms_norm", plot)
  if args is None:
    return

  copy_tbs = common.copy_bandwidth_tbs()  # 0.7 ms a copy: no dispatch gaps to hide
  print(f"copy bandwidth: {copy_tbs:.3f} TB/s")
  rows_out, sweeps = [], {}
  for width in args.widths:
    inputs = _inputs(args.rows, width, count=8)
    tensor_bytes = args.rows * width * 2
    fwd_copy_tbs = common.copy_bandwidth_tbs(tensor_bytes, chained=True)
    bwd_copy_tbs = common.copy_bandwidth_tbs(3 * tensor_bytes // 2, chained=True)
    for backend in args.backends:
      block_sizes = None
      if backend != "xla":
        block_sizes = BlockSizes.for_width(width)
        if args.sweep:
          block_sizes, sweeps[f"{backend}_{width}"] = _sweep(backend, inputs, block_sizes)
      f = _backend_fn(backend, block_sizes)
      fwd, bwd, both = _timers(f)
      t_fwd = common.time_ms_chained(fwd, [a[:2] for a in inputs])
      t_bwd = common.time_ms_chained(bwd, inputs)
      t_both = common.time_ms_chained(both, inputs)
      fwd_tbs = 2 * tensor_bytes / (t_fwd["median_ms"] * 1e-3) / 1e12
      bwd_tbs = 3 * tensor_bytes / (t_bwd["median_ms"] * 1e-3) / 1e12
      row = {"rows": args.rows, "width": width, "backend": backend, "fwd_ms": t_fwd["median_ms"],
             "fwd_TBps": fwd_tbs, "fwd_pct_copy": 100 * fwd_tbs / copy_tbs,
             "fwd_pct_same_bytes_copy": 100 * fwd_tbs / fwd_copy_tbs, "bwd_ms": t_bwd["median_ms"],
             "bwd_TBps": bwd_tbs, "bwd_pct_copy": 100 * bwd_tbs / copy_tbs,
             "bwd_pct_same_bytes_copy": 100 * bwd_tbs / bwd_copy_tbs, "fwd_copy_TBps": fwd_copy_tbs,
             "bwd_copy_TBps": bwd_copy_tbs, "fwd_bwd_ms": t_both["median_ms"],
             "spread_fwd": t_fwd, "spread_bwd": t_bwd, "spread_fwd_bwd": t_both,
             "bwd_launches": _kernel_launches(bwd, *inputs[0]), **_check(f, inputs),
             "block_sizes": dataclasses.asdict(block_sizes) if block_sizes else None}
      rows_out.append(row)
      print({k: v for k, v in row.items() if not k.startswith("spread")}, flush=True)
  results = {"copy_TBps": copy_tbs, "results": rows_out, "sweeps": sweeps}
  common.write_results(args.out, results)
  plot(results, args.plot)
  common.print_table(rows_out, ["width", "backend", "fwd_ms", "fwd_pct_copy", "fwd_pct_same_bytes_copy", "bwd_ms",
                                "bwd_pct_copy", "bwd_pct_same_bytes_copy", "fwd_bwd_ms", "rel_err_dx"])


if __name__ == "__main__":
  main()
