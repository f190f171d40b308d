"""FAT5's own PyTorch training step (catie-aq/flashT5's code, the small_fr recipe), timed on one device: the peer that
our benchmarks measure in the same run (`benchmarks/fat5_peer.py` runs this script in a subprocess). Imports torch
and FAT5's code only, never JAX.

  python benchmarks/fat5_step.py --checkout PATH --rows 128 --encoder-length 512 --decoder-length 512
  python benchmarks/fat5_step.py --checkout PATH --device cpu --rows 2 --encoder-length 64 --decoder-length 32 \
      --steps 1 --warmup 1                                # a smoke test of this script on a CPU

PATH is the root of a checkout of FAT5's repository, which is never part of this one: its code imports itself as
`src.model...` from there. The step is REFERENCE.md's "FAT5's own training step": FlashT5Config of small_fr with
FAT5's Triton attention, RMSNorm and cross-entropy (z-loss 1e-4), float32 parameters under bf16 autocast, forward
with input_ids, attention_mask and labels, backward, gradients clipped to norm 1.0, AdamWScale (foreach) step,
gradients set to None. Random token ids, two seeded batches used in turn. After `--warmup` steps, `--steps` steps
are timed one by one (synchronized) and the median reported; then `--steps` more back to back with one
synchronization at the end, as a training loop runs them (`step_s_pipelined`: their mean).

On a CPU (`--device cpu`) FAT5's PyTorch fallbacks run: its reference attention and no Triton kernels, which need a
GPU. `--attention-type` picks another of FAT5's attentions (default: triton on cuda, ref on cpu).

Prints one JSON line: step_s, step_s_spread, rows_per_s, step_s_pipelined, rows_per_s_pipelined, encoder_tokens_per_s,
peak_memory_gib (torch's peak allocation; None on a CPU), loss, rows, encoder_length, decoder_length, attention_type,
device (the name CUDA gives the GPU), torch, triton, fat5_commit (None unless PATH is the top of a git work tree). When
the step fails (out of memory, a Triton fault, any exception) it prints {"error": "<type: message>"} instead and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SMALL_FR = dict(vocab_size=32768, d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=12, num_decoder_layers=12,
                use_glu_mlp=True, position_encoding_type="t5", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, z_loss=1e-4, attention_scale=1.0, pad_token_id=0,
                dropout_rate=0.0, tie_word_embeddings=False)


def checkout_commit(checkout: str) -> str | None:
  """The commit of `checkout` when it is the top of a git work tree (not merely inside another repository)."""
  git = lambda *args: subprocess.run(["git", "-C", checkout, *args], capture_output=True, text=True)
  top = git("rev-parse", "--show-toplevel")
  if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(checkout):
    return None
  return git("rev-parse", "HEAD").stdout.strip() or None


def build(checkout: str, device: str, attention_type: str):
  """FAT5's small_fr model on `device` and its AdamWScale optimizer."""
  sys.path.insert(0, os.path.abspath(checkout))
  from src.model.configuration_flash_t5 import FlashT5Config  # pylint: disable=import-outside-toplevel
  from src.model.modeling_flash_t5 import FlashT5ForConditionalGeneration  # pylint: disable=import-outside-toplevel
  from src.utils.adamw_scaled import AdamWScale  # pylint: disable=import-outside-toplevel

  triton_ops = device == "cuda"
  config = FlashT5Config(**SMALL_FR, attention_type=attention_type, use_triton_layernorm=triton_ops,
                         use_triton_crossentropy=triton_ops)
  config.tie_word_embeddings = False  # transformers 5 sets it back to True; FAT5's model asserts it is False
  model = FlashT5ForConditionalGeneration(config).to(device)
  return model, AdamWScale(model.parameters(), foreach=True)


def measure(args: argparse.Namespace) -> dict:
  device = torch.device(args.device)
  model, optimizer = build(args.checkout, args.device, args.attention_type)
  vocab = model.config.vocab_size

  def batch(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = lambda length: torch.randint(2, vocab, (args.rows, length), generator=generator).to(device)
    return {"input_ids": tokens(args.encoder_length), "labels": tokens(args.decoder_length),
            "attention_mask": torch.ones(args.rows, args.encoder_length, dtype=torch.bool, device=device)}

  batches = [batch(seed) for seed in range(2)]
  synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None

  def step(inputs: dict) -> torch.Tensor:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
      loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  for i in range(args.warmup):
    step(batches[i % 2])
  synchronize()
  times = []
  for i in range(args.steps):
    start = time.perf_counter()
    loss = step(batches[i % 2])
    synchronize()
    times.append(time.perf_counter() - start)
  start = time.perf_counter()  # then as a training loop runs them: queued back to back, one wait at the end
  for i in range(args.steps):
    loss = step(batches[i % 2])
  synchronize()
  pipelined_s = (time.perf_counter() - start) / args.steps
  step_s = statistics.median(times)
  return {"step_s": step_s, "step_s_spread": [min(times), max(times)], "rows_per_s": args.rows / step_s,
          "step_s_pipelined": pipelined_s, "rows_per_s_pipelined": args.rows / pipelined_s,
          "encoder_tokens_per_s": args.rows * args.encoder_length / step_s,
          "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
          "loss": float(loss), "rows": args.rows, "encoder_length": args.encoder_length,
          "decoder_length": args.decoder_length, "attention_type": args.attention_type,
          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkout", required=True, help="root of a checkout of catie-aq/flashT5")
  parser.add_argument("--rows", type=int, default=128)
  parser.add_argument("--encoder-length", type=int, default=512)
  parser.add_argument("--decoder-length", type=int, default=512)
  parser.add_argument("--steps", type=int, default=10, help="timed steps (their median is reported)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
  parser.add_argument("--attention-type", default=None,
                      help="FAT5's config.attention_type (default: triton on cuda, ref on cpu)")
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.checkout, "src", "model", "modeling_flash_t5.py")):
    parser.error(f"{args.checkout} is not a checkout of catie-aq/flashT5 (no src/model/modeling_flash_t5.py)")
  args.attention_type = args.attention_type or ("triton" if args.device == "cuda" else "ref")
  try:
    result = measure(args)
  except Exception as error:  # pylint: disable=broad-except
    # Out of memory, a Triton kernel's illegal memory access at long lengths, a missing package: the caller records it.
    print(json.dumps({"error": " ".join(f"{type(error).__name__}: {error}".split())[:500]}), flush=True)
    return
  try:
    import triton  # pylint: disable=import-outside-toplevel
    triton_version = triton.__version__
  except ImportError:
    triton_version = None
  result.update(torch=torch.__version__, triton=triton_version, fat5_commit=checkout_commit(args.checkout))
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
