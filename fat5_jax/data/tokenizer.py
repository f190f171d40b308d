"""Sentencepiece tokenizer with FAT5's vocabulary layout, trained on the corpus or loaded from a .model file.

Id layout (T5's): pad 0, eos 1, unk 2, then the UL2 prefixes [R] [S] [X] as single pieces, 256 byte-fallback
pieces and the learned pieces. The `<extra_id_N>` sentinels are not pieces of the sentencepiece model: like
T5's extra ids they follow it, counting down from the top, so `<extra_id_0>` is the tokenizer's highest id
(`vocab_size - 1`) and `<extra_id_N>` is `vocab_size - 1 - N`. The same rule applies to a loaded model such as
T5's spiece.model (32,000 pieces + 100 sentinels = 32,100 <= 32,128 model rows).
"""

from __future__ import annotations

import hashlib
import io
import json
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
SOURCE_FILE = "source.json"  # beside spm.model: where it came from (see load_tokenizer)
_TRAINING_FIELDS = ("corpus", "text_field", "validation_fraction", "tokenizer_type", "tokenizer_vocab_size",
                    "tokenizer_max_sentences", "seed")
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

  def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, (begin, end) of each piece) per text, as UTF-8 byte offsets into the text, surrounding spaces
    included (sentencepiece's). A character split into byte pieces spans its last piece; the others are empty at its
    start."""
    return [([piece.id for piece in text.pieces], [(piece.begin, piece.end) for piece in text.pieces])
            for text in self._sp.encode(texts, out_type="proto", num_threads=os.cpu_count() or 1)]

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

  def decode_generated(self, ids) -> str:
    """Text of generated ids up to their first EOS (what follows it is padding)."""
    ids = [int(i) for i in ids]
    return self.decode(ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids)

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


def model_path(workdir: str) -> str:
  """Where a run keeps its sentencepiece model."""
  return os.path.join(workdir, "tokenizer", "spm.model")


def load_tokenizer(data_config: DataConfig, workdir: str, vocab_size: int) -> Tokenizer:
  """The run's tokenizer at {workdir}/tokenizer/spm.model: reused if it is the one the config asks for, else copied
  (after checks, so a bad file never lands there) or trained. Its origin is kept in source.json beside it and
  checked at every start: weights only mean something with the tokenizer they were trained with."""
  path = model_path(workdir)
  record = read_source(workdir)
  if os.path.exists(path):
    if record is None:  # made before records existed: take the config's word for it, once
      record = _wanted(data_config, path)
      _check(record, data_config, path)
      write_source(workdir, record)
      logging.warning("tokenizer %s had no record of its origin (an older version made it): recorded as %s", path,
                      _describe(record))
    else:
      _check(record, data_config, path)
    return _validated(path, data_config, vocab_size)
  if record is not None and record["source"] == "imported" and not data_config.tokenizer_path:
    raise ConfigError(f"{workdir} holds weights imported from {record['hf_dir']} without their tokenizer, and "
                      "training a new one would give them meaningless ids: set data.tokenizer_path to the "
                      "checkpoint's spiece.model")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if data_config.tokenizer_path:
    _validated(_existing(data_config.tokenizer_path), data_config, vocab_size)
    shutil.copyfile(data_config.tokenizer_path, path + ".tmp")
  else:
    with open(path + ".tmp", "wb") as f:
      f.write(train_sentencepiece(data_config))
  write_source(workdir, _wanted(data_config, path + ".tmp"))  # first: a crash in between leaves no unrecorded model
  os.replace(path + ".tmp", path)
  return _validated(path, data_config, vocab_size)


def recorded_tokenizer(data_config: DataConfig, workdir: str) -> Tokenizer | None:
  """The tokenizer a run in `workdir` used, checked against its record; None when the workdir has none. Never
  trains or copies one (export_hf: the weights' ids mean something only with their own tokenizer)."""
  path, record = model_path(workdir), read_source(workdir)
  if not os.path.exists(path):
    return None
  if record is not None:
    _check_unchanged(record, data_config, path)
  return Tokenizer(path, data_config.num_sentinels)


def import_tokenizer(hf_dir: str, workdir: str, data_config: DataConfig) -> str | None:
  """Makes the checkpoint's spiece.model the workdir's tokenizer (import_hf), recorded as imported, and returns its
  path; None when the checkpoint has none, recorded too, so that no run trains a tokenizer for these weights."""
  source, path = os.path.join(hf_dir, "spiece.model"), model_path(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  record = {"source": "imported", "hf_dir": os.path.abspath(hf_dir), "num_sentinels": data_config.num_sentinels}
  if os.path.isfile(source):
    try:
      Tokenizer(source, data_config.num_sentinels)
    except RuntimeError as e:
      raise ConfigError(f"{source} is not a sentencepiece model ({str(e).splitlines()[0]})") from e
    shutil.copyfile(source, path + ".tmp")
    os.replace(path + ".tmp", path)
    write_source(workdir, {**record, "sha256": sha256(path)})
    return path
  if os.path.exists(path):  # from an earlier attempt in this workdir: it would give the weights meaningless ids
    os.remove(path)
  write_source(workdir, {**record, "sha256": None})
  return None


def read_source(workdir: str) -> dict | None:
  """The record of where {workdir}/tokenizer/spm.model came from, None if there is none."""
  try:
    with open(os.path.join(workdir, "tokenizer", SOURCE_FILE)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def write_source(workdir: str, record: dict):
  path = os.path.join(workdir, "tokenizer", SOURCE_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1)
  os.replace(path + ".tmp", path)


def sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def training_settings(data_config: DataConfig) -> dict:
  """What decides the pieces of a tokenizer we train, the corpus's size included (a corpus fixed in place)."""
  settings = {f"data.{name}": getattr(data_config, name) for name in _TRAINING_FIELDS}
  files = corpus_lib.resolve_files(data_config.corpus)
  settings["corpus bytes"] = sum(os.path.getsize(f) for f in files)
  return settings


def _wanted(data_config: DataConfig, path: str) -> dict:
  """The record of the tokenizer the config asks for, `path` holding it."""
  if data_config.tokenizer_path:
    source = {"source": "copied", "tokenizer_path": os.path.abspath(data_config.tokenizer_path),
              "tokenizer_path_sha256": sha256(_existing(data_config.tokenizer_path))}
  else:
    source = {"source": "trained", "settings": training_settings(data_config)}
  return {"sha256": sha256(path), "num_sentinels": data_config.num_sentinels, **source}


def _check(record: dict, data_config: DataConfig, path: str):
  """Raises ConfigError, in one line naming both, when the workdir's tokenizer is not the one the config asks for."""
  holds = f"{os.path.dirname(path)} holds {_describe(record)}"
  fix = "use another workdir, or set the config back"
  _check_unchanged(record, data_config, path)
  if data_config.tokenizer_path:
    asked = sha256(_existing(data_config.tokenizer_path))
    if record["source"] == "trained" or asked != record["sha256"]:
      raise ConfigError(f"{holds}; the config asks data.tokenizer_path={data_config.tokenizer_path!r} "
                        f"(sha256 {asked[:12]}): {fix}")
  elif record["source"] == "copied":
    raise ConfigError(f"{holds}; the config asks a tokenizer trained on data.corpus={data_config.corpus!r} "
                      f"(data.tokenizer_path is empty): {fix}")
  elif record["source"] == "trained":
    settings = training_settings(data_config)
    differ = [k for k in settings if settings[k] != record["settings"].get(k)]
    if differ:
      raise ConfigError(f"{os.path.dirname(path)} holds a tokenizer trained with "
                        + ", ".join(f"{k}={record['settings'].get(k)!r}" for k in differ) + "; the config asks "
                        + ", ".join(f"{k}={settings[k]!r}" for k in differ) + f": {fix}")


def _check_unchanged(record: dict, data_config: DataConfig, path: str):
  """Raises ConfigError when the model file is not the one recorded, or was recorded with other sentinels."""
  if record["sha256"] != sha256(path):
    then = (record["sha256"] or "none")[:12]
    raise ConfigError(f"{path} changed after it was recorded in {SOURCE_FILE} (sha256 {then} then, "
                      f"{sha256(path)[:12]} now): put the original back, or use another workdir")
  if record["num_sentinels"] != data_config.num_sentinels:
    raise ConfigError(f"{os.path.dirname(path)} holds {_describe(record)} with data.num_sentinels="
                      f"{record['num_sentinels']}, the config asks data.num_sentinels={data_config.num_sentinels}: "
                      "use another workdir, or set the config back")


def _describe(record: dict) -> str:
  sha = record["sha256"][:12]
  if record["source"] == "copied":
    return f"a copy of data.tokenizer_path={record['tokenizer_path']!r} (sha256 {sha})"
  if record["source"] == "imported":
    return f"the tokenizer imported with the weights of {record['hf_dir']} (sha256 {sha})"
  return "a tokenizer trained with " + ", ".join(f"{k}={v!r}" for k, v in record["settings"].items())


def _existing(tokenizer_path: str) -> str:
  if not os.path.isfile(tokenizer_path):
    raise ConfigError(f"data.tokenizer_path={tokenizer_path!r} does not exist")
  return tokenizer_path


def _validated(path: str, data_config: DataConfig, vocab_size: int) -> Tokenizer:
  """The tokenizer at `path` if it has what the config needs: FAT5's special ids, room in the model, the prefixes."""
  try:
    tokenizer = Tokenizer(path, data_config.num_sentinels)
  except (RuntimeError, OSError) as e:
    raise ConfigError(f"tokenizer {path} is not a sentencepiece model ({str(e).splitlines()[0]})") from e
  if tokenizer.vocab_size > vocab_size:
    raise ConfigError(f"tokenizer {path} has {tokenizer.num_pieces} pieces + {tokenizer.num_sentinels} sentinels = "
                     f"{tokenizer.vocab_size} ids, more than model.vocab_size={vocab_size}")
  if (tokenizer.pad_id, tokenizer.eos_id) != (0, 1):
    raise ConfigError(f"tokenizer {path} has pad={tokenizer.pad_id}, eos={tokenizer.eos_id}; FAT5 needs pad 0, eos 1")
  for prefix in sorted({d[3] for d in data_config.denoisers if d[3]}):
    tokenizer.prefix_id(prefix)
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
