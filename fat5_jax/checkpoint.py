"""Orbax checkpoints of a run: train state, data iterator, resolved config and tokenizer, in `{workdir}/checkpoints`.

Saves are asynchronous; the latest `keep` checkpoints and the one with the best evaluation loss are kept, and
Orbax deletes an old step only after a newer one is complete. A step that fails to restore (truncated, corrupt)
is reported and the previous one is tried.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import os
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from fat5_jax.config import Config, architecture_differences

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of another architecture."""


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
                    tokenizer=ocp.JsonCheckpointHandler(), data=grain.checkpoint.CheckpointHandler())
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, *, config: Config, tokenizer_path: Optional[str] = None,
           data_iterator=None, eval_loss: Optional[float] = None, force: bool = False) -> bool:
    items = dict(state=ocp.args.PyTreeSave(state),
                 config=ocp.args.JsonSave(dataclasses.asdict(config)),
                 tokenizer=ocp.args.JsonSave(_tokenizer_record(tokenizer_path)))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def check_architecture(self, config: Config):
    """Refuses to resume a run whose model differs from the checkpoint's (the error lists the fields)."""
    steps = self.all_steps()
    if not steps:
      return
    diff = architecture_differences(self.saved_config(steps[-1])["model"], config.model)
    if diff:
      raise CheckpointMismatchError(
          f"{self.directory} holds a checkpoint of a different architecture (field: saved vs configured): "
          + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
          + ". Use another workdir, or configure the saved architecture.")

  def restore(self, abstract_state: dict, *, data_iterator=None):
    """Restores the newest readable step -> (step, state), or (None, None) when there is no checkpoint.

    `abstract_state` gives the top-level keys wanted and their shapes, dtypes and shardings (restoring onto
    another mesh reshards). Only the wanted keys that the step holds are read: an imported step 0 holds params
    only, and evaluation wants params only. The data iterator, when given, is restored in place.
    """
    errors = []
    for step in reversed(self.all_steps()):
      try:
        saved = self.manager.item_metadata(step)
        target = {k: v for k, v in abstract_state.items() if k in saved["state"]}
        items = dict(state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        if data_iterator is not None and "data" in saved:
          items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return step, self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
      except Exception as error:  # a damaged step: say so and fall back to the previous one
        log.warning("checkpoint step %d in %s could not be restored (%s: %s); trying the previous one", step,
                    self.directory, type(error).__name__, error)
        errors.append(f"step {step}: {type(error).__name__}: {str(error)[:300]}")
    if errors:
      raise RuntimeError(f"no step of {self.directory} could be restored into this run's state (did the "
                         "optimizer or batch settings change?):\n" + "\n".join(errors))
    return None, None

  def discard_newer_than(self, step: int):
    """Deletes the steps after `step` (ones that failed to restore), so that training can save over them."""
    for newer in [s for s in self.all_steps() if s > step]:
      log.warning("deleting checkpoint step %d of %s, which could not be restored", newer, self.directory)
      self.manager.delete(newer)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def restore_params(config: Config, abstract_params: Any) -> tuple[int, Any]:
  """(step, parameters) of the newest readable checkpoint in `config.workdir`: what evaluation and export start from.

  `abstract_params` gives the parameters' shapes, dtypes and shardings. A checkpoint of another architecture is
  refused; a workdir without one ends the run.
  """
  checkpointer = Checkpointer(config.workdir)
  try:
    checkpointer.check_architecture(config)
    step, state = checkpointer.restore({"params": abstract_params})
  finally:
    checkpointer.close()
  if step is None:
    raise SystemExit(f"no checkpoint in {checkpointer.directory}: train or import_hf first")
  return step, state["params"]
