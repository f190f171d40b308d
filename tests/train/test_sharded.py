"""Kernels split by rows over a mesh of 8 simulated CPU devices: each device runs attention, RMSNorm and the lm_head
loss on its own rows, no activation is gathered, and the loss and gradients equal one device's."""

import json
import os
import subprocess
import sys

import pytest

from fat5_jax.train import local_job

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The kernels' shard_map splits rows over both mesh axes, so one mesh that has both (4x2) covers its code; XLA's own
# partitioning is tried where it gathered activations, fsdp alone (1x8). One mesh with interpreted kernels: 29 s alone
# on 2 cores.


def sharded_results(attention_impl, kernel_backend, meshes):
  """tests/train/sharded_step.py under 8 devices (the device count is fixed when jax starts: a fresh process)."""
  env = dict(os.environ, **local_job.simulated_cpu_devices(8))
  out = subprocess.run([sys.executable, "-m", "tests.train.sharded_step", attention_impl, kernel_backend, *meshes],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("attention_impl,kernel_backend,meshes", [
    ("flash", "pallas", ("4x2",)),  # kernels: shard_map from the seam
    ("xla", "xla", ("1x8",)),  # XLA's own partitioning: FSDP gathered activations before the weights were pinned
])
def test_each_device_computes_its_own_rows(attention_impl, kernel_backend, meshes):
  results = sharded_results(attention_impl, kernel_backend, meshes)
  assert sorted(results) == sorted(f"data={m.split('x')[0]},fsdp={m.split('x')[1]}" for m in meshes)
  for mesh, result in results.items():
    assert result["activation_gathers"] == [], (mesh, result["activation_gathers"])
    assert abs(result["loss"] - result["one_device_loss"]) <= 1e-5 * abs(result["one_device_loss"]), (mesh, result)
    assert result["max_relative_grad_error"] < 1e-5, (mesh, result)
