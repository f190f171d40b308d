"""Two real processes on one machine, as a multi-host run has them: `main.py` launched twice with the coordinator in
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (docs/training.md), 4 simulated CPU devices each, CPU
collectives through gloo. They train what one process with 8 devices trains on the same rows, stop together after a
SIGTERM to one of them, and resume bit-exact."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.e2e.test_main_job import OVERRIDES, ROOT, last_value_per_step, saved_steps

PROCESSES, DEVICES_EACH = 2, 4
TIMEOUT_S = 240  # a run that takes longer has hung (a process waiting for another): fail, do not block CI
# One process that reads both processes' data shards and joins their batches as the two-process run does (each
# process's rows padded to the longest decoder bucket of the step), so that both runs train on the same global rows.
ONE_PROCESS_WITH_BOTH_SHARDS = """
import runpy, sys
import grain, numpy as np
from fat5_jax import data
from fat5_jax.train import distributed

def joined(batches):
  length = max(batch["decoder_input_tokens"].shape[1] for batch in batches)
  batches = [distributed.pad_decoder(batch, length) for batch in batches]
  return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}

class BothShards(grain.DatasetIterator):
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
data.make_train_iterator = lambda config, tokenizer, **_: BothShards(
    [make_train(config, tokenizer, **s) for s in shards])
data.make_eval_batches = lambda config, tokenizer, n, **_: [
    joined(parts) for parts in zip(*[make_eval(config, tokenizer, n, **s) for s in shards])]
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
""" % {"processes": PROCESSES}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def environment(devices: int, **variables) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", **variables}


def arguments(workdir, tokenizer_path, extra) -> list[str]:
  shared = [f"--config.data.tokenizer_path={tokenizer_path}"] if tokenizer_path else []
  return ["--config=configs/tiny_fr.py", f"--config.workdir={workdir}", *OVERRIDES, *shared, *extra]


def launch(index: int, port: int, workdir, tokenizer_path, extra, logs: str) -> subprocess.Popen:
  """Process `index` of the run; its output goes to files, not pipes: a process blocked on a full pipe would stall
  the other in a collective."""
  with open(os.path.join(logs, f"{index}.out"), "w") as stdout, open(os.path.join(logs, f"{index}.err"), "w") as err:
    process = subprocess.Popen(
        [sys.executable, "main.py", *arguments(workdir, tokenizer_path, extra)], cwd=ROOT, stdout=stdout, stderr=err,
        env=environment(DEVICES_EACH, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                        JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(index)))
  process.logs = stdout.name, err.name
  return process


@contextlib.contextmanager
def processes(workdir, tokenizer_path=None, *extra):
  """`main.py` on PROCESSES processes of DEVICES_EACH devices, launched as a user launches them; killed on failure."""
  port, logs = free_port(), tempfile.mkdtemp()
  launched = [launch(index, port, workdir, tokenizer_path, extra, logs) for index in range(PROCESSES)]
  try:
    yield launched
  finally:
    for process in launched:
      if process.poll() is None:
        process.kill()
      process.wait()


def finish(launched) -> list[tuple[int, str, str]]:
  """(exit code, stdout, stderr) of each process once all have ended; a failure after TIMEOUT_S."""
  deadline = time.time() + TIMEOUT_S
  for process in launched:
    try:
      process.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      pytest.fail(f"a process of the run was still running after {TIMEOUT_S} s: a hang")
  return [(process.returncode, *(open(path).read() for path in process.logs)) for process in launched]


def run_processes(workdir, tokenizer_path=None, *extra):
  with processes(workdir, tokenizer_path, *extra) as launched:
    results = finish(launched)
  for code, stdout, stderr in results:
    assert code == 0, stdout[-2000:] + stderr[-4000:]
  return results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """One process with 8 devices training on both shards' rows; its tokenizer serves the other runs."""
  workdir = str(tmp_path_factory.mktemp("one_process"))
  out = subprocess.run([sys.executable, "-c", ONE_PROCESS_WITH_BOTH_SHARDS, *arguments(workdir, None, [])], cwd=ROOT,
                       env=environment(PROCESSES * DEVICES_EACH), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return workdir, os.path.join(workdir, "tokenizer", "spm.model")


@pytest.fixture(scope="module")
def two_processes(one_process, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two_processes"))
  results = run_processes(workdir, one_process[1])
  return workdir, results


def test_two_processes_train_as_one_process_with_their_devices(one_process, two_processes):
  reference, workdir = one_process[0], two_processes[0]
  ours, theirs = last_value_per_step(workdir), last_value_per_step(reference)
  assert sorted(ours) == list(range(1, 17))
  # The same rows on the same devices; only the order in which gloo and the in-process all-reduce add the devices'
  # partial gradients differs, a rounding difference that a few steps of training cannot grow past this.
  for step in ours:
    assert ours[step] == pytest.approx(theirs[step], rel=1e-5), (step, ours[step], theirs[step])
  assert last_value_per_step(workdir, "eval") == pytest.approx(last_value_per_step(reference, "eval"), rel=1e-5)
  # Process 0 alone writes the run's files and prints the predictions.
  assert "predicted:" in two_processes[1][0][1] and "predicted:" not in two_processes[1][1][1]
  assert os.path.isfile(os.path.join(workdir, "hf", "model.safetensors"))


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_resumes_bit_exact(one_process, two_processes,
                                                                                       tmp_path):
  straight = two_processes[0]
  workdir = str(tmp_path)
  with processes(workdir, one_process[1]) as launched:
    marker = os.path.join(workdir, "checkpoints", "4", "commit_success.txt")
    deadline = time.time() + TIMEOUT_S
    while not os.path.exists(marker):
      assert all(process.poll() is None for process in launched), "a process ended before checkpoint 4"
      assert time.time() < deadline, f"no checkpoint 4 after {TIMEOUT_S} s"
      time.sleep(0.05)
    launched[1].send_signal(signal.SIGTERM)
    results = finish(launched)
  stops = []
  for code, _, stderr in results:
    assert code != 0 and "stopped by a preemption notice" in stderr, stderr[-3000:]
    stops.append(int(stderr.split(" at step ")[-1].split(";")[0]))
  assert stops[0] == stops[1] < 16, stops
  assert saved_steps(workdir)[-1] == stops[0]
  assert not [name for name in os.listdir(os.path.join(workdir, "checkpoints")) if not name.isdigit()]

  run_processes(workdir, one_process[1])
  assert last_value_per_step(workdir) == last_value_per_step(straight)
  assert last_value_per_step(workdir, "eval") == last_value_per_step(straight, "eval")
  with open(os.path.join(workdir, "hf", "model.safetensors"), "rb") as a, \
       open(os.path.join(straight, "hf", "model.safetensors"), "rb") as b:
    assert a.read() == b.read()


@pytest.mark.parametrize("mode", ["finetune", "predict"])
@pytest.mark.parametrize("launch", [{"JAX_NUM_PROCESSES": "2"}, {"SLURM_NTASKS": "4"}])
def test_one_process_modes_refuse_a_multi_process_launch_in_one_line(mode, launch, monkeypatch, tmp_path):
  from fat5_jax import cli
  from fat5_jax.config import Config

  for name, value in launch.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=f"--mode={mode} runs in one process: launch it once"):
    cli.run(mode, Config(workdir=str(tmp_path)), predict_files=("in.txt", "out.jsonl"))
  assert not os.listdir(tmp_path)  # refused before anything was written
