"""What the processes of a multi-process run agree on, and how a run hears that it must stop.

A run is multi-process when launched as one (see `initialize`): each process drives the devices of its host and
reads its own shard of the data. On one process every helper here is a no-op or a plain call. With several:
  - the decoder length of each batch is the longest of the processes' buckets, agreed host to host through the
    distributed runtime's key-value store, so that the host never waits for the step running on its devices;
  - a SIGTERM on any process (a preemption notice) stops every process after the same step, through JAX's
    preemption sync point;
  - process 0 builds what the others then find cached (tokenizer, token cache), and alone writes files;
  - parameters reach process 0's host one tensor at a time (export, predictions).
"""

from __future__ import annotations

import json
import logging
import os
import signal

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the runtime's key-value store; Orbax reaches it the same way
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# A process this late to an agreement has died or hung: fail rather than wait forever. Generous, since a process may
# still be compiling or saving while the others wait.
_AGREEMENT_TIMEOUT_MS = 30 * 60 * 1000


def launched_as_several_processes() -> bool:
  """Whether this process was launched as one of several: JAX_NUM_PROCESSES > 1, or SLURM with several tasks."""
  return int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize():
  """Joins a multi-process job when launched as one: under SLURM with several tasks (JAX reads srun's variables), or
  with JAX_NUM_PROCESSES > 1, JAX_PROCESS_ID and JAX_COORDINATOR_ADDRESS (host:port of process 0) set on every
  process. Safe to call twice."""
  if jax.distributed.is_initialized():
    return
  if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
    if "JAX_PROCESS_ID" not in os.environ or "JAX_COORDINATOR_ADDRESS" not in os.environ:
      raise ValueError("JAX_NUM_PROCESSES > 1 needs JAX_PROCESS_ID (0, 1, ...) and JAX_COORDINATOR_ADDRESS "
                       "(host:port of process 0) on every process")
    jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
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


def main_process_only(name: str, fn):
  """Runs `fn` (which writes files) on process 0 only; every process returns once it is done."""
  result = fn() if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
  return result


class _HostAllGather:
  """Every process's answer to a question asked again and again (once per step), host to host through the
  distributed runtime's key-value store: unlike a device collective, it never queues behind the step running on the
  devices, so the host keeps dispatching ahead. Each call is one round; the processes ask in the same order."""

  def __init__(self, name: str):
    self._name, self._round = f"fat5/{name}", 0

  def __call__(self, value) -> list:
    client, me, count = jax_distributed.global_state.client, jax.process_index(), jax.process_count()
    round_ = self._round
    self._round += 1
    client.key_value_set(f"{self._name}/{round_}/{me}", json.dumps(value))
    client.wait_at_barrier(self._name, _AGREEMENT_TIMEOUT_MS)
    answers = dict(client.key_value_dir_get(f"{self._name}/{round_}/"))
    if round_:  # every process passed this round's barrier, so all have read the previous round
      client.key_value_delete(f"{self._name}/{round_ - 1}/{me}")
    return [json.loads(answers[f"{self._name}/{round_}/{process}"]) for process in range(count)]


def pad_decoder(batch: dict, length: int) -> dict:
  """The batch with its decoder arrays padded with zeros (padding segment, no loss weight) to `length` tokens."""
  pad = lambda v: np.pad(v, [(0, 0), (0, length - v.shape[1])])
  return {k: pad(v) if k.startswith("decoder_") else v for k, v in batch.items()}


class DecoderLengths:
  """Each process packs its own rows into one of the decoder buckets: this pads every process's batch to the longest
  bucket of the same batch on any process, so that all give the trainer the same shapes. One host-side round per
  call, whatever the number of batches; a plain pass-through on one process."""

  def __init__(self, name: str):
    self._all_gather = _HostAllGather(f"decoder_lengths/{name}") if jax.process_count() > 1 else None

  def __call__(self, batches: list[dict]) -> list[dict]:
    if self._all_gather is None:
      return batches
    lengths = [int(batch["decoder_input_tokens"].shape[1]) for batch in batches]
    longest = np.max(self._all_gather(lengths), axis=0)
    return [pad_decoder(batch, int(length)) for batch, length in zip(batches, longest)]


def gather_to_main_process(tree):
  """A host (numpy) copy of a tree of global arrays on process 0, None on the others. With several processes, one
  tensor at a time is gathered (and then freed), so a sharded model is never whole on any device."""
  if jax.process_count() == 1:
    return jax.device_get(tree)  # assembles each array from its shards on the host
  gathered = [multihost_utils.process_allgather(leaf, tiled=True) for leaf in jax.tree.leaves(tree)]
  return jax.tree.unflatten(jax.tree.structure(tree), gathered) if jax.process_index() == 0 else None


class StopSignal:
  """How a run hears that it must stop (a preemption's SIGTERM, Ctrl-C's SIGINT): `should_stop` after each step.

  One process: a Python handler turns either signal into a flag. Several: JAX's preemption notifier (started by
  `jax.distributed.initialize`) catches SIGTERM itself, and the processes stop after the first step that all reach
  after the notice (`reached_preemption_sync_point`), so that they save the same step and none waits for the others
  in a collective. A Python SIGTERM handler would replace the notifier's, so only SIGINT gets one there, which
  re-sends itself as a SIGTERM. A second signal gives up waiting (KeyboardInterrupt)."""

  def __init__(self):
    self.received = None
    self._multi_process = jax.process_count() > 1
    self._interrupted = False
    signals = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
    self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    if self._interrupted:
      raise KeyboardInterrupt
    self._interrupted = True
    name = signal.Signals(signum).name
    if self._multi_process:
      log.warning("%s received: all processes will save a checkpoint after the same step, then stop", name)
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier
    else:
      self.received = name
      log.warning("%s received: saving a checkpoint, then stopping", name)

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step` (call it after every step; all processes get the same answer)."""
    if self._multi_process and self.received is None and multihost_utils.reached_preemption_sync_point(step):
      self.received = "a preemption notice (SIGTERM) to one of the processes"
    return self.received is not None

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
