"""Checkpointer edge cases that the end-to-end tests do not reach."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat5_jax.checkpoint import Checkpointer
from fat5_jax.config import Config


def _state(seed, opt_leaves=2):
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
          "opt_state": tuple(jnp.asarray(rng.normal(size=(3,)), jnp.float32) for _ in range(opt_leaves))}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_a_state_that_no_step_fits_is_an_error_not_a_fresh_start(tmp_path):
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(3, _state(0), config=Config(), force=True)
  checkpointer.wait()
  with pytest.raises(RuntimeError, match="could be restored"):  # e.g. the optimizer chain changed
    checkpointer.restore(_abstract(_state(0, opt_leaves=3)))


def test_steps_after_the_restored_one_are_discarded_so_training_can_save_again(tmp_path):
  checkpointer = Checkpointer(str(tmp_path))
  for step in (1, 2):
    checkpointer.save(step, _state(step), config=Config(), force=True)
    checkpointer.wait()
  checkpointer.discard_newer_than(1)
  assert checkpointer.all_steps() == [1]
  assert checkpointer.save(2, _state(5), config=Config())
  checkpointer.wait()
  step, restored = checkpointer.restore(_abstract(_state(0)))
  assert step == 2
  np.testing.assert_array_equal(restored["params"]["w"], _state(5)["params"]["w"])
