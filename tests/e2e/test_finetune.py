"""Fine-tuning end to end through `main.py --mode=finetune`: from a pretrained workdir and from scratch, on small
file tasks (classification, token classification, question answering), resumed, and a mismatched resume or head
refused."""

import json
import os
import subprocess
import sys

import pytest

from fat5_jax.train import finetune as finetune_lib
from tests.e2e.test_main_job import OVERRIDES, straight

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# test_main_job.py's model (tiny_fr made smaller still), which the pretrained run has: seconds per run.
MODEL = [flag for flag in OVERRIDES if flag.startswith("--config.model.")]
LABELS = ("sport", "cuisine", "musique")
TEMPLATES = {"sport": "Le match de {} a fini tard au stade.", "cuisine": "La recette de {} demande du beurre.",
             "musique": "Le concert de {} a rempli la salle."}


def run(*args):
  command = [sys.executable, "main.py", "--config=configs/tiny_fr.py", *args]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _write_task(directory, split, count, offset):
  path = os.path.join(directory, f"{split}.jsonl")
  with open(path, "w") as f:
    for i in range(count):
      label = LABELS[0] if i % 4 == 3 else LABELS[i % 4 % 3]  # sport is the majority: half the rows
      f.write(json.dumps({"text": TEMPLATES[label].format(f"numéro {offset + i}"), "target": label}) + "\n")
  return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(this worker's directory for tasks and fine-tunings, a pretrained workdir, the classification files' flags).
  The pretraining is test_main_job.py's straight run, made once for the session: fine-tunings only read it."""
  root = tmp_path_factory.mktemp("finetune")
  pretrained = straight(tmp_path_factory)[0]
  files = [f"--config.finetune.{split}_file={_write_task(str(root), split, count, offset)}"
           for split, count, offset in (("train", 48, 0), ("validation", 12, 100), ("test", 12, 200))]
  return root, pretrained, files


def finetune(setup, workdir, *extra, files=None):
  """A fine-tuning of the classification files, or of `files` (their --config.finetune.*_file flags)."""
  root, pretrained, classification_files = setup
  return run(f"--config.workdir={pretrained}", *MODEL, "--mode=finetune", "--config.finetune.task=files",
             *(files or classification_files), f"--config.finetune.workdir={root / workdir}",
             "--config.finetune.batch_size=8",
             "--config.finetune.input_length=32", "--config.finetune.target_length=8",
             "--config.finetune.eval_every=3", "--config.finetune.learning_rate=1e-2", *extra)


def results(setup, workdir):
  with open(setup[0] / workdir / "results.json") as f:
    return json.load(f)


def test_classification_from_pretrained_writes_results_and_resumes(setup):
  _, pretrained, _ = setup
  out = finetune(setup, "cls", f"--config.finetune.init_from={pretrained}", "--config.finetune.head=classification",
                 "--config.finetune.steps=6")
  assert out.returncode == 0, out.stderr[-3000:]
  got = results(setup, "cls")
  assert (got["task"], got["head"], got["init_from"]) == ("files", "classification", pretrained)
  assert got["sizes"] == {"train": 48, "validation": 12, "test": 12}
  assert set(got["test"]) == {"loss", "accuracy", "macro_f1"} and 0 <= got["test"]["accuracy"] <= 1
  # Test rows i = 0..11: sport for i % 4 in (0, 3), the train split's majority too: 6 of 12.
  assert got["baselines"] == {"majority": 0.5}
  assert got["best_step"] in (3, 6) and "| accuracy |" in out.stdout
  with open(setup[0] / "cls" / finetune_lib.LABELS_FILE) as f:
    labels = json.load(f)
  assert "sport" in labels and labels == sorted(set(labels))  # the names export_hf gives the head's outputs

  resumed = finetune(setup, "cls", f"--config.finetune.init_from={pretrained}",
                     "--config.finetune.head=classification", "--config.finetune.steps=9")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 6" in resumed.stdout and results(setup, "cls")["steps"] == 9

  refused = finetune(setup, "cls", f"--config.finetune.init_from={pretrained}", "--config.finetune.head=seq2seq",
                     "--config.finetune.steps=9")
  assert refused.returncode == 2 and "finetune.head: 'classification' vs 'seq2seq'" in refused.stderr
  assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_seq2seq_from_scratch_predicts_labels_by_decoding(setup):
  out = finetune(setup, "s2s", "--config.finetune.head=seq2seq", "--config.finetune.steps=3")
  assert out.returncode == 0, out.stderr[-3000:]
  got = results(setup, "s2s")
  assert (got["head"], got["init_from"], got["best_step"]) == ("seq2seq", "", 3)
  assert set(got["test"]) == {"loss", "accuracy", "macro_f1"}
  # A finished fine-tuning predicts with its best step and its own tokenizer.
  inputs, outputs = setup[0] / "inputs.txt", setup[0] / "predictions.jsonl"
  inputs.write_text("Le match de football a fini tard.\nUne nouvelle loi sur les impôts.\n")
  predicted = run(f"--config.workdir={setup[0] / 's2s'}", *MODEL, "--mode=predict", f"--input={inputs}",
                  f"--output={outputs}")
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  assert "wrote 2 predictions of step 3" in predicted.stdout
  assert len(outputs.read_text().splitlines()) == 2


