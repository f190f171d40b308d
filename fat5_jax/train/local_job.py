"""`main.py` run as the processes of a multi-process job on this host, launched as a user launches one
(docs/training.md, "Several GPUs, several hosts"), and what the runs leave in their workdirs. Used by
scripts/multi_process_job.py and tests/train/test_multiprocess.py, from a checkout (main.py is not in the package).

Devices: on GPUs, process i sees only the i-th GPU (CUDA_VISIBLE_DEVICES), as `srun --gpus-per-task=1` has it; on a
CPU, each process gets simulated devices and the processes' collectives go through gloo. The reference run, one
process with all the devices, reads every process's data shard (`ONE_PROCESS_WITH_ALL_SHARDS`), so that it trains on
the rows that the processes train on together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
import time

from fat5_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# main.py in one process that reads the data shards of all the job's processes and joins their batches as the job
# does (each process's rows padded to the longest decoder bucket of the step on any process).
ONE_PROCESS_WITH_ALL_SHARDS = """
import runpy, sys
import grain, numpy as np
from fat5_jax import data
from fat5_jax.train import distributed

def joined(batches):
  length = max(batch["decoder_input_tokens"].shape[1] for batch in batches)
  batches = [distributed.pad_decoder(batch, length) for batch in batches]
  return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}

class AllShards(grain.DatasetIterator):
  def __init__(self, parts):
    super().__init__()
    self.parts = parts
  def __next__(self):
    return joined([next(part) for part in self.parts])
  def get_state(self):
    return {"parts": [part.get_state() for part in self.parts]}
  def set_state(self, state):
    for part, part_state in zip(self.parts, state["parts"]):
      part.set_state(part_state)

shards = [dict(process_index=i, process_count=%(processes)d) for i in range(%(processes)d)]
make_train, make_eval = data.make_train_iterator, data.make_eval_batches
data.make_train_iterator = lambda config, tokenizer, **_: AllShards(
    [make_train(config, tokenizer, **s) for s in shards])
data.make_eval_batches = lambda config, tokenizer, n, **_: [
    joined(parts) for parts in zip(*[make_eval(config, tokenizer, n, **s) for s in shards])]
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""
_PREEMPTION_STOP = re.compile(r"stopped by a preemption notice .* at step (\d+);")


def xla_flags_with(flag: str) -> str:
  """XLA_FLAGS for a new process: this process's flags, then `flag` (the later of two settings wins)."""
  return " ".join(filter(None, [os.environ.get("XLA_FLAGS"), flag]))


def simulated_cpu_devices(count: int) -> dict[str, str]:
  """The environment variables that give a new process `count` simulated CPU devices, keeping this process's XLA
  flags."""
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags_with(f"--xla_force_host_platform_device_count={count}")}


@dataclasses.dataclass(frozen=True)
class Devices:
  """The job's devices: `processes` processes, each with one GPU, or with `cpu_devices_each` simulated CPU devices."""
  processes: int
  cpu_devices_each: int | None = None

  def environment(self, process: int | None = None, port: int | None = None) -> dict[str, str]:
    """This process's environment for process `process` of the job, its coordinator on `port`; for `process=None`,
    for one process with all the job's devices."""
    env = dict(os.environ)
    if self.cpu_devices_each:
      devices = self.cpu_devices_each * (self.processes if process is None else 1)
      env.update(simulated_cpu_devices(devices), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    else:
      gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(self.processes)))).split(",")
      if len(gpus) < self.processes:
        raise ValueError(f"{self.processes} processes need as many GPUs; CUDA_VISIBLE_DEVICES lists {len(gpus)}")
      env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:self.processes]) if process is None else gpus[process]
    if process is not None:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(self.processes),
                 JAX_PROCESS_ID=str(process))
    return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def processes(arguments: list[str], devices: Devices, logs: str):
  """`main.py ARGUMENTS` as the job's processes (a list of Popen), each writing to LOGS/{index}.out and .err: files,
  not pipes, since a process blocked on a full pipe would stall the others in a collective. Those still running at
  the end of the block are killed."""
  os.makedirs(logs, exist_ok=True)
  port, launched = free_port(), []
  try:
    for index in range(devices.processes):
      with open(os.path.join(logs, f"{index}.out"), "w") as out, open(os.path.join(logs, f"{index}.err"), "w") as err:
        process = subprocess.Popen([sys.executable, "main.py", *arguments], cwd=ROOT, stdout=out, stderr=err,
                                   env=devices.environment(index, port))
      process.logs = out.name, err.name
      launched.append(process)
    yield launched
  finally:
    for process in launched:
      if process.poll() is None:
        process.kill()
      process.wait()


