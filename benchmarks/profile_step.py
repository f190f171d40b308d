"""Where one small_fr training step's device time goes: the step of `train_step.py` under `jax.profiler.trace`, its
kernels sorted into categories, per step.

  python -m benchmarks.profile_step [--out DIR] [--steps 3] [--variant flash/auto]   # small_fr, on a GPU
  python -m benchmarks.profile_step --tiny --out /tmp/profile                        # tiny_fr (one layer each), any CPU
  python -m benchmarks.profile_step --rows 8 --encoder-length 8192 [--remat block]   # long rows, a remat policy

Prints the Markdown table of categories last (ms per step and % of the step's wall time), after the 15 kernels that
take longest, with their category, and writes DIR/profile_step.json (environment, shapes, remat policy,
per-category and per-kernel times; DIR defaults to benchmarks/results). The trace goes to a temporary directory
unless --trace-dir says where.

Each kernel is sorted by, in order: its name when it is one of our kernels (Triton or Pallas attention,
cross-entropy, RMSNorm) or a collective or a matmul (cuBLAS, CUTLASS, Triton GEMM fusions, dots); the name scopes
its JAX op path goes through (`optimizer` in the trainer, `attention`, `rms_norm`, `lm_head_loss` in
`fat5_jax/ops.py`); what its name says it does (XLA names a fusion after its hero: loop_add_fusion,
input_reduce_fusion, transpose_copy_fusion); what the last JAX primitive of its path is. The op path comes from the
event itself when the trace carries one, else from the compiled program's metadata, joined on the event's HLO op or
on the kernel name (XLA names a fusion's kernel after the instruction). A matmul stays a matmul under any scope:
the lm_head matmuls of the loss are matmuls.

Host gaps are the step's wall time minus the time at least one kernel runs; on a CPU the thunks of a step run on
several threads at once, so the categories can sum to more than the step there. `idle_before_ms` charges each stretch
of idle device time to the category of the kernel that ends it: what the GPU waited for the host to launch (the
stretch between two traced steps included); `idle_before_kernel` does the same per kernel name for the ten with the
most, with the number of idle stretches per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Iterable

import jax

from benchmarks import common, train_step
from configs import small_fr
from fat5_jax import config as config_lib

IDLE_KERNELS = 10  # the kernels with the most idle device time before them, listed per kernel
CATEGORIES = ("matmuls", "attention", "rms_norm", "loss", "elementwise", "reductions", "optimizer", "copies",
              "collectives", "other")
# Our kernels by name (Triton function names, Pallas call names; cuDNN's attention too).
KERNEL_NAMES = (
    (re.compile(r"attention|flash|fmha|sdpa"), "attention"),
    (re.compile(r"cross_entropy|^_fused_kernel"), "loss"),
    (re.compile(r"rms_norm"), "rms_norm"),
)
# The Triton cross-entropy's forward-only and backward kernels share these names with RMSNorm's. The scope tells them
# apart; without one they are RMSNorm's, since the training step runs the cross-entropy's fused kernel.
RMS_NORM_OR_LOSS = re.compile(r"^_fwd_kernel|^_bwd_kernel")
COLLECTIVE = re.compile(r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all|collective")
MATMUL = re.compile(r"gemm|nvjet|cublas|cutlass|xmma|matmul|convolution|(^|[_.])dot([_.]|$)")
SCOPES = (("optimizer", "optimizer"), ("attention", "attention"), ("rms_norm", "rms_norm"),
          ("lm_head_loss", "loss"))
# What a kernel's name or its JAX primitive says it does, when it is not one of the above.
REDUCTION_WORDS = {"reduce", "reduction", "argmax", "argmin", "cumsum", "cumlogsumexp"}
COPY_WORDS = {"copy", "transpose", "concatenate", "pad", "slice", "reshape", "memcpy", "memset", "memcpyd2d",
              "memcpyh2d", "memcpyd2h", "memcpyp2p"}
OTHER_WORDS = {"gather", "scatter", "sort", "rng", "while", "conditional", "cond", "call", "custom"}


def op_paths(hlo_text: str) -> dict[str, str]:
  """The JAX op path (metadata op_name) of each instruction of an optimized HLO module's text that has one, under
  the instruction's name and under the kernel name XLA derives from it ('.' and '-' become '_')."""
  paths = {}
  for match in re.finditer(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*\bop_name="([^"]*)"', hlo_text, re.MULTILINE):
    name, path = match.groups()
    paths[name] = path
    paths.setdefault(re.sub(r"[.\-]", "_", name), path)
  return paths


