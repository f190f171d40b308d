"""Token classification and question answering tasks: their files, their batches by hand, the alignment of words
and answers with real sentencepiece pieces, and the embedded wiki_fr_title_tagging / wiki_fr_description_span."""

import json

import numpy as np
import pytest

from fat5_jax import config as config_lib
from fat5_jax.config import ConfigError, DataConfig
from fat5_jax.data import corpus, tasks
from fat5_jax.data import tokenizer as tokenizer_lib

FRACTION = 0.02  # data.validation_fraction's default


class ChunkTokenizer:
  """A word's pieces are its 3-character chunks, each 10 + its length; offsets as sentencepiece gives them (UTF-8
  bytes, a piece that starts a word holds the space before it)."""
  pad_id, eos_id = 0, 1

  def _pieces(self, text):
    pieces, position = [], 0
    for word in text.split(" "):
      for i in range(0, len(word), 3):
        begin = len(text[:position + i].encode()) - (1 if i == 0 and position else 0)
        end = len(text[:position + min(i + 3, len(word))].encode())
        pieces.append((10 + len(word[i:i + 3]), (begin, end)))
      position += len(word) + 1
    return pieces

  def encode_batch(self, texts):
    return [[piece for piece, _ in self._pieces(text)] for text in texts]

  def encode_with_offsets(self, texts):
    return [([piece for piece, _ in pieces], [span for _, span in pieces]) for pieces in map(self._pieces, texts)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """A real tokenizer, trained on the wiki_fr corpus in seconds."""
  path = tmp_path_factory.mktemp("spm") / "spm.model"
  path.write_bytes(tokenizer_lib.train_sentencepiece(DataConfig(tokenizer_vocab_size=2048,
                                                                tokenizer_max_sentences=5000)))
  return tokenizer_lib.Tokenizer(str(path), num_sentinels=100)


def _write_jsonl(path, rows):
  path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
                  encoding="utf-8")
  return str(path)


TAGGED = [{"tokens": ["Jeanne", "Moreau", "vit", "à", f"Paris-{i}"], "labels": ["B-PER", "I-PER", "O", "O", "B-LOC"]}
          for i in range(40)]
QUESTIONS = [{"question": f"Qui est Meryl Streep {i} ?", "context": f"Meryl Streep {i}, née en 1949, est une actrice "
              "américaine.", "answer": "actrice américaine", "answer_start": 0} for i in range(40)]
for row in QUESTIONS:
  row["answer_start"] = row["context"].index("actrice")


def test_token_file_task(tmp_path):
  path = _write_jsonl(tmp_path / "ner.jsonl", TAGGED)
  loaded = {split: tasks.load_task(path, split, validation_fraction=0.1) for split in tasks.SPLITS}
  task = loaded["train"][0]
  assert task == tasks.Task("ner", "token_classification", ("B-LOC", "B-PER", "I-PER", "O"))  # sorted tags
  examples = {split: examples for split, (_, examples) in loaded.items()}
  assert sum(map(len, examples.values())) == 40 and all(examples.values())
  assert examples["train"][0]["labels"] == [1, 2, 3, 3, 0]
  for split, split_examples in examples.items():  # split by the words joined with spaces
    assert all(tasks.split_of_document(" ".join(e["words"]), 0.1) == split for e in split_examples)
  assert tasks.majority_baseline(task, examples["train"], examples["test"]) == {"majority": 0.4}  # O: 2 of 5 words


def test_token_file_task_from_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(TAGGED), str(tmp_path / "ner.parquet"))
  task, examples = tasks.load_task(str(tmp_path / "ner.parquet"), "train", validation_fraction=0.1)
  assert task.kind == "token_classification" and examples[0]["words"] == TAGGED[0]["tokens"]


def test_question_answering_file_task(tmp_path):
  train = _write_jsonl(tmp_path / "train.jsonl", QUESTIONS)
  test = _write_jsonl(tmp_path / "test.jsonl", QUESTIONS[:1])
  files = {"train": train, "test": test}
  task, test_examples = tasks.load_task("qa", "test", validation_fraction=0.1, files=files)
  assert task == tasks.Task("qa", "question_answering", ())
  assert test_examples == QUESTIONS[:1]
  train_examples = tasks.load_task("qa", "train", validation_fraction=0.1, files=files)[1]
  validation_examples = tasks.load_task("qa", "validation", validation_fraction=0.1, files=files)[1]
  assert len(train_examples) + len(validation_examples) == 40
  assert all(tasks.split_of_document(e["context"], 0.1) != "validation" for e in train_examples)  # by the context
  assert tasks.majority_baseline(task, train_examples, test_examples) == {}


