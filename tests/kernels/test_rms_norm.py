"""RMSNorm on every backend against a float64 NumPy reference: values and gradients, of `rms_norm` and of
`rms_norm_with_residual` (whose backward kernel adds x's gradient from the residual stream).

Backends: "xla" (`reference.rms_norm` run as the op), "pallas" and "triton". Off a GPU the kernels run in their
interpreters, which poison every output first (Pallas' interpreter, and `common.triton_call` for Triton's), so an
element a kernel forgets fails; FAT5_INTERPRET=0 on a GPU compiles them and poisons freed device memory instead.
Shapes are not multiples of the blocks, and a few cases give the backward fewer programs than row blocks (a GPU
with one core) so that its programs stride.
"""

import dataclasses
import importlib
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.rms_norm import MAX_WIDTH, BlockSizes, Kernels, rms_norm, rms_norm_with_residual, reference
from pallas_kernels.rms_norm.tuning import bwd_num_programs
from tests.kernels.checks import INTERPRET, poison_device_memory, relative_error

BACKENDS = ("xla", "pallas", "triton")
# bf16 outputs: one rounding (Triton's interpreter rounds float32 -> bf16 toward zero where the GPU rounds to
# nearest: up to one ulp, 2**-8 relative).
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}


def _op(backend, eps, block_sizes):
  if backend == "xla":
    return lambda x, w: reference.rms_norm(x, w, eps)
  return lambda x, w: rms_norm(x, w, eps, block_sizes=block_sizes, backend=backend, interpret=INTERPRET)


def _float64_reference(x, weight, dy, eps):
  """y, dx, dweight in float64: y = w x r with r = 1 / sqrt(mean(x^2) + eps)."""
  x, weight, dy = (np.asarray(a, np.float64) for a in (x, weight, dy))
  x = x.reshape(-1, x.shape[-1])
  dy = dy.reshape(x.shape)
  r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  x_hat = x * r
  g = dy * weight
  dx = r * (g - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
  return x_hat * weight, dx, np.sum(dy * x_hat, axis=0)


def _inputs(seed, shape, dtype, weight_dtype):
  kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
  x = (2.0 * jax.random.normal(kx, shape) + 0.5).astype(dtype)
  weight = (1.0 + 0.3 * jax.random.normal(kw, shape[-1:])).astype(weight_dtype)
  dy = jax.random.normal(kd, shape).astype(dtype)
  return x, weight, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype,weight_dtype,block_sizes,cores", [
    # Rows and width both masked; 3 backward programs stride over 19 row blocks.
    ((37, 1000), jnp.float32, jnp.float32, BlockSizes(block_rows=4, bwd_block_rows=2, bwd_programs_per_core=3), 1),
    # Leading axes; 2 programs over 5 blocks of 4 rows, the last one partial.
    ((2, 9, 768), jnp.bfloat16, jnp.bfloat16, BlockSizes(block_rows=2, bwd_block_rows=4, bwd_programs_per_core=2),
     1),
    ((32, 512), jnp.bfloat16, jnp.float32, None, None),  # the tiles cover the array: no masks
    ((13, 4096), jnp.float32, jnp.bfloat16, None, None),  # 8 warps at this width
])
def test_matches_float64_reference(backend, shape, dtype, weight_dtype, block_sizes, cores, monkeypatch):
  if cores is not None:
    monkeypatch.setattr(common, "core_count", lambda: cores)
  x, weight, dy = _inputs(sum(shape), shape, dtype, weight_dtype)
  eps = 1e-6
  poison_device_memory()
  y, vjp = jax.vjp(_op(backend, eps, block_sizes), x, weight)
  poison_device_memory()
  dx, dweight = vjp(dy)
  chex.assert_type([y, dx, dweight], [dtype, dtype, weight_dtype])
  chex.assert_shape([y, dx, dweight], [shape, shape, shape[-1:]])
  chex.assert_tree_all_finite((y, dx, dweight))
  tol = max(TOLERANCE[dtype], TOLERANCE[weight_dtype])
  expected = _float64_reference(x, weight, dy, eps)
  for name, actual, want in zip(("y", "dx", "dweight"), (y, dx, dweight), expected):
    err = relative_error(np.asarray(actual, np.float64).reshape(want.shape), want)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("backend", ["pallas", "triton"])
