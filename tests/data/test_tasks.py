"""Fine-tuning tasks: embedded task sizes, the split and its hold-out from pretraining, file tasks, batches, errors."""

import json
from collections import Counter

import numpy as np
import pytest

from fat5_jax.config import ConfigError
from fat5_jax.data import corpus, packing, tasks

FRACTION = 0.02  # data.validation_fraction's default


class WordLengthTokenizer:
  """One token per word (10 + its length): batches can be checked by hand."""
  pad_id, eos_id = 0, 1

  def encode_batch(self, texts):
    return [[10 + len(word) for word in text.split()] for text in texts]


@pytest.fixture(scope="module")
def category():
  return {split: tasks.load_task(tasks.WIKI_FR_CATEGORY, split, validation_fraction=FRACTION) for split in tasks.SPLITS}


def test_embedded_category_task(category):
  task = category["train"][0]
  assert task == tasks.Task("wiki_fr_category", "classification", tasks.WIKI_FR_CATEGORIES)
  sizes = {split: len(examples) for split, (_, examples) in category.items()}
  assert sizes == {"train": 8714, "validation": 1029, "test": 212}
  counts = Counter(task.labels[e["label"]] for _, examples in category.values() for e in examples)
  assert len(counts) == 11 and counts["Personnalités"] == 1999 and counts["Mathématiques"] == 290
  assert 0.19 < counts.most_common(1)[0][1] / sum(counts.values()) < 0.21
  assert all(e["target"] == task.labels[e["label"]] for e in category["test"][1])
  baseline = tasks.majority_baseline(task, category["train"][1], category["test"][1])
  assert baseline == {"majority": pytest.approx(39 / 212)}  # Personnalités, the train majority, on the test split.


def test_embedded_description_task():
  sizes = {}
  for split in tasks.SPLITS:
    task, examples = tasks.load_task(tasks.WIKI_FR_DESCRIPTION, split, validation_fraction=FRACTION)
    sizes[split] = len(examples)
  assert task == tasks.Task("wiki_fr_description", "generation", ())
  assert sizes == {"train": 8443, "validation": 1001, "test": 203}  # 9,647 articles have a description.
  assert examples[0]["label"] == -1 and examples[0]["target"] and examples[0]["target"] == examples[0]["target"].strip()
  assert tasks.majority_baseline(task, examples, examples) == {}


def test_split_is_deterministic_disjoint_and_its_test_part_is_held_out_of_pretraining(category):
  again = tasks.load_task(tasks.WIKI_FR_CATEGORY, "validation", validation_fraction=FRACTION)
  assert again == category["validation"]
  texts = {split: {e["text"] for e in examples} for split, (_, examples) in category.items()}
  assert not (texts["train"] & texts["validation"] or texts["train"] & texts["test"]
              or texts["validation"] & texts["test"])
  pretraining = {"train": set(), "validation": set()}
  for split, text in corpus.iter_documents(corpus.WIKI_FR, "text", FRACTION):
    pretraining[split].add(text)
  assert not texts["test"] & pretraining["train"]
  assert texts["test"] == pretraining["validation"]
  description_test = tasks.load_task(tasks.WIKI_FR_DESCRIPTION, "test", validation_fraction=FRACTION)[1]
  assert {e["text"] for e in description_test} <= texts["test"]


def _rows(count):
  """Inputs with three labels (a, b, c) cycling."""
  return [{"question": f"document {i} du fichier", "answer": "abc"[i % 3]} for i in range(count)]


def _write(path, rows):
  suffix = path.suffix
  if suffix == ".jsonl":
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
  elif suffix == ".csv":
    path.write_text("question,answer\n" + "".join(f"{r['question']},{r['answer']}\n" for r in rows), encoding="utf-8")
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_file_task_carves_its_splits_out_of_one_file(tmp_path, suffix):
  path = _write(tmp_path / f"qa{suffix}", _rows(300))
  loaded = {split: tasks.load_task(path, split, validation_fraction=0.1, input_field="question", target_field="answer")
            for split in tasks.SPLITS}
  task = loaded["train"][0]
  assert task == tasks.Task("qa", "classification", ("a", "b", "c"))
  examples = {split: examples for split, (_, examples) in loaded.items()}
  assert sum(map(len, examples.values())) == 300 and all(examples.values())
  for split, split_examples in examples.items():
    for e in split_examples:
      assert tasks.split_of_document(e["text"], 0.1) == split and e["label"] == "abc".index(e["target"])


