"""UL2 denoisers: T5 span-corruption semantics, statistics, sentinel round trip, chunk lengths."""

import collections

import numpy as np
import pytest

from fat5_jax.config import DEFAULT_DENOISERS
from fat5_jax.data import ul2

VOCAB = 5000
EOS, PREFIX = 1, 3
DENOISERS = [ul2.Denoiser(*d) for d in DEFAULT_DENOISERS]


def _sentinels(n):
  return VOCAB - 1 - np.arange(n, dtype=np.int32)


def _tokens(rng, length):
  return rng.integers(10, VOCAB - 1000, size=length).astype(np.int32)


@pytest.mark.parametrize("denoiser", DENOISERS, ids=str)
def test_round_trip_and_format(denoiser):
  rng = np.random.default_rng(0)
  sentinel_ids = _sentinels(256)
  for length in [2, 3, 7, 50, 333, 700]:
    tokens = _tokens(rng, length)
    inputs, targets, sentinels = ul2.corrupt(tokens, denoiser, rng, sentinel_ids, PREFIX, EOS)
    np.testing.assert_array_equal(ul2.uncorrupt(inputs, targets, sentinels, True), tokens)
    assert inputs[0] == PREFIX and inputs[-1] == EOS and targets[-1] == EOS
    np.testing.assert_array_equal(sentinels, sentinel_ids[:len(sentinels)])  # <extra_id_0> first, counting down.
    if not denoiser.is_prefix_lm:
      np.testing.assert_array_equal(inputs[np.isin(inputs, sentinel_ids)], sentinels)
      np.testing.assert_array_equal(targets[np.isin(targets, sentinel_ids)], sentinels)
      assert targets[0] == sentinel_ids[0]
    expected = ul2.example_lengths(length, denoiser, 256)
    assert (len(inputs), len(targets)) == tuple(int(x) for x in expected)


@pytest.mark.parametrize("denoiser", DENOISERS, ids=str)
def test_measured_noise_density_and_span_length(denoiser):
  rng = np.random.default_rng(1)
  length, sentinel_ids = 4096, _sentinels(2000)
  noise = spans = 0
  for _ in range(30):
    tokens = _tokens(rng, length)
    inputs, targets, sentinels = ul2.corrupt(tokens, denoiser, rng, sentinel_ids, PREFIX, EOS)
    noise += len(targets) - 1 - len(sentinels)
    spans += max(len(sentinels), 1)
  if denoiser.is_prefix_lm:
    assert noise / 30 == length - round(length / denoiser.mu)  # Keeps the first L/mu tokens.
  else:
    assert abs(noise / (30 * length) - denoiser.r) < 0.005
    assert abs(noise / spans - denoiser.mu) / denoiser.mu < 0.05


def test_segmentations_equally_likely():
  # 10 tokens, 5 noise in 2 spans: 4 noise compositions x 4 kept compositions = 16 equally likely masks.
  rng = np.random.default_rng(2)
  denoiser = ul2.Denoiser(2.5, 0.5, 0, "[X]")
  tokens = np.arange(100, 110, dtype=np.int32)
  counts = collections.Counter()
  for _ in range(4800):
    _, targets, _ = ul2.corrupt(tokens, denoiser, rng, _sentinels(8), PREFIX, EOS)
    counts[tuple(t for t in targets if t < 1000)] += 1
  assert len(counts) == 16
  assert all(200 < c < 400 for c in counts.values()), counts  # Expected 300 each.


def test_spans_start_with_kept_tokens():
  rng = np.random.default_rng(3)
  tokens = _tokens(rng, 300)
  for _ in range(50):
    inputs, _, _ = ul2.corrupt(tokens, DENOISERS[3], rng, _sentinels(256), PREFIX, EOS)
    assert inputs[1] == tokens[0] and inputs[-2] == _sentinels(256)[np.isin(inputs, _sentinels(256)).sum() - 1]


def test_spans_capped_by_sentinels_and_max_spans():
  rng = np.random.default_rng(4)
  tokens = _tokens(rng, 600)
  _, _, sentinels = ul2.corrupt(tokens, ul2.Denoiser(3, 0.5, 0, "[X]"), rng, _sentinels(8), PREFIX, EOS)
  assert len(sentinels) == 8
  inputs, targets, sentinels = ul2.corrupt(tokens, ul2.Denoiser(3, 0.5, 5, "[X]"), rng, _sentinels(256), None, EOS)
  assert len(sentinels) == 5
  np.testing.assert_array_equal(ul2.uncorrupt(inputs, targets, sentinels, False), tokens)


@pytest.mark.parametrize("lengths", [(512, 512), (128, 64), (512, 128)])
def test_raw_length_fits_and_is_maximal(lengths):
  encoder_length, decoder_length = lengths
  for denoiser in DENOISERS:
    n = ul2.raw_length(denoiser, encoder_length, decoder_length, 256)
    inputs, targets = ul2.example_lengths(np.arange(2, n + 1), denoiser, 256)
    assert (inputs <= encoder_length).all() and (targets <= decoder_length).all()
    inputs, targets = ul2.example_lengths(n + 1, denoiser, 256)
    assert inputs > encoder_length or targets > decoder_length


def test_raw_length_t5_value():
  # T5's span corruption at 512 inputs (r=0.15, mu=3) reads 568 raw tokens with a 114-token target; our input
  # also carries the UL2 prefix token, which costs one raw token.
  assert ul2.raw_length(ul2.Denoiser(3, 0.15, 0, ""), 512, 114, 256) == 568
  assert ul2.raw_length(DENOISERS[0], 512, 512, 256) == 567


def test_transform_reproducible_and_mixture():
  transform = ul2.UL2Transform(DENOISERS, [0.165, 0.165, 0.34] + [0.0825] * 4, 512, 512, _sentinels(256),
                               {"[R]": 3, "[S]": 4, "[X]": 5}, EOS)
  piece = np.arange(10, 2010, dtype=np.int32)  # Distinct tokens locate the chunk.
  a = transform.example(piece, np.random.default_rng(7))
  b = transform.example(piece, np.random.default_rng(7))
  np.testing.assert_array_equal(a.inputs, b.inputs)
  assert len(a.original) == transform.raw_lengths[a.denoiser]
  np.testing.assert_array_equal(a.original, np.arange(a.original[0], a.original[0] + len(a.original)))
  counts = np.bincount([transform.example(piece[:50], np.random.default_rng(i)).denoiser for i in range(3000)],
                       minlength=7)
  np.testing.assert_allclose(counts / 3000, [0.165, 0.165, 0.34] + [0.0825] * 4, atol=0.03)
