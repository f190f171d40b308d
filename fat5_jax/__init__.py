"""FAT5-JAX: T5 / UL2 pretraining in JAX, with Pallas kernels for the parts XLA does slowly."""
