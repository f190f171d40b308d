"""GPU kernels for T5, one folder per op: flash attention with the T5 bias inside the kernel, cross-entropy with
z-loss (and a chunked lm_head loss), RMSNorm.

Each op has its public function (validation, custom_vjp), `pallas.py` (Pallas kernels, Triton lowering; the
interpreter off GPU), `triton.py` (raw Triton kernels, launched through jax-triton on a GPU or Triton's
interpreter off it), `reference.py` (its one jnp reference) and `tuning.py` (block sizes per device). The backends
load lazily, only when selected. Jax only: nothing here imports fat5_jax. Import the ops by their folders
(`from pallas_kernels.attention import flash_attention`): the package re-exports nothing, so that a function never
hides the folder of the same name.
"""
