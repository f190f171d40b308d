"""Long rows (docs/data.md, Long rows): the stream layout (`data.stream`) and packing of short documents, with every
denoiser at encoder lengths 2,048, 8,192 and 16,384 (decoder 512): shapes, span round trip, fill, eos separators,
determinism and resume."""

import glob
import json
import os

import numpy as np
import pytest

from fat5_jax import data
from fat5_jax.config import DEFAULT_DENOISERS, DEFAULT_PROPORTIONS, ConfigError, from_config_dict, to_config_dict
from fat5_jax.data import cache, pipeline, ul2

VOCAB = 1024
NUM_SENTINELS = 64
DECODER_LENGTH = 512
ROWS = 8
DENOISERS = {"R": ((3.0, 0.15, 0, "[R]"),), "S": ((4.0, 0.0, 1, "[S]"),), "X": ((64.0, 0.5, 0, "[X]"),),
             "mixture": DEFAULT_DENOISERS}
ENCODER_LENGTHS = (2048, 8192, 16384)
# Packed rows of wiki_fr documents (~150 tokens with this tokenizer) close when an example fits no row: the side that
# binds (the decoder, at these shapes) is then full but for less than one example's share (measured: 0.95 for [S],
# 0.98-0.99 for the others, on 8-row batches).
PACKED_FILL_BOUND = 0.85


def _config(workdir, denoisers="mixture", encoder_length=8192, stream=False, **data_overrides):
  config = to_config_dict()
  config.workdir = str(workdir)
  config.model.vocab_size = VOCAB
  chosen = DENOISERS[denoisers]
  config.data.update({**dict(encoder_length=encoder_length, decoder_length=DECODER_LENGTH,
                             decoder_length_buckets=(DECODER_LENGTH,), tokenizer_vocab_size=VOCAB,
                             num_sentinels=NUM_SENTINELS, tokenizer_max_sentences=3000, denoisers=chosen,
                             denoiser_proportions=DEFAULT_PROPORTIONS if denoisers == "mixture" else (1.0,),
                             # No worker processes (auto gives some on a GPU): the test reads batches in index order.
                             stream=stream, pack=not stream, num_workers=0), **data_overrides})
  config.train.update(batch_size=ROWS, grad_accum_steps=1)
  return from_config_dict(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, tokenizer, token cache directory) of a tiny wiki_fr run shared by the tests."""
  workdir = tmp_path_factory.mktemp("long_rows")
  config = _config(workdir)
  tokenizer = data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)
  return workdir, tokenizer, cache.pretokenize(config.data, config.workdir, tokenizer)


def _reference_stream(directory, split, eos_id):
  """The split's documents in corpus order, an eos after each, built the plain way."""
  parts = []
  for path in sorted(glob.glob(os.path.join(directory, f"{split}-*.tokens.npy"))):
    tokens, offsets = np.load(path), np.load(path.replace(".tokens.npy", ".offsets.npy"))
    for begin, end in zip(offsets[:-1], offsets[1:]):
      parts += [tokens[begin:end].astype(np.int32), [eos_id]]
  return np.concatenate(parts)


def test_stream_source_cuts_the_eos_joined_corpus_into_denoiser_chunks(run):
  _, tokenizer, directory = run
  transform = pipeline.make_transform(_config(run[0]).data, tokenizer)
  source = cache.StreamSource(directory, "train", transform.raw_lengths, DEFAULT_PROPORTIONS, 0, tokenizer.eos_id)
  reference = _reference_stream(directory, "train", tokenizer.eos_id)
  chunks = [source[i] for i in range(len(source))]
  for chunk in chunks:
    assert len(chunk["tokens"]) == transform.raw_lengths[chunk["denoiser"]]
  joined = np.concatenate([c["tokens"] for c in chunks])
  np.testing.assert_array_equal(joined, reference[:len(joined)])  # Consecutive chunks, eos where documents end.
  assert len(reference) - len(joined) < max(transform.raw_lengths)  # Only the tail is dropped.
  counts = np.bincount([c["denoiser"] for c in chunks], minlength=len(DEFAULT_PROPORTIONS)) / len(chunks)
  np.testing.assert_allclose(counts, DEFAULT_PROPORTIONS, atol=0.06)
  again = cache.StreamSource(directory, "train", transform.raw_lengths, DEFAULT_PROPORTIONS, 0, tokenizer.eos_id)
  np.testing.assert_array_equal(again[len(again) - 1]["tokens"], chunks[-1]["tokens"])
  other_seed = cache.StreamSource(directory, "train", transform.raw_lengths, DEFAULT_PROPORTIONS, 1, tokenizer.eos_id)
  assert [other_seed[i]["denoiser"] for i in range(50)] != [c["denoiser"] for c in chunks[:50]]
  with pytest.raises(ConfigError, match="fewer than one chunk"):
    cache.StreamSource(directory, "validation", [len(reference)], [1.0], 0, tokenizer.eos_id)


