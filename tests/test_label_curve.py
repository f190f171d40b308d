"""scripts/label_curve.py's table and plot on a fake run directory (no training)."""

import json

import pytest

from tests import scripts

label_curve = scripts.load("label_curve")

# (labels, head, start, seed) -> (test, validation) accuracy.
_ACCURACIES = {
    (250, "seq2seq", "pretrained", 0): (0.50, 0.40), (250, "seq2seq", "scratch", 0): (0.40, 0.45),
    (250, "seq2seq", "pretrained", 1): (0.60, 0.50), (250, "seq2seq", "scratch", 1): (0.50, 0.40),
    (1000, "seq2seq", "pretrained", 0): (0.70, 0.60), (1000, "seq2seq", "scratch", 0): (0.80, 0.70),
}


def _fake_runs(out_dir):
  for (labels, head, start, seed), (test, validation) in _ACCURACIES.items():
    run = out_dir / label_curve.run_name(labels, head, start, seed)
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "steps": 400, "best_step": 300, "test": {"accuracy": test}, "validation": {"accuracy": validation}}))
  (out_dir / label_curve.run_name(500, "seq2seq", "scratch", 0)).mkdir()  # unfinished: no results.json


def test_table_averages_the_seeds_and_counts_the_pairs_pretraining_wins(tmp_path, capsys):
  _fake_runs(tmp_path / "runs")
  label_curve.table(str(tmp_path / "runs"), str(tmp_path / "curve.json"), str(tmp_path / "curve.png"))
  rows = capsys.readouterr().out.splitlines()[2:]
  assert rows == ["| 250 | seq2seq | pretrained | 2 | 55.0% | 45.0% | 2 / 1 of 2 |",
                  "| 250 | seq2seq | scratch | 2 | 45.0% | 42.5% |  |",
                  "| 1,000 | seq2seq | pretrained | 1 | 70.0% | 60.0% | 0 / 0 of 1 |",
                  "| 1,000 | seq2seq | scratch | 1 | 80.0% | 70.0% |  |"]
  saved = json.loads((tmp_path / "curve.json").read_text())
  assert saved["recipe"] == list(label_curve.RECIPE) and saved["jax"]
  saved = saved["runs"]
  assert list(saved) == ["250", "1000"]  # in increasing label counts, the unfinished run left out
  assert saved["250"]["seq2seq"]["scratch"]["1"]["validation"] == pytest.approx(0.40)
  assert (tmp_path / "curve.png").stat().st_size > 0


def test_run_refuses_label_counts_without_a_step_count_each(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr("sys.argv", ["label_curve.py", "run", str(tmp_path / "runs"), "--pretrained", str(tmp_path),
                                   "--labels", "250,500", "--steps", "400"])
  with pytest.raises(SystemExit) as stopped:
    label_curve.main()
  assert stopped.value.code == 2
  assert "--labels has 2 counts and --steps 1" in capsys.readouterr().err
  assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_table_shows_a_start_whose_partner_run_is_unfinished(tmp_path, capsys):
  run = tmp_path / "runs" / label_curve.run_name(500, "seq2seq", "pretrained", 0)  # its scratch run: not finished
  run.mkdir(parents=True)
  (run / "results.json").write_text(json.dumps({"steps": 600, "best_step": 450, "test": {"accuracy": 0.5},
                                                "validation": {"accuracy": 0.25}}))
  label_curve.table(str(tmp_path / "runs"), str(tmp_path / "curve.json"), None)
  assert capsys.readouterr().out.splitlines()[2:] == ["| 500 | seq2seq | pretrained | 1 | 50.0% | 25.0% | 0 / 0 of 0 |"]
