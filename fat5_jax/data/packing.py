"""Packing UL2 examples into fixed-shape rows, with a decoder length picked per batch from a few buckets.

Each example goes to one bucket (a decoder length). With packing, that is the bucket whose decoder:encoder
ratio is nearest to the example's own (among the buckets its target fits), so a bucket's rows fill on both sides;
without packing, the shortest bucket its target fits. Each bucket first-fit packs its examples into `rows` rows
of [encoder_length, bucket]; when an example fits no row of its bucket, that bucket's rows leave as one batch
and the example starts the next one. Every batch therefore has `rows` non-empty rows and one of
len(buckets) decoder shapes.

Resuming: an example is rebuilt exactly from its index (the UL2 transform is a Grain random map), so the
iterator's state is only the next index and, per bucket, the indices of the examples in its open rows.
Restoring re-reads those examples and re-packs them in order: a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

BATCH_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions", "decoder_input_tokens",
              "decoder_target_tokens", "decoder_segment_ids", "decoder_positions", "decoder_loss_weights")


def choose_bucket(input_length: int, target_length: int, encoder_length: int, buckets: tuple, pack: bool) -> int:
  """Index of the bucket an example goes to (see the module docstring)."""
  fitting = [i for i, b in enumerate(buckets) if b >= target_length]
  if not fitting:
    raise ValueError(f"target of {target_length} tokens exceeds the longest decoder bucket {buckets[-1]}")
  if not pack:
    return fitting[0]
  ratio = np.log(target_length / input_length)
  return min(fitting, key=lambda i: abs(ratio - np.log(buckets[i] / encoder_length)))


class RowPacker:
  """First-fit packing of (inputs, targets) pairs into `rows` rows of [encoder_length, decoder_length]."""

  def __init__(self, rows: int, encoder_length: int, decoder_length: int, max_segments: int):
    self.rows, self.encoder_length, self.decoder_length = rows, encoder_length, decoder_length
    self._max_segments = max_segments
    self._encoder_free = np.full(rows, encoder_length, np.int64)
    self._decoder_free = np.full(rows, decoder_length, np.int64)
    self._segments = np.zeros(rows, np.int64)
    self._examples = []  # (row, inputs, targets) in insertion order.

  def try_add(self, inputs: np.ndarray, targets: np.ndarray) -> bool:
    if len(inputs) > self.encoder_length or len(targets) > self.decoder_length:
      raise ValueError(f"example ({len(inputs)}, {len(targets)}) exceeds the row "
                       f"({self.encoder_length}, {self.decoder_length})")
    fits = ((self._encoder_free >= len(inputs)) & (self._decoder_free >= len(targets))
            & (self._segments < self._max_segments))
    row = int(np.argmax(fits))
    if not fits[row]:
      return False
    self._encoder_free[row] -= len(inputs)
    self._decoder_free[row] -= len(targets)
    self._segments[row] += 1
    self._examples.append((row, inputs, targets))
    return True

  def batch(self, decoder_start_id: int) -> dict[str, np.ndarray]:
    """The packed arrays (pad id 0, segment 0 on padding), built with one scatter per array."""
    rows = np.array([row for row, _, _ in self._examples], np.int64)
    order = np.argsort(rows, kind="stable")  # Segments of a row in insertion order.
    rows = rows[order]
    first = np.searchsorted(rows, rows)  # Position (in `order`) of the first segment of each one's row.
    encoder = _scatter([self._examples[i][1] for i in order], rows, first, self.rows, self.encoder_length)
    decoder = _scatter([self._examples[i][2] for i in order], rows, first, self.rows, self.decoder_length)
    decoder_inputs = np.zeros_like(decoder["tokens"])
    decoder_inputs[:, 1:] = decoder["tokens"][:, :-1]
    decoder_inputs[decoder["positions"] == 0] = decoder_start_id  # Shift right within each segment.
    decoder_inputs[decoder["segment_ids"] == 0] = 0
    return {"encoder_input_tokens": encoder["tokens"], "encoder_segment_ids": encoder["segment_ids"],
            "encoder_positions": encoder["positions"], "decoder_input_tokens": decoder_inputs,
            "decoder_target_tokens": decoder["tokens"], "decoder_segment_ids": decoder["segment_ids"],
            "decoder_positions": decoder["positions"],
            "decoder_loss_weights": (decoder["segment_ids"] > 0).astype(np.float32)}


def _scatter(sequences: list, rows: np.ndarray, first: np.ndarray, num_rows: int, length: int) -> dict:
  """Places row-sorted sequences side by side in their rows, with 1-based segment ids and positions."""
  lengths = np.array([len(s) for s in sequences], np.int64)
  starts = np.cumsum(lengths) - lengths  # In the concatenation of all sequences.
  segment = np.arange(len(lengths)) - first
  position = np.arange(starts[-1] + lengths[-1]) - np.repeat(starts, lengths)
  token_rows = np.repeat(rows, lengths)
  token_cols = np.repeat(starts - starts[first], lengths) + position
  out = {"tokens": np.zeros((num_rows, length), np.int32), "segment_ids": np.zeros((num_rows, length), np.int32),
         "positions": np.zeros((num_rows, length), np.int32)}
  out["tokens"][token_rows, token_cols] = np.concatenate(sequences)
  out["segment_ids"][token_rows, token_cols] = np.repeat(segment + 1, lengths)
  out["positions"][token_rows, token_cols] = position
  return out


class PackedBatchDataset(grain.IterDataset):
  """Grain IterDataset: examples (a MapDataset of {"inputs", "targets"}) -> packed, bucketed batches.

  `set_slice` lets Grain's worker processes each take every n-th example (indices stay those of the example
  dataset, so example i is the same whatever the number of workers).
  """

  def __init__(self, examples: grain.MapDataset, *, rows: int, encoder_length: int, buckets: tuple, pack: bool,
               decoder_start_id: int):
    super().__init__(examples)
    self._config = dict(rows=rows, encoder_length=encoder_length, buckets=tuple(buckets), pack=pack,
                        decoder_start_id=decoder_start_id)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice  # The example dataset is infinite: only strided slices make sense.
    self._parents = (self._parent.slice(sl),)

  def __iter__(self) -> PackedBatchIterator:
    return PackedBatchIterator(self._parent, **self._config)

  def __str__(self) -> str:
    return f"PackedBatchDataset({self._config})"


class PackedBatchIterator(grain.DatasetIterator):
  """Iterator of PackedBatchDataset; its state is JSON (Grain's checkpoint handler writes it as such)."""

  def __init__(self, examples: grain.MapDataset, *, rows, encoder_length, buckets, pack, decoder_start_id):
    super().__init__()
    self._examples = examples
    self._rows, self._encoder_length, self._buckets = rows, encoder_length, buckets
    self._pack, self._decoder_start_id = pack, decoder_start_id
    self._next = 0
    self._reset_packers()

  def _new_packer(self, bucket: int) -> RowPacker:
    max_segments = self._encoder_length if self._pack else 1
    return RowPacker(self._rows, self._encoder_length, self._buckets[bucket], max_segments)

  def _reset_packers(self):
    self._packers = [self._new_packer(b) for b in range(len(self._buckets))]
    self._pending = [[] for _ in self._buckets]  # Example indices in each packer, in insertion order.

  def _add(self, index: int, example: dict) -> dict | None:
    """Adds an example; returns the batch it closed, if any."""
    inputs, targets = example["inputs"], example["targets"]
    b = choose_bucket(len(inputs), len(targets), self._encoder_length, self._buckets, self._pack)
    if self._packers[b].try_add(inputs, targets):
      self._pending[b].append(index)
      return None
    batch = self._packers[b].batch(self._decoder_start_id)
    self._packers[b] = self._new_packer(b)
    self._packers[b].try_add(inputs, targets)
    self._pending[b] = [index]
    return batch

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      index = self._next
      batch = self._add(index, self._examples[index])
      self._next += 1
      if batch is not None:
        return batch

  def get_state(self) -> dict[str, Any]:
    return {"next": self._next, "pending": [list(p) for p in self._pending]}

  def set_state(self, state: dict[str, Any]):
    self._reset_packers()
    for indices in state["pending"]:
      for index in indices:
        if self._add(index, self._examples[index]) is not None:
          raise ValueError("iterator state does not match this pipeline (a pending example closed a batch)")
    self._next = state["next"]

  def __str__(self) -> str:
    return f"PackedBatchIterator(next={self._next})"


def padding_fractions(batch: dict[str, np.ndarray]) -> dict[str, float]:
  """Share of encoder and decoder positions that hold padding."""
  return {"encoder_padding": float(np.mean(batch["encoder_segment_ids"] == 0)),
          "decoder_padding": float(np.mean(batch["decoder_segment_ids"] == 0))}
