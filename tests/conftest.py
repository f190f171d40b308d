import os

from absl import flags

# Mosaic GPU's interpreter runs each warpgroup of a kernel as its own XLA:CPU execution on the PJRT client's
# thread pool (one thread per core by default), and a barrier wait blocks its thread: a kernel with more
# warpgroups than the pool has threads stalls (the Mosaic forward has three, CPU runners two cores). Read when
# jax makes its CPU client, so set before any test runs.
os.environ.setdefault("PJRT_NPROC", str(max(8, os.cpu_count() or 1)))

# Grain's worker processes read absl flags, which only absl.app (main.py) parses.
flags.FLAGS.mark_as_parsed()
