"""Corpus readers, tokenizer layout, token cache, the Grain train iterator (Orbax resume), inspect_data."""

import json
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fat5_jax import data
from fat5_jax.config import ConfigError, from_config_dict, to_config_dict
from fat5_jax.data import cache, corpus, pipeline, ul2

VOCAB = 1024


def _config(workdir, **data_overrides):
  config = to_config_dict()
  config.workdir = str(workdir)
  config.model.vocab_size = VOCAB
  config.data.update({**dict(encoder_length=64, decoder_length=32, decoder_length_buckets=(16, 32),
                             tokenizer_vocab_size=VOCAB, num_sentinels=64, tokenizer_max_sentences=3000,
                             inspect_examples=2), **data_overrides})
  config.train.update(batch_size=4, grad_accum_steps=2)
  return from_config_dict(config)


@pytest.fixture(scope="session")
def run(tmp_path_factory):
  """A tiny wiki_fr run shared by the tests: (config, tokenizer)."""
  config = _config(tmp_path_factory.mktemp("run"))
  return config, data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)


# Corpus.

def test_plain_text_jsonl_parquet_dirs_and_globs(tmp_path):
  (tmp_path / "lines.txt").write_text("premier document\n  \nsecond document\n")
  (tmp_path / "blocks.txt").write_text("un\nbloc\n\ndeux\n\n\n")
  (tmp_path / "docs.jsonl").write_text('{"text": "a"}\nnot json\n{"other": 1}\n{"text": "   "}\n{"text": "b"}\n')
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["p1", None, "p2"]}), tmp_path / "t.parquet")
  stats = corpus.CorpusStats()
  docs = [t for _, t in corpus.iter_documents(str(tmp_path / "*.txt") + "," + str(tmp_path / "docs.jsonl"), "text",
                                              0.2, stats, max_malformed_fraction=0.5)]
  assert docs == ["un\nbloc", "deux", "premier document", "second document", "a", "b"]
  assert (stats.blank, stats.bad_json, stats.missing_field) == (2, 1, 1)
  assert [t for _, t in corpus.iter_documents(str(tmp_path / "t.parquet"), "body", 0.2)] == ["p1", "p2"]
  assert len(corpus.resolve_files(str(tmp_path))) == 4


def test_corpus_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    corpus.resolve_files(str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match="matches no file"):
    corpus.resolve_files(str(tmp_path / "*.jsonl"))
  (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  with pytest.raises(ValueError, match="not UTF-8"):
    list(corpus.iter_documents(str(tmp_path / "latin1.txt"), "text", 0.1))
  (tmp_path / "blank.txt").write_text(" \n\n \n")
  with pytest.raises(ValueError, match="holds no document"):
    list(corpus.iter_documents(str(tmp_path / "blank.txt"), "text", 0.1))
  (tmp_path / "x.csv").write_text("a")
  with pytest.raises(ValueError, match="unknown type"):
    corpus.resolve_files(str(tmp_path / "x.csv"))
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["p"]}), tmp_path / "t.parquet")
  with pytest.raises(ValueError, match="no column 'text'"):
    list(corpus.iter_documents(str(tmp_path / "t.parquet"), "text", 0.1))


def test_validation_split_is_deterministic_and_disjoint():
  splits = [dict.fromkeys(corpus.SPLITS, 0), dict.fromkeys(corpus.SPLITS, 0)]
  seen = {}
  for counts in splits:
    for split, text in corpus.iter_documents("wiki_fr", "text", 0.02):
      counts[split] += 1
      assert seen.setdefault(text, split) == split
  assert splits[0] == splits[1] and 0.01 < splits[0]["validation"] / sum(splits[0].values()) < 0.03


# Tokenizer.

