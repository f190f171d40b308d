"""What the processes of a multi-host run agree on, and how a run hears that it must stop.

On one process every helper is a no-op or a plain call; with several, each process reads its own shard of the data,
pads its decoder bucket to the longest of the step, and lets process 0 build what the others then find cached.
"""

from __future__ import annotations

import logging
import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def initialize():
  """Joins a multi-host job when launched as one (JAX reads the coordinator from the environment)."""
  if int(os.environ.get("JAX_NUM_PROCESSES", os.environ.get("SLURM_NTASKS", "1"))) > 1:
    jax.distributed.initialize()


def process_shard() -> dict[str, int]:
  """This process's part of the data: its index and the process count."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def main_process_first(name: str, fn):
  """Runs `fn` on process 0 (tokenizer training, pre-tokenization), then on the others, which find it cached."""
  if jax.process_count() == 1:
    return fn()
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return result if jax.process_index() == 0 else fn()


def pad_decoder_to_global_length(batch: dict) -> dict:
  """Each process picks its decoder bucket from its own rows: pad every process to the longest (zeros are padding)."""
  length = batch["decoder_input_tokens"].shape[1]
  longest = int(np.max(multihost_utils.process_allgather(np.asarray(length))))
  pad = lambda v: np.pad(v, [(0, 0), (0, longest - length)]) if v.ndim == 2 else v
  return {k: pad(v) if k.startswith("decoder_") else v for k, v in batch.items()}


class StopSignal:
  """Turns SIGTERM / SIGINT (preemption, Ctrl-C) into a flag the loop checks after each step."""

  def __init__(self):
    self.received = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    if self.received is not None:  # a second signal: give up waiting
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    log.warning("%s received: saving a checkpoint, then stopping", self.received)

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