@pytest.mark.parametrize("shape,dtype,weight_dtype,block_sizes", [
    # Rows and width masked; 3 backward programs stride over 19 row blocks.
    ((37, 1000), jnp.float32, jnp.float32, BlockSizes(block_rows=4, bwd_block_rows=2, bwd_programs_per_core=3)),
    # Leading axes, bf16 activations with a float32 weight; 2 programs over 5 blocks of 4 rows, the last partial.
    ((2, 9, 768), jnp.bfloat16, jnp.float32, BlockSizes(block_rows=2, bwd_block_rows=4, bwd_programs_per_core=2)),
])
def test_with_residual_matches_float64_reference(backend, shape, dtype, weight_dtype, block_sizes, monkeypatch):
  """x feeds the residual stream and the norm: it comes back unchanged, and its gradient is the sum of both paths'
  (the residual stream's cotangent plus the norm's dx), added by the backward kernel."""
  monkeypatch.setattr(common, "core_count", lambda: 1)
  x, weight, dy = _inputs(sum(shape) + 1, shape, dtype, weight_dtype)
  dx_residual = jax.random.normal(jax.random.key(sum(shape) + 2), shape).astype(dtype)
  eps = 1e-6
  op = lambda x, w: rms_norm_with_residual(x, w, eps, block_sizes=block_sizes, backend=backend, interpret=INTERPRET)
  poison_device_memory()
  (x_out, y), vjp = jax.vjp(op, x, weight)
  poison_device_memory()
  dx, dweight = vjp((dx_residual, dy))
  chex.assert_trees_all_equal(x_out, x)
  chex.assert_type([y, dx, dweight], [dtype, dtype, weight_dtype])
  y_want, dx_norm, dweight_want = _float64_reference(x, weight, dy, eps)
  dx_want = dx_norm + np.asarray(dx_residual, np.float64).reshape(dx_norm.shape)
  for name, actual, want in zip(("y", "dx", "dweight"), (y, dx, dweight), (y_want, dx_want, dweight_want)):
    err = relative_error(np.asarray(actual, np.float64).reshape(want.shape), want)
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e} >= {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("backend", ["pallas", "triton"])
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 2**-7)])
def test_with_residual_is_rms_norm_and_the_separate_add(backend, dtype, tolerance):
  """The fused form against rms_norm whose x also feeds the residual stream, autodiff adding x's two gradients
  after the kernel: the same y and weight gradient, and the same dx up to rounding (in bf16 the separate add
  rounds once more: within one bf16 ulp, 2**-7 relative)."""
  x, weight, dy = _inputs(3, (6, 200), dtype, jnp.float32)
  dx_residual = jax.random.normal(jax.random.key(4), x.shape).astype(dtype)
  kwargs = dict(backend=backend, interpret=INTERPRET)
  fused = lambda x, w: rms_norm_with_residual(x, w, **kwargs)
  separate = lambda x, w: (x, rms_norm(x, w, **kwargs))
  (fused_out, fused_vjp), (separate_out, separate_vjp) = jax.vjp(fused, x, weight), jax.vjp(separate, x, weight)
  chex.assert_trees_all_equal(fused_out, separate_out)
  (fused_dx, fused_dweight), (separate_dx, separate_dweight) = (
      fused_vjp((dx_residual, dy)), separate_vjp((dx_residual, dy)))
  chex.assert_trees_all_close(fused_dweight, separate_dweight, rtol=1e-6)
  assert relative_error(fused_dx, separate_dx) < tolerance


@pytest.mark.parametrize("backend", ["pallas", "triton"])
def test_weight_gradient_accumulates_in_float32(backend, monkeypatch):
  """4,096 bf16 rows whose weight-gradient terms all have one sign, in one backward program (a one-core GPU) that
  adds 256 blocks of 16 rows: a bf16 accumulator would be off by about 3% (simulated). The kernels sum in float32
  and round once: within 1e-2 of float64 on the same bf16 inputs."""
  monkeypatch.setattr(common, "core_count", lambda: 1)
  num_rows, width = 4096, 48
  kx, kw, kd = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 20))), 3)
  x = (jnp.abs(jax.random.normal(kx, (num_rows, width))) + 0.5).astype(jnp.bfloat16)
  weight = jax.random.uniform(kw, (width,), minval=0.5, maxval=1.5).astype(jnp.bfloat16)
  dy = jax.random.uniform(kd, (num_rows, width), minval=0.5, maxval=1.5).astype(jnp.bfloat16)
  block_sizes = BlockSizes(bwd_block_rows=16, bwd_programs_per_core=1)
  poison_device_memory()
  _, vjp = jax.vjp(_op(backend, 1e-6, block_sizes), x, weight)
  _, dweight = vjp(dy)
  expected = _float64_reference(x, weight, dy, 1e-6)[2]
  assert dweight.dtype == jnp.bfloat16 and expected.min() > 1000  # thousands of positive terms per column
  assert relative_error(dweight, expected) < 1e-2


