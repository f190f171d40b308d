"""Training throughput of small_fr on one GPU, against FAT5's own PyTorch step measured in the same run.

Each variant runs the public `fat5_jax.train.Trainer` on full 512-token encoder and decoder rows (FAT5 pads its
decoder to 512 too), 128 rows per micro-batch, bf16 parameters with Kahan-compensated AdamWScale: the small_fr
recipe. A variant is `model.attention_impl/model.kernel_backend` (xla|cudnn|flash / auto|pallas|triton|xla). Time
per optimizer step is the median over repeats after warm-up, each step waited for; throughput is rows/s, encoder
tokens/s, TFLOP/s from `fat5_jax.flops` and MFU against the chip's dense bf16 peak. `step_s_pipelined` is the mean
of as many steps dispatched back to back with one wait at the end, as the training loop runs them: the host's work
between two steps (a few ms) then overlaps the device's, where the waited median counts it; `mfu_pipelined` is the
MFU at that pace. `dispatch_s` is the median time a waited step's call takes to return to the host: the host's
share of the gap between two waited steps. `compile_s` is the step's lowering and compilation, `warmup_s` its first
three steps.

`--remat` runs each variant under each `train.remat` policy, and `--encoder-length` / `--decoder-length` change the
rows (e.g. 8 rows of 8,192 + 512 tokens). Memory of each run: `compiled_temp_gib` and `compiled_total_gib` from XLA's
memory analysis of its compiled step (scratch; and arguments + outputs + scratch, the donated state counted once),
and `peak_memory_gib`, the device's peak since the process started: give the policies from least to most memory
(full,block,attention,none) and each run's peak is its own.

`--fat5 PATH` (a checkout of catie-aq/flashT5, never committed here) measures FAT5's own PyTorch step first
(`fat5_peer.py`: its Triton kernels, bf16 autocast, AdamWScale) on the same rows, rows x accum in one step, and each of
our runs gets `vs_fat5`, its rows/s over FAT5's from this run (`vs_fat5_pipelined`: both back to back). FAT5's rows come
with an attention mask of ones; `--unpacked` gives ours the same (a key mask), where by default they are packed rows of
one segment each (segment ids, compared per pair: the small_fr data's layout).

  python -m benchmarks.train_step [--steps 10] [--variants flash/auto,cudnn/auto,xla/xla] [--remat none,block]
                                  [--fat5 PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from benchmarks import common, fat5_peer
from configs import small_fr
from fat5_jax import config as config_lib, flops, sharding
from fat5_jax.train import Trainer


def full_rows(rows: int, encoder_length: int, decoder_length: int, vocab: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  ones = lambda length: np.ones((rows, length), np.int32)
  arange = lambda length: np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
  tokens = lambda length: rng.integers(2, vocab, (rows, length), dtype=np.int32)
  return dict(encoder_input_tokens=tokens(encoder_length), encoder_segment_ids=ones(encoder_length),
              encoder_positions=arange(encoder_length), decoder_input_tokens=tokens(decoder_length),
              decoder_target_tokens=tokens(decoder_length), decoder_segment_ids=ones(decoder_length),
              decoder_positions=arange(decoder_length),
              decoder_loss_weights=np.ones((rows, decoder_length), np.float32))


def build(values: ml_collections.ConfigDict, *, rows: int, accum: int, encoder_length: int = 512,
          decoder_length: int = 512, devices=None) -> tuple[config_lib.Config, Trainer, dict, list[dict]]:
  """The step measured here, for the config `values`: (config, trainer, fresh state, two batches of full rows on the
  device), `accum` micro-batches of `rows` rows per step, on `devices` (default all) meshed as `values.train` says."""
  values.train.update(batch_size=rows, grad_accum_steps=accum)
  config = config_lib.from_config_dict(values)
  trainer = Trainer(config, sharding.make_mesh(config.train, devices))
  batches = [trainer.put_batch(full_rows(rows * accum, encoder_length, decoder_length, config.model.vocab_size, seed),
                               micro_batches=accum) for seed in range(2)]
  return config, trainer, trainer.init_state(), batches


def measure(attention_impl: str, kernel_backend: str, *, rows: int, accum: int, steps: int,
            values: ml_collections.ConfigDict | None = None, encoder_length: int = 512,
            decoder_length: int = 512, devices=None, inspect: Callable[[Any], dict] | None = None) -> dict:
  """The step's median time and throughput for `values` (default small_fr) on full rows of these lengths, on
  `devices` (default all); `inspect(compiled_step)` adds its entries to the result (scaling.py: the collectives).
  MFU is against the peak of all the devices, `peak_memory_gib` the fullest device's."""
  values = values or small_fr.get_config()
  values.model.update(attention_impl=attention_impl, kernel_backend=kernel_backend)
  config, trainer, state, batches = build(values, rows=rows, accum=accum, encoder_length=encoder_length,
                                          decoder_length=decoder_length, devices=devices)
  start = time.perf_counter()
  train_step = trainer.train_step.lower(state, batches[0]).compile()  # compiled once, for its memory analysis too
  compile_s = time.perf_counter() - start
  print(f"compiled in {compile_s:.0f} s", file=sys.stderr, flush=True)  # how far a run a time limit cut got
  analysis = train_step.memory_analysis()
  start = time.perf_counter()
  for i in range(3):  # warm up
    state, metrics = train_step(state, batches[i % 2])
  jax.block_until_ready(state)
  warmup_s = time.perf_counter() - start
  times, dispatches = [], []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batches[i % 2])
    dispatches.append(time.perf_counter() - start)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  start = time.perf_counter()  # then as the training loop runs them: dispatched back to back, one wait at the end
  for i in range(steps):
    state, metrics = train_step(state, batches[i % 2])
  jax.block_until_ready(state)
  pipelined_s = (time.perf_counter() - start) / steps
  step_s = statistics.median(times)
  rows_per_s = rows * accum / step_s
  mesh_devices = list(trainer.mesh.devices.flat)
  chip_peak = flops.peak_flops(mesh_devices[0])
  throughput = common.training_throughput(rows_per_s, config.model, encoder_length, decoder_length,
                                          chip_peak and chip_peak * len(mesh_devices))
  peak_bytes = max((device.memory_stats() or {}).get("peak_bytes_in_use", 0) for device in mesh_devices)
  compiled_total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
                    - analysis.alias_size_in_bytes)
  return {"attention_impl": attention_impl, "kernel_backend": kernel_backend, "remat": config.train.remat,
          "pack": config.data.pack,
          "rows": rows, "grad_accum_steps": accum, "encoder_length": encoder_length, "decoder_length": decoder_length,
          "step_s": step_s, "step_s_spread": [min(times), max(times)], "rows_per_s": rows_per_s,
          "dispatch_s": statistics.median(dispatches), "compile_s": compile_s, "warmup_s": warmup_s,
          "step_s_pipelined": pipelined_s, "rows_per_s_pipelined": rows * accum / pipelined_s,
          **throughput, "mfu_pipelined": throughput["mfu"] and throughput["mfu"] * step_s / pipelined_s,
          "peak_memory_gib": peak_bytes / 2 ** 30,
          "compiled_temp_gib": analysis.temp_size_in_bytes / 2 ** 30, "compiled_total_gib": compiled_total / 2 ** 30,
          "loss": float(metrics["loss"]), **(inspect(train_step) if inspect else {})}


