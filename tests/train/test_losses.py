"""Cross-entropy + z-loss + label smoothing against a float64 NumPy statement, its gradient, masking and metrics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fat5_jax import losses

B, T, V = 3, 5, 37


def _inputs(seed, dtype=jnp.bfloat16):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  logits = (3.0 * jax.random.normal(k1, (B, T, V))).astype(dtype)
  targets = jax.random.randint(k2, (B, T), 0, V)
  weights = (jax.random.uniform(k3, (B, T)) > 0.3).astype(jnp.float32).at[0, 0].set(1.0)
  return logits, targets, weights


def _numpy_token_terms(logits, targets, z_loss, ls):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  target_logit = np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]
  loss = (1 - ls) * (lse - target_logit) + ls * (lse - x.mean(-1)) + z_loss * lse ** 2
  return loss, z_loss * lse ** 2, lse


@pytest.mark.parametrize("z_loss,ls", [(1e-4, 0.0), (1e-2, 0.1)])
def test_matches_float64_numpy(z_loss, ls):
  logits, targets, weights = _inputs(0)
  loss_sum, metrics = jax.jit(lambda *a: losses.cross_entropy_loss(*a, z_loss=z_loss, label_smoothing=ls))(
      logits, targets, weights)
  loss, z_term, _ = _numpy_token_terms(logits.astype(jnp.float32), targets, z_loss, ls)
  w = np.asarray(weights, np.float64)
  correct = (np.asarray(logits.astype(jnp.float32)).argmax(-1) == np.asarray(targets))
  np.testing.assert_allclose(loss_sum, (w * loss).sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["z_loss"], (w * z_term).sum(), rtol=1e-5)
  assert float(metrics["correct"]) == (w * correct).sum()
  assert float(metrics["tokens"]) == w.sum()
  assert all(v.dtype == jnp.float32 for v in metrics.values())
  assert float(metrics["loss"]) == float(loss_sum)


def test_gradient_matches_closed_form():
  """d loss / d logits = w * ((1-ls)(p - onehot) + ls (p - 1/V) + 2 z lse p), with p = softmax(logits)."""
  z_loss, ls = 1e-2, 0.2
  logits, targets, weights = _inputs(1, jnp.float32)
  grad = jax.grad(lambda x: losses.cross_entropy_loss(x, targets, weights, z_loss=z_loss, label_smoothing=ls)[0])(
      logits)
  x = np.asarray(logits, np.float64)
  _, _, lse = _numpy_token_terms(x, targets, z_loss, ls)
  p = np.exp(x - lse[..., None])
  onehot = np.eye(V)[np.asarray(targets)]
  expected = (1 - ls) * (p - onehot) + ls * (p - 1.0 / V) + 2 * z_loss * lse[..., None] * p
  expected *= np.asarray(weights, np.float64)[..., None]
  np.testing.assert_allclose(grad, expected, atol=2e-6)


def test_padding_is_ignored():
  logits, targets, weights = _inputs(2)
  noise = jax.random.normal(jax.random.key(3), logits.shape).astype(logits.dtype) * 50
  padded = weights[..., None] == 0
  other_logits = jnp.where(padded, noise, logits)
  other_targets = jnp.where(weights == 0, (targets + 7) % V, targets)
  fn = lambda x, t: losses.cross_entropy_loss(x, t, weights)
  chex.assert_trees_all_close(fn(logits, targets), fn(other_logits, other_targets), rtol=1e-6)
  grad = jax.grad(lambda x: fn(x, targets)[0])(logits.astype(jnp.float32))
  assert float(jnp.abs(jnp.where(padded, grad, 0)).max()) == 0.0


def test_bf16_logits_are_computed_in_float32():
  logits, targets, weights = _inputs(4)
  from_bf16 = losses.cross_entropy_loss(logits, targets, weights)
  from_f32 = losses.cross_entropy_loss(logits.astype(jnp.float32), targets, weights)
  chex.assert_trees_all_close(from_bf16, from_f32, rtol=1e-6)


def test_large_logits_stay_finite():
  logits, targets, weights = _inputs(5, jnp.float32)
  loss_sum, metrics = losses.cross_entropy_loss((logits + 3e4).astype(jnp.bfloat16), targets, weights)
  assert np.isfinite(float(loss_sum)) and np.isfinite(float(metrics["z_loss"]))


def test_normalize_metrics():
  logits, targets, weights = _inputs(6)
  loss_sum, sums = losses.cross_entropy_loss(logits, targets, weights)
  means = losses.normalize_metrics(sums)
  tokens = float(weights.sum())
  np.testing.assert_allclose(means["loss"], float(loss_sum) / tokens, rtol=1e-6)
  np.testing.assert_allclose(means["accuracy"], float(sums["correct"]) / tokens, rtol=1e-6)
  assert float(means["tokens"]) == tokens and set(means) == {"loss", "z_loss", "accuracy", "tokens"}
  empty = losses.normalize_metrics({k: jnp.zeros(()) for k in sums})
  assert all(float(v) == 0.0 for v in empty.values())


def test_bad_inputs_raise():
  logits, targets, weights = _inputs(7)
  with pytest.raises(ValueError, match="logits"):
    losses.cross_entropy_loss(logits[0], targets, weights)
  with pytest.raises(ValueError, match="integers"):
    losses.cross_entropy_loss(logits, targets.astype(jnp.float32), weights)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.cross_entropy_loss(logits, targets, weights, label_smoothing=1.0)
  with pytest.raises(ValueError, match="tokens"):
    losses.normalize_metrics({"loss": jnp.ones(())})
