"""What the kernel test modules share: where the kernels run, the error measure, output poisoning, and one
compilation per kernel in Mosaic GPU's interpreter.

Off GPU the kernels run in Pallas interpret mode, which fills every output with NaN (floats) or the minimum
integer before the kernel writes it, so an element a kernel forgets shows up at once. On a GPU,
`poison_device_memory` fills the memory the allocator hands out next with NaN to the same end. FAT5_INTERPRET=0
forces the compiled kernels, =1 the interpreter; unset means interpret off GPU only.
"""

import contextlib
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

INTERPRET = {"0": False, "1": True}.get(os.environ.get("FAT5_INTERPRET", ""))
ON_GPU = jax.default_backend() == "gpu"


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def poison_device_memory():
  """Fill the memory the GPU allocator will hand out next with NaN (interpret mode poisons outputs itself)."""
  if ON_GPU:
    jnp.full((1 << 26,), jnp.nan, jnp.float32).block_until_ready().delete()


@contextlib.contextmanager
def compile_each_interpreted_kernel_once():
  """The interpreter (jax 0.10.2) runs a kernel of several warpgroups (the Mosaic forward, the dk/dv kernel) by
  compiling its jaxpr with XLA:CPU again for every warpgroup of every program (`thread_map._run_jaxpr`), about 1 s
  each on the CPU runners: most of such a test's time. The executable depends on the jaxpr and the argument shapes
  only (`_run_jaxpr` passes everything else as arguments), so inside this block it is compiled once per jaxpr and
  shapes; the execution is unchanged. A no-op where the interpreter has no such function."""
  try:
    from jax._src.pallas.mosaic.interpret import thread_map  # pylint: disable=import-outside-toplevel
  except ImportError:
    thread_map = None
  if not hasattr(thread_map, "_run_jaxpr") or not hasattr(thread_map, "jax_core"):
    yield
    return
  cache, lock = {}, threading.Lock()

  def run_jaxpr(jaxpr, consts, *args):
    def run(jaxpr, consts, *args):
      thread_map.jax_core.eval_jaxpr(jaxpr, consts, *args)

    shapes = jax.tree.map(lambda x: (np.shape(x), str(getattr(x, "dtype", type(x)))), (consts, args))
    key = (id(jaxpr), str(shapes))
    with lock:  # the other warpgroups of the first program wait for the first one's compilation
      if key not in cache:
        cache[key] = (jaxpr, jax.jit(run, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile())
      compiled = cache[key][1]  # (the jaxpr kept alive: its id stays unique)
    compiled(consts, *args)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(thread_map, "_run_jaxpr", run_jaxpr)
    yield
