"""Pieces of the fine-tuning loop that need no training: steps from epochs, the best saved step, the results table
(the loop itself runs end to end in tests/e2e/test_finetune.py)."""

import json

import pytest

from fat5_jax import config as config_lib
from fat5_jax.train import finetune


def _config(**finetune_fields):
  values = config_lib.to_config_dict().to_dict()
  values["finetune"].update(finetune_fields)
  return config_lib.from_config_dict(values)


def test_epochs_set_the_steps_and_the_run_config_restates_the_optimizer():
  run = finetune._run_config(_config(steps=0, epochs=1.5, batch_size=32, learning_rate=3e-4), "/ft", train_size=100)
  assert run.train.steps == 5  # ceil(1.5 * 100 / 32)
  assert (run.train.learning_rate, run.train.schedule, run.train.warmup_steps, run.train.grad_accum_steps) == (
      3e-4, "linear", 0, 1)
  assert (run.workdir, run.data.encoder_length, run.data.decoder_length_buckets) == ("/ft", 512, (64,))


def test_best_step_is_the_best_saved_evaluation(tmp_path):
  records = [{"step": 2, "split": "eval", "accuracy": 0.5}, {"step": 2, "split": "train", "accuracy": 0.9},
             {"step": 4, "split": "eval", "accuracy": 0.7}, {"step": 6, "split": "eval", "accuracy": 0.6},
             {"step": 4, "split": "eval", "accuracy": 0.4}]  # step 4 evaluated again after a resume: that counts
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  assert finetune._best_step(str(tmp_path), [2, 4, 6], "accuracy") == (6, {"accuracy": 0.6})
  assert finetune._best_step(str(tmp_path), [2, 4], "accuracy") == (2, {"accuracy": 0.5})


def test_results_table_puts_the_majority_beside_accuracy():
  table = finetune.results_table({
      "task": "wiki_fr_category", "head": "classification", "init_from": "", "steps": 10, "best_step": 8,
      "sizes": {"test": 212}, "test": {"accuracy": 0.5, "macro_f1": 0.25}, "baselines": {"majority": 0.184}})
  assert "from scratch" in table and "step 8 of 10" in table
  assert "| accuracy | 0.5000 | 0.1840 |" in table and "| macro_f1 | 0.2500 |  |" in table


def test_train_examples_take_a_fixed_nested_sample_of_the_train_split_alone():
  _, full = finetune._load_splits(_config())
  _, hundred = finetune._load_splits(_config(train_examples=100, seed=3))  # the sample ignores finetune.seed
  _, fifty = finetune._load_splits(_config(train_examples=50))
  texts = lambda examples: [e["text"] for e in examples]
  assert len(hundred["train"]) == 100 and set(texts(hundred["train"])) <= set(texts(full["train"]))
  assert texts(fifty["train"]) == texts(hundred["train"])[:50]
  assert len(set(texts(hundred["train"]))) == 100 and texts(hundred["train"]) != texts(full["train"])[:100]
  assert all(hundred[split] == full[split] for split in ("validation", "test"))
  with pytest.raises(config_lib.ConfigError, match=f"train split holds {len(full['train'])} examples"):
    finetune._load_splits(_config(train_examples=len(full["train"]) + 1))
