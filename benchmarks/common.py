"""Shared benchmark helpers: the command-line options every benchmark has, timing (warm-up + median), random
inputs and cotangents, copy bandwidth, compiled memory, training throughput figures, the environment of measuring
subprocesses and the JSON line each prints, and the JSON results writer.

Timing: each sample launches `calls` back-to-back executions of a jitted function (rotating among input sets so
that no run reads what the previous one left in L2), blocks once, and divides; the reported time is the median
over samples, after warm-up calls that also absorb compilation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from configs import tiny_fr
from fat5_jax import flops
from fat5_jax.config import ModelConfig

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where main.py is: subprocesses run there
TINY_CONFIG_NAME = "configs.tiny_fr, one layer each"


def tiny_config():
  """`--tiny`'s model, which checks a tool end to end on a CPU: tiny_fr with one encoder and one decoder layer (on 2
  CPU cores a second layer nearly doubles a training step's compile time)."""
  values = tiny_fr.get_config()
  values.model.update(num_layers=1, num_decoder_layers=1)
  return values


def parse_args(parser: argparse.ArgumentParser, name: str,
               plot: Callable[[dict, str], None]) -> argparse.Namespace | None:
  """Parses the command line with the options every benchmark shares: `--out` (results JSON, default
  benchmarks/results/{name}.json), `--plot` (PNG, default benchmarks/{name}.png) and `--plot-from JSON`, which only
  redraws `--plot` from saved results with `plot(results, path)`. Returns the arguments, or None after a redraw."""
  parser.add_argument("--out", default=f"benchmarks/results/{name}.json", help="results JSON")
  parser.add_argument("--plot", default=f"benchmarks/{name}.png", help="plot PNG")
  parser.add_argument("--plot-from", metavar="JSON", help="only draw --plot from this results JSON")
  args = parser.parse_args()
  if args.plot_from is None:
    return args
  with open(args.plot_from) as f:
    plot(json.load(f), args.plot)
  return None


def add_unpacked_flag(parser: argparse.ArgumentParser) -> None:
  """`--unpacked`: rows as data.pack=False gives them (one document each): the model passes token masks, which the
  attention applies to the keys only, where packed rows' segment ids are compared per pair."""
  parser.add_argument("--unpacked", action="store_true",
                      help="rows as data.pack=False gives them: token masks, which the attention applies to the keys "
                           "only (packed rows' segment ids are compared per pair)")


def time_ms(fn: Callable, arg_sets: Sequence[tuple], *, warmup: int = 3, samples: int = 15,
            calls: int = 10) -> dict[str, float]:
  """Median and spread (milliseconds per call) of `fn(*args)` over `samples` samples of `calls` calls each."""
  for i in range(warmup):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  per_call = []
  for _ in range(samples):
    start = time.perf_counter()
    outs = [fn(*arg_sets[i % len(arg_sets)]) for i in range(calls)]
    jax.block_until_ready(outs)
    per_call.append((time.perf_counter() - start) * 1e3 / calls)
  return {"median_ms": statistics.median(per_call), "min_ms": min(per_call), "max_ms": max(per_call)}


def time_ms_chained(fn: Callable, arg_sets: Sequence[tuple], *, warmup: int = 3, samples: int = 15,
                    calls: int = 4) -> dict[str, float]:
  """`time_ms` for kernels shorter than a host dispatch (tens of microseconds): one jitted program calls `fn`
  once on each input set, back to back on the device, and the times are per call of `fn`. The sets must be
  distinct arrays, or XLA merges the identical calls."""
  chain = jax.jit(lambda sets: [fn(*args) for args in sets])
  times = time_ms(chain, [(list(arg_sets),)], warmup=warmup, samples=samples, calls=calls)
  return {k: v / len(arg_sets) for k, v in times.items()}


def relative_error(actual: jax.Array, expected: jax.Array) -> float:
  """||actual - expected|| / ||expected|| in float32 (the accuracy figure every results JSON reports)."""
  actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
  return float(jnp.linalg.norm(actual - expected) / jnp.linalg.norm(expected))


