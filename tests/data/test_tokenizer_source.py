"""The workdir tokenizer's record (tokenizer/source.json): a config that asks for another tokenizer is an error."""

import io
import json
import logging
import os
import shutil

import pytest
import sentencepiece as spm

from fat5_jax import data
from fat5_jax.config import ConfigError, from_config_dict, to_config_dict
from fat5_jax.data import tokenizer as tokenizer_lib

VOCAB = 512


def _corpus(path, lines=400):
  path.write_text("\n".join(f"le chat numéro {i} mange la souris {i % 13} dans la cuisine de {i % 7} maisons"
                            for i in range(lines)))
  return str(path)


def _config(workdir, **data_overrides):
  config = to_config_dict()
  config.workdir = str(workdir)
  config.model.vocab_size = VOCAB
  config.data.update({**dict(tokenizer_vocab_size=VOCAB, num_sentinels=16, validation_fraction=0.1), **data_overrides})
  return from_config_dict(config)


def _load(config):
  return data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny tokenizer trained into a workdir: (its config, its path)."""
  root = tmp_path_factory.mktemp("trained")
  config = _config(root / "run", corpus=_corpus(root / "corpus.txt"))
  return config, _load(config).path


def test_trained_tokenizer_is_recorded_and_other_settings_are_refused(trained, tmp_path):
  config, path = trained
  record = tokenizer_lib.read_source(config.workdir)
  assert record["source"] == "trained" and record["sha256"] == tokenizer_lib.sha256(path)
  assert record["settings"]["data.corpus"] == config.data.corpus
  assert _load(config).path == path  # the same config: reused
  workdir = tmp_path / "run"
  shutil.copytree(config.workdir, workdir)
  with pytest.raises(ConfigError, match=rf"trained with data.tokenizer_vocab_size={VOCAB}; the config asks "
                                        r"data.tokenizer_vocab_size=400: use another workdir, or set the config back"):
    _load(_config(workdir, corpus=config.data.corpus, tokenizer_vocab_size=400))
  with pytest.raises(ConfigError, match=r"data.corpus='[^']*corpus.txt'.*the config asks data.corpus='[^']*other"):
    _load(_config(workdir, corpus=_corpus(tmp_path / "other.txt")))
  with pytest.raises(ConfigError, match=r"holds a tokenizer trained with .*; the config asks data.tokenizer_path="):
    _load(_config(workdir, corpus=config.data.corpus, tokenizer_path=path))


def test_a_corpus_fixed_in_place_is_not_silently_reused(tmp_path):
  """The issue's case: a tokenizer trained on a broken corpus, kept after the corpus file is fixed."""
  corpus = _corpus(tmp_path / "corpus.txt", lines=3)
  config = _config(tmp_path / "run", corpus=corpus)
  assert _load(config).num_pieces < VOCAB - 16  # too small: the largest size it can
  _corpus(tmp_path / "corpus.txt")
  with pytest.raises(ConfigError, match=r"trained with corpus bytes=\d+; the config asks corpus bytes=\d+"):
    _load(config)


def test_copied_tokenizer_is_recorded_and_another_one_is_refused(trained, tmp_path):
  _, path = trained
  config = _config(tmp_path / "run", tokenizer_path=path)
  copied = _load(config)
  record = tokenizer_lib.read_source(config.workdir)
  assert record["source"] == "copied" and record["tokenizer_path"] == os.path.abspath(path)
  assert record["sha256"] == record["tokenizer_path_sha256"] == tokenizer_lib.sha256(path)
  shutil.copyfile(path, tmp_path / "moved.model")  # the same file elsewhere: the same tokenizer
  assert _load(_config(tmp_path / "run", tokenizer_path=str(tmp_path / "moved.model"))).path == copied.path
  other = _load(_config(tmp_path / "other", corpus=_corpus(tmp_path / "other.txt", lines=300)))
  with pytest.raises(ConfigError, match=r"holds a copy of data.tokenizer_path='[^']*spm.model' \(sha256 \w+\); the "
                                        r"config asks data.tokenizer_path='[^']*other/tokenizer/spm.model'"):
    _load(_config(tmp_path / "run", tokenizer_path=other.path))
  with pytest.raises(ConfigError, match=r"holds a copy of .*; the config asks a tokenizer trained on data.corpus"):
    _load(_config(tmp_path / "run"))
  with pytest.raises(ConfigError, match="does not exist"):
    _load(_config(tmp_path / "run", tokenizer_path=str(tmp_path / "missing.model")))
  with pytest.raises(ConfigError, match=r"data.num_sentinels=16, the config asks data.num_sentinels=32"):
    _load(_config(tmp_path / "run", tokenizer_path=path, num_sentinels=32))


def test_a_bad_tokenizer_path_is_refused_before_it_is_copied(trained, tmp_path):
  _, path = trained
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"<html>not found</html>")
  config = _config(tmp_path / "run", tokenizer_path=str(garbage))
  with pytest.raises(ConfigError, match="garbage.model is not a sentencepiece model"):
    _load(config)
  too_big = _config(tmp_path / "run", tokenizer_path=path)
  with pytest.raises(ConfigError, match="more than model.vocab_size=300"):
    data.load_tokenizer(too_big.data, too_big.workdir, 300)
  no_prefixes = io.BytesIO()  # pad 0 and eos 1 as FAT5 needs, but no UL2 prefix pieces
  # A soft vocabulary limit: sentencepiece releases differ by one in how many pieces this text can give.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["le chat mange la souris"] * 50), model_writer=no_prefixes,
                                 vocab_size=20, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 minloglevel=2)
  (tmp_path / "no_prefixes.model").write_bytes(no_prefixes.getvalue())
  with pytest.raises(ConfigError, match=r"no_prefixes.model has no piece '\[R\]'"):
    _load(_config(tmp_path / "run", tokenizer_path=str(tmp_path / "no_prefixes.model")))
  assert not os.listdir(tmp_path / "run" / "tokenizer")  # nothing landed
  fixed = _load(_config(tmp_path / "run", tokenizer_path=path))  # the path fixed: it works
  assert tokenizer_lib.sha256(fixed.path) == tokenizer_lib.sha256(path)


def test_an_unrecorded_tokenizer_is_recorded_once_with_a_warning(trained, tmp_path, caplog):
  config, _ = trained
  workdir = tmp_path / "run"
  shutil.copytree(config.workdir, workdir)
  os.remove(workdir / "tokenizer" / "source.json")  # as an older version left it
  unrecorded = _config(workdir, corpus=config.data.corpus)
  with caplog.at_level(logging.WARNING):
    _load(unrecorded)
    _load(unrecorded)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "had no record of its origin" in warnings[0]
  assert tokenizer_lib.read_source(str(workdir))["source"] == "trained"


def test_a_replaced_model_file_is_refused(trained, tmp_path):
  config, _ = trained
  workdir = tmp_path / "run"
  shutil.copytree(config.workdir, workdir)
  with open(workdir / "tokenizer" / "spm.model", "ab") as f:
    f.write(b"\0")
  with pytest.raises(ConfigError, match=r"spm.model changed after it was recorded in source.json"):
    _load(_config(workdir, corpus=config.data.corpus))
  with open(workdir / "tokenizer" / "source.json") as f:
    assert json.load(f)["source"] == "trained"