def test_stream_needs_one_example_per_row(tmp_path):
  with pytest.raises(ConfigError, match="set data.pack=False"):
    _config(tmp_path, stream=True, pack=True)


def _segments(batch, row):
  """[(inputs, targets)] of one row's segments, in segment order."""
  out = []
  for segment in range(1, batch["encoder_segment_ids"][row].max() + 1):
    inputs = batch["encoder_input_tokens"][row][batch["encoder_segment_ids"][row] == segment]
    targets = batch["decoder_target_tokens"][row][batch["decoder_segment_ids"][row] == segment]
    out.append((inputs, targets))
  return out


def _originals(batch, tokenizer):
  """The chunk each segment of the batch was cut from, rebuilt from its input and target."""
  sentinel_ids = tokenizer.sentinel_ids(tokenizer.num_sentinels)
  originals = []
  for row in range(len(batch["encoder_input_tokens"])):
    for inputs, targets in _segments(batch, row):
      sentinels = targets[np.isin(targets, sentinel_ids)]
      originals.append(ul2.uncorrupt(inputs, targets, sentinels, has_prefix=True))
  return originals


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("encoder_length", ENCODER_LENGTHS)
@pytest.mark.parametrize("denoisers", list(DENOISERS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "packed"])
def test_long_rows(run, stream, denoisers, encoder_length):
  workdir, tokenizer, _ = run
  config = _config(workdir, denoisers, encoder_length, stream)
  examples, transform = pipeline.example_dataset(config, tokenizer, "train")
  iterator = data.make_train_iterator(config, tokenizer)
  head = [next(iterator) for _ in range(2)]
  state = json.loads(json.dumps(iterator.get_state()))  # Grain's checkpoint handler stores JSON.
  tail = [next(iterator) for _ in range(2)]

  first = 0  # One decoder bucket: batch k holds the next examples in index order.
  eos_count, binding_fill = 0, []
  for batch in head + tail:
    assert batch["encoder_input_tokens"].shape == (ROWS, encoder_length)
    assert batch["decoder_target_tokens"].shape == (ROWS, DECODER_LENGTH)
    originals = _originals(batch, tokenizer)
    expected = [examples[i] for i in range(first, first + len(originals))]
    first += len(originals)
    assert sorted(map(tuple, originals)) == sorted(tuple(e["original"]) for e in expected)  # Targets hold the spans.
    encoder_used = (batch["encoder_segment_ids"] > 0).sum(axis=1)
    decoder_used = (batch["decoder_segment_ids"] > 0).sum(axis=1)
    if stream:
      assert batch["encoder_segment_ids"].max() == 1 and (batch["encoder_segment_ids"][:, 0] == 1).all()
      for e in expected:  # Whole chunks of the denoiser's raw length, filling the side that binds.
        raw = transform.raw_lengths[e["denoiser"]]
        assert len(e["original"]) == raw
        assert (len(e["inputs"]), len(e["targets"])) == tuple(
            int(n) for n in ul2.example_lengths(raw, transform.denoisers[e["denoiser"]], NUM_SENTINELS))
      # One more raw token would overflow a side, and a token adds at most 2 to either.
      assert ((encoder_used >= encoder_length - 1) | (decoder_used >= DECODER_LENGTH - 1)).all()
      eos_count += sum(int((o == tokenizer.eos_id).sum()) for o in originals)
    else:
      binding_fill.append(np.maximum(encoder_used / encoder_length, decoder_used / DECODER_LENGTH))
  if not stream:
    assert np.mean(binding_fill) >= PACKED_FILL_BOUND
  if stream:  # Chunks run across documents, which eos separates (chunks of >= 681 tokens, documents ~150).
    assert eos_count >= 4 * ROWS

  fresh = data.make_train_iterator(config, tokenizer)
  _assert_same_batches(head + tail, [next(fresh) for _ in range(4)])
  resumed = data.make_train_iterator(config, tokenizer)
  resumed.set_state(state)
  _assert_same_batches(tail, [next(resumed) for _ in range(2)])


def test_stream_eval_batches(run):
  workdir, tokenizer, _ = run
  config = _config(workdir, "mixture", 8192, stream=True)
  a, b = data.make_eval_batches(config, tokenizer, 2), data.make_eval_batches(config, tokenizer, 2)
  _assert_same_batches(a, b)
  assert a[0]["encoder_input_tokens"].shape == (ROWS, 8192)
