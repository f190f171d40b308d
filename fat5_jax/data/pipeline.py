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

import json
import os
from typing import Any, Callable

import grain
import jax
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

  With worker processes Grain reads absl flags: outside `absl.app` (main.py), call
  `absl.flags.FLAGS.mark_as_parsed()` first.
  """
  dataset = _batches(config, tokenizer, "train", train_rows(config, process_count), process_index, process_count)
  num_workers = resolve_num_workers(config.data.num_workers)
  if num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(dataset)


def resolve_num_workers(configured: int, saved: int | None = None) -> int:
  """The Grain worker processes of `data.num_workers`: a count >= 0 as configured; -1 (auto) the count the resumed
  checkpoint was saved with (`saved`), else one sized from this host. Each worker packs its own share of the
  examples, so the batch sequence depends on the count: a resume must keep it, and a configured count that differs
  from the saved one is refused."""
  if saved is not None and configured not in (-1, saved):
    raise ConfigError(f"data.num_workers={configured}, but the checkpoint being resumed was saved with {saved} "
                      f"workers, and the batch sequence depends on the count: set data.num_workers={saved} (or -1), "
                      "or use a new workdir")
  if configured >= 0:
    return configured
  if saved is not None:
    return saved
  if jax.default_backend() == "cpu":
    return 0  # the CPU computes the steps too: workers would take cores from it (and CI has two)
  # The cores this process may run on (a launcher's CPU binding included), one kept for the main process (it
  # dispatches the steps and receives the batches). Up to 4 per local device: one core packs more small_fr rows per
  # second than an H200 trains (docs/data.md, Throughput), so 4 leave a wide margin for slower cores and longer
  # documents, while each worker costs its own memory and copy of the pipeline. Several processes on one host
  # without CPU binding (one per GPU) then take 4 workers each rather than all the cores each.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, min(cores - 1, 4 * jax.local_device_count()))


class DevicePrefetch(grain.DatasetIterator):
  """Train batches one step ahead on the device(s): `prefetch()` draws the next batch and starts its transfer
  (`prepare`, e.g. the trainer's put_batch, which returns before the copy ends), so that the host never waits for
  it; `next()` returns it (drawing one then if none is ahead).

  Its checkpoint state is the position after the batches returned, not after the one prefetched: a run saved with
  a batch ahead resumes with that batch. A checkpoint stores it as the wrapped iterator's own state, which restores
  into a plain train iterator."""

  def __init__(self, iterator: grain.DatasetIterator, prepare: Callable[[dict], Any]):
    super().__init__()
    self._iterator, self._prepare = iterator, prepare
    self._ahead = None  # (the wrapped iterator's state before the batch ahead, as JSON; the prepared batch)

  def prefetch(self) -> None:
    if self._ahead is None:
      position = json.dumps(self._iterator.get_state())  # a copy: the live state changes with the next draws
      self._ahead = (position, self._prepare(next(self._iterator)))

  def __next__(self):
    self.prefetch()
    (_, batch), self._ahead = self._ahead, None
    return batch

  def get_state(self) -> dict:
    return self._iterator.get_state() if self._ahead is None else json.loads(self._ahead[0])

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)
    self._ahead = None

  def close(self) -> None:
    # Stops the wrapped iterator's worker processes now, not at garbage collection: a run that fails would otherwise
    # leave their shared memory for Python's resource tracker to report after the error.
    self._iterator.close()


def make_eval_batches(config: Config, tokenizer: Tokenizer, num_batches: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """This process's part of `num_batches` validation batches of `train.batch_size` rows, the same on every call:
  each process reads its own shard of the split (as in training), so P processes evaluate distinct rows."""
  rows = _rows_per_process(config.train.batch_size, "train.batch_size", process_count)
  iterator = iter(_batches(config, tokenizer, "validation", rows, process_index, process_count))
  return [next(iterator) for _ in range(num_batches)]
