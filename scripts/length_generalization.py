"""Length generalization on CPU: tiny_fr pretrained at 1,024 encoder tokens with each position encoding (t5 bias,
RoPE, ALiBi, FIRE), then its held-out loss at 1,024, 2,048, 4,096 and 8,192 encoder tokens.

  python scripts/length_generalization.py run OUT_DIR [--steps 160 --rows 8]  # OUT_DIR/<encoding>, ~20 min
  python scripts/length_generalization.py table OUT_DIR RESULTS_JSON [--png PLOT]    # Markdown table on stdout

Every model has the same seed, tokenizer (trained once into OUT_DIR/tokenizer) and batches; only
`model.position_encoding_type` differs. Rows are one chunk of the corpus stream each (`data.stream=True`) under
an [S] prefix-LM denoiser whose mu puts the chunk's first L - 2 tokens in the encoder (L tokens with prefix and eos)
and the next 127 in the decoder at every length L (docs/training.md, "Length generalization", says why). Each
length evaluates the same number of encoder tokens (64 rows of 1,024 ... 8 rows of 8,192) from the validation
stream, through `main.py --mode=eval`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ENCODINGS = ("t5", "rope", "alibi", "fire")
TRAIN_LENGTH = 1024
EVAL_LENGTHS = (1024, 2048, 4096, 8192)
# Rows are [S] prefix-LM chunks: the encoder holds the first encoder_length - 2 tokens of a stream chunk (plus
# prefix and eos), the decoder the next CONTINUATION (plus eos), the same at every length, so only the encoder's
# positions go beyond training. Span corruption would need sentinels training never saw (docs/training.md).
CONTINUATION = 127
DECODER_LENGTH = CONTINUATION + 1
NUM_SENTINELS = 256
# Every length evaluates 8 batches of 65,536 encoder tokens (64 rows of 1,024 ... 8 of 8,192): one row at 8,192,
# where the xla attention's [H, S, S] float32 logits take 1 GiB a layer and FIRE's [S, S, 32] MLP hidden 8.6 GB.
EVAL_STEPS = 8
# The embedded corpus holds ~1.1M tokens: the default 2 % validation split (24k tokens) is under 3 chunks of 8,192.
VALIDATION_FRACTION = 0.1


def denoiser(encoder_length: int) -> tuple:
  """The [S] denoiser (mu, 0, 1, "[S]") whose chunks keep encoder_length - 2 tokens and predict CONTINUATION."""
  kept = encoder_length - 2
  return ((kept + CONTINUATION) / kept, 0.0, 1, "[S]")


def row_layout(encoder_length: int) -> dict:
  """The stream chunk of `encoder_length` rows, checked to fill the encoder and the decoder exactly."""
  from fat5_jax.data import ul2

  spec = denoiser(encoder_length)
  raw = ul2.raw_length(ul2.Denoiser(*spec), encoder_length, DECODER_LENGTH, NUM_SENTINELS)
  inputs, targets = (int(x) for x in ul2.example_lengths(raw, ul2.Denoiser(*spec), NUM_SENTINELS))
  if (inputs, targets) != (encoder_length, DECODER_LENGTH):
    raise ValueError(f"{spec} at {encoder_length}: chunks of {raw} give {inputs} + {targets} tokens")
  return {"encoder_length": encoder_length, "decoder_length": DECODER_LENGTH, "denoiser": spec, "raw_length": raw,
          "input_tokens": inputs, "target_tokens": targets}


def _data_flags() -> list[str]:
  return ["--config=configs/tiny_fr.py", "--config.data.stream=True", "--config.data.pack=False",
          "--config.data.denoiser_proportions=(1.0,)", f"--config.data.validation_fraction={VALIDATION_FRACTION}"]


def _length_flags(layout: dict) -> list[str]:
  return [f"--config.data.denoisers=({layout['denoiser']!r},)",
          f"--config.data.encoder_length={layout['encoder_length']}",
          f"--config.data.decoder_length={layout['decoder_length']}",
          f"--config.data.decoder_length_buckets=({layout['decoder_length']},)"]


def _main_py(args: list[str], log_path: str) -> str:
  """Runs main.py with `args`, its stderr into `log_path`; returns its stdout (raises when it fails)."""
  with open(log_path, "w") as log:
    result = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                            text=True)
  if result.returncode:
    raise SystemExit(f"main.py {' '.join(args)} exited with {result.returncode}: see {log_path}")
  return result.stdout


def _environment() -> dict:
  import flax
  import jax
  import optax

  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
  return {"device": f"{jax.devices()[0].platform}: {cpu}, {os.cpu_count()} cores",
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                       "optax": optax.__version__}}


def run(out_dir: str, steps: int, rows: int):
  started = time.time()
  progress = lambda message: print(f"[{time.time() - started:5.0f} s] {message}", flush=True)
  tokenizer = os.path.join(out_dir, "tokenizer", "tokenizer", "spm.model")
  layouts = {length: row_layout(length) for length in EVAL_LENGTHS}
  # inspect_data trains the tokenizer into its workdir; every model then loads that one file.
  _main_py([*_data_flags(), *_length_flags(layouts[TRAIN_LENGTH]),
            f"--config.workdir={os.path.join(out_dir, 'tokenizer')}", "--mode=inspect_data"],
           os.path.join(out_dir, "tokenizer.log"))
  progress(f"tokenizer: {tokenizer}")
  settings = {"command": "python scripts/length_generalization.py " + " ".join(sys.argv[1:]), "steps": steps,
              "rows": rows, "train_length": TRAIN_LENGTH,
              "validation_fraction": VALIDATION_FRACTION, "layouts": layouts, **_environment()}
  train = [f"--config.train.steps={steps}", f"--config.train.batch_size={rows}", "--config.train.grad_accum_steps=1",
           f"--config.train.warmup_steps={max(1, steps // 10)}", "--config.train.log_every=10",
           f"--config.train.eval_every={steps}", "--config.train.eval_steps=2",
           f"--config.train.checkpoint_every={steps}"]
  for encoding in ENCODINGS:
    workdir = os.path.join(out_dir, encoding)
    common = [*_data_flags(), f"--config.data.tokenizer_path={tokenizer}", f"--config.workdir={workdir}",
              f"--config.model.position_encoding_type={encoding}"]
    _main_py([*common, *_length_flags(layouts[TRAIN_LENGTH]), *train], os.path.join(out_dir, f"{encoding}.log"))
    progress(f"{encoding}: trained {steps} steps of {rows} x {TRAIN_LENGTH}")
    for length in EVAL_LENGTHS:
      batch = max(EVAL_LENGTHS) // length
      stdout = _main_py([*common, *_length_flags(layouts[length]), "--mode=eval", f"--config.train.batch_size={batch}",
                         f"--config.train.eval_steps={EVAL_STEPS}"],
                        os.path.join(out_dir, f"{encoding}_eval_{length}.log"))
      metrics = json.loads(stdout[stdout.rfind("\n{") + 1:])  # The JSON main.py prints last.
      eval_rows = batch * EVAL_STEPS
      # A full chunk (row_layout's raw length) fills the encoder and the decoder; a shorter one would have fewer
      # targets, so the count shows that every row was full.
      if metrics["tokens"] != eval_rows * layouts[length]["target_tokens"]:
        raise SystemExit(f"{encoding} at {length}: {metrics['tokens']} target tokens, expected {eval_rows} rows of "
                         f"{layouts[length]['target_tokens']}: rows not full")
      with open(os.path.join(workdir, f"eval_{length}.json"), "w") as f:
        json.dump({**metrics, "rows": eval_rows, "encoder_length": length}, f, indent=1)
      progress(f"{encoding} at {length}: loss {metrics['loss']:.4f} over {eval_rows} rows")
  settings["runtime_s"] = round(time.time() - started)
  with open(os.path.join(out_dir, "settings.json"), "w") as f:
    json.dump(settings, f, indent=1)


def read_losses(out_dir: str) -> dict[str, dict[int, float]]:
  """{encoding: {evaluation length: eval loss}} from the run's eval_<length>.json files."""
  losses = {}
  for encoding in ENCODINGS:
    losses[encoding] = {}
    for length in EVAL_LENGTHS:
      with open(os.path.join(out_dir, encoding, f"eval_{length}.json")) as f:
        losses[encoding][length] = json.load(f)["loss"]
  return losses


