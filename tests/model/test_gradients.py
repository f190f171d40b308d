"""bf16 parameters used many times per micro-batch get the gradient a float32 model gets: their gradient is
accumulated in float32 and rounded to bf16 once, not at every one of thousands of additions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fat5_jax import losses
from fat5_jax.config import model_config
from fat5_jax.model import T5

REPEATED_TOKEN, ROWS, LENGTH = 7, 16, 256  # the token fills every encoder position: 4,096 occurrences
DECODER_LENGTH = 64  # random tokens: the decoder's position bias and norms see varied inputs
SMALL = dict(vocab_size=64, d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=1, num_decoder_layers=1,
             attention_impl="xla", kernel_backend="xla")


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """The float32 reference needs float32 dots; on a GPU XLA's default is TF32."""
  with jax.default_matmul_precision("highest"):
    yield


def _gradients(dtype: str, params=None):
  """Parameter gradients of the mean token loss of a model computing and storing its parameters in `dtype`, its
  weights `params` when given; and the weights it used."""
  config = model_config(**SMALL, param_dtype=dtype, dtype=dtype)
  model = T5(config, rngs=nnx.Rngs(0))
  graphdef, own_params, rest = nnx.split(model, nnx.Param, ...)
  if params is not None:
    own_params = jax.tree.map(lambda p: p.astype(dtype), params)
  rng = np.random.default_rng(0)
  encoder_tokens = jnp.full((ROWS, LENGTH), REPEATED_TOKEN, jnp.int32)
  decoder_tokens = jnp.asarray(rng.integers(8, SMALL["vocab_size"], (ROWS, DECODER_LENGTH)), jnp.int32)
  targets = jnp.asarray(rng.integers(8, SMALL["vocab_size"], (ROWS, DECODER_LENGTH)), jnp.int32)

  @jax.jit
  def grads(params):
    def mean_loss(params):
      logits = nnx.merge(graphdef, params, rest)(encoder_tokens, decoder_tokens)
      loss_sum, metrics = losses.cross_entropy_loss(logits, targets, jnp.ones(targets.shape), z_loss=1e-4)
      return loss_sum / metrics["tokens"]
    return jax.grad(mean_loss)(params)

  return nnx.to_pure_dict(grads(own_params)), own_params


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def test_bf16_gradients_of_shared_parameters_match_float32():
  grads16, params16 = _gradients("bfloat16")
  grads32, _ = _gradients("float32", params16)  # the same (bf16-representable) weights
  assert grads16["shared"]["embedding"].dtype == jnp.bfloat16
  row = lambda grads: grads["shared"]["embedding"][REPEATED_TOKEN]
  assert _relative_error(row(grads16), row(grads32)) < 1e-2  # 0.78 when the rows were gathered from a bf16 table
  # Used by every layer of a stack at every (query, key) pair, and at every token of a stack (the encoder's see one
  # repeated token: attention is uniform whatever the bias, its gradient is 0).
  table = lambda grads: grads["decoder"]["position"]["relative_attention_bias"]
  assert _relative_error(table(grads16), table(grads32)) < 1e-2
  norm = lambda grads: grads["decoder"]["final_norm"]["weight"]
  assert _relative_error(norm(grads16), norm(grads32)) < 1e-2
