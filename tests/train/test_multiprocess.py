"""Two real processes on one machine, as a multi-host run has them: `main.py` launched twice with the coordinator in
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (docs/training.md), 4 simulated CPU devices each, CPU
collectives through gloo. They stop together after a SIGTERM to one of them, resume, and train what one process with 8
devices trains on the same rows (one process's resume is bit-exact: tests/e2e/test_main_job.py)."""

import os
import signal
import tempfile

import pytest

from fat5_jax.train import local_job
from fat5_jax.train.local_job import last_value_per_step, saved_steps
from tests.e2e.test_main_job import OVERRIDES

DEVICES = local_job.Devices(processes=2, cpu_devices_each=4)
TIMEOUT_S = 240  # a run that takes longer has hung (a process waiting for another): fail, do not block CI


def arguments(workdir, tokenizer_path=None) -> list[str]:
  shared = [f"--config.data.tokenizer_path={tokenizer_path}"] if tokenizer_path else []
  return ["--config=configs/tiny_fr.py", f"--config.workdir={workdir}", *OVERRIDES, *shared]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(shared_compilation_cache):
  """The resume loads the programs that the first launch compiled (tests/conftest.py)."""


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """One process with 8 devices training on both shards' rows; its tokenizer serves the two processes."""
  workdir = str(tmp_path_factory.mktemp("one_process"))
  local_job.run_one_process(arguments(workdir), DEVICES, TIMEOUT_S)
  return workdir, os.path.join(workdir, "tokenizer", "spm.model")


def test_two_processes_stop_together_on_one_sigterm_and_resume_to_train_as_one_process(one_process, tmp_path):
  reference, tokenizer_path = one_process
  workdir = str(tmp_path)
  with local_job.processes(arguments(workdir, tokenizer_path), DEVICES, tempfile.mkdtemp()) as launched:
    local_job.wait_for_checkpoint(workdir, 4, launched, TIMEOUT_S)
    launched[1].send_signal(signal.SIGTERM)
    results = local_job.finish(launched, TIMEOUT_S)
  stops = [local_job.preemption_stop_step(stderr) for _, _, stderr in results]
  for (code, _, stderr), stop in zip(results, stops):
    assert code != 0 and stop is not None, stderr[-3000:]
  assert stops[0] == stops[1] < 16, stops
  assert saved_steps(workdir)[-1] == stops[0]
  assert not [name for name in os.listdir(os.path.join(workdir, "checkpoints")) if not name.isdigit()]

  resumed = local_job.run_processes(arguments(workdir, tokenizer_path), DEVICES, tempfile.mkdtemp(), TIMEOUT_S)
  ours, theirs = last_value_per_step(workdir), last_value_per_step(reference)
  assert sorted(ours) == list(range(1, 17))
  # The same rows on the same devices, before and after the stop; only the order in which gloo and the in-process
  # all-reduce add the devices' partial gradients differs, a rounding difference that 16 steps cannot grow past
  # this. Rows read twice or skipped at the resume would differ by far more.
  for step in ours:
    assert ours[step] == pytest.approx(theirs[step], rel=1e-5), (step, ours[step], theirs[step])
  assert last_value_per_step(workdir, "eval") == pytest.approx(last_value_per_step(reference, "eval"), rel=1e-5)
  # Process 0 alone writes the run's files and prints the predictions.
  assert "predicted:" in resumed[0][1] and "predicted:" not in resumed[1][1]
  assert os.path.isfile(os.path.join(workdir, "hf", "model.safetensors"))


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
