#!/usr/bin/env bash
# The whole test suite on a GPU with every kernel compiled (FAT5_INTERPRET=0): run it after each kernel change.
# Workers share the GPU, so none may preallocate its memory (with the default, 8 workers run out of it).
# Usage: bash scripts/gpu_tests.sh [pytest arguments]; WORKERS=n sets the pytest-xdist workers (default 6).
set -uo pipefail
cd "$(dirname "$0")/.."
export FAT5_INTERPRET=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
python -m pytest -q -n "${WORKERS:-6}" -p no:cacheprovider -r fEs tests "$@" > gpu_tests.log 2>&1
status=$?
grep -E "^(FAILED|ERROR) " gpu_tests.log || true
tail -n 1 gpu_tests.log  # pytest's summary line, last
exit $status