def device_events(trace: dict) -> list[dict]:
  """The kernel events of a Chrome trace from `jax.profiler`: on a GPU those of its stream lines (not the derived
  "XLA Ops" or "XLA Modules" lines, which repeat them), on a CPU the innermost XLA thunks (events with an hlo_op)."""
  events = trace["traceEvents"]
  process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
  streams = {key for key, name in thread.items() if name.startswith("Stream")}
  if streams:
    return [e for e in spans if (e["pid"], e["tid"]) in streams]
  gpus = {pid for pid, name in process.items() if "GPU" in name}
  if gpus:  # the host's thunk events carry an hlo_op too: counting them would be wrong
    raise ValueError(f"no stream line on the GPU; lines: {sorted(n for k, n in thread.items() if k[0] in gpus)}")
  return _innermost([e for e in spans if "hlo_op" in e.get("args", {})])


def _innermost(events: list[dict]) -> list[dict]:
  """Events that enclose no other event of their thread (a while or conditional thunk encloses its body's)."""
  inner = []
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e["pid"], e["tid"])].append(e)
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
    enclosing, leaf = [], {}
    for e in thread_events:
      while enclosing and enclosing[-1]["ts"] + enclosing[-1]["dur"] <= e["ts"]:
        enclosing.pop()
      if enclosing:
        leaf[id(enclosing[-1])] = False
      leaf.setdefault(id(e), True)
      enclosing.append(e)
    inner += [e for e in thread_events if leaf[id(e)]]
  return inner


def op_path(event: dict, paths: dict[str, str]) -> tuple[str, str]:
  """(JAX op path, where it came from: "event", "program" or "none") of a kernel event. The kernel name is tried
  before the event's hlo_op: kernels run from a command buffer name the buffer as their hlo_op."""
  args = event.get("args", {})
  for key in ("tf_op", "name", "op_name"):
    if "/" in str(args.get(key, "")):
      return str(args[key]), "event"
  path = paths.get(event["name"]) or paths.get(str(args.get("hlo_op", "")))
  return (path, "program") if path else ("", "none")


def _words(name: str) -> set[str]:
  return set(re.split(r"[_.\-/()\s]+", name.lower()))


def _kind(words: set[str]) -> str | None:
  if words & REDUCTION_WORDS:
    return "reductions"
  if words & COPY_WORDS:
    return "copies"
  if words & OTHER_WORDS:
    return "other"
  return None


def categorize(kernel: str, path: str) -> str:
  """The category of a kernel from its name and its JAX op path ("" when unknown); see the module docstring."""
  name = kernel.lower()
  if COLLECTIVE.search(name):
    return "collectives"
  for pattern, category in KERNEL_NAMES:
    if pattern.search(name):
      return category
  primitive = path.rsplit("/", 1)[-1]
  if MATMUL.search(name) or primitive == "dot_general":
    return "matmuls"
  scopes = set(re.split(r"[/()]+", path))  # transforms wrap a scope: jvp(attention), transpose(jvp(attention))
  for scope, category in SCOPES:
    if scope in scopes:
      return category
  if RMS_NORM_OR_LOSS.search(name):
    return "rms_norm"
  name_words = _words(name)
  kind = _kind(name_words - {"fusion", "loop", "input", "wrapped"}) or _kind(_words(primitive))
  if kind:
    return kind
  return "elementwise" if name_words & {"fusion", "loop", "input", "wrapped", "convert"} or primitive else "other"


def _busy_us(events: Iterable[dict]) -> float:
  """Time (us) during which at least one of `events` runs."""
  busy, end = 0.0, float("-inf")
  for e in sorted(events, key=lambda e: e["ts"]):
    start, stop = e["ts"], e["ts"] + e["dur"]
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy


def _idle_before_us(events: list[dict], labels: list[str]) -> tuple[dict[str, float], collections.Counter]:
  """Idle device time (us) between kernels, each idle stretch charged to the label (category or kernel) of the
  kernel that ends it: what the GPU was waiting for the host to launch; and the number of stretches per label."""
  idle, stretches = collections.defaultdict(float), collections.Counter()
  ordered = sorted(zip(events, labels), key=lambda pair: pair[0]["ts"])
  end = ordered[0][0]["ts"] if ordered else 0.0  # no idle stretch before the first kernel
  for e, label in ordered:
    if e["ts"] > end:
      idle[label] += e["ts"] - end
      stretches[label] += 1
    end = max(end, e["ts"] + e["dur"])
  return idle, stretches


