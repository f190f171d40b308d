"""The kernel seam: what each config resolves to, the loss through every backend, and the renamed config fields."""

import logging
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat5_jax import ops
from fat5_jax.config import ConfigError, from_config_dict, model_config, to_config_dict

ON_GPU = jax.default_backend() == "gpu"
TOL = 5e-3 if ON_GPU else 1e-5  # compiled float32 kernels use TF32 dots on a GPU


@pytest.mark.skipif(ON_GPU, reason="off-GPU resolution")
@pytest.mark.parametrize("requested,expected", [("auto", "xla"), ("xla", "xla"), ("pallas", "pallas"),
                                                ("triton", "triton")])
def test_backends_off_gpu(requested, expected):
  chosen = ops.ops_for(model_config(attention_impl="flash", kernel_backend=requested))
  assert (chosen.attention_impl, chosen.backend, chosen.attention_fallback) == ("flash", expected, None)


@pytest.mark.skipif(not ON_GPU, reason="on-GPU resolution")
@pytest.mark.parametrize("requested,expected,fallback", [("auto", "triton", "pallas"), ("xla", "xla", None),
                                                         ("pallas", "pallas", None), ("triton", "triton", None)])
def test_backends_on_gpu(requested, expected, fallback):
  chosen = ops.ops_for(model_config(attention_impl="flash", kernel_backend=requested))
  assert (chosen.backend, chosen.attention_fallback) == (expected, fallback)


@pytest.mark.skipif(ON_GPU, reason="off-GPU message")
def test_interpreted_kernels_are_announced_once(caplog):
  ops._say_interpreted.cache_clear()
  with caplog.at_level(logging.WARNING):
    for layers in (1, 2):  # two configs, one message
      ops.ops_for(model_config(num_layers=layers, kernel_backend="pallas"))
  said = [r.getMessage() for r in caplog.records if "interpreter" in r.getMessage()]
  assert len(said) == 1 and "\n" not in said[0] and "slow" in said[0]


