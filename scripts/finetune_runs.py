"""Pretraining helps fine-tuning, on the GPU: small_fr pretrained on the embedded corpus, then fine-tuned on the
embedded tasks from those weights and from scratch with the same recipe, one table of test results.

  python scripts/finetune_runs.py run OUT_DIR [--pretrain_steps 300 --rows 32 --finetune_steps 800 --config CFG]
  python scripts/finetune_runs.py table OUT_DIR RESULTS_JSON    # the Markdown table, and the runs as JSON

The tokenizer is trained once (`--mode=inspect_data` in OUT_DIR/pretrain); the from-scratch runs start beside the
pretraining, the pretrained ones once it ends. Runs share the GPU, so their wall times are not throughput figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (task, head, target_length): the category as a label and as text, and the description as text.
FINETUNINGS = (("wiki_fr_category", "classification", 16), ("wiki_fr_category", "seq2seq", 16),
               ("wiki_fr_description", "seq2seq", 64))


def _launch(config: str, out_dir: str, name: str, args: list[str]) -> subprocess.Popen:
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # the runs share one GPU
  log = open(os.path.join(out_dir, f"{name}.log"), "w")
  return subprocess.Popen([sys.executable, "main.py", f"--config={config}", *args], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT)


def _finetunings(config: str, out_dir: str, pretrain_dir: str, init: str, steps: int, rows: int) -> dict:
  running = {}
  for task, head, target_length in FINETUNINGS:
    name = f"{task}_{head}_{init}"
    running[name] = _launch(config, out_dir, name, [
        f"--config.workdir={pretrain_dir}", "--mode=finetune", f"--config.finetune.task={task}",
        f"--config.finetune.head={head}", f"--config.finetune.workdir={os.path.join(out_dir, name)}",
        f"--config.finetune.init_from={pretrain_dir if init == 'pretrained' else ''}",
        f"--config.finetune.steps={steps}", f"--config.finetune.eval_every={steps // 4}",
        f"--config.finetune.batch_size={rows}", "--config.finetune.input_length=256",
        f"--config.finetune.target_length={target_length}", "--config.finetune.learning_rate=3e-4"])
  return running


def run(config: str, out_dir: str, pretrain_steps: int, rows: int, finetune_steps: int):
  pretrain_dir = os.path.join(out_dir, "pretrain")
  started, times = time.time(), {}
  subprocess.run([sys.executable, "main.py", f"--config={config}", f"--config.workdir={pretrain_dir}",
                  "--mode=inspect_data"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  print(f"tokenizer: {time.time() - started:.0f} s", flush=True)
  running = _finetunings(config, out_dir, pretrain_dir, "scratch", finetune_steps, rows)
  running["pretrain"] = _launch(config, out_dir, "pretrain", [
      f"--config.workdir={pretrain_dir}", f"--config.train.steps={pretrain_steps}",
      f"--config.train.batch_size={rows}", "--config.train.grad_accum_steps=1",
      f"--config.train.warmup_steps={pretrain_steps // 10}", "--config.train.log_every=10",
      f"--config.train.eval_every={pretrain_steps // 6}", "--config.train.eval_steps=8",
      f"--config.train.checkpoint_every={pretrain_steps}"])
  while running:
    for name, process in list(running.items()):
      if process.poll() is None:
        continue
      times[name] = time.time() - started
      print(f"{name}: exit {process.returncode} after {times[name]:.0f} s", flush=True)
      del running[name]
      if name == "pretrain":
        running.update(_finetunings(config, out_dir, pretrain_dir, "pretrained", finetune_steps, rows))
    time.sleep(1)
  with open(os.path.join(out_dir, "times.json"), "w") as f:
    json.dump({"pretrain_steps": pretrain_steps, "rows": rows, "finetune_steps": finetune_steps,
               "seconds_since_start": times}, f, indent=1)


def table(out_dir: str, results_json: str):
  from fat5_jax.metrics import read_metrics

  with open(os.path.join(out_dir, "times.json")) as f:
    times = json.load(f)
  pretraining = [r for r in read_metrics(os.path.join(out_dir, "pretrain", "metrics.jsonl")) if r["split"] == "eval"]
  runs = {}
  lines = ["| task | head | start | best step | test | validation | finished after |", "|---|---|---|---|---|---|---|"]
  for task, head, _ in FINETUNINGS:
    for init in ("pretrained", "scratch"):
      name = f"{task}_{head}_{init}"
      with open(os.path.join(out_dir, name, "results.json")) as f:
        runs[name] = results = json.load(f)
      metrics = ("accuracy", "macro_f1") if "accuracy" in results["test"] else ("rouge_l", "chrf", "exact_match")
      shown = lambda split: ", ".join(f"{m} {results[split][m]:.3f}" for m in metrics)
      lines.append(f"| `{task}` | {head} | {init} | {results['best_step']} of {results['steps']} | {shown('test')} | "
                   f"{shown('validation')} | {times['seconds_since_start'][name]:.0f} s |")
  summary = {**times, "pretraining_eval_loss": {r["step"]: r["loss"] for r in pretraining}, "runs": runs}
  with open(results_json, "w") as f:
    json.dump(summary, f, indent=1)
  print("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  run_args = commands.add_parser("run")
  run_args.add_argument("out_dir")
  run_args.add_argument("--pretrain_steps", type=int, default=300)
  run_args.add_argument("--rows", type=int, default=32)
  run_args.add_argument("--finetune_steps", type=int, default=800)
  run_args.add_argument("--config", default="configs/small_fr.py", help="main.py's config of every run")
  table_args = commands.add_parser("table")
  table_args.add_argument("out_dir")
  table_args.add_argument("results_json")
  args = parser.parse_args()
  if args.command == "run":
    os.makedirs(args.out_dir, exist_ok=True)
    run(args.config, args.out_dir, args.pretrain_steps, args.rows, args.finetune_steps)
  else:
    table(args.out_dir, args.results_json)


if __name__ == "__main__":
  main()
