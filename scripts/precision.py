"""Parameter precision on the GPU: small_fr pretrained on the embedded corpus with bfloat16 parameters and
Kahan-compensated updates, bfloat16 parameters without Kahan, and float32 parameters, then one plot of their losses.

  python scripts/precision.py run OUT_DIR [--steps 1000 --rows 64 --tokenizer PATH --variants a,b]  # OUT_DIR/<name>
  python scripts/precision.py plot OUT_DIR docs/precision.png                          # + OUT_DIR/summary.json

Every variant sees the same batches in the same order (same seed, same tokenizer); only the parameter dtype and the
compensation differ. The variants run side by side on one GPU, so their rows/s are not throughput figures. `--tokenizer`
skips training a 32k sentencepiece model in each workdir.
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

VARIANTS = {
    "bf16_kahan": ("bfloat16 parameters, Kahan", ["--config.model.param_dtype=bfloat16", "--config.train.kahan=True"]),
    "bf16_plain": ("bfloat16 parameters, no Kahan",
                   ["--config.model.param_dtype=bfloat16", "--config.train.kahan=False"]),
    "fp32_master": ("float32 parameters", ["--config.model.param_dtype=float32", "--config.train.kahan=False"]),
}


def run(out_dir: str, steps: int, rows: int, tokenizer: str | None, variants: list[str]):
  common = [f"--config.train.steps={steps}", f"--config.train.batch_size={rows}", "--config.train.grad_accum_steps=1",
            f"--config.train.warmup_steps={steps // 10}", "--config.train.log_every=10",
            f"--config.train.eval_every={steps // 10}", "--config.train.eval_steps=8",
            f"--config.train.checkpoint_every={steps}"]
  if tokenizer:
    common.append(f"--config.data.tokenizer_path={tokenizer}")
  # The three share the GPU at once (small_fr at this batch uses a fraction of it): start-up, tokenizer and token
  # cache overlap instead of being paid three times over.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  started, running = time.time(), {}
  for name in variants:
    _, overrides = VARIANTS[name]
    log = open(os.path.join(out_dir, f"{name}.log"), "w")
    running[name] = subprocess.Popen([sys.executable, "main.py", "--config=configs/small_fr.py",
                                      f"--config.workdir={os.path.join(out_dir, name)}", *common, *overrides],
                                     cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  for name, process in running.items():
    print(f"{name}: exit {process.wait()} after {time.time() - started:.0f} s", flush=True)


def plot(out_dir: str, png: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from fat5_jax.metrics import read_metrics

  fig, ax = plt.subplots(figsize=(8, 4.5))
  summary = {}
  for (name, (label, _)), color in zip(VARIANTS.items(), ("tab:blue", "tab:orange", "tab:green")):
    records = read_metrics(os.path.join(out_dir, name, "metrics.jsonl"))
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r["split"] == "eval"]
    ax.plot(*zip(*train), color=color, alpha=0.6, label=f"{label}: train")
    ax.plot(*zip(*evals), color=color, marker="o", linestyle="--", label=f"{label}: eval")
    summary[name] = {"label": label, "final_eval_loss": evals[-1][1], "final_train_loss": train[-1][1],
                     "eval": dict(evals), "steps": evals[-1][0],
                     "rows_per_s": [r["rows_per_s"] for r in records if r["split"] == "train"][-1]}
  ax.set_xlabel("step")
  ax.set_ylabel("loss per target token (cross-entropy + z-loss)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("small_fr on the embedded corpus: parameter precision")
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  for name, result in summary.items():
    print(f"{result['label']:32s} final eval loss {result['final_eval_loss']:.4f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  run_args = commands.add_parser("run")
  run_args.add_argument("out_dir")
  run_args.add_argument("--steps", type=int, default=1000)
  run_args.add_argument("--rows", type=int, default=64)
  run_args.add_argument("--tokenizer")
  run_args.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names among the variants")
  plot_args = commands.add_parser("plot")
  plot_args.add_argument("out_dir")
  plot_args.add_argument("png")
  args = parser.parse_args()
  if args.command == "run":
    os.makedirs(args.out_dir, exist_ok=True)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
      parser.error(f"unknown variants {unknown}: choose among {sorted(VARIANTS)}")
    run(args.out_dir, args.steps, args.rows, args.tokenizer, variants)
  else:
    plot(args.out_dir, args.png)


if __name__ == "__main__":
  main()
