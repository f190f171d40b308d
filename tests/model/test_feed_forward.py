"""The gated feed-forward's hidden layer (`gated_activation`): the values and gradients of activation(gate) * linear,
and a backward that keeps only its two inputs and writes their gradients as they are."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from fat5_jax.config import model_config
from fat5_jax.model import ACTIVATIONS, FeedForward, gated_activation

GATED = [name for name in ACTIVATIONS if name.startswith("gated-")]


def _feed_forward(dtype: str):
  """(FeedForward as a function of (params, x), its params, an x [2, 5, d_model]): d_model 32, d_ff 48, GEGLU."""
  config = model_config(d_model=32, d_ff=48, feed_forward_proj="gated-gelu", dtype=dtype)
  graphdef, params = nnx.split(FeedForward(config, rngs=nnx.Rngs(0)))
  return lambda p, x: nnx.merge(graphdef, p)(x), params, jnp.ones((2, 5, 32), dtype)


def _inputs(seed: int, shape=(3, 37, 50)):
  keys = jax.random.split(jax.random.key(seed), 3)
  # Around zero, where the activations bend (and relu's kink is met by no input exactly).
  return tuple(2.0 * jax.random.normal(key, shape, jnp.float32) for key in keys)


@pytest.mark.parametrize("name", GATED)
def test_values_and_gradients_match_the_float64_product(name):
  activation = ACTIVATIONS[name]
  gate, linear, cotangent = _inputs(seed=len(name))
  with jax.enable_x64():
    reference = lambda g, l: activation(g) * l
    expected, reference_vjp = jax.vjp(reference, gate.astype(jnp.float64), linear.astype(jnp.float64))
    expected_grads = reference_vjp(cotangent.astype(jnp.float64))
  out, vjp = jax.vjp(functools.partial(gated_activation, activation), gate, linear)
  grads = jax.jit(vjp)(cotangent)
  # atol: float32's tanh reaches -1 for gates below about -5.5, where the derivative is still ~1e-5 (values ~10);
  # the gradients' rounding there, times linear and the cotangent, reaches 7e-5 where XLA:CPU fuses no multiply-adds
  # (LLVM at -O0, as tests/conftest.py compiles).
  chex.assert_trees_all_close(out, expected.astype(jnp.float32), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads, jax.tree.map(lambda x: x.astype(jnp.float32), expected_grads), rtol=1e-5,
                              atol=1e-4)


@pytest.mark.parametrize("name", GATED)
def test_bf16_inputs_are_rounded_once(name):
  """bf16 in, bf16 out: within one bf16 rounding of the float32 result (an error per operation would exceed it)."""
  activation = ACTIVATIONS[name]
  gate, linear, cotangent = (x.astype(jnp.bfloat16) for x in _inputs(seed=7))
  as32 = lambda x: x.astype(jnp.float32)
  expected, reference_vjp = jax.vjp(lambda g, l: activation(g) * l, as32(gate), as32(linear))
  expected_grads = reference_vjp(as32(cotangent))
  out, vjp = jax.vjp(functools.partial(gated_activation, activation), gate, linear)
  grads = vjp(cotangent)
  assert out.dtype == grads[0].dtype == grads[1].dtype == jnp.bfloat16
  ulp = 2.0 ** -8  # bf16's relative rounding step
  for ours, exact in zip((out, *grads), (expected, *expected_grads)):
    np.testing.assert_array_less(np.abs(as32(ours) - exact), ulp * np.abs(exact) + 1e-30)


def test_the_backward_keeps_only_the_matmuls_outputs_and_the_hidden_layer():
  """Residuals of d_ff features: wi_0's and wi_1's outputs (the activation's inputs) and the hidden layer (wo's
  input). tanh-GELU(gate) * linear differentiated as written kept eight (counted when this op was written)."""
  apply, params, x = _feed_forward("bfloat16")
  residuals = saved_residuals(lambda p, x: apply(p, x).astype(jnp.float32).sum(), params, x)
  hidden_sized = [aval.shape for aval, _ in residuals if aval.ndim == 3 and aval.shape[-1] >= 48]
  assert hidden_sized == [(2, 5, 48)] * 3, residuals


def test_the_gradient_writes_nothing_wider_than_d_ff():
  """The gradient writes those of gate and linear as they are: no concatenation (or select) into one
  [tokens, 2 d_ff] cotangent, which XLA:GPU runs as a copy of both."""
  apply, params, x = _feed_forward("float32")
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: apply(params, x).sum()))(x).jaxpr
  wide = [eqn.primitive.name for eqn in jaxpr.eqns if any(v.aval.ndim and v.aval.shape[-1] > 48
                                                         for v in eqn.outvars)]
  assert wide == [], wide


def test_compiled_stack_holds_less_per_layer_than_the_product_as_written():
  """Compiled (float32), each layer of a stack of gated feed-forwards holds gate, linear, the hidden layer and x:
  3.25 [tokens, d_ff] buffers at these shapes, on XLA:CPU and XLA:GPU alike (H200, 2026-12-01), against 5.25 and 4.25
  for the product differentiated as written. Were the backward's recomputation free of the cotangent, XLA would merge
  it with the forward's and hold as much as the product as written (measured on XLA:CPU: 5.25)."""
  tokens, width, hidden = 1024, 64, 256
  activation = ACTIVATIONS["gated-gelu"]
  products = {"ours": lambda x, w0, w1: gated_activation(activation, x @ w0, x @ w1),
              "as written": lambda x, w0, w1: activation(x @ w0) * (x @ w1)}

  def bytes_per_layer(product) -> float:
    def loss(weights, x):
      for w0, w1, wo in weights:
        x = x + product(x, w0, w1) @ wo
      return jnp.sum(x ** 2)

    def temp_bytes(layers: int) -> int:
      weights = [tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in
                       ((width, hidden), (width, hidden), (hidden, width))) for _ in range(layers)]
      x = jax.ShapeDtypeStruct((tokens, width), jnp.float32)
      return jax.jit(jax.grad(loss)).lower(weights, x).compile().memory_analysis().temp_size_in_bytes

    return (temp_bytes(4) - temp_bytes(2)) / 2

  per_layer = {name: bytes_per_layer(product) / (tokens * hidden * 4) for name, product in products.items()}
  assert per_layer["ours"] <= 3.5, per_layer  # in [tokens, d_ff] float32 buffers
  assert per_layer["ours"] <= per_layer["as written"] - 0.75, per_layer
