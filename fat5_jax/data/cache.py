"""Pre-tokenized corpus on disk: numpy shards read by memory map, keyed by corpus and tokenizer.

Two Grain sources read it: `PieceSource` (documents, long ones cut into pieces) and `StreamSource` (the split as
one eos-separated stream cut into chunks of each drawn denoiser's raw length, `data.stream`).

Layout of `{workdir}/cache/tokens-{key}/`: per split, `{split}-{i:05d}.tokens.npy` (every document's ids one
after another, uint16 when the vocabulary fits) and `{split}-{i:05d}.offsets.npy` (int64, documents + 1 bounds),
plus `meta.json`. The key hashes the corpus files (paths, sizes, mtimes), the text field, the validation fraction
and the tokenizer model's bytes, so a second run with the same inputs opens the cache at once and any change
builds a new one. The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
from typing import Sequence

import numpy as np
import tqdm

from fat5_jax.config import ConfigError, DataConfig
from fat5_jax.data import corpus as corpus_lib
from fat5_jax.data.tokenizer import Tokenizer

CACHE_VERSION = 1
SHARD_TOKENS = 1 << 26  # 64M tokens (128 MiB in uint16) per shard file.
MIN_DOCUMENT_TOKENS = 2  # Span corruption needs a noise token and a kept one.
_ENCODE_BATCH = 2048  # Documents per sentencepiece call.


def cache_key(data_config: DataConfig, tokenizer: Tokenizer) -> str:
  with open(tokenizer.path, "rb") as f:
    model_hash = hashlib.sha256(f.read()).hexdigest()
  identity = {"version": CACHE_VERSION, "tokenizer": model_hash,
              **corpus_lib.fingerprint(data_config.corpus, data_config.text_field, data_config.validation_fraction)}
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def pretokenize(data_config: DataConfig, workdir: str, tokenizer: Tokenizer) -> str:
  """Directory of the tokenized corpus, building it on the first call (with a progress bar)."""
  directory = os.path.join(workdir, "cache", f"tokens-{cache_key(data_config, tokenizer)}")
  if os.path.exists(os.path.join(directory, "meta.json")):
    return directory
  tmp = f"{directory}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  stats = corpus_lib.CorpusStats()
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  writers = {split: _ShardWriter(tmp, split, dtype) for split in corpus_lib.SPLITS}
  docs = corpus_lib.iter_documents(data_config.corpus, data_config.text_field, data_config.validation_fraction,
                                   stats, max_malformed_fraction=data_config.max_malformed_fraction)
  with tqdm.tqdm(desc=f"tokenizing {data_config.corpus}", unit=" docs", mininterval=2.0) as bar:
    for batch in _batched(docs, _ENCODE_BATCH):
      ids = tokenizer.encode_batch([text for _, text in batch])
      for (split, _), doc in zip(batch, ids):
        writers[split].add(doc)
      bar.update(len(batch))
  meta = {"corpus_stats": dataclasses.asdict(stats), "dtype": np.dtype(dtype).name,
          **{split: w.close() for split, w in writers.items()}}
  for split in corpus_lib.SPLITS:
    if meta[split]["documents"] == 0:
      shutil.rmtree(tmp)
      raise ConfigError(f"data.corpus={data_config.corpus!r} has no usable document in the {split} split "
                       f"({meta[split]['too_short']} too short); use a larger corpus or validation_fraction")
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  try:
    os.replace(tmp, directory)
  except OSError:  # Another process finished the same cache first.
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("tokenized corpus in %s: %s", directory, meta)
  return directory


def read_meta(directory: str) -> dict:
  with open(os.path.join(directory, "meta.json")) as f:
    return json.load(f)


def _batched(items, size):
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


class _ShardWriter:
  """Appends documents to shard files of about SHARD_TOKENS tokens."""

  def __init__(self, directory: str, split: str, dtype):
    self._prefix = os.path.join(directory, split)
    self._dtype = dtype
    self._docs, self._tokens, self._shard = [], 0, 0
    self.stats = {"documents": 0, "tokens": 0, "too_short": 0, "shards": 0}

  def add(self, ids: list[int]):
    if len(ids) < MIN_DOCUMENT_TOKENS:
      self.stats["too_short"] += 1
      return
    self._docs.append(np.asarray(ids, self._dtype))
    self._tokens += len(ids)
    if self._tokens >= SHARD_TOKENS:
      self._flush()

  def close(self) -> dict:
    self._flush()
    return self.stats

  def _flush(self):
    if not self._docs:
      return
    offsets = np.zeros(len(self._docs) + 1, np.int64)
    np.cumsum([len(d) for d in self._docs], out=offsets[1:])
    np.save(f"{self._prefix}-{self._shard:05d}.tokens.npy", np.concatenate(self._docs))
    np.save(f"{self._prefix}-{self._shard:05d}.offsets.npy", offsets)
    self.stats["documents"] += len(self._docs)
    self.stats["tokens"] += int(offsets[-1])
    self.stats["shards"] += 1
    self._docs, self._tokens, self._shard = [], 0, self._shard + 1


class PieceSource:
  """Grain data source over one split: documents cut into pieces of at most `max_length` tokens.

  A longer document is cut into ceil(length / max_length) near-equal pieces, so every piece but a short
  document's is at least half of `max_length`. Item i is piece i as an int32 array. Memory maps are opened
  lazily so that the source pickles cheaply into Grain's worker processes.
  """

  def __init__(self, directory: str, split: str, max_length: int):
    if max_length < MIN_DOCUMENT_TOKENS:
      raise ValueError(f"max_length={max_length} is below {MIN_DOCUMENT_TOKENS}")
    self._files = sorted(glob.glob(os.path.join(directory, f"{split}-*.tokens.npy")))
    if not self._files:
      raise ValueError(f"no {split} shard in {directory}")
    self._tokens = None
    shard, start, end = [], [], []
    for i, path in enumerate(self._files):
      offsets = np.load(path.replace(".tokens.npy", ".offsets.npy"))
      lengths = np.diff(offsets)
      count = -(-lengths // max_length)
      doc = np.repeat(np.arange(len(lengths)), count)
      part = np.arange(len(doc)) - np.repeat(np.cumsum(count) - count, count)
      start.append(offsets[doc] + part * lengths[doc] // count[doc])
      end.append(offsets[doc] + (part + 1) * lengths[doc] // count[doc])
      shard.append(np.full(len(doc), i, np.int32))
    self._shard, self._start, self._end = np.concatenate(shard), np.concatenate(start), np.concatenate(end)

  def __len__(self) -> int:
    return len(self._shard)

  def __getitem__(self, index: int) -> np.ndarray:
    if self._tokens is None:
      self._tokens = [np.load(path, mmap_mode="r") for path in self._files]
    shard = self._tokens[self._shard[index]]
    return np.asarray(shard[self._start[index]:self._end[index]], np.int32)

  def __getstate__(self):
    return {**self.__dict__, "_tokens": None}

  def __repr__(self) -> str:
    return f"PieceSource({len(self)} pieces in {len(self._files)} shards)"


class StreamSource:
  """Grain data source over one split read as one stream: each document followed by eos, all in corpus order, cut
  into consecutive chunks of exactly the raw length of the denoiser drawn for each chunk.

  The plan (each chunk's denoiser, hence its start) is drawn once from `seed` and the denoisers' proportions and
  kept as two arrays, so item i is rebuilt on its own, the same in every run and process: {"tokens": int32 chunk,
  "denoiser": index}. The stream's tail shorter than the next planned chunk is dropped (under one chunk per split).
  """

  _PLAN_BLOCK = 1 << 16  # Denoisers drawn at a time; fixed, so the plan depends only on the seed.

  def __init__(self, directory: str, split: str, raw_lengths: Sequence[int], proportions: Sequence[float],
               seed: int, eos_id: int):
    self._files = sorted(glob.glob(os.path.join(directory, f"{split}-*.tokens.npy")))
    if not self._files:
      raise ValueError(f"no {split} shard in {directory}")
    self._tokens = None
    self._eos_id = eos_id
    self._raw_lengths = np.asarray(raw_lengths, np.int64)
    offsets = [np.load(path.replace(".tokens.npy", ".offsets.npy")) for path in self._files]
    self._shard_starts = np.cumsum([0] + [int(o[-1]) for o in offsets])  # Of each shard in the token sequence.
    lengths = np.concatenate([np.diff(o) for o in offsets])
    self._eos_positions = np.cumsum(lengths + 1) - 1  # Stream position of the eos after each document.
    stream_length = int(self._eos_positions[-1]) + 1
    rng = np.random.default_rng(seed)
    weights = np.asarray(proportions, np.float64) / np.sum(proportions)
    blocks, covered = [], 0
    while covered < stream_length:
      blocks.append(rng.choice(len(weights), size=self._PLAN_BLOCK, p=weights))
      covered += int(self._raw_lengths[blocks[-1]].sum())
    denoisers = np.concatenate(blocks)
    ends = np.cumsum(self._raw_lengths[denoisers])
    count = int(np.searchsorted(ends, stream_length, side="right"))
    if count == 0:
      raise ConfigError(f"the {split} split's stream holds {stream_length} tokens, fewer than one chunk of "
                        f"{int(self._raw_lengths[denoisers[0]])}: use a larger corpus or validation_fraction, or "
                        "shorter rows")
    self._denoisers = denoisers[:count].astype(np.int8)
    self._starts = ends[:count] - self._raw_lengths[self._denoisers]

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> dict:
    denoiser = int(self._denoisers[index])
    start = int(self._starts[index])
    end = start + int(self._raw_lengths[denoiser])
    # A stream position p holds token p - (eos before p) of the token sequence, or an eos.
    first_eos, last_eos = np.searchsorted(self._eos_positions, [start, end])
    tokens = self._read(start - first_eos, end - last_eos)
    eos_offsets = self._eos_positions[first_eos:last_eos] - start
    chunk = np.insert(tokens, eos_offsets - np.arange(len(eos_offsets)), self._eos_id)
    return {"tokens": chunk, "denoiser": denoiser}

  def _read(self, begin: int, end: int) -> np.ndarray:
    """Tokens [begin, end) of the split's token sequence (all shards one after another)."""
    if self._tokens is None:
      self._tokens = [np.load(path, mmap_mode="r") for path in self._files]
    parts = []
    shard = int(np.searchsorted(self._shard_starts, begin, side="right")) - 1
    while begin < end:
      stop = min(end, int(self._shard_starts[shard + 1]))
      base = int(self._shard_starts[shard])
      parts.append(np.asarray(self._tokens[shard][begin - base:stop - base], np.int32))
      begin, shard = stop, shard + 1
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)

  def __getstate__(self):
    return {**self.__dict__, "_tokens": None}

  def __repr__(self) -> str:
    return f"StreamSource({len(self)} chunks in {len(self._files)} shards)"