CITIES = ("Paris", "Lyon", "Marseille", "Toulouse", "Nantes", "Lille")


def _write_rows(directory, name, rows):
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return path


@pytest.fixture(scope="module")
def span_files(setup):
  """--config.finetune.*_file flags of a token classification task (the city's word tagged B-LOC) and of a question
  answering task (where does she live: the city), 48 / 12 / 12 rows."""
  root = str(setup[0])
  flags = {"token_classification": [], "question_answering": []}
  for split, count, offset in (("train", 48, 0), ("validation", 12, 100), ("test", 12, 200)):
    people = [(f"Marie{offset + i}", CITIES[i % len(CITIES)], 1900 + offset + i) for i in range(count)]
    tagged = [{"tokens": [name, "habite", "à", city, "depuis", str(year), "."],
               "labels": ["B-PER", "O", "O", "B-LOC", "O", "O", "O"]} for name, city, year in people]
    contexts = [(f"{name} habite à {city} depuis {year}.", city, name) for name, city, year in people]
    questions = [{"question": f"Où habite {name} ?", "context": context, "answer": city,
                  "answer_start": context.index(city)} for context, city, name in contexts]
    for head, rows in (("token_classification", tagged), ("question_answering", questions)):
      flags[head].append(f"--config.finetune.{split}_file={_write_rows(root, f'{head}_{split}.jsonl', rows)}")
  return flags


def test_token_classification_from_pretrained(setup, span_files):
  _, pretrained, _ = setup
  out = finetune(setup, "tagging", f"--config.finetune.init_from={pretrained}",
                 "--config.finetune.head=token_classification", "--config.finetune.steps=3",
                 files=span_files["token_classification"])
  assert out.returncode == 0, out.stderr[-3000:]
  got = results(setup, "tagging")
  assert (got["head"], got["best_step"], got["sizes"]) == ("token_classification", 3,
                                                          {"train": 48, "validation": 12, "test": 12})
  assert set(got["test"]) == {"loss", "accuracy", "macro_f1"} and 0 <= got["test"]["macro_f1"] <= 1
  assert got["baselines"] == {"majority": pytest.approx(5 / 7)}  # O: 5 of each row's 7 words

  refused = finetune(setup, "tagging_as_classes", "--config.finetune.head=classification",
                     files=span_files["token_classification"])
  assert refused.returncode == 2 and "task files is token_classification: finetune.head='classification' cannot " \
      "learn it; use token_classification" in refused.stderr
  assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_question_answering_from_scratch(setup, span_files):
  out = finetune(setup, "qa", "--config.finetune.head=question_answering", "--config.finetune.steps=3",
                 files=span_files["question_answering"])
  assert out.returncode == 0, out.stderr[-3000:]
  got = results(setup, "qa")
  assert (got["head"], got["init_from"], got["best_step"]) == ("question_answering", "", 3)
  assert set(got["test"]) == {"loss", "exact_match", "f1"} and got["baselines"] == {}
  assert "| f1 |" in out.stdout
