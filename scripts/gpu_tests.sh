#!/usr/bin/env bash
# The whole test suite on a GPU with every kernel compiled (FAT5_INTERPRET=0): run it after each kernel change.
# Workers share the GPU, so none may preallocate its memory (with the default, 8 workers run out of it).
# Usage: bash scripts/gpu_tests.sh [test paths and pytest arguments, default: tests]; WORKERS=n sets the pytest-xdist
# workers (default 6). gpu_tests.log lists the 20 slowest tests, to plan runs under a time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
export FAT5_INTERPRET=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
# The tests state CPU semantics: float32 matmuls in full float32 (a GPU's default is TF32) and reductions in a fixed
# order (the bit-exact resume test; scatter-adds are otherwise atomic on a GPU). The kernel tests set their own
# GPU tolerances.
export JAX_DEFAULT_MATMUL_PRECISION=highest XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
python -m pytest -q -n "${WORKERS:-6}" -p no:cacheprovider -r fEs --durations=20 "${@:-tests}" > gpu_tests.log 2>&1
status=$?
grep -E "^(FAILED|ERROR) " gpu_tests.log || true
tail -n 1 gpu_tests.log  # pytest's summary line, last
exit $status
