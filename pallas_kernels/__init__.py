"""GPU kernels in Pallas (Triton lowering), each beside a plain-jnp reference; interpreted off GPU.

Jax only: nothing here imports fat5_jax. The raw Triton versions (`triton_kernels`, through jax-triton) load
lazily on GPU.
"""

from pallas_kernels.cross_entropy import chunked_lm_head_cross_entropy, cross_entropy
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.rms_norm import rms_norm

__all__ = ["chunked_lm_head_cross_entropy", "cross_entropy", "flash_attention", "rms_norm"]
