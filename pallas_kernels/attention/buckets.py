"""T5's relative-position buckets, and the band maths both kernel backends share (numpy and jnp only).

The kernels never bucket a distance themselves: they read a per-head vector indexed by the distance clipped to
+-max_distance (beyond it every pair shares the last bucket), built here from `bucket_lut`. Tiles whose
distances reach inside +-max_distance form the "band"; their bias is precomputed here as one tile per
k_start - q_start shift (`band_tiles`), which the kernels load like k or v.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import next_power_of_2


@functools.lru_cache(maxsize=None)
def bucket_lut(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bucket of every relative position in [-max_distance, max_distance], Hugging Face's formula in float32.

  Computed once on the host with numpy, so every device agrees; beyond +-max_distance the bucket is constant.
  """
  relative = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0) * num_buckets
    distance = np.abs(relative)
  else:
    distance = -np.minimum(relative, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):  # log(0) in the branch that small distances do not take
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
  large = np.minimum(max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64), num_buckets - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def check_buckets(num_buckets: int, bidirectional: bool, max_distance: int) -> None:
  max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
  if max_exact < 1 or max_distance <= max_exact:
    raise ValueError(f"T5 buckets need max_distance ({max_distance}) > max_exact ({max_exact}) >= 1 "
                     f"(num_buckets={num_buckets}, bidirectional={bidirectional})")


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> jax.Array:
  """Hugging Face's `T5Attention._relative_position_bucket`, bit for bit (relative_position = key - query)."""
  check_buckets(num_buckets, bidirectional, max_distance)
  lut = jnp.asarray(bucket_lut(bidirectional, num_buckets, max_distance))
  return lut[jnp.clip(relative_position, -max_distance, max_distance) + max_distance]


def lut_size(max_distance: int) -> int:
  """Entries of the per-distance vectors: 2 * max_distance + 1, padded to a power of two (a kernel block)."""
  return next_power_of_2(2 * max_distance + 1)


def padded_lut(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
  """The bucket of each distance + max_distance, padded with bucket 0 to lut_size entries."""
  lut = np.zeros((lut_size(max_distance),), np.int32)
  lut[: 2 * max_distance + 1] = bucket_lut(bidirectional, num_buckets, max_distance)
  return lut


def band_shifts(max_distance: int, bq: int, bk: int) -> tuple[int, int, int]:
  """(first shift, step, count) of the tiles whose distances k_start - q_start + (j - i) reach inside
  +-max_distance. Shifts are multiples of min(bq, bk)."""
  step = min(bq, bk)
  first = -((max_distance + bk - 2) // step) * step  # smallest multiple of step with shift + bk - 1 > -md
  last = ((max_distance + bq - 2) // step) * step  # largest with shift - (bq - 1) < md
  return first, step, (last - first) // step + 1


def band_tiles(vector: jax.Array, max_distance: int, bq: int, bk: int) -> jax.Array:
  """[H, count * bq, bk]: the bias tile of every band shift from the per-distance vector [H, lut_size]."""
  first, step, count = band_shifts(max_distance, bq, bk)
  shifts = first + step * np.arange(count)
  md = max_distance
  index = np.clip(shifts[:, None, None] + np.arange(bk)[None, None, :] - np.arange(bq)[None, :, None], -md, md)
  return vector[:, (index + md).reshape(count * bq, bk)]


def sum_into_buckets(sums: jax.Array, slot_buckets: np.ndarray, buckets_padded: int) -> jax.Array:
  """[H, buckets_padded]: the per-slot table gradient sums [H, slots] added up per bucket (slot_buckets [slots]), as a
  float32 matmul with a one-hot matrix: deterministic where a scatter-add is not on a GPU."""
  one_hot = (slot_buckets[:, None] == np.arange(buckets_padded)).astype(np.float32)
  return jnp.dot(sums, one_hot, precision=jax.lax.Precision.HIGHEST)
