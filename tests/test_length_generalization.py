"""scripts/length_generalization.py's table on a fake run directory (no training)."""

import json
import os

import pytest

from tests import scripts

length_generalization = scripts.load("length_generalization")


def _fake_run(out_dir) -> dict:
  losses = {}
  for i, encoding in enumerate(length_generalization.ENCODINGS):
    os.makedirs(out_dir / encoding)
    losses[encoding] = {length: 4.0 + i + j for j, length in enumerate(length_generalization.EVAL_LENGTHS)}
    for length, loss in losses[encoding].items():
      (out_dir / encoding / f"eval_{length}.json").write_text(json.dumps({"loss": loss, "tokens": 1.0}))
  (out_dir / "settings.json").write_text(json.dumps({"steps": 3, "device": "cpu"}))
  return losses


def test_table_reads_every_eval_and_divides_by_the_training_length(tmp_path, capsys):
  losses = _fake_run(tmp_path / "run")
  results = tmp_path / "results.json"
  length_generalization.table(str(tmp_path / "run"), str(results), None)
  table = capsys.readouterr().out.splitlines()
  assert table[0] == "| position encoding | 1,024 | 2,048 | 4,096 | 8,192 |"
  assert table[2] == "| t5 | 4.000 | 5.000 (1.25x) | 6.000 (1.50x) | 7.000 (1.75x) |"
  assert [line.split(" ")[1] for line in table[2:]] == list(length_generalization.ENCODINGS)
  saved = json.loads(results.read_text())
  assert saved["steps"] == 3 and saved["device"] == "cpu"  # The run's settings are carried over.
  assert saved["loss"]["fire"] == {str(length): loss for length, loss in losses["fire"].items()}
  assert saved["ratio_to_train_length"]["alibi"]["8192"] == pytest.approx(9.0 / 6.0)