@pytest.mark.parametrize("backend", ["pallas", "triton"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_lm_head_loss_of_every_backend_matches_the_reference(backend, label_smoothing):
  """The chunked lm_head + fused cross-entropy kernel (interpreted off GPU): sums and gradients."""
  rng = np.random.default_rng(11)
  hidden = jnp.asarray(rng.normal(size=(3, 7, 32)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(32, 300)) * 0.2, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 300, size=(3, 7)), jnp.int32)
  weights = jnp.asarray(rng.random((3, 7)) > 0.3, jnp.float32)

  def run(chosen):
    loss = lambda h, w: chosen.lm_head_loss(h, w, targets, weights, z_loss=1e-3, label_smoothing=label_smoothing)
    (_, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, kernel)
    return metrics, grads

  chex.assert_trees_all_close(run(ops.Ops(backend=backend)), run(ops.REFERENCE), rtol=TOL, atol=TOL)


def test_auto_falls_back_to_pallas_for_attention_triton_lacks():
  """ALiBi under `auto` on a GPU: the Triton choice gives way to Pallas (here both interpreted)."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 19, 2, 32)), jnp.float32) for _ in range(3))
  segments = jnp.ones((1, 19), jnp.int32)
  bias = ops.AttentionBias(kind="alibi", slopes=jnp.asarray([[0.5, 0.25], [0.5, 0.25]], jnp.float32))
  kwargs = dict(bias=bias, q_segment_ids=segments, kv_segment_ids=segments, q_positions=None, kv_positions=None,
                causal=True, scale=1.0)
  auto_on_gpu = ops.Ops(attention_impl="flash", backend="triton", attention_fallback="pallas")
  chex.assert_trees_all_close(auto_on_gpu.attention(q, k, v, **kwargs), ops.REFERENCE.attention(q, k, v, **kwargs),
                              rtol=10 * TOL, atol=10 * TOL)
  with pytest.raises(ValueError, match="triton"):
    ops.Ops(attention_impl="flash", backend="triton").attention(q, k, v, **kwargs)


@pytest.mark.parametrize("capability,head_dim,lengths,dtype,bias,expected", [
    ((9, 0), 128, (2048, 2048), jnp.bfloat16, "t5", "mosaic"), ((9, 0), 128, (4096, 4096), jnp.float16, None, "mosaic"),
    ((9, 0), 64, (4096, 4096), jnp.bfloat16, "t5", "mosaic"), ((9, 0), 96, (4096, 4096), jnp.bfloat16, "t5", "triton"),
    ((9, 0), 64, (512, 1024), jnp.bfloat16, None, "mosaic"), ((9, 0), 64, (512, 512), jnp.bfloat16, "t5", "triton"),
    ((9, 0), 64, (256, 8192), jnp.bfloat16, None, "triton"), ((9, 0), 64, (8192, 512), jnp.bfloat16, None, "triton"),
    ((9, 0), 128, (2048, 2048), jnp.float32, "t5", "triton"), ((8, 0), 128, (2048, 2048), jnp.bfloat16, "t5", "triton"),
    ((9, 0), 128, (2048, 2048), jnp.bfloat16, "alibi", "pallas")])
def test_auto_attention_kernel_per_call(monkeypatch, capability, head_dim, lengths, dtype, bias, expected):
  """`auto` on a GPU: Mosaic GPU on Hopper at head_dim 64 and 128 from 512 queries over 1,024 keys (16-bit), Triton
  otherwise, Pallas where Triton lacks the case."""
  monkeypatch.setattr(ops.common, "device_capability", lambda: capability)
  q, k = (jax.ShapeDtypeStruct((2, length, 4, head_dim), dtype) for length in lengths)
  kwargs = dict(q_positions=None, **({"alibi_slopes": jnp.ones((4,))} if bias == "alibi" else {}))
  assert ops._auto_attention_backend(q, k, kwargs, "pallas") == expected


@pytest.mark.skipif(not ON_GPU, reason="compiles the Mosaic GPU kernels")
@pytest.mark.skipif(ON_GPU and jax.devices()[0].compute_capability.split(".")[0] != "9", reason="Hopper only")
@pytest.mark.parametrize("head_dim,queries", [(64, 2048), (128, 2048), (64, 512)])
def test_auto_attention_on_hopper_matches_the_reference(head_dim, queries):
  """The model's attention as `auto` runs it where it picks the Mosaic GPU kernels: self-attention (causal, T5 bias,
  a key mask with padding) and, at 512 queries, the decoder's cross-attention (no bias, the encoder's key mask).
  Values and gradients of q, k, v (and of the table where there is one) against the reference."""
  rng = np.random.default_rng(5)
  self_attention = queries == 2048
  q = jnp.asarray(rng.normal(size=(2, queries, 2, head_dim)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(2, 2048, 2, head_dim)), jnp.bfloat16) for _ in range(2))
  table = jnp.asarray(rng.normal(size=(32, 2)), jnp.float32)
  kv_mask = jnp.arange(2048)[None, :] < jnp.array([[2048], [1900]])
  q_mask = kv_mask if self_attention else jnp.ones((2, queries), bool)
  cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def run(chosen):
    def loss(q, k, v, table):
      bias = ops.AttentionBias(kind="t5", table=table, bidirectional=False) if self_attention else None
      out = chosen.attention(q, k, v, bias=bias, q_segment_ids=q_mask, kv_segment_ids=kv_mask, q_positions=None,
                             kv_positions=None, causal=self_attention, scale=1.0)
      return jnp.sum(jnp.where(q_mask[:, :, None, None], out.astype(jnp.float32), 0) * cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3) if self_attention else (0, 1, 2))(q, k, v, table)

  auto = ops.Ops(attention_impl="flash", backend="triton", attention_fallback="pallas")
  assert ops._auto_attention_backend(q, k, dict(q_positions=None), "pallas") == "mosaic"
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  ours, reference = f32(run(auto)), f32(run(ops.REFERENCE))
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):  # both in bf16: the kernel tests' bound
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 3e-2


@pytest.mark.parametrize("field,value,message", [
    ("kernel_impl", "pallas", "model.kernel_backend"),
    ("attention_impl", "pallas", "'flash'"),
])
def test_old_field_names_are_rejected_with_the_new_name(field, value, message):
  values = to_config_dict().to_dict()
  values["model"][field] = value
  with pytest.raises(ConfigError, match=message) as error:
    from_config_dict(values)
  assert "\n" not in str(error.value)


def test_triton_attention_with_alibi_is_a_config_error():
  with pytest.raises(ConfigError, match="kernel_backend=triton"):
    model_config(attention_impl="flash", kernel_backend="triton", position_encoding_type="alibi")


@pytest.mark.parametrize("flag,message", [
    ("--config.model.kernel_impl=pallas", "model.kernel_backend"),
    ("--config.model.attention_impl=pallas", "'flash'"),
    ("--config.model.atention_impl=flash", "unknown field 'model.atention_impl'"),
])
def test_old_and_unknown_names_on_the_command_line_fail_in_one_line(flag, message):
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "main.py", "--config=configs/tiny_fr.py", "--mode=summary", flag], cwd=root,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and out.stdout == ""
  assert out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr


def test_two_token_masks_make_a_key_mask_and_anything_else_segment_ids():
  mask, ids = jnp.asarray([[True, True, False]]), jnp.asarray([[1, 2, 0]])
  assert set(ops._masks(mask, mask)) == {"kv_mask"}
  for q_ids, kv_ids in ((ids, ids), (mask, ids), (ids, mask)):  # a mixed pair keeps one segment per mask
    masks = ops._masks(q_ids, kv_ids)
    assert masks["q_segment_ids"].dtype == masks["kv_segment_ids"].dtype == jnp.int32