GOOD_TOKENS = '{"tokens": ["a", "b"], "labels": ["X", "O"]}'
GOOD_QUESTION = '{"question": "q", "context": "le chat", "answer": "chat", "answer_start": 3}'


@pytest.mark.parametrize("second_line, message", [
    ('{"tokens": ["a"]}', "line 2: no field 'labels'"),
    ('{"tokens": "a b", "labels": ["O", "O"]}', "line 2: field 'tokens' is 'a b', not a non-empty list of non-empty"),
    ('{"tokens": [], "labels": []}', "line 2: field 'tokens' is \\[\\], not a non-empty list"),
    ('{"tokens": ["a", " "], "labels": ["O", "O"]}', "line 2: field 'tokens' is \\['a', ' '\\], not a non-empty"),
    ('{"tokens": ["a"], "labels": [1]}', "line 2: field 'labels' is \\[1\\], not a non-empty list"),
    ('{"tokens": ["a", "b"], "labels": ["O"]}', "line 2: 1 labels for 2 tokens"),
])
def test_bad_token_rows_fail_in_one_line(tmp_path, second_line, message):
  path = _write_jsonl(tmp_path / "ner.jsonl", [GOOD_TOKENS, second_line])
  with pytest.raises(ConfigError, match=message) as error:
    tasks.load_task(path, "train", validation_fraction=0.1)
  assert "\n" not in str(error.value) and path in str(error.value)


@pytest.mark.parametrize("second_line, message", [
    ('{"question": "q", "context": "le chat", "answer": "chat"}', "line 2: no field 'answer_start'"),
    ('{"question": "", "context": "le chat", "answer": "chat", "answer_start": 3}',
     "line 2: field 'question' is '', not a non-empty string"),
    ('{"question": "q", "context": "le chat", "answer": " ", "answer_start": 3}',
     "line 2: field 'answer' is ' ', not a non-empty string"),
    ('{"question": "q", "context": "le chat", "answer": "chat", "answer_start": "3"}',
     "line 2: field 'answer_start' is '3', not a character position"),
    ('{"question": "q", "context": "le chat", "answer": "chat", "answer_start": -1}',
     "line 2: field 'answer_start' is -1, not a character position"),
    ('{"question": "q", "context": "le chat", "answer": "chat", "answer_start": 2}',
     "line 2: the answer 'chat' does not occur at answer_start=2 of the context, which holds ' cha' there"),
])
def test_bad_question_rows_fail_in_one_line(tmp_path, second_line, message):
  path = _write_jsonl(tmp_path / "qa.jsonl", [GOOD_QUESTION, second_line])
  with pytest.raises(ConfigError, match=message) as error:
    tasks.load_task(path, "train", validation_fraction=0.1)
  assert "\n" not in str(error.value) and path in str(error.value)


def test_unknown_tag_and_mixed_formats_fail_in_one_line(tmp_path):
  train = _write_jsonl(tmp_path / "train.jsonl", [GOOD_TOKENS])
  test = _write_jsonl(tmp_path / "test.jsonl", ['{"tokens": ["a"], "labels": ["Y"]}'])
  with pytest.raises(ConfigError, match=f"task file '{test}': tag 'Y' is not one of the 2 tags of the train file"):
    tasks.load_task("t", "test", validation_fraction=0.1, files={"train": train, "test": test})
  questions = _write_jsonl(tmp_path / "questions.jsonl", [GOOD_QUESTION])
  with pytest.raises(ConfigError, match="line 1: no field 'tokens'"):  # the train file decides the format
    tasks.load_task("t", "test", validation_fraction=0.1, files={"train": train, "test": questions})
  with pytest.raises(ConfigError, match="line 1: no field 'question'"):  # a forced kind reads its own format
    tasks.load_task(train, "train", validation_fraction=0.1, kind="question_answering")
  tagging = [{"words": ["a"], "labels": [0]}]
  with pytest.raises(ConfigError, match="the classification head cannot learn token_classification examples; use "
                                        "token_classification"):
    next(tasks.batches(tagging, ChunkTokenizer(), head="classification", rows=1, input_length=4, target_length=2,
                       seed=0, shuffle=False))