def random_like(key: jax.Array, tree: Any, scale: float = 1.0) -> Any:
  """A random normal pytree shaped like `tree` (arrays or ShapeDtypeStructs): the cotangents of fwd+bwd timing,
  so that XLA cannot exploit a constant one."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([(scale * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)
                            for k, leaf in zip(keys, leaves)])


def copy_bandwidth_tbs(nbytes: int = 1 << 30, chained: bool = False) -> float:
  """Device-memory bandwidth of an elementwise copy of `nbytes` (bytes read + written) in TB/s; `chained` times
  it like `time_ms_chained` (for copies as short as the kernels they are compared with)."""
  copy = jax.jit(lambda x: -x)  # a negation cannot be elided, unlike x * 1
  sets = [(jax.random.normal(jax.random.key(i), (nbytes // 4,), jnp.float32),) for i in range(8 if chained else 1)]
  t = (time_ms_chained if chained else time_ms)(copy, sets, samples=21)["median_ms"]
  return 2 * nbytes / (t * 1e-3) / 1e12


def compiled_memory(fn: Callable, *args) -> dict[str, int]:
  """XLA's memory analysis of `jax.jit(fn)` on these arguments: temp (scratch) bytes is the extra peak."""
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  return {"temp_bytes": int(analysis.temp_size_in_bytes), "output_bytes": int(analysis.output_size_in_bytes),
          "argument_bytes": int(analysis.argument_size_in_bytes)}


def training_throughput(rows_per_s: float, model: ModelConfig, encoder_length: int, decoder_length: int,
                        peak: float | None) -> dict[str, float | None]:
  """Encoder tokens/s, TFLOP/s and MFU against `peak` FLOP/s (None: no MFU) of `rows_per_s` training rows of these
  lengths for `model`. Model FLOPs (`fat5_jax.flops`): what remat recomputes is not counted, so policies and
  implementations are compared on the same work."""
  tflops = rows_per_s * flops.training_flops_per_row(model, encoder_length, decoder_length) / 1e12
  return {"encoder_tokens_per_s": rows_per_s * encoder_length, "tflops_per_s": tflops,
          "mfu": tflops * 1e12 / peak if peak else None}


def json_line_of(command: Sequence[str], **kwargs) -> dict[str, Any]:
  """Runs `command` (subprocess.Popen's `kwargs`) and returns the last JSON object it printed on a line of its own,
  or {"error": its last line of stderr} when it printed none (a process killed by a CUDA fault cannot report). Its
  stderr goes on to ours as it comes (progress such as `compiled in N s` shows even if a time limit ends the run)."""
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as process:
    stdout = []
    reader = threading.Thread(target=lambda: stdout.extend(process.stdout))  # a full stdout pipe would block it
    reader.start()
    last_stderr = ""
    for line in process.stderr:
      sys.stderr.write(line)
      last_stderr = line.strip() or last_stderr
    reader.join()
  printed = [line for line in stdout if line.startswith("{")]
  if printed:
    return json.loads(printed[-1])
  return {"error": last_stderr[:500] or f"exited with {process.returncode}, printing nothing"}


def subprocess_environment() -> dict[str, str]:
  """The environment for the subprocesses that measure: this process's as it is. This process, which only starts
  them and records the device's name, then opens the device without preallocating (JAX takes 75% of a GPU's memory
  at its first use otherwise), so that it takes no memory from them: call this before JAX first touches a device."""
  environment = dict(os.environ)
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return environment


def environment() -> dict[str, str]:
  device = jax.devices()[0]
  spec = sys.modules["__main__"].__spec__  # set under `python -m benchmarks.x`, which then reads back as run
  script = f"-m {spec.name}" if spec else sys.argv[0]
  return {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
          "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "command": " ".join([os.path.basename(sys.executable), script] + sys.argv[1:]),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}  # they change what is measured, and are not in the command


def write_results(path: str, results: dict[str, Any]) -> None:
  """Write `results` with the environment (device, date, jax version, command) as indented JSON."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump({"environment": environment(), **results}, f, indent=1)
  print(f"wrote {path}")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
  """A Markdown table of `rows` (floats with 3 decimals)."""
  def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for row in rows:
    print("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")


def save_bar_chart(path: str, title: str, categories: Sequence[str], series: dict[str, Sequence[float]],
                   ylabel: str, lines: dict[str, float] | None = None) -> None:
  """Grouped bars (one group per category, one bar per series) with optional horizontal reference lines."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(categories) * max(1, len(series)) / 2, 3.6))
  width = 0.8 / max(1, len(series))
  for i, (name, values) in enumerate(series.items()):
    xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
    bars = ax.bar(xs, values, width, label=name)
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
  for j, (label, value) in enumerate((lines or {}).items()):
    ax.axhline(value, color=f"C{len(series) + j}", linestyle="--", linewidth=1, label=label)
  ax.set_xticks(range(len(categories)), categories)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")
