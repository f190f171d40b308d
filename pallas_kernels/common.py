"""What every kernel shares: the base-2 constants, the mask value, the interpret policy, the device's properties,
and one launcher for raw Triton kernels that runs them compiled on a GPU or in Triton's interpreter on a CPU."""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import threading
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

LOG2E = math.log2(math.e)  # the kernels work in base 2: exp2 is one hardware instruction
LN2 = math.log(2.0)
# Finite stand-in for -inf: exp2(MASK - m) is 0 for any real m, and MASK - MASK is no NaN.
MASK = -0.7 * float(np.finfo(np.float32).max)
BACKENDS = ("pallas", "triton")


def resolve_interpret(interpret: bool | None) -> bool:
  """interpret=None: compiled kernels on a GPU, the interpreters (Pallas', Triton's) anywhere else."""
  return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def check_backend(backend: str, backends: tuple[str, ...] = BACKENDS) -> str:
  if backend not in backends:
    raise ValueError(f"backend must be one of {backends}; got {backend!r}")
  return backend


def next_power_of_2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def device_capability() -> tuple[int, int]:
  """(major, minor) compute capability of the first device; (0, 0) off NVIDIA GPUs."""
  text = getattr(jax.devices()[0], "compute_capability", None)
  if text is None:
    return (0, 0)
  major, _, minor = str(text).partition(".")
  return int(major), int(minor or 0)


@functools.lru_cache(maxsize=None)
def core_count(default: int = 132) -> int:
  """Streaming multiprocessors of the first device (the H100's 132 off GPU, where it only sizes interpreted
  grids)."""
  return int(getattr(jax.devices()[0], "core_count", 0) or default)


def load_triton_kernels(module: str, interpret: bool) -> ModuleType:
  """Import a module of `@triton.jit` kernels. Interpreted, Triton must be told before the module is first
  imported (the decorator reads TRITON_INTERPRET), so this is the one way kernel modules are loaded."""
  if interpret:
    os.environ["TRITON_INTERPRET"] = "1"
    _repair_triton_interpreter()
  return importlib.import_module(module)


def _repair_triton_interpreter() -> None:
  """Repairs of Triton 3.6's interpreter for our kernels (process-wide, once; each belongs upstream).

  - Triton's own library functions (tl.zeros, tl.sum, tl.cdiv...) are `@triton.jit` functions too. When something
    imported triton before TRITON_INTERPRET=1 was set (Hugging Face's T5 module does, through torch), they are
    compiled-mode functions that the interpreter refuses to call: make them interpreted, as importing triton
    under TRITON_INTERPRET=1 would have. (Their tensor-method forms, `x.sum()`, stay compiled: call the functions.)
  - The interpreter turns a scalar into a Python int with `int(array of shape (1,))`, which NumPy 2.4 refuses, so
    `tl.range` over traced bounds fails (triton-lang/triton#9171, fixed after 3.6 by #9172).
  - It runs a kernel by patching `triton.language` for the kernel's duration, for the whole process: two kernels
    on two threads (XLA may run independent host callbacks concurrently) would undo each other's patches. Grid
    runs are serialized.
  """
  from triton.runtime import interpreter
  from triton.runtime.jit import JITFunction
  if getattr(interpreter, "pallas_kernels_repaired", False):
    return
  interpreted = {}
  for name, module in list(sys.modules.items()):
    if name == "triton.language" or name.startswith("triton.language."):
      for attr, value in list(vars(module).items()):
        if isinstance(value, JITFunction):
          setattr(module, attr, interpreted.setdefault(id(value), interpreter.InterpretedFunction(value.fn)))
  try:
    int(np.ones(1, np.int32))
  except TypeError:
    patch = interpreter._patch_lang_tensor  # pylint: disable=protected-access

    def patch_lang_tensor(tensor, scope):
      patch(tensor, scope)
      scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor  # pylint: disable=protected-access
  run, lock = interpreter.GridExecutor.__call__, threading.Lock()

  def serialized(self, *args, **kwargs):
    with lock:
      return run(self, *args, **kwargs)

  interpreter.GridExecutor.__call__ = serialized
  interpreter.pallas_kernels_repaired = True


def triton_call(*args, kernel, out_shape, grid, num_warps: int, num_stages: int, interpret: bool, **constants):
  """Launch `kernel[grid](*args, *outputs, **constants)` on JAX arrays; returns the outputs like jax-triton.

  Compiled: through jax-triton on the GPU. Interpreted: a host callback runs the kernel in Triton's interpreter on
  torch CPU tensors, with every output poisoned first (NaN, or the smallest integer) so that an element the kernel
  forgets to write shows up in the tests.
  """
  shapes = out_shape if isinstance(out_shape, (list, tuple)) else [out_shape]
  if not interpret:
    import jax_triton as jt  # GPU only: jax-triton 0.3 refuses to import on a CPU jaxlib
    return jt.triton_call(*args, kernel=kernel, out_shape=out_shape, grid=grid, num_warps=num_warps,
                          num_stages=num_stages, **constants)
  if type(kernel).__name__ != "InterpretedFunction":
    raise RuntimeError(f"{getattr(kernel, '__name__', kernel)} was compiled for a GPU: load its module with "
                       "load_triton_kernels(..., interpret=True) before anything imports it")

  def run(*host_args):
    import torch  # the interpreter works on torch tensors
    inputs = [_to_torch(torch, np.asarray(a)) for a in host_args]
    outputs = [_poisoned(torch, s) for s in shapes]
    kernel[tuple(grid)](*inputs, *outputs, num_warps=num_warps, num_stages=num_stages, **constants)
    return [_to_numpy(torch, t, s.dtype) for t, s in zip(outputs, shapes)]

  results = jax.pure_callback(run, [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes], *args)
  return results if isinstance(out_shape, (list, tuple)) else results[0]


def _to_torch(torch, array: np.ndarray):
  if array.dtype == jnp.bfloat16:  # numpy has no bfloat16 of its own: move the bits
    return torch.from_numpy(np.array(array.view(np.int16))).view(torch.bfloat16)
  return torch.from_numpy(np.array(array))


def _poisoned(torch, shape: jax.ShapeDtypeStruct):
  dtype = np.dtype(shape.dtype)
  if dtype == jnp.bfloat16:
    return torch.full(shape.shape, float("nan"), dtype=torch.bfloat16)
  tensor = torch.from_numpy(np.empty(shape.shape, dtype))
  return tensor.fill_(float("nan") if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min)


def _to_numpy(torch, tensor, dtype) -> np.ndarray:
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
  return tensor.numpy().astype(dtype, copy=False)