@pytest.mark.parametrize("head", ["token_classification", "question_answering"])
def test_token_level_heads_refuse_text_file_fields(head):
  values = config_lib.to_config_dict().to_dict()
  values["finetune"].update(head=head, input_field="tokens")  # their files have fixed fields
  with pytest.raises(ConfigError, match=f"a {head} file has fixed fields"):
    config_lib.from_config_dict(values)


def test_token_classification_batches_by_hand():
  examples = [{"words": ["abcdefg", "hi", "jklm", "no"], "labels": [2, 0, 1, 2]},  # pieces 3 3 1 | 2 | 3 1 | 2
              {"words": ["pq"], "labels": [1]}]
  got = list(tasks.batches(examples, ChunkTokenizer(), head="token_classification", rows=3, input_length=7,
                           target_length=2, seed=0, shuffle=False))
  assert len(got) == 1 and sorted(got[0]) == sorted([*tasks.ENCODER_KEYS, "labels", "label_weights"])
  batch = got[0]
  # Cut to 6 pieces then EOS: "no" is cut off and unlabelled; "jklm" keeps its first piece.
  np.testing.assert_array_equal(batch["encoder_input_tokens"], [[13, 13, 11, 12, 13, 11, 1], [12, 1, 0, 0, 0, 0, 0],
                                                                [0] * 7])
  np.testing.assert_array_equal(batch["label_weights"], [[1, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0] * 7])
  np.testing.assert_array_equal(batch["labels"], [[2, 0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0] * 7])
  assert batch["labels"].dtype == np.int32 and batch["label_weights"].dtype == np.float32


def test_question_answering_batches_by_hand():
  context = "un deux trois quatre"  # pieces: un | deu x | tro is | qua tre
  examples = [{"question": "quoi", "context": context, "answer": "trois", "answer_start": 8},
              {"question": "abcdefghijkl", "context": context, "answer": "quatre", "answer_start": 14}]
  got = list(tasks.batches(examples, ChunkTokenizer(), head="question_answering", rows=3, input_length=10,
                           target_length=2, seed=0, shuffle=False))
  assert len(got) == 1 and sorted(got[0]) == sorted([*tasks.ENCODER_KEYS, "start_positions", "end_positions",
                                                     "label_weights"])
  batch = got[0]
  # Row 0: question (2 pieces), EOS, the context's 7 pieces cut to 6, EOS: "trois" is pieces 3-4 of the context.
  np.testing.assert_array_equal(batch["encoder_input_tokens"][0], [13, 11, 1, 12, 13, 11, 13, 12, 13, 1])
  # Row 1: the question is cut to input_length // 2 - 1 = 4 pieces; 4 context pieces fit: "quatre" is cut off.
  np.testing.assert_array_equal(batch["encoder_input_tokens"][1], [13, 13, 13, 13, 1, 12, 13, 11, 13, 1])
  np.testing.assert_array_equal(batch["start_positions"], [3 + 3, 0, 0])
  np.testing.assert_array_equal(batch["end_positions"], [3 + 4, 0, 0])
  np.testing.assert_array_equal(batch["label_weights"], [1, 0, 0])  # cut off, padding
  assert batch["start_positions"].dtype == np.int32 and batch["label_weights"].dtype == np.float32


def test_answer_pieces_by_hand():
  # "né à 😀x" as sentencepiece pieces it: "▁né", "▁à", "▁", the emoji's 4 byte pieces (the last spans it), "x".
  context = "né à 😀x"
  offsets = [(0, 3), (3, 6), (6, 7), (7, 7), (7, 7), (7, 7), (7, 11), (11, 12)]
  assert tasks.answer_pieces(context, offsets, 0, "né") == (0, 0)
  assert tasks.answer_pieces(context, offsets, 1, "é à") == (0, 1)  # the pieces that hold it, whole
  assert tasks.answer_pieces(context, offsets, 5, "😀") == (3, 6)  # from the emoji's first byte piece
  assert tasks.answer_pieces(context, offsets, 5, "😀x") == (3, 7)
  assert tasks.answer_pieces(context, offsets, 6, "x") == (7, 7)


