"""FAT5's own PyTorch training step measured in the same run as ours: `benchmarks/fat5_step.py` in a subprocess, on a
checkout of catie-aq/flashT5 that the benchmark is pointed at (`--fat5 PATH`; its code is never committed here).

Order: JAX preallocates 75% of the GPU's memory when this process first touches the GPU, so a benchmark calls
`measure` for all its shapes before its own JAX work starts; each FAT5 process then has the whole GPU and has exited
when ours runs. Nothing here touches a JAX device: FAT5's MFU is against the peak of the GPU its process names.
"""

from __future__ import annotations

import os
import sys

from benchmarks import common
from configs import small_fr
from fat5_jax import config as config_lib, flops

STEP_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fat5_step.py")


def measure(checkout: str, rows: int, encoder_length: int, decoder_length: int, steps: int = 10) -> dict:
  """FAT5's step on `rows` rows of these lengths: fat5_step.py's figures with TFLOP/s and MFU (small_fr's FLOPs,
  the same model), or {"error": ...} when the step failed or its process died (then its last line of stderr)."""
  command = [sys.executable, STEP_SCRIPT, "--checkout", checkout, "--rows", str(rows),
             "--encoder-length", str(encoder_length), "--decoder-length", str(decoder_length), "--steps", str(steps)]
  result = common.json_line_of(command)
  if "error" not in result:
    model = config_lib.from_config_dict(small_fr.get_config()).model
    result.update(common.training_throughput(result["rows_per_s"], model, encoder_length, decoder_length,
                                             flops.PEAK_FLOPS.get(result["device"])))
  return result
