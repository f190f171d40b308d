"""What a run shows: metrics as JSON Lines and TensorBoard events in the workdir, and the loss-curve plot."""

from __future__ import annotations

import json
import os


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
