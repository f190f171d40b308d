"""The logged training metrics: means over the logging window, not the last step's values."""

import jax.numpy as jnp
import pytest

from fat5_jax.metrics import WindowMeans


def _step(loss, accuracy, tokens, grad_norm, learning_rate):
  return {k: jnp.float32(v) for k, v in dict(loss=loss, z_loss=loss / 100, accuracy=accuracy, tokens=tokens,
                                               grad_norm=grad_norm, learning_rate=learning_rate,
                                               skipped_steps=0.0).items()}


def test_window_means_weight_per_token_metrics_by_tokens():
  window = WindowMeans()
  window.add(_step(loss=2.0, accuracy=0.5, tokens=100, grad_norm=1.0, learning_rate=1e-3))
  window.add(_step(loss=8.0, accuracy=0.0, tokens=300, grad_norm=3.0, learning_rate=2e-3))
  means = window.means()
  assert means["loss"] == pytest.approx((2.0 * 100 + 8.0 * 300) / 400)
  assert means["z_loss"] == pytest.approx((0.02 * 100 + 0.08 * 300) / 400)
  assert means["accuracy"] == pytest.approx(50 / 400)
  assert means["tokens"] == pytest.approx(200) and means["grad_norm"] == pytest.approx(2.0)
  assert means["learning_rate"] == pytest.approx(2e-3)  # the last step's
  window.add(_step(loss=1.0, accuracy=1.0, tokens=10, grad_norm=5.0, learning_rate=3e-3))
  assert window.means()["loss"] == pytest.approx(1.0)  # a fresh window after each read
