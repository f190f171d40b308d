"""RMSNorm in plain jnp: the one reference of the kernels (and the op XLA runs when no kernel is chosen)."""

import jax
from jax import lax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6) -> jax.Array:
  """weight * x / sqrt(mean(x**2, -1) + eps) over the last axis: the statistics and the product in float32 (float64
  stays float64), one rounding to x's dtype at the end, like the kernels."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dtype)
  rstd = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * rstd * weight.astype(dtype)).astype(x.dtype)
