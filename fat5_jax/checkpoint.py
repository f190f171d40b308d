"""Orbax checkpoints of a run: train state, data iterator, resolved config and tokenizer, in `{workdir}/checkpoints`.

Saves are asynchronous; the latest `keep` checkpoints and the one with the best evaluation loss are kept, and
Orbax deletes an old step only after a newer one is complete. Nothing here deletes a step: a damaged one (missing,
truncated or garbled files) is renamed aside to `N.damaged` once an older step has restored, and any other failure,
or settings that do not fit the saved state, stops the run with nothing changed.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import re
import sys
from typing import Any, Optional

import grain
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from fat5_jax.config import Config, ConfigError, architecture_differences

log = logging.getLogger(__name__)

# Settings that the saved data position depends on: with others, Grain's iterator state means other batches.
DATA_POSITION_FIELDS = ("train.batch_size", "train.grad_accum_steps", "data.encoder_length", "data.decoder_length",
                        "data.decoder_length_buckets", "data.pack", "data.stream")
# Settings that decide the optimizer state's arrays (clipping on or off, Kahan buffers, moment and parameter dtypes).
OPTIMIZER_FIELDS = ("train.clip_norm", "train.kahan", "train.moment_dtype", "model.param_dtype")
# TensorStore reports missing, truncated or garbled array files as a ValueError starting with one of these codes
# (found by damaging steps); PERMISSION_DENIED, UNAVAILABLE and the like are not damage.
_DAMAGE_STATUSES = ("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE")
_GRAIN_MISSING = re.compile(r"^File .* does not exist\.$")  # Grain's iterator state file is gone
_READ_OUTCOMES = ("read", "damaged", "failed")  # of one step on one process
RESULTS_FILE = "results.json"  # a finished fine-tuning's test results, with the step they were measured at


class CheckpointError(ValueError):
  """Checkpoints this run cannot use as they are (unreadable, all damaged); nothing on disk was changed. main.py
  prints it as one line."""


class ChecksumError(Exception):
  """Restored arrays whose bits differ from what was saved (a flipped or overwritten block): damage."""


class CheckpointMismatchError(CheckpointError, ConfigError):
  """The run's settings do not fit the saved state (architecture, batching, lengths, optimizer state): a usage
  error, fixed by the settings or another workdir."""


def _damage(error: BaseException) -> Optional[BaseException]:
  """The error in `error`'s chain of causes that means the step's files are missing or corrupt, so that falling
  back to an older step is right; None for anything else (permissions, a full disk, other settings), which must
  stop the run instead. Orbax wraps TensorStore's read errors in a bare Exception: the cause tells."""
  while error is not None:
    message = str(error)
    if (isinstance(error, (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError,
                           ChecksumError))
        or isinstance(error, KeyError) and "was not found in the checkpoint" in message  # an item directory is gone
        or isinstance(error, ValueError) and (message.startswith(_DAMAGE_STATUSES) or _GRAIN_MISSING.match(message))):
      return error
    error = error.__cause__
  return None


def _describe(error: BaseException) -> str:
  """The first line of the innermost cause (Orbax's wrappers repeat whole TensorStore specs)."""
  while error.__cause__ is not None:
    error = error.__cause__
  return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


