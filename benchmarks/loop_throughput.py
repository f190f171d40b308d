"""The real training loop's throughput against the bare step's: `main.py` runs a config for a few hundred steps in a
temporary workdir, and the rows/s it logs per window (docs/training.md) are compared with `train_step.measure` on
the same shapes in the same run.

  python -m benchmarks.loop_throughput [--steps 100] [--out DIR]        # small_fr on a GPU: several minutes
  python -m benchmarks.loop_throughput --tiny --out /tmp/loop           # tiny_fr shapes on any CPU: ~1-2 min

Same shapes on both sides: `train.batch_size` rows per micro-batch, the config's `train.grad_accum_steps`, the
encoder length and one decoder bucket, the longest (the bare step runs full rows); `--buckets` gives the loop
others, and `--config.FIELD=VALUE` overrides (e.g. --config.train.grad_accum_steps=1) go to both sides. The loop
runs the corpus, evaluation and checkpoint saves of a real run (every `--eval-every` steps), which its logged
figure leaves out. Reported: the median and spread of the logged rows/s over the windows after the first, the
median encoder fill (the share of the loop's encoder positions holding tokens; the bare step's rows are full), the
bare step's rows/s, and their ratio; written to DIR/loop_throughput.json with device, date, versions and both commands.
The loop runs first, in a subprocess whose output passes through, and the step after it in this process (both would
not fit on one GPU); the loop's half of the JSON is written before the step runs. small_fr steps 4 x 128 rows (about
0.7 s each on an H200): 100 steps, the loop's compiles, evaluations and saves, then the bare step's compile took
more than the 300 s an earlier attempt allowed: give it a call of its own.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common, train_step

# --tiny: tiny_fr at the sizes of profile_step.py --tiny, quick on 2 CPU cores.
TINY = {"config": "configs/tiny_fr.py", "steps": 60, "log_every": 10, "eval_every": 30, "bench_steps": 5,
        "overrides": {"data.encoder_length": 128, "data.decoder_length": 64, "train.batch_size": 16,
                      "train.grad_accum_steps": 1, "train.eval_steps": 2}}


def parse_override(text: str) -> tuple[str, object]:
  """`--config.train.batch_size=64` -> ("train.batch_size", 64); values as Python literals, else strings."""
  key, _, value = text.removeprefix("--config.").partition("=")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def loop_command(config_path: str, workdir: str, overrides: dict) -> list[str]:
  # Tuples as main.py's flags read them: "(128,256,512)".
  text = lambda value: f"({','.join(map(str, value))}{',' if len(value) == 1 else ''})" if isinstance(
      value, tuple) else str(value)
  return [sys.executable, "main.py", f"--config={config_path}", f"--config.workdir={workdir}",
          *(f"--config.{key}={text(value)}" for key, value in overrides.items())]


def logged_windows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [{"step": r["step"], "rows_per_s": r["rows_per_s"], "encoder_fill": r["encoder_fill"]} for r in records
          if r["split"] == "train" and "rows_per_s" in r]


def run_streamed(command: list[str]) -> list[str]:
  """Runs main.py with its output passed through as it comes (a run cut short still shows how far it got);
  returns the output's lines, or exits with main.py's status and last lines if it failed."""
  lines = []
  with subprocess.Popen(command, cwd=common.CHECKOUT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as run:
    for line in run.stdout:
      print(line, end="", flush=True)
      lines.append(line.rstrip("\n"))
  if run.returncode:
    raise SystemExit(f"main.py failed ({run.returncode}); its last lines:\n" + "\n".join(lines[-30:]))
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/small_fr.py")
  parser.add_argument("--steps", type=int, default=100, help="steps of the main.py run")
  parser.add_argument("--log-every", type=int, default=10, help="steps per logged window")
  parser.add_argument("--eval-every", type=int, default=50, help="steps between evaluations and checkpoint saves")
  parser.add_argument("--buckets", default=None, help="the loop's decoder buckets, e.g. 128,256,512 (default: the "
                                                      "longest only, the bare step's shape)")
  parser.add_argument("--bench-steps", type=int, default=10, help="timed steps of the bare step")
  parser.add_argument("--tiny", action="store_true", help="tiny_fr shapes on a CPU: checks the tool end to end")
  parser.add_argument("--out", default="benchmarks/results", help="directory of loop_throughput.json")
  args, extra = parser.parse_known_args()
  unknown = [e for e in extra if not e.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (main.py overrides are --config.FIELD=VALUE)")
  tiny = TINY if args.tiny else {}
  config_path = tiny.get("config", args.config)
  steps, log_every = tiny.get("steps", args.steps), tiny.get("log_every", args.log_every)
  eval_every = tiny.get("eval_every", args.eval_every)
  overrides = {**tiny.get("overrides", {}), **dict(parse_override(e) for e in extra)}

  module = os.path.splitext(config_path)[0].replace("/", ".")
  values = importlib.import_module(module).get_config()
  values.update_from_flattened_dict(overrides)
  buckets = (tuple(int(b) for b in args.buckets.split(",")) if args.buckets
             else (values.data.decoder_length,))
  loop_overrides = {**overrides, "data.decoder_length_buckets": buckets, "train.steps": steps,
                    "train.log_every": log_every, "train.eval_every": eval_every,
                    "train.checkpoint_every": eval_every}
  with tempfile.TemporaryDirectory(prefix="loop_throughput_") as workdir:
    command = loop_command(config_path, workdir, loop_overrides)
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    output = run_streamed(command)
    loop_s = time.perf_counter() - start
    windows = logged_windows(workdir)
  workers = [line for line in output if line.startswith("data.num_workers=")]
  steady = [w["rows_per_s"] for w in windows[1:]]
  if not steady:
    raise SystemExit(f"main.py logged {len(windows)} windows: raise --steps or lower --log-every")
  loop = {"median_rows_per_s": statistics.median(steady), "min_rows_per_s": min(steady),
          "max_rows_per_s": max(steady), "median_encoder_fill": statistics.median(w["encoder_fill"] for w in windows),
          "windows": windows, "steps": steps, "log_every": log_every,
          "eval_every": eval_every, "decoder_length_buckets": list(buckets),
          "data_workers": workers[0] if workers else None, "wall_s": loop_s,
          "command": " ".join(["python"] + command[1:])}
  results = {"config": config_path, "tiny": args.tiny, "loop": loop}
  path = os.path.join(args.out, "loop_throughput.json")
  common.write_results(path, results)  # the loop's half is kept if the bare step fails or is cut short
  print(f"loop: median {loop['median_rows_per_s']:.1f} rows/s over {len(steady)} windows; now the bare step",
        flush=True)
  bench = train_step.measure(values.model.attention_impl, values.model.kernel_backend,
                             rows=values.train.batch_size, accum=values.train.grad_accum_steps,
                             steps=tiny.get("bench_steps", args.bench_steps), values=values,
                             encoder_length=values.data.encoder_length, decoder_length=values.data.decoder_length)
  results.update(step=bench, ratio=loop["median_rows_per_s"] / bench["rows_per_s"])
  common.write_results(path, results)
  print(f"loop ({len(steady)} windows of {log_every} steps after the first): median {loop['median_rows_per_s']:.1f} "
        f"rows/s (spread {loop['min_rows_per_s']:.1f}-{loop['max_rows_per_s']:.1f}, encoder fill "
        f"{loop['median_encoder_fill']:.0%}); bare step (full rows) "
        f"{bench['rows_per_s']:.1f} rows/s ({bench['step_s']:.4f} s per {values.train.batch_size} x "
        f"{values.train.grad_accum_steps} rows); loop / step = {results['ratio']:.3f}; {loop['data_workers']}")


if __name__ == "__main__":
  main()
