"""RMSNorm kernels (Pallas, and raw Triton on GPU) against the float64 jnp reference: values and gradients.

CPU runs the Pallas kernels in interpret mode (which fills outputs with NaN before the kernel runs, so an
unwritten element fails). On a GPU, FAT5_INTERPRET=0 compiles them, the jax-triton variant runs too, and freed
device memory is filled with NaN before each call so that stale buffers would show.
"""


import chex
import jax
import jax.numpy as jnp
import pytest

from tests.kernels.checks import INTERPRET, ON_GPU, poison_device_memory, relative_error
from pallas_kernels.rms_norm import BlockSizes, rms_norm, rms_norm_reference

IMPLS = ["pallas", pytest.param("triton", marks=pytest.mark.skipif(not ON_GPU, reason="jax-triton needs a GPU"))]
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}


def _inputs(seed, shape, dtype, weight_dtype):
  kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
  x = (2.0 * jax.random.normal(kx, shape) + 0.5).astype(dtype)
  weight = (1.0 + 0.3 * jax.random.normal(kw, shape[-1:])).astype(weight_dtype)
  dy = jax.random.normal(kd, shape).astype(dtype)
  return x, weight, dy


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype,weight_dtype,block_sizes", [
    ((32, 512), jnp.bfloat16, jnp.float32, None),  # tiles cover the rows exactly: no masking
    ((37, 1000), jnp.float32, jnp.float32, BlockSizes(block_rows=4, bwd_block_rows=2, bwd_programs=3)),
    ((2, 9, 768), jnp.bfloat16, jnp.bfloat16, BlockSizes(block_rows=2, bwd_block_rows=4, bwd_programs=2)),
    ((13, 4096), jnp.float32, jnp.bfloat16, None),
])
def test_matches_float64_reference(impl, shape, dtype, weight_dtype, block_sizes):
  x, weight, dy = _inputs(sum(shape), shape, dtype, weight_dtype)
  eps = 1e-6
  poison_device_memory()
  y, vjp = jax.vjp(lambda x, w: rms_norm(x, w, eps, block_sizes=block_sizes, impl=impl, interpret=INTERPRET),
                   x, weight)
  poison_device_memory()
  dx, dweight = vjp(dy)
  with jax.enable_x64(True):
    ref_y, ref_vjp = jax.vjp(lambda x, w: rms_norm_reference(x, w, eps), x.astype(jnp.float64),
                             weight.astype(jnp.float64))
    ref_dx, ref_dweight = ref_vjp(dy.astype(jnp.float64))
    chex.assert_type([y, dx, dweight], [dtype, dtype, weight_dtype])
    chex.assert_shape([y, dx, dweight], [shape, shape, shape[-1:]])
    chex.assert_tree_all_finite((y, dx, dweight))
    tol = max(TOLERANCE[dtype], TOLERANCE[weight_dtype])
    for name, actual, expected in [("y", y, ref_y), ("dx", dx, ref_dx), ("dweight", dweight, ref_dweight)]:
      err = relative_error(actual, expected)
      assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def test_reference_matches_t5_formula():
  x, weight, _ = _inputs(7, (5, 64), jnp.float32, jnp.float32)
  expected = weight * x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  chex.assert_trees_all_close(rms_norm_reference(x, weight), expected, rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(weight=jnp.ones(63)), "weight"),
    (dict(x=jnp.ones((4, 32768)), weight=jnp.ones(32768)), "widths up to"),
    (dict(impl="cuda"), "impl"),
    (dict(x=jnp.ones((4, 64), jnp.int32)), "floating"),
])
def test_bad_input_raises(kwargs, message):
  args = dict(x=jnp.ones((4, 64)), weight=jnp.ones(64)) | kwargs
  impl = args.pop("impl", "pallas")
  with pytest.raises(ValueError, match=message):
    rms_norm(args["x"], args["weight"], impl=impl, interpret=True)


def test_bad_block_sizes_raise():
  with pytest.raises(ValueError, match="power of two"):
    rms_norm(jnp.ones((4, 64)), jnp.ones(64), block_sizes=BlockSizes(block_rows=3), interpret=True)
