"""Cross-entropy + z-loss: XLA vs the Pallas and Triton kernels, and the chunked lm_head loss's memory.

  python -m benchmarks.cross_entropy [--backends xla pallas triton] [--sweep [fwd fwd_bwd fused]] [--skip-lm-head]

Part 1, per-token loss on given logits (16,384 tokens x vocab 32,768, bf16, z-loss 1e-4): forward (loss, lse),
forward + backward with random cotangents on both outputs, and the fused loss-and-gradient kernel (cotangent
known in advance, as in the chunked lm_head loss). Bytes: the forward reads the logits once, forward + backward
reads them twice and writes their gradient once, the fused kernel reads once from HBM and writes once.
Part 2, lm_head + loss (65,536 tokens, d_model 512, vocab 32,768: small_fr's micro-batch): value and gradients
(hidden, kernel) of the materialized XLA version vs the chunked one; extra memory = XLA's compiled temp bytes.
"xla" is the kernels' jnp reference (`pallas_kernels.cross_entropy.reference`), or the chunked loss's "xla" backend.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import common
from pallas_kernels.cross_entropy import (BlockSizes, chunked_lm_head_cross_entropy, cross_entropy,
                                          cross_entropy_and_grad, reference)

Z_LOSS = 1e-4
TILES = [(1, 2048), (1, 4096), (1, 8192), (1, 16384), (2, 4096), (4, 2048)]
FWD_SWEEP = [dict(block_tokens=t, block_vocab=v, num_warps=w) for t, v in TILES for w in (4, 8, 16)]
BWD_SWEEP = [dict(bwd_block_tokens=t, bwd_block_vocab=v, bwd_num_warps=w) for t, v in TILES for w in (4, 8, 16)]
STAGES = [dict(num_stages=s) for s in (1, 2, 3, 4)]
FUSED_PROGRAMS_SWEEP = [dict(fused_programs_per_core=p) for p in (1, 2, 3, 4, 6, 8)]
FUSED_TILE_SWEEP = [dict(fused_block_vocab=v, fused_num_warps=w) for v in (2048, 4096, 8192) for w in (4, 8, 16)]


def _inputs(num_tokens, vocab, count):
  sets = []
  for i in range(count):
    k1, k2, k3 = jax.random.split(jax.random.key(i), 3)
    logits = (3.0 * jax.random.normal(k1, (num_tokens, vocab))).astype(jnp.bfloat16)
    targets = jax.random.randint(k2, (num_tokens,), 0, vocab)
    targets = jnp.where(jax.random.uniform(k3, (num_tokens,)) < 0.05, -1, targets)  # a few ignored tokens
    cot = common.random_like(k3, (jax.ShapeDtypeStruct((num_tokens,), jnp.float32),) * 2)
    sets.append((logits, targets, *cot))
  return sets


def _functions(backend, block_sizes):
  if backend == "xla":
    loss_fn = lambda x, t: reference.cross_entropy(x, t, z_loss=Z_LOSS)
  else:
    loss_fn = lambda x, t: cross_entropy(x, t, z_loss=Z_LOSS, block_sizes=block_sizes, backend=backend,
                                         interpret=False)
  fwd = jax.jit(loss_fn)

  @jax.jit
  def fwd_bwd(x, t, dloss, dlse):
    out, vjp = jax.vjp(lambda x: loss_fn(x, t), x)
    return out, vjp((dloss, dlse))

  @jax.jit
  def fused(x, t, dloss, dlse):
    del dlse
    return cross_entropy_and_grad(x, t, dloss, z_loss=Z_LOSS, block_sizes=block_sizes, backend=backend,
                                  interpret=False)

  return {"fwd": lambda x, t, dl, dz: fwd(x, t), "fwd_bwd": fwd_bwd, "fused": fused}


def _check(fns, inputs):
  x, t, dl, dz = inputs[0]
  ref = _functions("xla", None)
  (loss, lse), (dx,) = fns["fwd_bwd"](x, t, dl, dz)
  (rloss, rlse), (rdx,) = ref["fwd_bwd"](x.astype(jnp.float32), t, dl, dz)
  floss, _, _, fdx = fns["fused"](x, t, dl, dz)
  _, (rfdx,) = ref["fwd_bwd"](x.astype(jnp.float32), t, dl, jnp.zeros_like(dz))
  rel = common.relative_error
  return {"rel_err_loss": rel(loss, rloss), "rel_err_lse": rel(lse, rlse), "rel_err_dlogits": rel(dx, rdx),
          "rel_err_fused_loss": rel(floss, rloss), "rel_err_fused_dlogits": rel(fdx, rfdx)}


def _best(trials, kind, configs, make_fn, inputs, base):
  def timed(cfg):
    try:
      t = common.time_ms(make_fn(dataclasses.replace(base, **cfg)), inputs, warmup=2, samples=5,
                         calls=10)["median_ms"]
    except Exception as e:  # pylint: disable=broad-except
      print(f"{kind} {cfg} failed: {type(e).__name__}: {str(e)[:300]}")
      t = float("inf")
    trials.append({"pass": kind, **cfg, "ms": t})
    print(f"  {kind} {cfg}: {t:.4f} ms", flush=True)
    return t
  return dataclasses.replace(base, **min(configs, key=timed))


def _sweep(backend, inputs, passes):
  """Best BlockSizes for the per-token kernels and for the fused one (separately: they share num_stages)."""
  trials = []
  base = BlockSizes()
  if "fwd" in passes:
    base = _best(trials, "fwd", FWD_SWEEP, lambda bs: _functions(backend, bs)["fwd"], inputs, base)
  if "fwd_bwd" in passes:
    base = _best(trials, "fwd_bwd", BWD_SWEEP, lambda bs: _functions(backend, bs)["fwd_bwd"], inputs, base)
    base = _best(trials, "fwd_bwd", STAGES, lambda bs: _functions(backend, bs)["fwd_bwd"], inputs, base)
  fused_best = base
  if "fused" in passes:
    for sweep in (FUSED_PROGRAMS_SWEEP, FUSED_TILE_SWEEP, FUSED_PROGRAMS_SWEEP):
      fused_best = _best(trials, "fused", sweep, lambda bs: _functions(backend, bs)["fused"], inputs, fused_best)
  return base, fused_best, trials


def part1(args, copy_tbs):
  num_tokens, vocab = args.tokens, args.vocab
  inputs = _inputs(num_tokens, vocab, count=2)
  logits_bytes = num_tokens * vocab * 2
  rows, sweeps = [], {}
  for backend in args.backends:
    block_sizes = fused_sizes = None if backend == "xla" else BlockSizes()
    if backend != "xla" and args.sweep is not None:
      block_sizes, fused_sizes, sweeps[backend] = _sweep(backend, inputs, args.sweep or ["fwd", "fwd_bwd", "fused"])
    fns = _functions(backend, block_sizes)
    fused_fns = _functions(backend, fused_sizes)
    times = {"fwd": common.time_ms(fns["fwd"], inputs), "fwd_bwd": common.time_ms(fns["fwd_bwd"], inputs),
             "fused": common.time_ms(fused_fns["fused"], inputs)}
    row = {"backend": backend, "tokens": num_tokens, "vocab": vocab,
           **{f"{k}_ms": v["median_ms"] for k, v in times.items()},
           "fwd_TBps": logits_bytes / (times["fwd"]["median_ms"] * 1e-3) / 1e12,
           "fwd_bwd_TBps": 3 * logits_bytes / (times["fwd_bwd"]["median_ms"] * 1e-3) / 1e12,
           "fused_TBps": 2 * logits_bytes / (times["fused"]["median_ms"] * 1e-3) / 1e12,
           "spread": times, **_check(fns, inputs),
           "block_sizes": dataclasses.asdict(block_sizes) if block_sizes else None,
           "fused_block_sizes": dataclasses.asdict(fused_sizes) if fused_sizes else None}
    rows.append(row)
    print({k: v for k, v in row.items() if k != "spread"}, flush=True)
  floor_ms = {"fwd": logits_bytes / (copy_tbs * 1e12) * 1e3, "fwd_bwd": 3 * logits_bytes / (copy_tbs * 1e12) * 1e3,
              "fused": 2 * logits_bytes / (copy_tbs * 1e12) * 1e3}
  return {"results": rows, "sweeps": sweeps, "floor_ms_at_copy_bandwidth": floor_ms}


def part2(args):
  num_tokens, d_model, vocab = args.lm_head_tokens, 512, 32768
  k1, k2, k3 = jax.random.split(jax.random.key(42), 3)
  hidden = jax.random.normal(k1, (num_tokens, d_model), jnp.bfloat16)
  kernel = jax.random.normal(k2, (d_model, vocab), jnp.float32) * 0.05
  targets = jax.random.randint(k3, (num_tokens,), 0, vocab)
  weights = (targets % 7 != 0).astype(jnp.float32)  # some padding

  def loss_and_grads(fn):
    def f(h, k):
      sums = fn(h, k)
      return sums.loss / num_tokens, sums
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

  variants = {"xla_materialized": lambda h, k: reference.lm_head_cross_entropy(h, k, targets, weights,
                                                                               z_loss=Z_LOSS)}
  for backend in args.backends:
    for chunk in ([8192] if backend == "xla" else args.chunks):
      variants[f"{backend}_chunk{chunk}"] = (
          lambda h, k, backend=backend, chunk=chunk: chunked_lm_head_cross_entropy(
              h, k, targets, weights, z_loss=Z_LOSS, chunk_size=chunk, backend=backend, interpret=False))
  rows, baseline = [], None
  for name, fn in variants.items():
    step = loss_and_grads(fn)
    memory = common.compiled_memory(step, hidden, kernel)
    t = common.time_ms(jax.jit(step), [(hidden, kernel)], samples=9, calls=3)
    (loss, sums), grads = jax.jit(step)(hidden, kernel)
    if baseline is None:
      baseline = (loss, grads)
    rel = common.relative_error
    rows.append({"variant": name, "ms": t["median_ms"], "spread": t, **memory,
                 "temp_GiB": memory["temp_bytes"] / 2**30, "loss": float(loss), "accuracy_count": float(sums.correct),
                 "rel_diff_loss": rel(loss, baseline[0]), "rel_diff_dhidden": rel(grads[0], baseline[1][0]),
                 "rel_diff_dkernel": rel(grads[1], baseline[1][1])})
    print({k: v for k, v in rows[-1].items() if k != "spread"}, flush=True)
  base = rows[0]
  for row in rows:
    row["temp_vs_xla"] = row["temp_bytes"] / base["temp_bytes"]
    row["time_vs_xla"] = row["ms"] / base["ms"]
  return {"tokens": num_tokens, "d_model": d_model, "vocab": vocab, "results": rows}


def plot(results, path):
  rows = results["per_token"]["results"]
  categories = ["fwd", "fwd_bwd", "fused"]
  series = {r.get("backend", r.get("impl")): [r[f"{c}_TBps"] for c in categories]  # "impl" before the rename
            for r in rows}
  common.save_bar_chart(
      path, f"Cross-entropy + z-loss, {rows[0]['tokens']} x {rows[0]['vocab']} bf16: bandwidth over the bytes each "
      "pass needs", categories, series, "TB/s", {"copy 1 GiB": results["copy_TBps"]})
  if "lm_head" in results:
    rows = results["lm_head"]["results"]
    common.save_bar_chart(
        path.replace(".png", "_lm_head.png"), "lm_head + loss, value and grads, 65,536 tokens (small_fr)",
        [r["variant"].replace("_", "\n") for r in rows],
        {"time / XLA": [r["time_vs_xla"] for r in rows], "extra memory / XLA": [r["temp_vs_xla"] for r in rows]},
        "ratio to materialized XLA", {"1/8": 0.125, "1.1": 1.1})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backends", nargs="+", default=["xla", "pallas", "triton"],
                      help="xla: the jnp reference (per chunk in the lm_head loss)")
  parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 8192, 16384])
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--lm-head-tokens", type=int, default=65536)
  parser.add_argument("--sweep", nargs="*", choices=["fwd", "fwd_bwd", "fused"],
                      help="tune these kernels' block sizes first (all three when none is named)")
  parser.add_argument("--skip-lm-head", action="store_true")
  args = common.parse_args(parser, "cross_entropy", plot)  # --plot-from also redraws the _lm_head twin
  if args is None:
    return

  copy_tbs = common.copy_bandwidth_tbs()
  print(f"copy bandwidth: {copy_tbs:.3f} TB/s")
  results = {"copy_TBps": copy_tbs, "per_token": part1(args, copy_tbs)}
  common.print_table(results["per_token"]["results"],
                     ["backend", "fwd_ms", "fwd_bwd_ms", "fused_ms", "fwd_bwd_TBps", "fused_TBps", "rel_err_dlogits"])
  common.write_results(args.out, results)
  if not args.skip_lm_head:
    results["lm_head"] = part2(args)
    common.print_table(results["lm_head"]["results"],
                       ["variant", "ms", "time_vs_xla", "temp_GiB", "temp_vs_xla", "rel_diff_dkernel"])
  common.write_results(args.out, results)
  plot(results, args.plot)


if __name__ == "__main__":
  main()