def markdown(losses: dict[str, dict[int, float]]) -> str:
  """Eval loss per encoding and length, with the ratio to the same model's loss at the training length."""
  header = "| position encoding | " + " | ".join(f"{length:,}" for length in EVAL_LENGTHS) + " |"
  lines = [header, "|---" * (len(EVAL_LENGTHS) + 1) + "|"]
  for encoding, by_length in losses.items():
    base = by_length[TRAIN_LENGTH]
    cells = [f"{by_length[length]:.3f}" + ("" if length == TRAIN_LENGTH else f" ({by_length[length] / base:.2f}x)")
             for length in EVAL_LENGTHS]
    lines.append(f"| {encoding} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(losses: dict[str, dict[int, float]], png: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for encoding, by_length in losses.items():
    ax.plot(list(by_length), list(by_length.values()), marker="o", label=encoding)
  ax.axvline(TRAIN_LENGTH, color="gray", linestyle=":", label="training length")
  ax.set_xscale("log", base=2)
  ax.set_xticks(EVAL_LENGTHS, [f"{length:,}" for length in EVAL_LENGTHS])
  ax.set_xlabel("encoder tokens at evaluation")
  ax.set_ylabel("held-out loss per target token")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"tiny_fr trained at {TRAIN_LENGTH:,} encoder tokens on CPU: length generalization")
  fig.tight_layout()
  fig.savefig(png, dpi=120)


def table(out_dir: str, results_json: str, png: str | None):
  losses = read_losses(out_dir)
  with open(os.path.join(out_dir, "settings.json")) as f:
    settings = json.load(f)
  ratios = {encoding: {length: loss / by_length[TRAIN_LENGTH] for length, loss in by_length.items()}
            for encoding, by_length in losses.items()}
  with open(results_json, "w") as f:
    json.dump({**settings, "loss": losses, "ratio_to_train_length": ratios}, f, indent=1)
  if png:
    plot(losses, png)
  print(markdown(losses))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  run_args = commands.add_parser("run")
  run_args.add_argument("out_dir")
  run_args.add_argument("--steps", type=int, default=160)
  run_args.add_argument("--rows", type=int, default=8)
  table_args = commands.add_parser("table")
  table_args.add_argument("out_dir")
  table_args.add_argument("results_json")
  table_args.add_argument("--png", help="also plot loss against evaluation length here")
  args = parser.parse_args()
  if args.command == "run":
    os.makedirs(args.out_dir, exist_ok=True)
    run(args.out_dir, args.steps, args.rows)
  else:
    table(args.out_dir, args.results_json, args.png)


if __name__ == "__main__":
  main()
