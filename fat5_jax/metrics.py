"""What a run shows: metrics as JSON Lines and TensorBoard events in the workdir, and the loss-curve plot."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp


PER_TOKEN = ("loss", "z_loss", "accuracy")  # metrics that are means over target tokens


@jax.jit
def _add_step(sums, metrics):
  """One step added to the window's sums, in one dispatch (the loop calls it every step)."""
  step = {k: metrics[k] * metrics["tokens"] for k in PER_TOKEN}
  step.update(tokens=metrics["tokens"], grad_norm=metrics["grad_norm"])
  return step if sums is None else {k: sums[k] + v for k, v in step.items()}


@jax.jit
def _extend_run(length, previous, skipped):
  return jnp.where(skipped > previous, length + 1, 0)


class WindowMeans:
  """Training metrics averaged over a logging window rather than read off its last step.

  Per-token metrics (loss, z_loss, accuracy) are weighted by each step's target tokens, grad_norm and tokens are
  means per step, the rest (learning rate, skipped steps) are the last step's. `add` only queues device work, so
  the steps between logs never wait for the device.
  """

  def __init__(self):
    self.sums, self.last, self.steps = None, None, 0

  def add(self, metrics: dict) -> None:
    self.sums, self.last, self.steps = _add_step(self.sums, metrics), metrics, self.steps + 1

  def means(self) -> dict[str, float]:
    """The window's metrics as floats (waits for its steps, one transfer), and a fresh window."""
    sums, last = jax.device_get((self.sums, self.last))
    out = {k: float(v) for k, v in last.items()}
    out.update({k: float(sums[k] / sums["tokens"]) if sums["tokens"] > 0 else 0.0 for k in PER_TOKEN},
               tokens=float(sums["tokens"]) / self.steps, grad_norm=float(sums["grad_norm"]) / self.steps)
    self.__init__()
    return out


class SkippedRun:
  """The number of consecutive updates skipped as non-finite, counted on the device so that no step waits."""

  def __init__(self, skipped_so_far):
    self.previous, self.length = skipped_so_far, jnp.zeros((), jnp.int32)

  def add(self, metrics: dict) -> None:
    self.length = _extend_run(self.length, self.previous, metrics["skipped_steps"])
    self.previous = metrics["skipped_steps"]


class MetricWriter:
  """Appends `{"step": ..., "split": ..., **metrics}` to {workdir}/metrics.jsonl and TensorBoard events."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
    for name, value in metrics.items():
      self._tensorboard.add_scalar(f"{split}/{name}", value, step)
    self._tensorboard.flush()

  def close(self):
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, out_path: str) -> str:
  """Training and validation loss against the step, as a PNG. A resumed run's repeated steps keep the last value."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = {}
  for record in read_metrics(metrics_path):
    if "loss" in record:
      curves.setdefault(record["split"], {})[record["step"]] = record["loss"]
  fig, ax = plt.subplots(figsize=(7, 4))
  for split, points in sorted(curves.items()):
    steps = sorted(points)
    ax.plot(steps, [points[s] for s in steps], marker="o" if split == "eval" else None, label=split)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (cross-entropy + z-loss, per target token)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path
