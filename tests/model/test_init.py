"""A fresh model draws its weights as FAT5 does, and so starts training where FAT5's models start."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fat5_jax import config as config_lib
from fat5_jax.model import T5


@pytest.mark.parametrize("name", ["tiny_fr", "small_fr"])
def test_fresh_model_starts_at_the_loss_of_unit_scale_logits(name):
  """The decoder's final RMSNorm gives hidden states of RMS 1 and the untied lm_head has std d_model**-0.5, so each
  token's logits are N(0, 1) over the vocabulary whatever the input: random token ids are as good a batch as real
  text. The loss expected over targets is then E[logsumexp] - E[logit] = ln(vocab) + 1/2 (Hugging Face's std 1.0
  gave logits of std sqrt(d_model) and losses of 40 and 92)."""
  config = config_lib.from_config_dict(importlib.import_module(f"configs.{name}").get_config()).model
  model = T5(config_lib.model_config(**{**config.__dict__, "attention_impl": "xla", "kernel_backend": "xla"}),
             rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  token_ids = lambda length: jnp.asarray(rng.integers(1, config.vocab_size, (2, length)), jnp.int32)
  logits = nnx.jit(lambda model, inputs, decoder_inputs: model(inputs, decoder_inputs))(
      model, token_ids(128), token_ids(64)).astype(jnp.float32)
  # The mean loss over every possible target: no sampling noise from drawing targets.
  loss_over_targets = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1))
  assert abs(float(loss_over_targets) - (math.log(config.vocab_size) + 0.5)) < 0.05
  assert abs(float(jnp.std(logits)) - 1.0) < 0.02


def test_init_standard_deviations_follow_fat5():
  d_model, d_kv, heads, d_ff, factor = 256, 32, 16, 512, 0.5
  config = config_lib.model_config(vocab_size=512, d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=d_ff,
                                   num_layers=1, num_decoder_layers=1, param_dtype="float32",
                                   initializer_factor=factor)
  model = T5(config, rngs=nnx.Rngs(0))
  block, attention = model.encoder.blocks[0], model.encoder.blocks[0].self_attention
  expected = {
      "q": (attention.q, (d_model * d_kv) ** -0.5), "k": (attention.k, d_model ** -0.5),
      "v": (attention.v, d_model ** -0.5), "o": (attention.o, (heads * d_kv) ** -0.5),
      "wi_0": (block.mlp.wi_0, d_model ** -0.5), "wi_1": (block.mlp.wi_1, d_model ** -0.5),
      "wo": (block.mlp.wo, d_model ** -0.5),  # FAT5's, not Hugging Face's d_ff**-0.5
      "cross q": (model.decoder.blocks[0].cross_attention.q, (d_model * d_kv) ** -0.5),
      "embedding": (model.shared.embedding, 1.0), "lm_head": (model.lm_head, d_model ** -0.5),
  }
  for name, (param, std) in expected.items():
    assert abs(float(jnp.std(param[...])) / (factor * std) - 1) < 0.1, name
  bias = model.encoder.position.relative_attention_bias[...]  # 512 values only: looser
  assert abs(float(jnp.std(bias)) / (factor * d_model ** -0.5) - 1) < 0.2
  assert np.all(np.asarray(block.mlp_norm.weight[...]) == factor)


def test_fire_mlp_follows_pytorch_default_init():
  """FAT5 leaves its FIRE MLP to torch.nn.Linear's default: uniform in +-fan_in**-0.5, biases too."""
  width = 256
  config = config_lib.model_config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=64, num_layers=1,
                                   num_decoder_layers=1, position_encoding_type="fire", fire_mlp_width=width)
  fire = T5(config, rngs=nnx.Rngs(0)).encoder.position
  for param, bound in ((fire.mlp_in, 1.0), (fire.mlp_in_bias, 1.0), (fire.mlp_out, width ** -0.5)):
    values = np.asarray(param[...])
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
    assert abs(values.std() / (bound / math.sqrt(3)) - 1) < 0.15
