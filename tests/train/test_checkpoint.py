"""Checkpointer edge cases that the end-to-end tests do not reach: damaged steps, settings that do not fit the saved
state, and restore errors that are not damage."""

import dataclasses
import glob
import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat5_jax.checkpoint import RESULTS_FILE, Checkpointer, CheckpointError, CheckpointMismatchError, restore_params
from fat5_jax.config import Config, DataConfig, TrainConfig


def _state(seed, opt_leaves=2):
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
          "opt_state": tuple(jnp.asarray(rng.normal(size=(3,)), jnp.float32) for _ in range(opt_leaves))}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _iterator():
  return iter(grain.MapDataset.range(100))


def _saved(directory, steps=(1, 2), config=Config()):
  """A Checkpointer holding `steps`, each with a data position (`step` items read)."""
  checkpointer = Checkpointer(str(directory))
  iterator = _iterator()
  for step in steps:
    while next(iterator) < step - 1:
      pass
    checkpointer.save(step, _state(step), config=config, data_iterator=iterator, force=True)
    checkpointer.wait()
  return checkpointer


def _entries(directory):
  return sorted(os.listdir(os.path.join(directory, "checkpoints")))


def _truncate_state(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def _garble_data_position(step_dir):
  for path in glob.glob(os.path.join(step_dir, "data", "*.json")):
    with open(path, "w") as f:
      f.write("{not json")


def _overwrite_a_block(step_dir):
  """4 KiB of noise in the middle of the largest array file, its size unchanged."""
  files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(p)]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 4)
    f.write(np.random.default_rng(0).bytes(min(4096, size // 2)))


def _silently_changed_array(step_dir):
  """Bits that read back without a decoding error but are not what was saved: the checksums must tell."""
  path = os.path.join(step_dir, "checksums", "metadata")
  with open(path) as f:
    saved = json.load(f)
  saved["params/w"] ^= 1
  with open(path, "w") as f:
    json.dump(saved, f)


DAMAGE = {"truncated state": _truncate_state,
          "overwritten block": _overwrite_a_block,
          "array changed behind the decoder's back": _silently_changed_array,
          "deleted tree metadata": lambda step_dir: os.remove(os.path.join(step_dir, "state", "_METADATA")),
          "deleted state": lambda step_dir: [os.remove(p) for p in glob.glob(f"{step_dir}/state/**/*", recursive=True)
                                             if os.path.isfile(p)],
          "garbled data position": _garble_data_position}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_step_falls_back_and_is_renamed_aside_not_deleted(damage, tmp_path, caplog):
  checkpointer = _saved(tmp_path)
  DAMAGE[damage](os.path.join(checkpointer.directory, "2"))
  checkpointer.check_resume(Config(), _abstract(_state(0)))  # damage is restore's to report, not a refusal
  iterator = _iterator()
  with caplog.at_level(logging.DEBUG):
    step, restored = checkpointer.restore(_abstract(_state(0)), data_iterator=iterator)
  assert step == 1 and next(iterator) == 1
  np.testing.assert_array_equal(restored["params"]["w"], _state(1)["params"]["w"])
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and "step 2" in warnings[0] and "2.damaged" in warnings[0], warnings
  assert _entries(tmp_path) == ["1", "2.damaged"] and checkpointer.all_steps() == [1]
  # Training saves under the damaged step's number; a second damaged step 2 is set aside beside the first.
  checkpointer.save(2, _state(5), config=Config(), data_iterator=_iterator(), force=True)
  checkpointer.wait()
  DAMAGE[damage](os.path.join(checkpointer.directory, "2"))
  assert checkpointer.restore(_abstract(_state(0)), data_iterator=_iterator())[0] == 1
  assert _entries(tmp_path) == ["1", "2.damaged", "2.damaged-2"]


def test_every_step_damaged_is_one_error_and_changes_nothing(tmp_path):
  checkpointer = _saved(tmp_path)
  for step in (1, 2):
    _truncate_state(os.path.join(checkpointer.directory, str(step)))
  with pytest.raises(CheckpointError, match="every checkpoint step .* is damaged .*step 2: .*step 1: "):
    checkpointer.restore(_abstract(_state(0)))
  assert _entries(tmp_path) == ["1", "2"]


def test_a_given_step_is_restored_exactly_and_never_falls_back(tmp_path):
  checkpointer = _saved(tmp_path, steps=(1, 2, 3))
  step, restored = checkpointer.restore(_abstract(_state(0)), step=2)
  assert step == 2
  np.testing.assert_array_equal(restored["params"]["w"], _state(2)["params"]["w"])
  with pytest.raises(CheckpointError, match=r"has no step 7 \(it holds \[1, 2, 3\]\)"):
    checkpointer.restore(_abstract(_state(0)), step=7)
  _truncate_state(os.path.join(checkpointer.directory, "2"))
  with pytest.raises(CheckpointError, match="step 2 .* is damaged .*: use another step"):
    checkpointer.restore(_abstract(_state(0)), step=2)
  assert _entries(tmp_path) == ["1", "2", "3"]  # nothing set aside for a step asked by number


def test_a_finished_fine_tuning_is_read_at_its_best_step_others_at_their_newest(tmp_path):
  _saved(tmp_path, steps=(1, 2, 3)).close()
  abstract = _abstract(_state(0))["params"]
  step, params = restore_params(Config(workdir=str(tmp_path)), abstract)
  assert step == 3
  with open(tmp_path / RESULTS_FILE, "w") as f:
    json.dump({"best_step": 2}, f)
  step, params = restore_params(Config(workdir=str(tmp_path)), abstract)
  assert step == 2
  np.testing.assert_array_equal(params["w"], _state(2)["params"]["w"])


def test_a_changed_batch_size_is_refused_naming_the_field_and_deletes_nothing(tmp_path):
  checkpointer = _saved(tmp_path)
  changed = dataclasses.replace(Config(), train=TrainConfig(batch_size=64, grad_accum_steps=2))
  with pytest.raises(CheckpointMismatchError) as refused:
    checkpointer.check_resume(changed, _abstract(_state(0)))
  message = str(refused.value)
  assert "train.batch_size: 128 vs 64" in message and "train.grad_accum_steps: 4 vs 2" in message, message
  assert "saved settings" in message and "new workdir" in message and "\n" not in message
  assert _entries(tmp_path) == ["1", "2"]
  checkpointer.check_resume(Config(), _abstract(_state(0)))


def test_a_changed_row_layout_is_refused_and_a_config_older_than_the_field_means_its_default(tmp_path):
  checkpointer = _saved(tmp_path)
  streamed = dataclasses.replace(Config(), data=DataConfig(stream=True, pack=False))
  with pytest.raises(CheckpointMismatchError, match="data.stream: False vs True"):
    checkpointer.check_resume(streamed, _abstract(_state(0)))
  older = json.loads(json.dumps(dataclasses.asdict(Config())))
  del older["data"]["stream"]  # saved before data.stream existed: rows were never streamed
  checkpointer.save(3, _state(3), config=Config(), data_iterator=_iterator(), force=True)
  checkpointer.wait()
  with open(os.path.join(checkpointer.directory, "3", "config", "metadata"), "w") as f:
    json.dump(older, f)
  checkpointer.check_resume(Config(), _abstract(_state(0)))
  with pytest.raises(CheckpointMismatchError, match="data.stream: False vs True"):
    checkpointer.check_resume(streamed, _abstract(_state(0)))


def test_imported_parameters_resume_with_any_batch_size(tmp_path):
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(0, {"params": _state(0)["params"]}, config=Config(), force=True)  # as import_hf writes it
  checkpointer.wait()
  changed = dataclasses.replace(Config(), train=TrainConfig(batch_size=64))
  checkpointer.check_resume(changed, _abstract(_state(0)))
  step, restored = checkpointer.restore(_abstract(_state(0)), data_iterator=_iterator())
  assert step == 0 and set(restored) == {"params"}


def test_another_optimizer_state_is_refused_and_its_restore_changes_nothing(tmp_path):
  checkpointer = _saved(tmp_path)
  other = _abstract(_state(0, opt_leaves=3))  # e.g. gradient clipping switched on
  with pytest.raises(CheckpointMismatchError, match="state arrays: '1 differ, e.g. opt_state/2: absent'"):
    checkpointer.check_resume(Config(), other)
  with pytest.raises(CheckpointError, match="nothing was changed"):
    checkpointer.restore(other)
  assert _entries(tmp_path) == ["1", "2"]


def test_an_error_that_is_not_damage_stops_the_restore_and_changes_nothing(tmp_path, monkeypatch):
  checkpointer = _saved(tmp_path)
  restore = checkpointer.manager.restore
  calls = []

  def restore_once_denied(*args, **kwargs):
    calls.append(args)
    if len(calls) == 1:
      raise PermissionError(13, "Permission denied", os.path.join(checkpointer.directory, "2"))
    return restore(*args, **kwargs)

  monkeypatch.setattr(checkpointer.manager, "restore", restore_once_denied)
  with pytest.raises(CheckpointError, match="step 2 .* could not be read \\(PermissionError: .*nothing was changed"):
    checkpointer.restore(_abstract(_state(0)))
  assert _entries(tmp_path) == ["1", "2"]
  assert checkpointer.restore(_abstract(_state(0)))[0] == 2  # the cause gone, the same step restores


def test_a_failed_background_save_is_one_error_and_keeps_the_earlier_steps(tmp_path, monkeypatch):
  checkpointer = _saved(tmp_path)
  checkpointer.check_saves()  # nothing failed

  def failed():
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpointer.manager, "check_for_errors", failed)
  with pytest.raises(CheckpointError, match="No space left on device") as error:
    checkpointer.check_saves()
  assert "\n" not in str(error.value) and "earlier checkpoints are kept" in str(error.value)
  assert _entries(tmp_path) == ["1", "2"]
