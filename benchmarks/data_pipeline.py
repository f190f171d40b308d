"""Rows per second of the UL2 input pipeline at small_fr shapes (512 / 512, buckets 128/256/512, 512-row batches).

Measures one process (num_workers=0, one core) on the embedded wiki_fr corpus (short documents: several
examples per row) and on the same text joined into long documents (one full-length chunk per row), with and
without packing, and wiki_fr read as one stream (data.stream), then the same with Grain worker processes. Prints a
table; writes benchmarks/results/data_pipeline.json (data_pipeline_encoder{N}.json at another --encoder-length).
Run from the repository root:

  python -m benchmarks.data_pipeline [--seconds 10] [--encoder-length 8192 --rows 64 --workers 0]
"""

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time

import numpy as np
from absl import flags

from configs import small_fr
from fat5_jax import data
from fat5_jax.config import from_config_dict
from fat5_jax.data import corpus

RESULTS = os.path.join(os.path.dirname(__file__), "results", "data_pipeline.json")
TARGET_ROWS_PER_SECOND = 1000  # What one H100 consumes with margin (FAT5's own step runs 451 rows/s).


def _long_document_corpus(directory: str) -> str:
  """wiki_fr's train text joined 60 articles at a time (documents of ~6k tokens), blank-line separated."""
  texts = [t.replace("\n", " ") for split, t in corpus.iter_documents("wiki_fr", "text", 0.02) if split == "train"]
  path = os.path.join(directory, "wiki_fr_long.txt")
  with open(path, "w") as f:
    f.write("\n\n".join(" ".join(texts[i:i + 60]) for i in range(0, len(texts), 60)))
  return path


def _measure(config, tokenizer, seconds: float) -> dict:
  iterator = data.make_train_iterator(config, tokenizer)
  next(iterator)  # Start-up: workers, cache.
  start, batches = time.perf_counter(), []
  while time.perf_counter() - start < seconds or len(batches) < 3:
    batches.append(next(iterator))
  elapsed = time.perf_counter() - start
  rows = sum(len(b["encoder_input_tokens"]) for b in batches)
  padding = [data.padding_fractions(b) for b in batches]
  buckets = [int(b["decoder_target_tokens"].shape[1]) for b in batches]
  return {"rows_per_second": rows / elapsed, "batches": len(batches),
          "rows_per_batch": len(batches[0]["encoder_input_tokens"]),
          "encoder_padding": float(np.mean([p["encoder_padding"] for p in padding])),
          "decoder_padding": float(np.mean([p["decoder_padding"] for p in padding])),
          "mean_decoder_length": float(np.mean(buckets)),
          "decoder_buckets": {b: buckets.count(b) for b in sorted(set(buckets))}}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="0: no worker cases")
  parser.add_argument("--encoder-length", type=int, default=0, help="0: small_fr's")
  parser.add_argument("--rows", type=int, default=0, help="rows per batch; 0: small_fr's")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags, which only absl.app parses
  base = small_fr.get_config()
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    base.workdir = workdir
    base.data.encoder_length = args.encoder_length or base.data.encoder_length
    if args.rows:
      base.train.update(batch_size=args.rows, grad_accum_steps=1)
    long_path = _long_document_corpus(workdir)
    config = from_config_dict(base)
    tokenizer = data.load_tokenizer(config.data, workdir, config.model.vocab_size)
    cases = [("wiki_fr", "packed", 0), ("wiki_fr", "unpacked", 0), ("wiki_fr", "stream", 0),
             ("long_docs", "packed", 0), ("long_docs", "unpacked", 0)]
    if args.workers:
      cases += [("wiki_fr", "packed", args.workers), ("long_docs", "packed", args.workers)]
    for name, layout, workers in cases:
      case = dataclasses.replace(config.data, corpus=long_path if name == "long_docs" else "wiki_fr",
                                 pack=layout == "packed", stream=layout == "stream", num_workers=workers,
                                 tokenizer_path=tokenizer.path)
      result = _measure(dataclasses.replace(config, data=case), tokenizer, args.seconds)
      cores = max(workers, 1)
      per_core = result["rows_per_second"] / cores
      result.update(corpus=name, layout=layout, num_workers=workers, rows_per_second_per_core=per_core,
                    workers_for_target=int(np.ceil(TARGET_ROWS_PER_SECOND / per_core)))
      results.append(result)
      print(json.dumps(result))
  shapes = (f"small_fr: encoder {config.data.encoder_length}, decoder buckets {config.data.decoder_length_buckets}, "
            f"{data.train_rows(config)} rows per batch, tokenizer {config.data.tokenizer_vocab_size}")
  report = {"benchmark": "data_pipeline", "shapes": shapes, "machine": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "device": "CPU of the development machine (not the GPU "
            "host)", "target_rows_per_second": TARGET_ROWS_PER_SECOND, "results": results}
  results_path = RESULTS if config.data.encoder_length == 512 else RESULTS.replace(
      ".json", f"_encoder{config.data.encoder_length}.json")
  os.makedirs(os.path.dirname(results_path), exist_ok=True)
  with open(results_path, "w") as f:
    json.dump(report, f, indent=1)
  print(f"\n{'corpus':<10} {'layout':<8} {'workers':>7} {'rows/s':>8} {'per core':>8} {'enc pad':>8} {'dec pad':>8} "
        f"{'mean dec':>8} {'workers for 1000/s':>18}")
  for r in results:
    print(f"{r['corpus']:<10} {r['layout']:<8} {r['num_workers']:>7} {r['rows_per_second']:>8.0f} "
          f"{r['rows_per_second_per_core']:>8.0f} {r['encoder_padding']:>8.1%} {r['decoder_padding']:>8.1%} "
          f"{r['mean_decoder_length']:>8.0f} {r['workers_for_target']:>18}")


if __name__ == "__main__":
  main()