def kernel_name(name: str) -> str:
  """A kernel's name with XLA's numbering dropped (loop_add_fusion_3 -> loop_add_fusion)."""
  return re.sub(r"([._]\d+)+$", "", name)


def breakdown(trace: dict, paths: dict[str, str], steps: int, step_ms: float) -> dict[str, Any]:
  """Per-step device time of a trace of `steps` steps by category and by kernel (numbered names merged), the
  share of kernel time whose op path came from the event or the program, and the host gaps against `step_ms`."""
  events = device_events(trace)
  by_category = dict.fromkeys(CATEGORIES, 0.0)
  by_kernel = collections.defaultdict(lambda: {"ms": 0.0, "calls": 0})
  sources = collections.Counter()
  categories = []
  for e in events:
    path, source = op_path(e, paths)
    category = categorize(e["name"], path)
    categories.append(category)
    ms = e["dur"] / 1e3 / steps
    by_category[category] += ms
    kernel = by_kernel[(kernel_name(e["name"]), category)]
    kernel["ms"] += ms
    kernel["calls"] += 1 / steps
    sources[source] += e["dur"]
  kernels = sorted(({"kernel": name, "category": category, **times} for (name, category), times in by_kernel.items()),
                   key=lambda k: -k["ms"])
  busy_ms = _busy_us(events) / 1e3 / steps
  total = sum(sources.values()) or 1.0
  idle_by_category, _ = _idle_before_us(events, categories)
  idle_by_kernel, stretches = _idle_before_us(events, [kernel_name(e["name"]) for e in events])
  top_idle = sorted(idle_by_kernel.items(), key=lambda item: -item[1])[:IDLE_KERNELS]
  return {"step_ms": step_ms, "device_busy_ms": busy_ms, "host_gaps_ms": step_ms - busy_ms,
          "kernel_ms": sum(by_category.values()), "categories_ms": by_category, "kernels": kernels,
          "idle_before_ms": {c: us / 1e3 / steps
                             for c, us in sorted(idle_by_category.items(), key=lambda item: -item[1])},
          "idle_before_kernel": {name: {"ms": us / 1e3 / steps, "stretches": stretches[name] / steps}
                                 for name, us in top_idle},
          "op_path_source": {k: sources[k] / total for k in ("event", "program", "none")}}


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
  """The category table: ms per step and % of the step's wall time, host gaps and the step last."""
  step = result["step_ms"]
  rows = [{"category": c, "ms_per_step": ms, "pct_of_step": 100 * ms / step}
          for c, ms in result["categories_ms"].items()]
  rows.sort(key=lambda r: -r["ms_per_step"])
  rows.append({"category": "host gaps (no kernel running)", "ms_per_step": result["host_gaps_ms"],
               "pct_of_step": 100 * result["host_gaps_ms"] / step})
  rows.append({"category": "step (wall)", "ms_per_step": step, "pct_of_step": 100.0})
  return rows


def kernel_ms(fn, args: tuple, calls: int = 5) -> dict[str, float]:
  """Device time per call (ms) of each kernel that `fn(*args)` runs (numbered names merged), from a trace of
  `calls` calls after one untraced call; longest first."""
  jax.block_until_ready(fn(*args))
  trace_dir = tempfile.mkdtemp(prefix="kernel_ms_")
  with jax.profiler.trace(trace_dir):
    for _ in range(calls):
      jax.block_until_ready(fn(*args))
  by_kernel = collections.Counter()
  for e in device_events(load_trace(trace_dir)):
    by_kernel[kernel_name(e["name"])] += e["dur"] / 1e3 / calls
  return dict(by_kernel.most_common())


