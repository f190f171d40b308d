"""FAT5-JAX: T5 / UL2 pretraining in JAX. The model and trainer reach GPU kernels (`pallas_kernels`: Pallas and raw
Triton) only through `fat5_jax.ops`, which picks them from the config."""
