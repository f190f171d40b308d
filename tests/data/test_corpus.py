"""Malformed JSON Lines: reported in one warning line, and an error past data.max_malformed_fraction."""

import json
import logging

import pytest

from fat5_jax import data
from fat5_jax.config import ConfigError, from_config_dict, to_config_dict
from fat5_jax.data import corpus


def _write_jsonl(path, good: int, bad: int):
  """`good` records, then `bad` lines cut short (as a crashed writer leaves them)."""
  lines = [json.dumps({"text": f"document numéro {i} du corpus"}) for i in range(good)]
  lines += ['{"text": "coupé' for _ in range(bad)]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_few_malformed_lines_are_reported_once_and_skipped(tmp_path, caplog):
  path = _write_jsonl(tmp_path / "docs.jsonl", good=299, bad=1)
  with caplog.at_level(logging.WARNING):
    for _ in range(2):  # The tokenizer and the token cache both read the corpus: one line in all.
      stats = corpus.CorpusStats()
      assert len(list(corpus.iter_documents(path, "text", 0.1, stats))) == 299
  assert (stats.bad_json, stats.json_lines) == (1, 300)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "skipped 1 of 300 JSON lines as malformed (1 not JSON" in warnings[0]


def test_too_many_malformed_lines_stop_the_run(tmp_path):
  path = _write_jsonl(tmp_path / "docs.jsonl", good=2000, bad=1000)
  with pytest.raises(ConfigError, match=r"docs.jsonl.*1000 of 3000 lines \(33.3%\).*data.max_malformed_fraction"):
    list(corpus.iter_documents(path, "text", 0.1))
  assert len(list(corpus.iter_documents(path, "text", 0.1, max_malformed_fraction=0.5))) == 2000
  config = to_config_dict()
  config.workdir = str(tmp_path / "run")
  config.data.corpus = path
  config = from_config_dict(config)
  assert config.data.max_malformed_fraction == 0.01
  with pytest.raises(ConfigError, match="1000 of 3000 lines"):  # At the start of a run: training its tokenizer.
    data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)


def test_a_wrong_text_field_counts_as_malformed(tmp_path):
  path = _write_jsonl(tmp_path / "docs.jsonl", good=10, bad=0)
  with pytest.raises(ConfigError, match="10 without a string field 'body'.*data.text_field"):
    list(corpus.iter_documents(path, "body", 0.1))
