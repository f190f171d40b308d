"""The Grain input pipeline: tokenized pieces -> shuffled, repeated, UL2-corrupted -> packed bucketed batches.

    source (PieceSource of one split, or StreamSource with data.stream; sliced by JAX process)
      .shuffle(seed).repeat()            a new permutation each epoch
      .random_map(UL2Transform, seed)    example i depends only on (seed, i); i counts across epochs
    PackedBatchDataset(rows, buckets)    first-fit packing per decoder bucket
      .mp_prefetch(num_workers)          each worker packs every n-th example; outputs interleave in order

A train batch holds `train.batch_size * train.grad_accum_steps // process_count` rows that share one decoder
bucket: the trainer reshapes it to [grad_accum_steps, rows_per_step, ...] for its scan.
"""

from __future__ import annotations

import grain
import numpy as np

from fat5_jax.config import Config, ConfigError, DataConfig
from fat5_jax.data import cache, ul2
from fat5_jax.data.packing import PackedBatchDataset
from fat5_jax.data.tokenizer import Tokenizer


def make_transform(data_config: DataConfig, tokenizer: Tokenizer) -> ul2.UL2Transform:
  denoisers = ul2.denoisers_from_config(data_config)
  prefix_ids = {d.prefix: tokenizer.prefix_id(d.prefix) for d in denoisers if d.prefix}
  return ul2.UL2Transform(denoisers, data_config.denoiser_proportions, data_config.encoder_length,
                          data_config.decoder_length, tokenizer.sentinel_ids(tokenizer.num_sentinels), prefix_ids,
                          tokenizer.eos_id)


def example_dataset(config: Config, tokenizer: Tokenizer, split: str, *, process_index: int = 0,
                    process_count: int = 1) -> tuple[grain.MapDataset, ul2.UL2Transform]:
  """Infinite MapDataset of UL2 examples of one split (this process's shard) and the transform making them."""
  data = config.data
  directory = cache.pretokenize(data, config.workdir, tokenizer)
  transform = make_transform(data, tokenizer)
  if data.stream:
    chunks = cache.StreamSource(directory, split, transform.raw_lengths, data.denoiser_proportions, data.seed,
                                tokenizer.eos_id)
  else:
    chunks = cache.PieceSource(directory, split, transform.max_raw_length)
  source = grain.MapDataset.source(chunks)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
  source = source[process_index::process_count]
  if len(source) == 0:
    raise ValueError(f"the {split} split has fewer pieces than the {process_count} processes")
  # Each process shuffles and draws noise with its own seed: with one seed, every host would pick the same denoiser
  # and spans at each step, over neighbouring pieces of the corpus.
  seed = data.seed + 1_000_003 * process_index
  examples = source.shuffle(seed=seed).repeat(None).random_map(transform, seed=seed)
  return examples, transform


def _batches(config: Config, tokenizer: Tokenizer, split: str, rows: int, process_index: int,
             process_count: int) -> grain.IterDataset:
  examples, _ = example_dataset(config, tokenizer, split, process_index=process_index, process_count=process_count)
  return PackedBatchDataset(examples, rows=rows, encoder_length=config.data.encoder_length,
                            buckets=tuple(config.data.decoder_length_buckets), pack=config.data.pack,
                            decoder_start_id=config.model.decoder_start_token_id)


def _rows_per_process(total: int, what: str, process_count: int) -> int:
  if total % process_count:
    raise ConfigError(f"{what} = {total} is not divisible by {process_count} processes")
  return total // process_count


def train_rows(config: Config, process_count: int = 1) -> int:
  """Rows per train batch on one process: one optimizer step's micro-batches, all in one decoder bucket."""
  return _rows_per_process(config.train.batch_size * config.train.grad_accum_steps,
                           "train.batch_size * grad_accum_steps", process_count)


def make_train_iterator(config: Config, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Checkpointable iterator (grain.checkpoint.CheckpointSave/Restore) of this process's train batches.

  With `data.num_workers > 0` Grain reads absl flags: outside `absl.app` (main.py), call
  `absl.flags.FLAGS.mark_as_parsed()` first.
  """
  dataset = _batches(config, tokenizer, "train", train_rows(config, process_count), process_index, process_count)
  if config.data.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return iter(dataset)


def make_eval_batches(config: Config, tokenizer: Tokenizer, num_batches: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """This process's part of `num_batches` validation batches of `train.batch_size` rows, the same on every call:
  each process reads its own shard of the split (as in training), so P processes evaluate distinct rows."""
  rows = _rows_per_process(config.train.batch_size, "train.batch_size", process_count)
  iterator = iter(_batches(config, tokenizer, "validation", rows, process_index, process_count))
  return [next(iterator) for _ in range(num_batches)]
