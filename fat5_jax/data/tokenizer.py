"""Sentencepiece tokenizer with FAT5's vocabulary layout, trained on the corpus or loaded from a .model file.

Id layout (T5's): pad 0, eos 1, unk 2, then the UL2 prefixes [R] [S] [X] as single pieces, 256 byte-fallback
pieces and the learned pieces. The `<extra_id_N>` sentinels are not pieces of the sentencepiece model: like
T5's extra ids they follow it, counting down from the top, so `<extra_id_0>` is the tokenizer's highest id
(`vocab_size - 1`) and `<extra_id_N>` is `vocab_size - 1 - N`. The same rule applies to a loaded model such as
T5's spiece.model (32,000 pieces + 100 sentinels = 32,100 <= 32,128 model rows).
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil

import numpy as np
import sentencepiece as spm

from fat5_jax.config import ConfigError, DataConfig
from fat5_jax.data import corpus as corpus_lib

PREFIXES = ("[R]", "[S]", "[X]")
_MAX_SENTENCE_CHARS = 4096  # Sentencepiece drops longer sentences; cut them instead.
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


class Tokenizer:
  """Encode/decode with sentinels appended after the sentencepiece pieces."""

  def __init__(self, path: str, num_sentinels: int):
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.num_pieces = self._sp.get_piece_size()
    self.num_sentinels = num_sentinels
    self.vocab_size = self.num_pieces + num_sentinels
    self.pad_id = self._sp.pad_id()
    self.eos_id = self._sp.eos_id()
    self.unk_id = self._sp.unk_id()

  def encode(self, text: str | list[str]) -> list[int] | list[list[int]]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=os.cpu_count() or 1)

  def decode(self, ids, show_special: bool = False) -> str:
    """Text of `ids`; sentinels appear as `<extra_id_N>`; with show_special, pad and eos too."""
    out, run = [], []
    for i in (int(i) for i in ids):
      special = self._special_text(i, show_special)
      if special is None:
        run.append(i)
        continue
      if run:
        out.append(self._sp.decode(run))
        run = []
      out.append(special)
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  def sentinel_id(self, i: int) -> int:
    if not 0 <= i < self.num_sentinels:
      raise ValueError(f"sentinel {i} outside [0, {self.num_sentinels})")
    return self.vocab_size - 1 - i

  def sentinel_ids(self, count: int) -> np.ndarray:
    """Ids of <extra_id_0> ... <extra_id_{count-1}>, in that order."""
    if count > self.num_sentinels:
      raise ValueError(f"{count} sentinels requested, the tokenizer has {self.num_sentinels}")
    return self.vocab_size - 1 - np.arange(count, dtype=np.int32)

  def prefix_id(self, prefix: str) -> int:
    """Id of a UL2 prefix piece such as "[R]"; raises if the model does not hold it as one piece."""
    i = self._sp.piece_to_id(prefix)
    if i == self.unk_id or self._sp.id_to_piece(i) != prefix:
      raise ConfigError(f"tokenizer {self.path} has no piece {prefix!r}; train one with data.tokenizer_path='' or "
                       "change the denoiser prefixes")
    return i

  def _special_text(self, i: int, show_special: bool) -> str | None:
    if i >= self.vocab_size:  # model rows past the tokenizer (e.g. T5's 32,128 > 32,100): no text of their own
      return f"<unused_{i}>"
    if i >= self.num_pieces:
      return f"<extra_id_{self.vocab_size - 1 - i}>"
    if show_special and i in (self.pad_id, self.eos_id):
      return self._sp.id_to_piece(i)
    return None


def load_tokenizer(data_config: DataConfig, workdir: str, vocab_size: int) -> Tokenizer:
  """The run's tokenizer at {workdir}/tokenizer/spm.model: reused if present, else copied or trained."""
  path = os.path.join(workdir, "tokenizer", "spm.model")
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if data_config.tokenizer_path:
      if not os.path.isfile(data_config.tokenizer_path):
        raise ConfigError(f"data.tokenizer_path={data_config.tokenizer_path!r} does not exist")
      shutil.copyfile(data_config.tokenizer_path, path + ".tmp")
    else:
      with open(path + ".tmp", "wb") as f:
        f.write(train_sentencepiece(data_config))
    os.replace(path + ".tmp", path)
  tokenizer = Tokenizer(path, data_config.num_sentinels)
  if tokenizer.vocab_size > vocab_size:
    raise ConfigError(f"tokenizer {path} has {tokenizer.num_pieces} pieces + {tokenizer.num_sentinels} sentinels = "
                     f"{tokenizer.vocab_size} ids, more than model.vocab_size={vocab_size}")
  if (tokenizer.pad_id, tokenizer.eos_id) != (0, 1):
    raise ConfigError(f"tokenizer {path} has pad={tokenizer.pad_id}, eos={tokenizer.eos_id}; FAT5 needs pad 0, eos 1")
  return tokenizer


def train_sentencepiece(data_config: DataConfig) -> bytes:
  """A serialized sentencepiece model trained on a sample of the train split's sentences."""
  sentences = sample_sentences(data_config)
  pieces = data_config.tokenizer_vocab_size - data_config.num_sentinels
  try:
    return _train(sentences, pieces, data_config.tokenizer_type)
  except RuntimeError as e:
    match = _TOO_HIGH.search(str(e))
    if not match:
      raise
    largest = int(match.group(2))
    logging.warning("corpus too small for %d pieces: training %d (+%d sentinels); the model keeps its vocab size",
                    pieces, largest, data_config.num_sentinels)
    return _train(sentences, largest, data_config.tokenizer_type)


def sample_sentences(data_config: DataConfig) -> list[str]:
  """Up to tokenizer_max_sentences lines of the train split, a seeded reservoir sample in corpus order."""
  rng = random.Random(data_config.seed)
  limit = data_config.tokenizer_max_sentences
  sample, seen = [], 0
  docs = corpus_lib.iter_documents(data_config.corpus, data_config.text_field, data_config.validation_fraction,
                                   max_malformed_fraction=data_config.max_malformed_fraction)
  for split, doc in docs:
    if split != "train":
      continue
    for line in doc.split("\n"):
      for start in range(0, len(line), _MAX_SENTENCE_CHARS):
        piece = line[start:start + _MAX_SENTENCE_CHARS]
        if not piece.strip():
          continue
        seen += 1
        if len(sample) < limit:
          sample.append(piece)
        else:
          j = rng.randrange(seen)
          if j < limit:
            sample[j] = piece
  if not sample:
    raise ConfigError(f"data.corpus={data_config.corpus!r} has no training text for the tokenizer")
  return sample


def _train(sentences: list[str], pieces: int, model_type: str) -> bytes:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=pieces, model_type=model_type,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, user_defined_symbols=list(PREFIXES), split_digits=True,
      byte_fallback=True, character_coverage=0.9999, max_sentence_length=4 * _MAX_SENTENCE_CHARS,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  return model.getvalue()