def finish(launched: list[subprocess.Popen], timeout_s: float) -> list[tuple[int, str, str]]:
  """(exit code, stdout, stderr) of each process once all have ended; TimeoutError after `timeout_s` (a hang: a
  process waiting for another)."""
  deadline = time.time() + timeout_s
  for process in launched:
    try:
      process.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      raise TimeoutError(f"a process of the job was still running after {timeout_s} s: a hang") from None
  outputs = []
  for process in launched:
    with open(process.logs[0]) as out, open(process.logs[1]) as err:
      outputs.append((process.returncode, out.read(), err.read()))
  return outputs


def run_processes(arguments: list[str], devices: Devices, logs: str, timeout_s: float) -> list[tuple[int, str, str]]:
  """`processes` run to their end: each one's (exit code, stdout, stderr); RuntimeError if any failed."""
  with processes(arguments, devices, logs) as launched:
    outputs = finish(launched, timeout_s)
  for index, (code, stdout, stderr) in enumerate(outputs):
    if code:
      raise RuntimeError(f"process {index} exited with code {code}:\n{stdout[-2000:]}\n{stderr[-4000:]}")
  return outputs


def run_one_process(arguments: list[str], devices: Devices, timeout_s: float) -> subprocess.CompletedProcess:
  """`main.py ARGUMENTS` as one process with all the job's devices, reading all its processes' data shards;
  RuntimeError if it failed, TimeoutError (as `finish` raises) if it ran past `timeout_s`."""
  program = ONE_PROCESS_WITH_ALL_SHARDS % {"processes": devices.processes}
  try:
    out = subprocess.run([sys.executable, "-c", program, *arguments], cwd=ROOT, env=devices.environment(),
                         capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    raise TimeoutError(f"the one process was still running after {timeout_s} s") from None
  if out.returncode:
    raise RuntimeError(f"the one process exited with code {out.returncode}:\n{out.stdout[-2000:]}\n"
                       f"{out.stderr[-4000:]}")
  return out


def wait_for_checkpoint(workdir: str, step: int, launched: list[subprocess.Popen], timeout_s: float):
  """Returns once checkpoint `step` of `workdir` is complete; RuntimeError if a process ends first."""
  marker = os.path.join(workdir, "checkpoints", str(step), "commit_success.txt")
  deadline = time.time() + timeout_s
  while not os.path.exists(marker):
    if any(process.poll() is not None for process in launched):
      raise RuntimeError(f"a process ended before checkpoint {step}")
    if time.time() > deadline:
      raise TimeoutError(f"no checkpoint {step} after {timeout_s} s")
    time.sleep(0.05)


def preemption_stop_step(stderr: str) -> int | None:
  """The step after which a process stopped on a preemption notice, from its last words; None if it did not."""
  found = _PREEMPTION_STOP.findall(stderr)
  return int(found[-1]) if found else None


def last_value_per_step(workdir: str, split: str = "train", key: str = "loss") -> dict[int, float]:
  """`key` of each step logged for `split` in the workdir's metrics; a resumed run's repeated steps keep the last."""
  return {record["step"]: record[key] for record in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if record["split"] == split}


def saved_steps(workdir: str) -> list[int]:
  """Completed steps (a killed save leaves a `N.orbax-checkpoint-tmp` directory, which does not count)."""
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(name) for name in names if name.isdigit())