def load_trace(trace_dir: str) -> dict:
  """The Chrome trace `jax.profiler.trace(trace_dir)` wrote last."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}/plugins/profile")
  with gzip.open(paths[-1]) as f:
    return json.load(f)


def profile(args: argparse.Namespace) -> tuple[dict, str, list[float], list[float]]:
  """Builds the step as train_step.py does, warms it up, times `steps` steps, then traces as many; returns (trace,
  the compiled step's HLO text, unprofiled and profiled step times in ms)."""
  values = common.tiny_config() if args.tiny else small_fr.get_config()
  attention_impl, kernel_backend = args.variant.split("/")
  values.model.update(attention_impl=attention_impl, kernel_backend=kernel_backend)
  values.train.update(remat=args.remat)
  values.data.update(pack=not args.unpacked)
  _, trainer, state, batches = train_step.build(values, rows=args.rows, accum=1, encoder_length=args.encoder_length,
                                                decoder_length=args.decoder_length)
  for i in range(args.warmup):  # the first call compiles
    state, _ = trainer.train_step(state, batches[i % 2])
  jax.block_until_ready(state)
  # The executable the calls compiled, from the cache (no second compilation): its metadata maps kernels to op paths.
  hlo_text = trainer.train_step.lower(state, batches[0]).compile().as_text()

  def timed_steps(state):
    times = []
    for i in range(args.steps):
      start = time.perf_counter()
      state, _ = trainer.train_step(state, batches[i % 2])
      jax.block_until_ready(state)
      times.append((time.perf_counter() - start) * 1e3)
    return state, times

  state, plain = timed_steps(state)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
  print(f"tracing into {trace_dir}")
  with jax.profiler.trace(trace_dir):
    state, profiled = timed_steps(state)
  return load_trace(trace_dir), hlo_text, plain, profiled


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="benchmarks/results", help="directory of the results JSON")
  parser.add_argument("--trace-dir", default=None, help="where the profiler writes (default: a new temporary "
                                                         "directory)")
  parser.add_argument("--steps", type=int, default=3, help="steps timed without, then with, the profiler")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--rows", type=int, default=None, help="rows per step (default 128; 16 with --tiny); set it "
                                                               "at long lengths, e.g. --rows 8 --encoder-length 8192")
  parser.add_argument("--encoder-length", type=int, default=None, help="encoder tokens per row (default 512; 128 "
                                                                       "with --tiny)")
  parser.add_argument("--decoder-length", type=int, default=None, help="decoder tokens per row (default 512; 64 "
                                                                       "with --tiny)")
  parser.add_argument("--remat", default="none", choices=config_lib.REMAT_POLICIES, help="train.remat policy")
  parser.add_argument("--variant", default="flash/auto", help="model.attention_impl/model.kernel_backend")
  common.add_unpacked_flag(parser)
  parser.add_argument("--tiny", action="store_true", help="tiny_fr with one layer each, 16 rows of 128 + 64 "
                                                          "tokens: checks the parsing on a CPU")
  args = parser.parse_args(argv)
  # A shape not given is --tiny's or small_fr's.
  args.rows = args.rows or (16 if args.tiny else 128)
  args.encoder_length = args.encoder_length or (128 if args.tiny else 512)
  args.decoder_length = args.decoder_length or (64 if args.tiny else 512)
  return args


def main():
  args = parse_args()
  trace, hlo_text, plain, profiled = profile(args)
  events = device_events(trace)
  arg_keys = collections.Counter(key for e in events for key in e.get("args", {}))
  print(f"{len(events)} kernel events; their args' keys (events with each): {dict(arg_keys)}; three, raw:")
  for e in events[:3]:
    print(json.dumps(e)[:600])
  result = breakdown(trace, op_paths(hlo_text), args.steps, statistics.mean(profiled))
  result.update(variant=args.variant, tiny=args.tiny, rows=args.rows, encoder_length=args.encoder_length,
                decoder_length=args.decoder_length, remat=args.remat, pack=not args.unpacked, steps=args.steps,
                unprofiled_step_ms=plain, profiled_step_ms=profiled)
  common.write_results(os.path.join(args.out, "profile_step.json"), result)
  print(f"\nop path of kernel time: {result['op_path_source']}; step {statistics.mean(plain):.2f} ms unprofiled, "
        f"{result['step_ms']:.2f} ms profiled (means); kernels {result['kernel_ms']:.2f} ms, device busy "
        f"{result['device_busy_ms']:.2f} ms per step\n")
  common.print_table(result["kernels"][:15], ["kernel", "category", "ms", "calls"])
  print()
  print(f"idle device time before each category's kernels, ms per step: "
        f"{ {c: round(ms, 2) for c, ms in result['idle_before_ms'].items()} }")
  common.print_table([{"kernel": name, **idle} for name, idle in result["idle_before_kernel"].items()],
                     ["kernel", "ms", "stretches"])
  common.print_table(table_rows(result), ["category", "ms_per_step", "pct_of_step"])


if __name__ == "__main__":
  main()
