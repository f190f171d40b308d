"""What every kernel module shares: the interpret-mode default and the base-2 constants."""

import math

import jax

LOG2E = math.log2(math.e)  # the kernels work in base 2: exp2 is one hardware instruction
LN2 = math.log(2.0)


def resolve_interpret(interpret: bool | None, impl: str = "pallas") -> bool:
  """interpret=None means the Pallas interpreter off GPU and compiled kernels on GPU; raw Triton has no
  interpreter."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if interpret and impl == "triton":
    raise ValueError("impl='triton' runs on a GPU only (no interpret mode)")
  return interpret