@contextlib.contextmanager
def _quiet_restore():
  """One line per damaged step instead of pages: Orbax (through absl) and asyncio log failed reads, and each
  abandoned read coroutine prints its traceback ("Exception ignored in") when collected, so they are collected
  here, with the hook that prints them silenced."""
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "orbax", "tensorstore")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
      gc.collect()
    finally:
      sys.unraisablehook = hook
      for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def _flat(tree) -> dict:
  """{"a/0/b": (shape, dtype)}: saved metadata and abstract arrays, comparable whatever their node types."""
  name = lambda key: str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
  return {"/".join(map(name, path)): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _checksum(x: jax.Array) -> jax.Array:
  """A position-weighted sum of the array's bits, as uint32 with wrap-around: exact whatever the sharding or the
  order of the reduction, and changed by any flipped or overwritten block short of a vanishing coincidence."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize < 4:
    bits = lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
  else:  # 8-byte types split into two words
    bits = lax.bitcast_convert_type(x, jnp.uint32)
  bits = bits.reshape(-1)
  weights = lax.iota(jnp.uint32, bits.size) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums_on_device = jax.jit(lambda tree: jnp.stack([_checksum(x) for x in jax.tree.leaves(tree)]))


def checksums(tree) -> dict[str, int]:
  """{"a/0/b": checksum} of every array of a state (one transfer), saved with each step and verified on restore."""
  return dict(zip(_flat(tree), map(int, jax.device_get(_checksums_on_device(tree)))))


def _verify(saved: dict, state) -> None:
  """Raises ChecksumError unless every restored array has the checksum it was saved with."""
  wrong = sorted(path for path, value in checksums(state).items() if saved.get(path, value) != value)
  if wrong:
    raise ChecksumError(f"{len(wrong)} restored arrays differ from what was saved, e.g. {wrong[0]}")


def _differences(saved: dict, ours: dict, fields: tuple) -> dict:
  """{"section.field": (saved, ours)} for the `fields` whose values differ between two configs as JSON. A field the
  saved config lacks is older than the field: it was saved with the field's default behaviour."""
  defaults = json.loads(json.dumps(dataclasses.asdict(Config())))
  get = lambda config, field: config.get(field.split(".")[0], {}).get(
      field.split(".")[1], defaults[field.split(".")[0]][field.split(".")[1]])
  return {field: (get(saved, field), get(ours, field)) for field in fields if get(saved, field) != get(ours, field)}


@functools.lru_cache(maxsize=None)  # read once per run, not at every save
def _tokenizer_record(tokenizer_path: Optional[str]) -> dict:
  if not tokenizer_path:
    return {}
  with open(tokenizer_path, "rb") as f:
    return {"spm_model_base64": base64.b64encode(f.read()).decode("ascii"), "name": os.path.basename(tokenizer_path)}


class Checkpointer:
  """One run's checkpoints. Items: `state` (pytree), `config` and `tokenizer` (JSON), `data` (Grain iterator)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: -m["eval_loss"], n=1,
                                  keep_checkpoints_without_metrics=False)])
    # Handlers named up front, so that a fresh process can read metadata before it restores anything.
    handlers = dict(state=ocp.PyTreeCheckpointHandler(), config=ocp.JsonCheckpointHandler(),
                    tokenizer=ocp.JsonCheckpointHandler(), checksums=ocp.JsonCheckpointHandler(),
                    data=grain.checkpoint.CheckpointHandler())
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, *, config: Config, tokenizer_path: Optional[str] = None,
           data_iterator=None, eval_loss: Optional[float] = None, force: bool = False) -> bool:
    items = dict(state=ocp.args.PyTreeSave(state), checksums=ocp.args.JsonSave(checksums(state)),
                 config=ocp.args.JsonSave(dataclasses.asdict(config)),
                 tokenizer=ocp.args.JsonSave(_tokenizer_record(tokenizer_path)))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def _read(self, step: int, read, check=None) -> tuple[Any, Optional[str]]:
    """(`read(step)`, None); (None, what is wrong) when the step is damaged; CheckpointError on any other error,
    with nothing changed. The failed attempt's errors are dropped before the quiet block ends, so that it collects
    what they hold.

    Each process reads only the files of its own shards, so damage can show on one process alone: the processes
    agree on one outcome (damaged on one is damaged on all, an error on one stops all) before `check(result)` runs,
    since the checksums it verifies are computed on the global arrays, by all processes together."""
    with _quiet_restore():
      try:
        if not os.path.isfile(os.path.join(self.directory, str(step), "state", "_METADATA")):
          # Without it Orbax guesses the tree from the array names, and the error would look like other settings.
          raise FileNotFoundError(f"{step}/state/_METADATA is missing")
        result = read(step)
      except Exception as error:
        damage = _damage(error)
        self._agree_outcome(step, "damaged" if damage is not None else "failed")
        if damage is None:
          raise CheckpointError(
              f"checkpoint step {step} in {self.directory} could not be read ({_describe(error)}); nothing was "
              "changed: fix the cause and run again") from error
        return None, _describe(damage)
      damaged_on = self._agree_outcome(step, "read")
      if damaged_on is not None:
        return None, f"damaged as process {damaged_on} read it"
      try:
        if check is not None:
          check(result)
        return result, None
      except ChecksumError as error:
        return None, _describe(error)

  def _agree_outcome(self, step: int, outcome: str) -> Optional[int]:
    """This process's outcome of reading `step` ("read", "damaged" or "failed") against every process's: the first
    process that found the step damaged (None if none did); CheckpointError if another process failed otherwise.
    One small collective per step read, at the start of a run only."""
    if jax.process_count() == 1:
      return None
    outcomes = [_READ_OUTCOMES[int(code)] for code in
                multihost_utils.process_allgather(np.int32(_READ_OUTCOMES.index(outcome)))]
    if "failed" in outcomes and outcome != "failed":
      raise CheckpointError(f"checkpoint step {step} in {self.directory} could not be read by process "
                            f"{outcomes.index('failed')} (its output says why); nothing was changed: fix the cause "
                            "and run again")
    return outcomes.index("damaged") if "damaged" in outcomes else None

  def newest_readable(self) -> Optional[tuple[int, dict, Any]]:
    """(step, saved config, item metadata) of the newest step that reads; None without one (restore reports
    damaged steps)."""
    for step in reversed(self.all_steps()):
      read, damage = self._read(step, lambda s: (self.saved_config(s), self.manager.item_metadata(s)))
      if damage is None:
        return step, *read
    return None

  def check_architecture(self, config: Config):
    """Refuses to resume a run whose model differs from the checkpoint's (the error lists the fields)."""
    newest = self.newest_readable()
    if newest is None:
      return
    diff = architecture_differences(newest[1]["model"], config.model)
    if diff:
      raise CheckpointMismatchError(
          f"{self.directory} holds a checkpoint of a different architecture (field: saved vs configured): "
          + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
          + ". Use another workdir, or configure the saved architecture.")

  def check_resume(self, config: Config, abstract_state: dict):
    """Refuses, before anything is read into the run or changed on disk, to resume with settings that do not fit
    the newest readable step: its architecture, the batching and lengths its data position was saved with, and
    its optimizer state's arrays. The error names each differing field (saved vs configured) and the ways out."""
    newest = self.newest_readable()
    if newest is None:
      return
    step, saved, metadata = newest
    ours = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as the saved JSON has them: lists
    diff = {f"model.{k}": v for k, v in architecture_differences(saved["model"], config.model).items()}
    if "data" in metadata:  # an imported step 0 has no data position
      diff.update(_differences(saved, ours, DATA_POSITION_FIELDS))
    held = _flat(metadata["state"])
    wanted = _flat({k: v for k, v in abstract_state.items() if k in metadata["state"]})
    arrays = sorted(k for k in held.keys() | wanted.keys() if held.get(k) != wanted.get(k))
    if arrays:
      diff.update(_differences(saved, ours, OPTIMIZER_FIELDS))
      diff["state arrays"] = (f"{len(arrays)} differ, e.g. {arrays[0]}: {held.get(arrays[0], 'absent')}",
                              str(wanted.get(arrays[0], "absent")))
    if diff:
      raise CheckpointMismatchError(
          f"{self.directory} holds step {step}, saved with settings this run does not fit (field: saved vs "
          "configured): " + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
          + ". Either run with the saved settings, or start a new workdir; nothing was changed.")

  def _restore_step(self, step: int, abstract_state: dict, data_iterator) -> dict:
    """The step's items as read (state, and checksums when it has them), not yet verified."""
    saved = self.manager.item_metadata(step)
    target = {k: v for k, v in abstract_state.items() if k in saved["state"]}
    items = dict(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    if "checksums" in saved:  # steps of earlier versions have none
      items["checksums"] = ocp.args.JsonRestore()
    if data_iterator is not None and "data" in saved:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))

  def restore(self, abstract_state: dict, *, data_iterator=None, step: Optional[int] = None):
    """Restores the newest readable step -> (step, state), or (None, None) when there is no checkpoint. With
    `step`, that step exactly: CheckpointError if it is missing or damaged, and nothing is set aside.

    `abstract_state` gives the top-level keys wanted and their shapes, dtypes and shardings (restoring onto
    another mesh reshards). Only the wanted keys that the step holds are read: an imported step 0 holds params
    only, and evaluation wants params only. The data iterator, when given, is restored in place. Damaged newer
    steps are renamed aside once an older one has restored (training can then save under their numbers); when
    every step is damaged, or a step fails otherwise, CheckpointError stops the run with nothing changed.
    """
    def read(at: int):
      return self._read(at, lambda s: self._restore_step(s, abstract_state, data_iterator),
                        check=lambda items: _verify(items.get("checksums", {}), items["state"]))

    if step is not None:
      if step not in self.all_steps():
        raise CheckpointError(f"{self.directory} has no step {step} (it holds {self.all_steps()})")
      restored, damage = read(step)
      if damage is not None:
        raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged ({damage}): use another step")
      return step, restored["state"]
    damaged = {}
    for newest in reversed(self.all_steps()):
      restored, damage = read(newest)
      if damage is None:
        self._set_aside(damaged, newest)
        return newest, restored["state"]
      damaged[newest] = damage
    if damaged:
      raise CheckpointError(
          f"every checkpoint step in {self.directory} is damaged ("
          + "; ".join(f"step {step}: {reason}" for step, reason in damaged.items())
          + f"); nothing was changed: move {self.directory} aside to start over, or use another workdir")
    return None, None

  def _set_aside(self, damaged: dict, restored: int):
    """Renames each damaged step to `N.damaged` (Orbax no longer lists it; its files stay for inspection), with one
    warning line per step."""
    for step, reason in damaged.items():
      path = os.path.join(self.directory, str(step))
      aside, n = f"{path}.damaged", 1
      while os.path.exists(aside):
        n += 1
        aside = f"{path}.damaged-{n}"
      if jax.process_index() == 0:  # the processes agreed which steps are damaged (_read): one of them acts
        os.rename(path, aside)
        log.warning("checkpoint step %d in %s could not be restored (%s): renamed to %s; using step %d", step,
                    self.directory, reason, os.path.basename(aside), restored)
    if damaged:
      ocp.multihost.sync_global_processes("fat5_set_aside_damaged_steps")
      self.manager.reload()

  def check_saves(self):
    """Raises CheckpointError if a save running in the background has failed: the run stops at the next step
    instead of training on for a whole checkpoint interval whose work it cannot keep. Does not wait."""
    self._saving(self.manager.check_for_errors)

  def wait(self):
    """Waits for the saves in flight; CheckpointError if one failed."""
    self._saving(self.manager.wait_until_finished)

  def _saving(self, call):
    try:
      call()
    except Exception as error:
      raise CheckpointError(f"a checkpoint save in {self.directory} failed ({_describe(error)}); the earlier "
                            "checkpoints are kept: fix the cause and run the same command to resume") from error

  def close(self):
    self.manager.close()


def chosen_step(workdir: str) -> Optional[int]:
  """The step a finished fine-tuning in `workdir` chose by its validation metric (`best_step` of its results
  file), or None for any other workdir, whose newest readable step is the one to use."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)["best_step"]


def restore_params(config: Config, abstract_params: Any) -> tuple[int, Any]:
  """(step, parameters) of `config.workdir`'s chosen step (a finished fine-tuning's best, `chosen_step`) or else
  its newest readable one: what evaluation, prediction, export and fine-tuning start from.

  `abstract_params` gives the parameters' shapes, dtypes and shardings. A checkpoint of another architecture is
  refused; a workdir without one ends the run.
  """
  checkpointer = Checkpointer(config.workdir)
  try:
    checkpointer.check_architecture(config)
    step, state = checkpointer.restore({"params": abstract_params}, step=chosen_step(config.workdir))
  finally:
    checkpointer.close()
  if step is None:
    raise SystemExit(f"no checkpoint in {checkpointer.directory}: train or import_hf first")
  return step, state["params"]
