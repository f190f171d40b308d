"""One run per workdir: two runs on one would overwrite each other's checkpoints and logs.

An advisory `flock` on `{workdir}/run.lock`, taken by the main process for the whole run. The kernel drops it when
the process ends, however it ends (kill -9 included), so a lock is never stale; the file only names the last holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket

from fat5_jax.config import ConfigError

LOCK_FILE = "run.lock"


@contextlib.contextmanager
def held(workdir: str, enabled: bool = True):
  """Holds the workdir's lock inside the block; raises ConfigError naming the holder if another run has it."""
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
      raise ConfigError(f"workdir {workdir} is in use by {holder}: wait for that run to end, or set another "
                        "--config.workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"the run of process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    yield
  finally:
    os.close(fd)  # closing the file releases the lock
