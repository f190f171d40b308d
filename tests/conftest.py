import importlib.util
import os
import pkgutil

import pytest
from absl import flags

from fat5_jax.train.local_job import xla_flags_with
from tests.shared import session_directory

# Mosaic GPU's interpreter runs each warpgroup of a kernel as its own XLA:CPU execution on the PJRT client's
# thread pool (one thread per core by default), and a barrier wait blocks its thread: a kernel with more
# warpgroups than the pool has threads stalls (the Mosaic forward has three, CPU runners two cores). Read when
# jax makes its CPU client, so set before any test runs.
os.environ.setdefault("PJRT_NPROC", str(max(8, os.cpu_count() or 1)))

# The tests compile far more than they compute: XLA:CPU with LLVM at -O0 compiles about twice as fast (a tiny
# training step: 15 -> 8 s), which takes a fifth off the suite. Only where no accelerator plugin is installed, so that
# the compiled GPU runs of the same tests build what users run. Set before jax makes its client, and inherited by the
# subprocesses (local_job.simulated_cpu_devices keeps it).
if importlib.util.find_spec("jax_plugins") is None or not list(
    pkgutil.iter_modules(importlib.import_module("jax_plugins").__path__)):
  os.environ["XLA_FLAGS"] = xla_flags_with("--xla_backend_optimization_level=0")

# Grain's worker processes read absl flags, which only absl.app (main.py) parses.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the module's main.py subprocesses, shared by the session's workers (as
  scripts/multi_process_job.py shares one between a job's launches): a run loads the programs that an earlier run of
  the same shapes compiled (a tiny run: 25 s, 10 s with every program cached). New each session, so the first run of
  each program still compiles it. In os.environ, which subprocesses inherit; this process's jax read its settings
  when imported, at collection."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAX_COMPILATION_CACHE_DIR", str(session_directory(tmp_path_factory) / "compilation_cache"))
    # By default only programs that took over 1 s to compile are kept: 3 of a tiny run's 58.
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    yield
