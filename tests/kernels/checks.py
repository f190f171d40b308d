"""What the kernel test modules share: where the kernels run, the error measure, and output poisoning.

Off GPU the kernels run in Pallas interpret mode, which fills every output with NaN (floats) or the minimum
integer before the kernel writes it, so an element a kernel forgets shows up at once. On a GPU,
`poison_device_memory` fills the memory the allocator hands out next with NaN to the same end. FAT5_INTERPRET=0
forces the compiled kernels, =1 the interpreter; unset means interpret off GPU only.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

INTERPRET = {"0": False, "1": True}.get(os.environ.get("FAT5_INTERPRET", ""))
ON_GPU = jax.default_backend() == "gpu"


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def poison_device_memory():
  """Fill the memory the GPU allocator will hand out next with NaN (interpret mode poisons outputs itself)."""
  if ON_GPU:
    jnp.full((1 << 26,), jnp.nan, jnp.float32).block_until_ready().delete()