def test_tokenizer_layout(run):
  config, tokenizer = run
  assert tokenizer.vocab_size == VOCAB and tokenizer.num_pieces == VOCAB - 64
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
  assert [tokenizer.prefix_id(p) for p in ("[R]", "[S]", "[X]")] == [3, 4, 5]
  assert tokenizer.sentinel_id(0) == VOCAB - 1 and tokenizer.sentinel_id(63) == VOCAB - 64
  assert tokenizer.decode([tokenizer.sentinel_id(5)]) == "<extra_id_5>"
  assert tokenizer.decode([VOCAB + 3]) == f"<unused_{VOCAB + 3}>"  # a model row past the tokenizer
  digits = tokenizer._sp.encode("année 2024", out_type=str)
  assert digits[-4:] == ["2", "0", "2", "4"]
  assert tokenizer.unk_id not in tokenizer.encode("漢字 😀")  # Byte fallback.
  assert tokenizer.decode(tokenizer.encode("Le château de Versailles")) == "Le château de Versailles"
  with pytest.raises(ValueError, match="no piece"):
    tokenizer.prefix_id("[Q]")


def test_tokenizer_is_reused_and_checked(run, tmp_path):
  config, tokenizer = run
  mtime = os.path.getmtime(tokenizer.path)
  assert data.load_tokenizer(config.data, config.workdir, VOCAB).path == tokenizer.path
  assert os.path.getmtime(tokenizer.path) == mtime
  with pytest.raises(ValueError, match="more than model.vocab_size"):
    data.load_tokenizer(config.data, config.workdir, VOCAB - 1)
  loaded = _config(tmp_path, tokenizer_path=tokenizer.path)
  assert data.load_tokenizer(loaded.data, loaded.workdir, VOCAB).encode("bonjour") == tokenizer.encode("bonjour")


def test_small_corpus_trains_largest_vocab(tmp_path, caplog):
  text = "\n".join(f"le chat {i % 7} mange la souris numéro {i % 5}" for i in range(200))
  (tmp_path / "small.txt").write_text(text)
  config = _config(tmp_path / "run", corpus=str(tmp_path / "small.txt"), tokenizer_vocab_size=1000,
                   validation_fraction=0.3)
  with caplog.at_level(logging.WARNING):
    tokenizer = data.load_tokenizer(config.data, config.workdir, VOCAB)
  assert "corpus too small" in caplog.text
  assert tokenizer.vocab_size < 1000 and tokenizer.sentinel_id(0) == tokenizer.vocab_size - 1


# Cache and pieces.

def test_cache_is_keyed_and_reused(run):
  config, tokenizer = run
  directory = cache.pretokenize(config.data, config.workdir, tokenizer)
  mtime = os.path.getmtime(os.path.join(directory, "meta.json"))
  assert cache.pretokenize(config.data, config.workdir, tokenizer) == directory
  assert os.path.getmtime(os.path.join(directory, "meta.json")) == mtime
  meta = cache.read_meta(directory)
  assert meta["train"]["documents"] > 9000 and meta["validation"]["documents"] > 100
  pieces = cache.PieceSource(directory, "train", 50)
  lengths = np.array([len(pieces[i]) for i in range(len(pieces))])
  assert lengths.max() <= 50 and lengths.sum() == meta["train"]["tokens"]


# Iterator.

def test_train_iterator_batches(run):
  config, tokenizer = run
  iterator = data.make_train_iterator(config, tokenizer)
  for _ in range(6):
    batch = next(iterator)
    assert set(batch) == set(data.BATCH_KEYS)
    assert batch["encoder_input_tokens"].shape == (8, 64)  # batch_size * grad_accum_steps rows.
    assert batch["decoder_target_tokens"].shape[1] in (16, 32)
    assert batch["decoder_loss_weights"].dtype == np.float32
    assert batch["encoder_input_tokens"].max() < VOCAB
  other = data.make_train_iterator(config, tokenizer, process_index=1, process_count=2)
  assert next(other)["encoder_input_tokens"].shape == (4, 64)


