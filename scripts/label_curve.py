"""Pretraining against scratch as the labels grow, on CPU: the README's fine-tuning recipe on `wiki_fr_category`,
from the quick start's workdir and from scratch, for a few label counts, heads and seeds; then a table and a plot.

  python scripts/label_curve.py run OUT_DIR --pretrained /tmp/tiny_pre [--labels 250,500 --steps 400,600
      --seeds 0,1,2 --heads classification,seq2seq --config configs/tiny_fr.py]
  python scripts/label_curve.py table OUT_DIR RESULTS_JSON [--plot PNG]

Each label count trains its own number of steps (`--steps`, in the same order), evaluating 4 times. The pretrained and
the scratch run of one (labels, head, seed) run side by side; a run whose `results.json` exists is not run again, so
an interrupted `run` continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTS = ("pretrained", "scratch")
# The README's recipe, but the steps and the number of labels.
RECIPE = ("--config.finetune.batch_size=16", "--config.finetune.input_length=128", "--config.finetune.target_length=16",
          "--config.finetune.optimizer=adamw_scale", "--config.finetune.learning_rate=1e-2")


def run_name(labels: int, head: str, start: str, seed: int) -> str:
  return f"{labels}_{head}_{start}_s{seed}"


def run(out_dir: str, pretrained: str, config: str, labels: list[int], steps: list[int], seeds: list[int],
        heads: list[str]):
  for count, count_steps in zip(labels, steps):
    for head in heads:
      for seed in seeds:
        running = []
        for start in STARTS:
          workdir = os.path.join(out_dir, run_name(count, head, start, seed))
          if os.path.exists(os.path.join(workdir, "results.json")):
            continue
          with open(f"{workdir}.log", "w") as log:  # the child keeps its own copy of the descriptor
            running.append((workdir, subprocess.Popen([
                sys.executable, "main.py", f"--config={config}", f"--config.workdir={pretrained}", "--mode=finetune",
                *RECIPE, f"--config.finetune.head={head}", f"--config.finetune.seed={seed}",
                f"--config.finetune.train_examples={count}", f"--config.finetune.steps={count_steps}",
                f"--config.finetune.eval_every={count_steps // 4}", f"--config.finetune.workdir={workdir}",
                f"--config.finetune.init_from={pretrained if start == 'pretrained' else ''}"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
        for workdir, process in running:
          if process.wait():
            sys.exit(f"{workdir} failed (exit {process.returncode}): see {workdir}.log")
          print(f"{os.path.basename(workdir)} done", flush=True)


def collect(out_dir: str) -> dict:
  """{labels: {head: {start: {seed: {"test": accuracy, "validation": accuracy, "best_step": int}}}}} of the finished
  runs, in increasing label counts."""
  runs = {}
  for name in sorted(os.listdir(out_dir)):
    path = os.path.join(out_dir, name, "results.json")
    if not os.path.isfile(path):
      continue
    count, rest = name.split("_", 1)
    head, start, seed = rest.rsplit("_", 2)
    with open(path) as f:
      results = json.load(f)
    runs.setdefault(int(count), {}).setdefault(head, {}).setdefault(start, {})[int(seed.lstrip("s"))] = {
        "test": results["test"]["accuracy"], "validation": results["validation"]["accuracy"],
        "best_step": results["best_step"], "steps": results["steps"]}
  return dict(sorted(runs.items()))


def table(out_dir: str, results_json: str, plot: str | None):
  runs = collect(out_dir)
  lines = ["| labels | head | start | seeds | test (mean) | validation (mean) | pretrained ahead on test / validation |",
           "|---|---|---|---|---|---|---|"]
  for count, by_head in runs.items():
    for head, by_start in by_head.items():
      for start in (start for start in STARTS if start in by_start):  # an interrupted run may lack one
        seeds = by_start[start]
        mean = lambda split: statistics.mean(r[split] for r in seeds.values())
        ahead = ""
        if start == "pretrained":
          paired = [s for s in seeds if s in by_start.get("scratch", {})]
          wins = lambda split: sum(seeds[s][split] > by_start["scratch"][s][split] for s in paired)
          ahead = f"{wins('test')} / {wins('validation')} of {len(paired)}"
        lines.append(f"| {count:,} | {head} | {start} | {len(seeds)} | {100 * mean('test'):.1f}% | "
                     f"{100 * mean('validation'):.1f}% | {ahead} |")
  with open(results_json, "w") as f:
    json.dump({"command": " ".join(["python", "scripts/label_curve.py", *sys.argv[1:]]),
               "date": datetime.date.today().isoformat(), "host": f"{os.cpu_count()} CPU cores, {platform.machine()}",
               "jax": importlib.metadata.version("jax"), "recipe": RECIPE, "runs": runs}, f, indent=1)
  print("\n".join(lines))
  if plot:
    _plot(runs, plot)


def _plot(runs: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  heads = sorted({head for by_head in runs.values() for head in by_head})
  figure, axes = plt.subplots(1, len(heads), figsize=(5 * len(heads), 4), squeeze=False)
  for axis, head in zip(axes[0], heads):
    for start, color, shift in zip(STARTS, ("tab:blue", "tab:gray"), (0.97, 1.03)):  # apart, so bars don't hide
      for split, style, marker in (("test", "-", "o"), ("validation", "--", "s")):
        counts = [c for c in runs if start in runs[c].get(head, {})]
        values = [[100 * r[split] for r in runs[c][head][start].values()] for c in counts]
        means = [statistics.mean(v) for v in values]
        spread = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
        axis.errorbar([c * shift for c in counts], means, yerr=spread, color=color, linestyle=style, marker=marker,
                      capsize=3, label=f"{start}, {split}")
    axis.set_xscale("log")
    axis.minorticks_off()
    axis.set_xticks(list(runs), [f"{c:,}" for c in runs])
    axis.set_xlabel("labelled training documents")
    axis.set_ylabel("accuracy (%), mean and range over seeds")
    axis.set_title(f"wiki_fr_category, {head} head")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  run_args = commands.add_parser("run")
  run_args.add_argument("out_dir")
  run_args.add_argument("--pretrained", required=True, help="the quick start's workdir")
  run_args.add_argument("--config", default="configs/tiny_fr.py")
  ints = lambda text: [int(x) for x in text.split(",")]
  run_args.add_argument("--labels", type=ints, default=[250, 500])
  run_args.add_argument("--steps", type=ints, default=[400, 600])
  run_args.add_argument("--seeds", type=ints, default=[0, 1, 2])
  run_args.add_argument("--heads", type=lambda text: text.split(","), default=["classification", "seq2seq"])
  table_args = commands.add_parser("table")
  table_args.add_argument("out_dir")
  table_args.add_argument("results_json")
  table_args.add_argument("--plot", help="a PNG: accuracy against the number of labels, one panel per head")
  args = parser.parse_args()
  if args.command == "run":
    if len(args.labels) != len(args.steps):
      parser.error(f"--labels has {len(args.labels)} counts and --steps {len(args.steps)}: give one step count each")
    os.makedirs(args.out_dir, exist_ok=True)
    run(args.out_dir, os.path.abspath(args.pretrained), args.config, args.labels, args.steps, args.seeds,
        args.heads)
  else:
    table(args.out_dir, args.results_json, args.plot)


if __name__ == "__main__":
  main()