def test_file_task_with_its_own_test_file_and_a_generation_target(tmp_path):
  train = _write(tmp_path / "train.jsonl", [{"text": f"phrase {i}", "target": f"réponse {i}"} for i in range(50)])
  test = _write(tmp_path / "test.jsonl", [{"text": "phrase test", "target": "réponse test"}])
  files = {"train": train, "validation": "", "test": test}  # An empty path is a split to carve out of train.
  task, test_examples = tasks.load_task("mine", "test", validation_fraction=0.1, files=files)
  assert task == tasks.Task("mine", "generation", ())
  assert test_examples == [{"text": "phrase test", "target": "réponse test", "label": -1}]
  train_examples = tasks.load_task("mine", "train", validation_fraction=0.1, files=files)[1]
  validation_examples = tasks.load_task("mine", "validation", validation_fraction=0.1, files=files)[1]
  assert len(train_examples) + len(validation_examples) == 50  # The train file's hash-test rows stay in train.
  forced = tasks.load_task("mine", "train", validation_fraction=0.1, files=files, kind="classification")[0]
  assert forced.kind == "classification" and len(forced.labels) == 50


def test_seq2seq_batches_by_hand():
  examples = [{"text": "un deux trois quatre cinq six", "target": "a bb", "label": 0},
              {"text": "sept", "target": "ccc dddd eeeee", "label": 1},
              {"text": "huit neuf", "target": "ff", "label": 0}]
  got = list(tasks.batches(examples, WordLengthTokenizer(), head="seq2seq", rows=2, input_length=4, target_length=3,
                           seed=0, shuffle=False))
  assert len(got) == 2 and set(got[0]) == set(packing.BATCH_KEYS)
  first, last = got
  np.testing.assert_array_equal(first["encoder_input_tokens"], [[12, 14, 15, 1], [14, 1, 0, 0]])  # Cut, then EOS.
  np.testing.assert_array_equal(first["encoder_segment_ids"], [[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(first["decoder_target_tokens"], [[11, 12, 1], [13, 14, 1]])
  np.testing.assert_array_equal(first["decoder_input_tokens"], [[0, 11, 12], [0, 13, 14]])
  np.testing.assert_array_equal(last["encoder_input_tokens"], [[14, 14, 1, 0], [0, 0, 0, 0]])  # A zero padding row.
  np.testing.assert_array_equal(last["decoder_target_tokens"], [[12, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(last["decoder_input_tokens"], [[0, 12, 0], [0, 0, 0]])
  np.testing.assert_array_equal(last["decoder_segment_ids"], [[1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(last["decoder_loss_weights"], [[1, 1, 0], [0, 0, 0]])
  assert last["decoder_loss_weights"].dtype == np.float32 and last["encoder_input_tokens"].dtype == np.int32


def test_classification_batches_by_hand_and_shuffling():
  examples = [{"text": "a " * i, "target": str(i % 2), "label": i % 2} for i in range(1, 6)]
  got = list(tasks.batches(examples, WordLengthTokenizer(), head="classification", rows=2, input_length=3,
                           target_length=2, seed=0, shuffle=False))
  assert sorted(got[0]) == ["encoder_input_tokens", "encoder_positions", "encoder_segment_ids", "label_weights",
                            "labels"]
  np.testing.assert_array_equal(got[0]["encoder_input_tokens"], [[11, 1, 0], [11, 11, 1]])
  np.testing.assert_array_equal(got[2]["encoder_input_tokens"], [[11, 11, 1], [0, 0, 0]])
  np.testing.assert_array_equal(got[2]["labels"], [1, 0])
  np.testing.assert_array_equal(got[2]["label_weights"], [1, 0])
  assert got[2]["labels"].dtype == np.int32 and got[2]["label_weights"].dtype == np.float32

  def order(seed):
    batches = tasks.batches(examples, WordLengthTokenizer(), head="classification", rows=2, input_length=8,
                            target_length=2, seed=seed, shuffle=True)
    return [int(row.sum()) for b in batches for row, w in zip(b["encoder_segment_ids"], b["label_weights"]) if w]
  assert order(3) == order(3) and sorted(order(3)) == [2, 3, 4, 5, 6] and order(3) != order(4)


def test_majority_baseline_by_hand():
  task = tasks.Task("t", "classification", ("x", "y"))
  train = [{"label": 1}, {"label": 1}, {"label": 0}]
  assert tasks.majority_baseline(task, train, [{"label": 1}, {"label": 0}, {"label": 0}, {"label": 1}]) == {
      "majority": 0.5}


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".jsonl", "does not exist"),
    ('{"text": "a", "target": "b"}\n', ".txt", "unknown type"),
    ('{"text": "a", "target": "b"}\n{"text": "a"\n', ".jsonl", "line 2: not JSON"),
    ('{"text": "a", "target": "b"}\n{"text": "a"}\n', ".jsonl", "line 2: no field 'target'"),
    ('{"text": "a", "target": " "}\n', ".jsonl", "line 1: field 'target' is ' ', not a non-empty string"),
    ('["a", "b"]\n', ".jsonl", "line 1: a JSON list, not an object"),
    ("text,target\na,b\nc,d,e\n", ".csv", "line 3: 2 columns expected"),
    ("", ".jsonl", "holds no row"),
])
def test_bad_files_fail_in_one_line(tmp_path, content, suffix, message):
  path = tmp_path / f"task{suffix}"
  if content is not None:
    path.write_text(content, encoding="utf-8")
  with pytest.raises(ConfigError, match=message) as error:
    tasks.load_task(str(path), "train", validation_fraction=0.1, files={"train": str(path)})
  assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_bad_requests_fail_in_one_line(tmp_path):
  train = _write(tmp_path / "train.jsonl", [{"text": f"phrase {i}", "target": "oui"} for i in range(10)])
  test = _write(tmp_path / "test.jsonl", [{"text": "phrase", "target": "non"}])
  with pytest.raises(ConfigError, match="target 'non' is not one of the 1 labels"):
    tasks.load_task("t", "test", validation_fraction=0.1, files={"train": train, "test": test})
  with pytest.raises(ConfigError, match="neither an embedded task"):
    tasks.load_task("wiki_fr_sentiment", "train", validation_fraction=0.1)
  with pytest.raises(ConfigError, match="split 'dev'"):
    tasks.load_task(train, "dev", validation_fraction=0.1)
  with pytest.raises(ConfigError, match="'train' \\(required\\)"):
    tasks.load_task("t", "test", validation_fraction=0.1, files={"test": test})
  with pytest.raises(ConfigError, match="is generation, not classification"):
    tasks.load_task(tasks.WIKI_FR_DESCRIPTION, "test", validation_fraction=0.1, kind="classification")
  generation = [{"text": "a", "target": "b", "label": -1}]
  with pytest.raises(ConfigError, match="the classification head cannot learn generation examples; use seq2seq"):
    next(tasks.batches(generation, WordLengthTokenizer(), head="classification", rows=1, input_length=4,
                       target_length=4, seed=0, shuffle=False))
  with pytest.raises(ConfigError, match="the token_classification head cannot learn generation examples"):
    next(tasks.batches(generation, WordLengthTokenizer(), head="token_classification", rows=1, input_length=4,
                       target_length=4, seed=0, shuffle=False))
  with pytest.raises(ConfigError, match="head 'tagging'"):
    next(tasks.batches(generation, WordLengthTokenizer(), head="tagging", rows=1, input_length=4,
                       target_length=4, seed=0, shuffle=False))
