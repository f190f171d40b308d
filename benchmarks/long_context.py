"""Long-context training throughput of small_fr against FAT5's own PyTorch step, both measured in this run (issue
18's table): encoder rows of 1,024 to 16,384 tokens with 512 decoder tokens, the same encoder tokens per step at every
length (rows = 65,536 // length).

  python -m benchmarks.long_context [--fat5 PATH] [--lengths 1024,2048] [--remat none,block] [--steps 10]
  python -m benchmarks.long_context --tiny --out /tmp/long_context.json --plot /tmp/long_context.png  # CPU, ~30 s

Order: with `--fat5 PATH` (a checkout of catie-aq/flashT5, never committed here) FAT5's step runs first at every
length (`fat5_peer.py`), then ours, `train_step.measure` with `--variant` (default flash/auto) under each `--remat`
policy. Every run has a process of its own, so that its `peak_memory_gib` (the device's peak since its process
started) is its own and a failure (out of memory, a kernel fault) ends only that run: ours re-run this module with
`--one LENGTH`, which prints one JSON line; each run's stderr (its `compiled in N s` among it) comes through as it
goes. Recorded per run: rows/s, encoder tokens/s, TFLOP/s, MFU (waited and back to back), the host's dispatch and
the compile time, peak memory, XLA's compiled memory, FAT5's figures at that length or how it failed, and our rows/s
over FAT5's. Results are written after every run. `--tiny` runs tiny_fr with one layer each at 128 and 256 encoder
tokens (+ 64) on a CPU: a check of the tool, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from benchmarks import common, fat5_peer, train_step
from configs import small_fr

SMALL_FR = {"config": small_fr.get_config, "name": small_fr.__name__, "lengths": "1024,2048,4096,8192,16384",
            "decoder_length": 512, "tokens_per_batch": 65536, "variant": "flash/auto", "steps": 10}
TINY = {"config": common.tiny_config, "name": common.TINY_CONFIG_NAME, "lengths": "128,256", "decoder_length": 64,
        "tokens_per_batch": 1024, "variant": "xla/auto", "steps": 2}


def one_run(args: argparse.Namespace) -> dict:
  """Our step at encoder length `args.one` under remat policy `args.remat` (this module's --one), or {"error": ...}.
  On one device, as FAT5's step runs."""
  values = args.preset["config"]()
  values.train.update(remat=args.remat)
  values.data.update(pack=not args.unpacked)
  attention_impl, kernel_backend = args.variant.split("/")
  try:
    return train_step.measure(attention_impl, kernel_backend, rows=args.tokens_per_batch // args.one, accum=1,
                              steps=args.steps, values=values, encoder_length=args.one,
                              decoder_length=args.decoder_length, devices=jax.devices()[:1])
  except Exception as error:  # pylint: disable=broad-except
    return {"error": " ".join(f"{type(error).__name__}: {error}".split())[:500]}


def ours(args: argparse.Namespace, length: int, remat: str, environment: dict[str, str]) -> dict:
  """`one_run` in a process of its own, with `environment`."""
  command = [sys.executable, "-m", "benchmarks.long_context", "--one", str(length), "--remat", remat,
             "--variant", args.variant, "--steps", str(args.steps), "--tokens-per-batch", str(args.tokens_per_batch),
             "--decoder-length", str(args.decoder_length)] + (["--tiny"] if args.tiny else []) + (
                 ["--unpacked"] if args.unpacked else [])
  return common.json_line_of(command, cwd=common.CHECKOUT, env=environment)


def table_rows(results: dict) -> list[dict]:
  """Our runs with FAT5's figures at the same length beside them (or the start of its error)."""
  fat5 = {r["encoder_length"]: r for r in results.get("fat5", [])}
  rows = []
  for run in results["results"]:
    theirs = fat5.get(run["encoder_length"], {})
    rows.append({**run, "fat5_rows_per_s": theirs.get("rows_per_s", theirs.get("error", "")[:40]),
                 "fat5_mfu": theirs.get("mfu", ""), "fat5_peak_memory_gib": theirs.get("peak_memory_gib", ""),
                 "error": run.get("error", "")[:40]})
  return rows


def plot(results: dict, path: str):
  """MFU and rows/s against the encoder length: ours under each remat policy, and FAT5's step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  def value(run, key):  # failed runs and MFU without a known peak are gaps in the lines
    if run.get(key) is None:
      return float("nan")
    return 100 * run[key] if key == "mfu" else run[key]

  lines = {f"ours, remat {remat}": [r for r in results["results"] if r["remat"] == remat]
           for remat in dict.fromkeys(r["remat"] for r in results["results"])}
  if results.get("fat5"):
    lines["FAT5 (PyTorch, Triton kernels)"] = results["fat5"]
  lengths = sorted({r["encoder_length"] for r in results["results"] + results.get("fat5", [])})
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, key, label in zip(axes, ("mfu", "rows_per_s"), ("MFU (%)", "training rows/s")):
    for name, runs in lines.items():
      ax.plot([r["encoder_length"] for r in runs], [value(r, key) for r in runs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{length:,}" for length in lengths])
    ax.minorticks_off()
    ax.set_xlabel(f"encoder tokens per row (+ {results['decoder_length']} decoder)")
    ax.set_ylabel(label)
  axes[0].set_ylim(bottom=0)
  axes[1].set_yscale("log")
  axes[0].legend(fontsize=7)
  failed = [f"{r['encoder_length']} ({r['error'].split(':')[0]})" for r in results.get("fat5", []) if "error" in r]
  config = results["config"].rsplit(".", 1)[-1]
  tokens = sorted({r["rows"] * r["encoder_length"] for r in results["results"]})
  batch = f"{tokens[0]:,}" if len(tokens) == 1 else f"{tokens[0]:,} to {tokens[-1]:,}"
  fig.suptitle(f"{config} training, {batch} encoder tokens per step, one "
               f"{results['environment']['device']}" + (f"\nFAT5 failed at {', '.join(failed)}" if failed else ""),
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--fat5", metavar="PATH", help="checkout of catie-aq/flashT5: measure its step at every length "
                                                     "first")
  parser.add_argument("--lengths", help=f"comma-separated encoder lengths (default {SMALL_FR['lengths']})")
  parser.add_argument("--decoder-length", type=int, help=f"default {SMALL_FR['decoder_length']}")
  parser.add_argument("--tokens-per-batch", type=int,
                      help=f"encoder tokens per step; rows = this // length (default {SMALL_FR['tokens_per_batch']})")
  parser.add_argument("--variant", help=f"model.attention_impl/model.kernel_backend (default {SMALL_FR['variant']})")
  common.add_unpacked_flag(parser)
  parser.add_argument("--remat", default="none", help="comma-separated train.remat policies, each run at every length")
  parser.add_argument("--steps", type=int, help=f"timed steps per run (default {SMALL_FR['steps']})")
  parser.add_argument("--tiny", action="store_true",
                      help=f"tiny_fr with one layer each at lengths {TINY['lengths']} + {TINY['decoder_length']} on a "
                           "CPU: checks the tool")
  parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one run of ours: see the module docstring
  args = common.parse_args(parser, "long_context", plot)
  if args is None:
    return
  args.preset = TINY if args.tiny else SMALL_FR
  for key in ("lengths", "decoder_length", "tokens_per_batch", "variant", "steps"):
    if getattr(args, key) is None:
      setattr(args, key, args.preset[key])
  if args.one:
    print(json.dumps(one_run(args)), flush=True)
    return
  if args.tiny and args.fat5:
    parser.error("--fat5 runs FAT5's small_fr recipe; leave out --tiny")
  lengths = [int(length) for length in args.lengths.split(",")]
  if max(lengths) > args.tokens_per_batch:
    parser.error(f"--tokens-per-batch {args.tokens_per_batch} is less than one row of {max(lengths)} tokens")
  environment = common.subprocess_environment()

  results = {"config": args.preset["name"], "variant": args.variant, "tokens_per_batch":
             args.tokens_per_batch, "decoder_length": args.decoder_length, "pack": not args.unpacked,
             "results": []}
  rows = {length: args.tokens_per_batch // length for length in lengths}
  if args.fat5:
    results["fat5"] = []
    for length in lengths:
      fat5 = {"encoder_length": length, "rows": rows[length],
              **fat5_peer.measure(args.fat5, rows[length], length, args.decoder_length, args.steps)}
      results["fat5"].append(fat5)
      print("FAT5:", fat5, flush=True)
      common.write_results(args.out, results)
  fat5_rows_per_s = {r["encoder_length"]: r.get("rows_per_s") for r in results.get("fat5", [])}
  for length in lengths:
    for remat in args.remat.split(","):
      run = {"encoder_length": length, "rows": rows[length], "remat": remat, **ours(args, length, remat, environment)}
      if fat5_rows_per_s.get(length) and "error" not in run:
        run["vs_fat5"] = run["rows_per_s"] / fat5_rows_per_s[length]
      results["results"].append(run)
      print(run, flush=True)
      common.write_results(args.out, results)
  common.print_table(table_rows(results),
                     ["encoder_length", "rows", "remat", "rows_per_s", "encoder_tokens_per_s", "tflops_per_s", "mfu",
                      "step_s", "step_s_pipelined", "mfu_pipelined", "dispatch_s", "compile_s", "peak_memory_gib",
                      "compiled_total_gib", "fat5_rows_per_s", "fat5_mfu", "fat5_peak_memory_gib", "vs_fat5", "error"])
  plot({"environment": common.environment(), **results}, args.plot)


if __name__ == "__main__":
  main()
