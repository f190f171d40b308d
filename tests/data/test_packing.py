"""Packing and length buckets: segment isolation, shapes, determinism, resume equality."""

import json

import grain
import numpy as np
import pytest

from fat5_jax.config import DEFAULT_DENOISERS, DEFAULT_PROPORTIONS
from fat5_jax.data import packing, ul2

VOCAB = 3000
START = 0


def _random_examples(rng, count, max_in, max_out):
  return [(rng.integers(3, VOCAB, size=rng.integers(2, max_in + 1)).astype(np.int32),
           rng.integers(3, VOCAB, size=rng.integers(2, max_out + 1)).astype(np.int32)) for _ in range(count)]


def _segments(batch, side, row):
  """{segment id: tokens} of one row, checking contiguity and positions on the way."""
  ids, positions = batch[f"{side}_segment_ids"][row], batch[f"{side}_positions"][row]
  tokens = batch["encoder_input_tokens" if side == "encoder" else "decoder_target_tokens"][row]
  used = ids > 0
  assert not used[np.argmin(used):].any() or used.all(), "padding must only trail"
  out = {}
  for s in np.unique(ids[used]):
    where = np.flatnonzero(ids == s)
    np.testing.assert_array_equal(where, np.arange(where[0], where[0] + len(where)))  # Contiguous.
    np.testing.assert_array_equal(positions[where], np.arange(len(where)))  # Positions restart per segment.
    out[int(s)] = tokens[where]
  assert (tokens[~used] == 0).all() and (positions[~used] == 0).all()
  return out


def test_row_packer_segments_never_mix():
  rng = np.random.default_rng(0)
  packer = packing.RowPacker(rows=8, encoder_length=64, decoder_length=32, max_segments=64)
  added = []
  for inputs, targets in _random_examples(rng, 200, 30, 16):
    if not packer.try_add(inputs, targets):
      break
    added.append((inputs, targets))
  batch = packer.batch(START)
  assert set(batch) == set(packing.BATCH_KEYS)
  assert batch["encoder_input_tokens"].shape == (8, 64) and batch["decoder_target_tokens"].shape == (8, 32)
  found = []
  for row in range(8):
    enc, dec = _segments(batch, "encoder", row), _segments(batch, "decoder", row)
    assert enc.keys() == dec.keys() and list(enc) == list(range(1, len(enc) + 1))
    found += [(tuple(enc[s]), tuple(dec[s])) for s in enc]
    ids = batch["decoder_segment_ids"][row]
    for s, target in dec.items():
      where = ids == s
      np.testing.assert_array_equal(batch["decoder_input_tokens"][row][where], np.concatenate([[START], target[:-1]]))
    np.testing.assert_array_equal(batch["decoder_loss_weights"][row], (ids > 0).astype(np.float32))
  assert sorted(found) == sorted((tuple(i), tuple(t)) for i, t in added)
  assert batch["decoder_loss_weights"].dtype == np.float32


def test_row_packer_without_packing_holds_one_example_per_row():
  rng = np.random.default_rng(1)
  packer = packing.RowPacker(rows=4, encoder_length=64, decoder_length=32, max_segments=1)
  examples = _random_examples(rng, 5, 10, 10)
  assert all(packer.try_add(*e) for e in examples[:4]) and not packer.try_add(*examples[4])
  assert packer.batch(START)["encoder_segment_ids"].max() == 1


def test_choose_bucket():
  buckets = (128, 256, 512)
  assert packing.choose_bucket(500, 100, 512, buckets, pack=True) == 0  # Ratio 0.2: the 128 bucket.
  assert packing.choose_bucket(170, 500, 512, buckets, pack=True) == 2
  assert packing.choose_bucket(60, 60, 512, buckets, pack=True) == 2  # Ratio 1 packs best with 512.
  assert packing.choose_bucket(60, 60, 512, buckets, pack=False) == 0  # Alone in a row: the shortest fits.
  assert packing.choose_bucket(60, 200, 512, buckets, pack=False) == 1
  with pytest.raises(ValueError, match="exceeds the longest"):
    packing.choose_bucket(60, 600, 512, buckets, pack=True)


def _example_dataset(seed=0):
  rng = np.random.default_rng(seed)
  pieces = [rng.integers(10, 2000, size=rng.integers(2, 300)).astype(np.int32) for _ in range(300)]
  transform = ul2.UL2Transform([ul2.Denoiser(*d) for d in DEFAULT_DENOISERS], DEFAULT_PROPORTIONS, 128, 64,
                               VOCAB - 1 - np.arange(100), {"[R]": 3, "[S]": 4, "[X]": 5}, 1)
  return grain.MapDataset.source(pieces).shuffle(seed=seed).repeat(None).random_map(transform, seed=seed)


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("pack", [True, False])
def test_iterator_deterministic_and_resumes_exactly(pack):
  make = lambda: iter(packing.PackedBatchDataset(_example_dataset(), rows=6, encoder_length=128, buckets=(32, 64),
                                                 pack=pack, decoder_start_id=START))
  first = make()
  head = _batches(first, 7)
  state = json.loads(json.dumps(first.get_state()))  # Grain's checkpoint handler stores JSON.
  tail = _batches(first, 9)
  _assert_same(head + tail, _batches(make(), 16))
  resumed = make()
  resumed.set_state(state)
  _assert_same(tail, _batches(resumed, 9))
  shapes = {b["decoder_target_tokens"].shape for b in head + tail}
  assert shapes <= {(6, 32), (6, 64)} and all(b["encoder_input_tokens"].shape == (6, 128) for b in head + tail)
  assert all((b["encoder_segment_ids"][:, 0] > 0).all() for b in head + tail)  # No empty row.


def test_padding_fractions():
  batch = {"encoder_segment_ids": np.array([[1, 1, 0, 0]]), "decoder_segment_ids": np.array([[1, 2, 2, 0]])}
  assert packing.padding_fractions(batch) == {"encoder_padding": 0.5, "decoder_padding": 0.25}