def test_resume_through_orbax_with_workers_and_a_batch_prefetched(run, tmp_path):
  config, tokenizer = run
  config = _config(config.workdir, num_workers=2)
  # As the training loop reads it: the saved position is that of the batches taken, not of the one ahead.
  iterator = pipeline.DevicePrefetch(data.make_train_iterator(config, tokenizer), lambda batch: batch)
  head = [next(iterator) for _ in range(3)]
  iterator.prefetch()
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  tail = [next(iterator) for _ in range(4)]
  restored = data.make_train_iterator(config, tokenizer)
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  fresh = data.make_train_iterator(config, tokenizer)
  for a, b in zip(head + tail, [next(fresh) for _ in range(7)]):
    np.testing.assert_array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])
  for a, b in zip(tail, [next(restored) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_one_worker_process_gives_the_batches_of_none(run):
  config, tokenizer = run
  inline, worker = (data.make_train_iterator(_config(config.workdir, num_workers=n), tokenizer) for n in (0, 1))
  for _ in range(3):
    a, b = next(inline), next(worker)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  worker.close()


def test_auto_workers_follow_the_host_and_a_resume_keeps_the_saved_count(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert pipeline.resolve_num_workers(-1) == 0  # the CPU backend computes the steps: no workers
  assert pipeline.resolve_num_workers(3) == 3
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for cores, devices, workers in [(16, 1, 4), (16, 8, 15), (128, 8, 32), (2, 1, 1), (1, 1, 1)]:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _, cores=cores: set(range(cores)))
    monkeypatch.setattr(jax, "local_device_count", lambda devices=devices: devices)
    assert pipeline.resolve_num_workers(-1) == workers, (cores, devices)
  assert pipeline.resolve_num_workers(-1, saved=0) == 0  # a checkpoint of before: kept, whatever the host
  assert pipeline.resolve_num_workers(2, saved=2) == 2
  with pytest.raises(ConfigError, match=r"^data.num_workers=4, but the checkpoint being resumed was saved with 2 "
                                        r"workers.*set data.num_workers=2 \(or -1\)"):
    pipeline.resolve_num_workers(4, saved=2)


def test_num_workers_is_a_count_or_auto(tmp_path):
  assert _config(tmp_path).data.num_workers == -1
  with pytest.raises(ConfigError, match=r"^data.num_workers must be >= 0, or -1 \(auto\), got -2$"):
    _config(tmp_path, num_workers=-2)


def test_eval_batches_are_deterministic(run):
  config, tokenizer = run
  a, b = data.make_eval_batches(config, tokenizer, 3), data.make_eval_batches(config, tokenizer, 3)
  assert len(a) == 3 and a[0]["encoder_input_tokens"].shape == (4, 64)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["decoder_target_tokens"], y["decoder_target_tokens"])
  # Two processes evaluate half a batch each, from their own shards of the split: no row is evaluated twice.
  halves = [data.make_eval_batches(config, tokenizer, 3, process_index=i, process_count=2) for i in range(2)]
  rows = [{tuple(r) for batch in half for r in batch["encoder_input_tokens"]} for half in halves]
  assert halves[0][0]["encoder_input_tokens"].shape == (2, 64) and rows[0] and not rows[0] & rows[1]
  with pytest.raises(ValueError, match="train.batch_size = 4 is not divisible by 3 processes"):
    data.make_eval_batches(config, tokenizer, 1, process_index=0, process_count=3)


def test_inspect_data(run, tmp_path, capsys):
  config, tokenizer = run
  stats = data.inspect_data(config, tokenizer, str(tmp_path / "inspect_data.jsonl"))
  printed = capsys.readouterr().out
  assert "<extra_id_0>" in printed and "rows/s" in printed
  records = [json.loads(line) for line in open(tmp_path / "inspect_data.jsonl")]
  assert len(records) == 2 * len(config.data.denoisers)
  for record in records:
    assert set(record) == {"mu", "r", "max_spans", "prefix", "original", "inputs", "targets", "sentinels"}
    restored = ul2.uncorrupt(np.array(record["inputs"]), np.array(record["targets"]), np.array(record["sentinels"]),
                             has_prefix=bool(record["prefix"]))
    np.testing.assert_array_equal(restored, record["original"])
  for d, s in zip(config.data.denoisers, stats["denoisers"]):
    expected = d[1] if d[1] > 0 else 1 - 1 / d[0]
    assert abs(s["noise_density"] - expected) < 0.05
  assert 0 <= stats["encoder_padding"] < 1 and 0 <= stats["decoder_padding"] < 1