def plot(results: dict, path: str):
  """Rows/s and peak memory of each measured variant beside FAT5's PyTorch step when the run measured it."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  measured = [r for r in results["results"] if "error" not in r]
  lengths = (measured[0].get("encoder_length", 512), measured[0].get("decoder_length", 512))
  fat5 = results.get("fat5", {}).get("rows_per_s")
  if fat5 is None and lengths == (512, 512):  # results written before --fat5 hold an earlier run's 512 + 512 figure
    fat5 = results.get("fat5_reference_rows_per_s")
  bars = ([("FAT5 (PyTorch, Triton kernels)", fat5, results.get("fat5", {}).get("peak_memory_gib"))]
          if fat5 is not None else [])
  # Results written before model.kernel_impl became model.kernel_backend name it kernel_impl.
  bars += [(f"ours: attention {r['attention_impl']}, kernels {r.get('kernel_backend', r.get('kernel_impl'))}"
            + (f", remat {r['remat']}" if r.get("remat", "none") != "none" else ""), r["rows_per_s"],
            r.get("peak_memory_gib")) for r in measured]
  names, rows, memory = zip(*bars)
  fig, ax = plt.subplots(figsize=(9, 2.8))
  drawn = ax.barh(names, rows, color=["grey"] * (len(bars) - len(measured)) + ["tab:blue"] * len(measured))
  ax.bar_label(drawn, [f"{r:.0f}" + ("" if m is None else f", {m:.1f} GiB") for r, m in zip(rows, memory)],
               padding=3)
  ax.set_xlim(right=max(rows) * 1.25)  # room for the labels
  ax.set_xlabel(f"small_fr training rows/s (peak memory): {lengths[0]} + {lengths[1]} tokens, "
                f"{results['environment']['device']}")
  ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rows", type=int, default=128)
  parser.add_argument("--accum", type=int, default=1)
  parser.add_argument("--variants", default="flash/auto",
                      help="comma-separated model.attention_impl/model.kernel_backend pairs, e.g. "
                           "flash/auto,cudnn/auto,xla/xla")
  parser.add_argument("--remat", default="none",
                      help=f"comma-separated train.remat policies ({', '.join(config_lib.REMAT_POLICIES)}), each run "
                           "with every variant; least memory first, so that each run's peak_memory_gib is its own")
  common.add_unpacked_flag(parser)
  parser.add_argument("--encoder-length", type=int, default=512)
  parser.add_argument("--decoder-length", type=int, default=512)
  parser.add_argument("--fat5", metavar="PATH", help="checkout of catie-aq/flashT5: measure its step on these rows "
                                                     "first, and each of ours against it")
  args = common.parse_args(parser, "train_step", plot)
  if args is None:
    return
  results = {"results": []}
  if args.fat5:  # before any JAX work: JAX takes most of the GPU's memory at its first use
    results["fat5"] = fat5_peer.measure(args.fat5, rows=args.rows * args.accum, encoder_length=args.encoder_length,
                                        decoder_length=args.decoder_length, steps=args.steps)
    print("FAT5:", results["fat5"], flush=True)
  fat5_rows_per_s = results.get("fat5", {}).get("rows_per_s")
  for variant in args.variants.split(","):
    attention_impl, kernel_backend = variant.split("/")
    for remat in args.remat.split(","):
      values = small_fr.get_config()
      values.train.update(remat=remat)
      values.data.update(pack=not args.unpacked)
      try:
        row = measure(attention_impl, kernel_backend, rows=args.rows, accum=args.accum, steps=args.steps,
                      values=values, encoder_length=args.encoder_length, decoder_length=args.decoder_length,
                      devices=jax.devices()[:1])  # one GPU, as FAT5's step runs
      except Exception as error:  # e.g. out of memory for a materialized baseline: record it and go on
        row = {"attention_impl": attention_impl, "kernel_backend": kernel_backend, "remat": remat,
               "error": repr(error)[:500]}
      if fat5_rows_per_s and "error" not in row:
        row["vs_fat5"] = row["rows_per_s"] / fat5_rows_per_s
        row["vs_fat5_pipelined"] = row["rows_per_s_pipelined"] / results["fat5"]["rows_per_s_pipelined"]
      results["results"].append(row)
      print(row, flush=True)
      # Written after every run, so a run cut short keeps what it measured.
      common.write_results(args.out, results)
  fat5_row = [{"attention_impl": "FAT5 (PyTorch)", **results["fat5"]}] if fat5_rows_per_s else []
  common.print_table(fat5_row + [r for r in results["results"] if "error" not in r],
                     ["attention_impl", "kernel_backend", "remat", "step_s", "rows_per_s", "tflops_per_s", "mfu",
                      "vs_fat5", "step_s_pipelined", "vs_fat5_pipelined", "peak_memory_gib", "compiled_total_gib"])
  plot({"environment": common.environment(), **results}, args.plot)


if __name__ == "__main__":
  main()
