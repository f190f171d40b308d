"""`--mode=inspect_data`: decoded examples of every denoiser, measured statistics, and a JSON Lines dump."""

from __future__ import annotations

import json
import os
import textwrap
import time

import numpy as np

from fat5_jax.config import Config
from fat5_jax.data import packing, pipeline
from fat5_jax.data.tokenizer import Tokenizer

_STAT_EXAMPLES = 4000  # Training examples whose noise statistics the table reports.
_TIMED_BATCHES = 8  # Batches timed for rows/s and padding.
_COLUMN = 58  # Width of each text column.


def example_statistics(examples: list[dict], num_denoisers: int) -> list[dict]:
  """Per denoiser: examples seen, measured noise density (noise tokens / chunk) and mean noise span length."""
  noise = np.zeros(num_denoisers)
  tokens = np.zeros(num_denoisers)
  spans = np.zeros(num_denoisers)
  count = np.zeros(num_denoisers, np.int64)
  for e in examples:
    d, num_spans = e["denoiser"], max(len(e["sentinels"]), 1)
    noise[d] += len(e["targets"]) - 1 - len(e["sentinels"])  # Target minus its sentinels and eos.
    tokens[d] += len(e["original"])
    spans[d] += num_spans
    count[d] += 1
  return [{"examples": int(count[d]), "noise_density": float(noise[d] / max(tokens[d], 1)),
           "mean_span_length": float(noise[d] / max(spans[d], 1))} for d in range(num_denoisers)]


def inspect_data(config: Config, tokenizer: Tokenizer, out_path: str) -> dict:
  """Prints examples and a statistics table, writes one JSON record per printed example, returns the stats."""
  examples, transform = pipeline.example_dataset(config, tokenizer, "train")
  denoisers = transform.denoisers
  per_denoiser = config.data.inspect_examples
  sample = [examples[i] for i in range(_STAT_EXAMPLES)]
  shown = {d: [e for e in sample if e["denoiser"] == d][:per_denoiser] for d in range(len(denoisers))}
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    for d, chosen in shown.items():
      print(f"\n=== denoiser {d}: {denoisers[d]} (raw chunk up to {transform.raw_lengths[d]} tokens) ===")
      for e in chosen:
        f.write(json.dumps({**denoisers[d].as_dict(), **{k: np.asarray(e[k]).tolist() for k in (
            "original", "inputs", "targets", "sentinels")}}) + "\n")
        _print_side_by_side(tokenizer.decode(e["inputs"], show_special=True),
                            tokenizer.decode(e["targets"], show_special=True))
  stats = {"denoisers": [{**denoisers[d].as_dict(), "raw_length": transform.raw_lengths[d], **s}
                         for d, s in enumerate(example_statistics(sample, len(denoisers)))]}
  stats.update(_batch_statistics(config, tokenizer))
  _print_table(stats)
  return stats


def _batch_statistics(config: Config, tokenizer: Tokenizer) -> dict:
  iterator = pipeline.make_train_iterator(config, tokenizer)
  next(iterator)  # Start-up (workers, caches) is not throughput.
  start = time.perf_counter()
  batches = [next(iterator) for _ in range(_TIMED_BATCHES)]
  seconds = time.perf_counter() - start
  rows = sum(len(b["encoder_input_tokens"]) for b in batches)
  padding = [packing.padding_fractions(b) for b in batches]
  buckets = [b["decoder_target_tokens"].shape[1] for b in batches]
  return {"rows_per_second": rows / seconds, "rows_per_batch": len(batches[0]["encoder_input_tokens"]),
          "encoder_padding": float(np.mean([p["encoder_padding"] for p in padding])),
          "decoder_padding": float(np.mean([p["decoder_padding"] for p in padding])),
          "decoder_buckets": {int(b): buckets.count(b) for b in sorted(set(buckets))},
          "num_workers": pipeline.resolve_num_workers(config.data.num_workers)}


def _print_side_by_side(left: str, right: str):
  left_lines = textwrap.wrap(left, _COLUMN) or [""]
  right_lines = textwrap.wrap(right, _COLUMN) or [""]
  print(f"{'INPUT':<{_COLUMN}} | TARGET")
  for i in range(max(len(left_lines), len(right_lines))):
    a = left_lines[i] if i < len(left_lines) else ""
    b = right_lines[i] if i < len(right_lines) else ""
    print(f"{a:<{_COLUMN}} | {b}")
  print("-" * (2 * _COLUMN + 3))


def _print_table(stats: dict):
  print(f"\n{'denoiser':<28} {'examples':>8} {'r':>6} {'noise':>7} {'mu':>6} {'span':>7} {'raw len':>8}")
  for d in stats["denoisers"]:
    name = f"({d['mu']:g}, {d['r']:g}, {d['max_spans']}, {d['prefix']})"
    print(f"{name:<28} {d['examples']:>8} {d['r']:>6.3f} {d['noise_density']:>7.3f} {d['mu']:>6.1f} "
          f"{d['mean_span_length']:>7.2f} {d['raw_length']:>8}")
  print(f"\nrows/s {stats['rows_per_second']:.0f} ({stats['num_workers']} workers, {stats['rows_per_batch']} rows per "
        f"batch); padding: encoder {stats['encoder_padding']:.1%}, decoder {stats['decoder_padding']:.1%}; "
        f"decoder buckets {stats['decoder_buckets']}")
