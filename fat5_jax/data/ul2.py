"""UL2 denoisers: T5 span corruption and the prefix-LM [S] objective, vectorized with numpy.

Span corruption of L tokens with noise density r and mean span length mu (T5's `random_spans_noise_mask`):
round(L*r) noise tokens (at least 1, at most L-1) in round(noise/mu) spans (at least 1; at most max_spans, the
tokenizer's sentinels and what the token counts allow). Noise and kept tokens are each cut into that many
non-empty spans, every segmentation equally likely, and the spans alternate kept/noise starting with kept. The
input replaces noise span k by `<extra_id_k>`; the target is `<extra_id_k>` followed by noise span k, for each k.
The [S] denoiser (r = 0, max_spans = 1) keeps the first round(L/mu) tokens as input and predicts the rest.
Inputs are `prefix, ..., eos`; targets end with eos.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from fat5_jax.config import ConfigError, DataConfig


@dataclasses.dataclass(frozen=True)
class Denoiser:
  mu: float
  r: float
  max_spans: int  # 0: no limit.
  prefix: str  # "" for no prefix token.

  @property
  def is_prefix_lm(self) -> bool:
    return self.r == 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Example:
  """One corrupted chunk before packing (the fields inspect_data writes)."""
  denoiser: int
  original: np.ndarray
  inputs: np.ndarray
  targets: np.ndarray
  sentinels: np.ndarray


def denoisers_from_config(data_config: DataConfig) -> list[Denoiser]:
  return [Denoiser(float(mu), float(r), int(spans), prefix) for mu, r, spans, prefix in data_config.denoisers]


def noise_counts(length, denoiser: Denoiser, num_sentinels: int):
  """(noise tokens, noise spans) for chunks of `length` tokens (scalar or array)."""
  length = np.asarray(length, np.int64)
  if denoiser.is_prefix_lm:
    kept = np.clip(np.rint(length / denoiser.mu), 1, length - 1).astype(np.int64)
    return length - kept, np.ones_like(length)
  noise = np.clip(np.rint(length * denoiser.r), 1, length - 1).astype(np.int64)
  spans = np.maximum(np.rint(noise / denoiser.mu), 1).astype(np.int64)
  cap = min(denoiser.max_spans or num_sentinels, num_sentinels)
  spans = np.minimum(np.minimum(spans, cap), np.minimum(noise, length - noise))
  return noise, spans


def example_lengths(length, denoiser: Denoiser, num_sentinels: int):
  """(input length, target length) of a corrupted chunk of `length` tokens, prefix and eos included."""
  noise, spans = noise_counts(length, denoiser, num_sentinels)
  prefix = 1 if denoiser.prefix else 0
  if denoiser.is_prefix_lm:
    return length - noise + prefix + 1, noise + 1
  return length - noise + spans + prefix + 1, noise + spans + 1


def raw_length(denoiser: Denoiser, encoder_length: int, decoder_length: int, num_sentinels: int) -> int:
  """Longest chunk whose input and target fit, and such that every shorter chunk fits too.

  The role of T5's `random_spans_helper`, solved by scanning every candidate length (inputs plus targets hold
  every original token, so no chunk longer than encoder_length + decoder_length can fit).
  """
  candidates = np.arange(2, encoder_length + decoder_length + 1)
  inputs, targets = example_lengths(candidates, denoiser, num_sentinels)
  fits = (inputs <= encoder_length) & (targets <= decoder_length)
  if not fits[0]:
    raise ConfigError(f"denoiser {denoiser} cannot fit even 2 tokens in encoder {encoder_length} / decoder "
                     f"{decoder_length}")
  return int(candidates[-1] if fits.all() else candidates[np.argmin(fits) - 1])


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Lengths of `num_segments` non-empty segments summing to `num_items`, uniformly over all compositions."""
  if num_segments == 1:
    return np.array([num_items], np.int64)
  cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False, shuffle=False)) + 1
  return np.diff(cuts, prepend=0, append=num_items)