def test_real_pieces_align_with_words_and_answers(tokenizer):
  words = ["L'Assemblée", "nationale", "siège", "au", "Palais-Bourbon", "(Paris)", "depuis", "1798."]
  example = {"words": words, "labels": list(range(len(words)))}
  batch = next(tasks.batches([example], tokenizer, head="token_classification", rows=1, input_length=64,
                             target_length=2, seed=0, shuffle=False))
  firsts = np.flatnonzero(batch["label_weights"][0])
  assert batch["labels"][0][firsts].tolist() == example["labels"]  # each word's tag on its first piece
  tokens, end = batch["encoder_input_tokens"][0], int(batch["encoder_segment_ids"][0].sum()) - 1  # EOS excluded
  bounds = [*firsts, end]
  assert [tokenizer.decode(tokens[a:b]).strip() for a, b in zip(bounds, bounds[1:])] == words
  assert tokens[:end].tolist() == tokenizer.encode_batch([" ".join(words)])[0]  # as the whole text is cut

  context = "Gary Cooper, né le 7 mai 1901 à Helena (Montana), est un acteur américain à l'écran 😀 célèbre."
  # The answer's pieces, and what they decode to: the answer, or a little more where a piece straddles its end.
  answers = {"Gary Cooper": "Gary Cooper", "acteur américain": "acteur américain", "1901": "1901",
             "😀 célèbre": "😀 célèbre", "l'écran": "l'écran",
             "Helena (Montana)": ("Helena (Montana)", "Helena (Montana),")}  # as the tokenizer cuts "),"
  examples = [{"question": "Qui ?", "context": context, "answer": a, "answer_start": context.index(a)} for a in answers]
  batch = next(tasks.batches(examples, tokenizer, head="question_answering", rows=len(answers), input_length=64,
                             target_length=2, seed=0, shuffle=False))
  assert batch["label_weights"].tolist() == [1.0] * len(answers)
  for row, decoded in enumerate(answers.values()):
    start, end = batch["start_positions"][row], batch["end_positions"][row]
    assert tokenizer.decode(batch["encoder_input_tokens"][row][start:end + 1]).strip() in (decoded if isinstance(
        decoded, tuple) else (decoded,))


@pytest.fixture(scope="module")
def pretraining_validation():
  return {text for split, text in corpus.iter_documents(corpus.WIKI_FR, "text", FRACTION) if split == "validation"}


def test_embedded_title_tagging(pretraining_validation):
  loaded = {split: tasks.load_task(tasks.WIKI_FR_TITLE_TAGGING, split, validation_fraction=FRACTION)
            for split in tasks.SPLITS}
  task = loaded["train"][0]
  assert task == tasks.Task("wiki_fr_title_tagging", "token_classification", ("B", "I", "O"))
  assert {split: len(examples) for split, (_, examples) in loaded.items()} == {
      "train": 7897, "validation": 934, "test": 198}  # 9,029 of the 9,955 summaries name their title
  test = loaded["test"][1]
  validation_words = {" ".join(text.split()) for text in pretraining_validation}
  assert all(" ".join(e["words"]) in validation_words for e in test)
  assert all(0 in e["labels"] for e in test)  # every kept summary has an occurrence, starting with B
  # "Jeanne Moreau, née le ..." (the article "Jeanne Moreau"): the comma stays on the word it follows.
  jeanne = next(e for _, examples in loaded.values() for e in examples if e["words"][:2] == ["Jeanne", "Moreau,"])
  assert jeanne["labels"][:3] == [0, 1, 2]
  assert tasks.majority_baseline(task, loaded["train"][1], test)["majority"] > 0.9  # O


def test_embedded_description_span(pretraining_validation):
  loaded = {split: tasks.load_task(tasks.WIKI_FR_DESCRIPTION_SPAN, split, validation_fraction=FRACTION)
            for split in tasks.SPLITS}
  assert loaded["train"][0] == tasks.Task("wiki_fr_description_span", "question_answering", ())
  assert {split: len(examples) for split, (_, examples) in loaded.items()} == {
      "train": 1639, "validation": 179, "test": 44}  # 1,862 of the 9,647 descriptions occur in their summary
  assert all(e["context"] in pretraining_validation for e in loaded["test"][1])
  for _, examples in loaded.values():
    for e in examples:
      assert e["context"][e["answer_start"]:e["answer_start"] + len(e["answer"])] == e["answer"]
  streep = next(e for _, examples in loaded.values() for e in examples if e["question"] == "Meryl Streep")
  assert (streep["answer"], streep["answer_start"]) == ("actrice américaine", 68)