@pytest.mark.parametrize("backend", ["pallas", "triton"])
def test_jit_and_one_row(backend):
  """Under jit, with one row (one program each way) and a width of 3."""
  for shape in [(1, 96), (5, 3)]:
    x, weight, dy = _inputs(1, shape, jnp.float32, jnp.float32)
    y = jax.jit(_op(backend, 1e-5, None))(x, weight)
    dx, dweight = jax.jit(lambda x, w, dy: jax.vjp(_op(backend, 1e-5, None), x, w)[1](dy))(x, weight, dy)
    for actual, want in zip((y, dx, dweight), _float64_reference(x, weight, dy, 1e-5)):
      assert relative_error(np.asarray(actual).reshape(want.shape), want) < 1e-5


def test_block_sizes_are_the_h100_sweep_results(monkeypatch):
  """for_width's tables are what the H100 sweeps chose; the backward's programs come from the core count: 8 per
  SM (1056 on the H100's 132) and 16 per SM at widths up to 512 (2112)."""
  monkeypatch.setattr(common, "core_count", lambda: 132)
  narrow, wide = BlockSizes.for_width(512), BlockSizes.for_width(1024)
  assert dataclasses.asdict(narrow) == dict(block_rows=4, num_warps=8, bwd_block_rows=1, bwd_num_warps=4,
                                            bwd_programs_per_core=16, num_stages=2)
  assert dataclasses.asdict(wide) == dict(block_rows=2, num_warps=4, bwd_block_rows=1, bwd_num_warps=4,
                                          bwd_programs_per_core=8, num_stages=2)
  assert (bwd_num_programs(narrow, 65536), bwd_num_programs(wide, 65536)) == (2112, 1056)
  assert bwd_num_programs(BlockSizes(), 65536) == 1056
  assert bwd_num_programs(wide, 100) == 100  # never more programs than row blocks
  assert BlockSizes.for_width(4096).bwd_num_warps == 8 and BlockSizes.for_width(4096).num_warps == 8


def test_reference_matches_t5_formula():
  x, weight, _ = _inputs(7, (5, 64), jnp.float32, jnp.float32)
  expected = weight * x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  chex.assert_trees_all_close(reference.rms_norm(x, weight), expected, rtol=1e-6)
  chex.assert_type(reference.rms_norm(x.astype(jnp.bfloat16), weight), jnp.bfloat16)


@pytest.mark.parametrize("backend", ["pallas", "triton"])
def test_backends_implement_the_kernels_protocol(backend):
  name = f"pallas_kernels.rms_norm.{backend}"
  module = (common.load_triton_kernels(name, common.resolve_interpret(INTERPRET)) if backend == "triton"
            else importlib.import_module(name))
  for name in ("forward", "backward"):
    expected = list(inspect.signature(getattr(Kernels, name)).parameters)[1:]  # without self
    assert list(inspect.signature(getattr(module, name)).parameters) == expected, name


@pytest.mark.parametrize("kwargs,message", [
    (dict(weight=jnp.ones(63)), "weight"),
    (dict(x=jnp.ones((4, 2 * MAX_WIDTH)), weight=jnp.ones(2 * MAX_WIDTH)), "widths up to"),
    (dict(backend="xla"), "backend"),
    (dict(backend="cuda"), "backend"),
    (dict(x=jnp.ones((4, 64), jnp.int32)), "floating"),
    (dict(x=jnp.ones(())), "weight"),
    (dict(block_sizes=BlockSizes(block_rows=3)), "power of two"),
    (dict(block_sizes=BlockSizes(bwd_programs_per_core=0)), "positive"),
])
def test_bad_input_raises(kwargs, message):
  args = dict(x=jnp.ones((4, 64)), weight=jnp.ones(64)) | kwargs
  with pytest.raises(ValueError, match=message):
    rms_norm(args.pop("x"), args.pop("weight"), interpret=True, **args)