def corrupt(tokens: np.ndarray, denoiser: Denoiser, rng: np.random.Generator, sentinel_ids: np.ndarray,
            prefix_id: int | None, eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, sentinels used) of one chunk; `sentinel_ids[k]` is the id of <extra_id_k>."""
  length = len(tokens)
  noise, spans = (int(x) for x in noise_counts(length, denoiser, len(sentinel_ids)))
  head = [prefix_id] if prefix_id is not None else []
  if denoiser.is_prefix_lm:
    kept = length - noise
    inputs = np.concatenate([head, tokens[:kept], [eos_id]])
    targets = np.concatenate([tokens[kept:], [eos_id]])
    return inputs.astype(np.int32), targets.astype(np.int32), np.zeros(0, np.int32)
  kept_lengths = random_segmentation(length - noise, spans, rng)
  noise_lengths = random_segmentation(noise, spans, rng)
  bounds = np.cumsum(np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1))
  noise_starts, kept_starts = bounds[0::2], np.concatenate([[0], bounds[1:-1:2]])
  is_noise = np.repeat(np.tile(np.array([False, True]), spans), np.diff(bounds, prepend=0))
  sentinels = sentinel_ids[:spans]
  # The first token of each noise span becomes its sentinel in the input, the first token of each kept span the
  # same sentinel in the target; the other tokens of the spans that each side drops are removed.
  marked = tokens.copy()
  marked[noise_starts] = sentinels
  inputs_keep = ~is_noise
  inputs_keep[noise_starts] = True
  target_marked = tokens.copy()
  target_marked[kept_starts] = sentinels
  targets_keep = is_noise.copy()
  targets_keep[kept_starts] = True
  inputs = np.concatenate([head, marked[inputs_keep], [eos_id]]).astype(np.int32)
  targets = np.concatenate([target_marked[targets_keep], [eos_id]]).astype(np.int32)
  return inputs, targets, sentinels.astype(np.int32)


def uncorrupt(inputs: np.ndarray, targets: np.ndarray, sentinels: np.ndarray, has_prefix: bool) -> np.ndarray:
  """The original chunk back from an input and its target (the inverse of `corrupt`, used by tests)."""
  body_in, body_out = inputs[int(has_prefix):-1], targets[:-1]
  if len(sentinels) == 0:
    return np.concatenate([body_in, body_out])
  in_parts = np.split(body_in, np.flatnonzero(np.isin(body_in, sentinels)))
  out_parts = np.split(body_out, np.flatnonzero(np.isin(body_out, sentinels)))[1:]
  pieces = [in_parts[0]]
  for kept, noise in zip(in_parts[1:], out_parts):
    pieces += [noise[1:], kept[1:]]
  return np.concatenate(pieces)


class UL2Transform(grain.transforms.RandomMap):
  """Grain random map: piece of tokens (or stream chunk) -> the fields of an `Example` for one denoiser.

  All randomness comes from the rng Grain derives from (seed, index), so example i can be rebuilt alone.
  """

  def __init__(self, denoisers: list[Denoiser], proportions, encoder_length: int, decoder_length: int,
               sentinel_ids: np.ndarray, prefix_ids: dict, eos_id: int):
    self.denoisers = denoisers
    self._cumulative = np.cumsum(np.asarray(proportions, np.float64) / np.sum(proportions))
    self.raw_lengths = [raw_length(d, encoder_length, decoder_length, len(sentinel_ids)) for d in denoisers]
    self._sentinel_ids = np.asarray(sentinel_ids, np.int32)
    self._prefix_ids = [prefix_ids[d.prefix] if d.prefix else None for d in denoisers]
    self._eos_id = eos_id

  @property
  def max_raw_length(self) -> int:
    return max(self.raw_lengths)

  def example(self, piece: np.ndarray, rng: np.random.Generator, denoiser: int | None = None) -> Example:
    """Corrupts a random chunk of `piece` with `denoiser` (sampled from the proportions when None)."""
    if denoiser is None:
      denoiser = int(min(np.searchsorted(self._cumulative, rng.random(), side="right"), len(self.denoisers) - 1))
    size = self.raw_lengths[denoiser]
    start = int(rng.integers(0, len(piece) - size + 1)) if len(piece) > size else 0
    chunk = piece[start:start + size]
    inputs, targets, sentinels = corrupt(chunk, self.denoisers[denoiser], rng, self._sentinel_ids,
                                         self._prefix_ids[denoiser], self._eos_id)
    return Example(denoiser, chunk, inputs, targets, sentinels)

  def random_map(self, element: np.ndarray | dict, rng: np.random.Generator) -> dict:
    """`element`: a piece (a denoiser is sampled, a window of its raw length taken) or a stream chunk
    {"tokens", "denoiser"} (`cache.StreamSource`: already of that denoiser's raw length, corrupted whole)."""
    if isinstance(element, dict):
      return dict(vars(self.example(element["tokens"], rng, element["denoiser"])))
    return dict(vars(self.example(element, rng)))
