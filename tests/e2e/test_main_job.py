"""The main job end to end, as a user runs it: `python main.py --config=...` in subprocesses, killed and resumed."""

import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fat5_jax.train.local_job import last_value_per_step, read_metrics, saved_steps
from tests.shared import once_per_session

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# tiny_fr made smaller still, so that each run takes seconds.
OVERRIDES = [
    "--config.model.d_model=64", "--config.model.d_kv=16", "--config.model.d_ff=128", "--config.model.num_heads=4",
    "--config.model.num_layers=1", "--config.model.num_decoder_layers=1",
    "--config.data.encoder_length=64", "--config.data.decoder_length=32",
    "--config.data.decoder_length_buckets=(16,32)",
    "--config.train.batch_size=8", "--config.train.steps=16", "--config.train.log_every=1",
    "--config.train.checkpoint_every=4", "--config.train.eval_every=8", "--config.train.eval_steps=2",
    "--config.train.warmup_steps=4",
]


def command(workdir, *extra):
  """main.py's command line; a flag of `extra` replaces OVERRIDES' flag of that name (main.py refuses a tuple field
  given twice)."""
  names = {flag.split("=")[0] for flag in extra}
  overrides = [flag for flag in OVERRIDES if flag.split("=")[0] not in names]
  return [sys.executable, "main.py", "--config=configs/tiny_fr.py", f"--config.workdir={workdir}", *overrides, *extra]


def run(workdir, *extra, check=True):
  out = subprocess.run(command(workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
  if check:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out


def start(workdir):
  return subprocess.Popen(command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(ready, what, process, timeout=300):
  """Returns once `ready()`; fails if the run (`process`) ends first or `timeout` seconds pass."""
  deadline = time.time() + timeout
  while not ready():
    assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()[-3000:]}"
    assert time.time() < deadline, f"no {what} after {timeout} s"
    time.sleep(0.05)


def wait_for_checkpoint(workdir, step, process):
  marker = os.path.join(workdir, "checkpoints", str(step), "commit_success.txt")
  wait_until(lambda: os.path.exists(marker), f"checkpoint {step}", process)


def straight(tmp_path_factory) -> tuple[str, str]:
  """(workdir, stdout) of one straight run, made once for all the session's workers (test_finetune.py fine-tunes
  it too): the tests only read it."""
  return tuple(once_per_session(tmp_path_factory, "straight", lambda workdir: (workdir, run(workdir).stdout)))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  return straight(tmp_path_factory)


def test_straight_run_learns_and_exports_a_loadable_model(straight_run):
  workdir, stdout = straight_run
  evals = last_value_per_step(workdir, "eval")
  assert sorted(evals) == [0, 8, 16]
  assert evals[16] < 0.8 * evals[0], evals
  fills = [record["encoder_fill"] for record in read_metrics(os.path.join(workdir, "metrics.jsonl"))
           if record["split"] == "train" and "encoder_fill" in record]
  # Packed rows end in padding, the more so where a batch's decoder bucket is short.
  assert fills and all(0 < fill < 1 for fill in fills) and max(fills) - min(fills) > 0.1, fills
  assert os.path.getsize(os.path.join(workdir, "loss.png")) > 10_000
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 16
  assert '"train": {' not in stdout  # the resolved config is printed only with --verbose
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert "predicted:" in stdout

  import torch
  from transformers import T5ForConditionalGeneration
  model, info = T5ForConditionalGeneration.from_pretrained(os.path.join(workdir, "hf"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    logits = model(input_ids=torch.tensor([[5, 6, 7, 1]]), decoder_input_ids=torch.tensor([[0, 8]])).logits
  assert torch.isfinite(logits).all()


def test_resume_after_sigkill_is_bit_identical(straight_run, tmp_path):
  reference, _ = straight_run
  workdir = str(tmp_path)
  process = start(workdir)
  wait_for_checkpoint(workdir, 8, process)
  process.kill()
  process.wait()
  assert saved_steps(workdir)[-1] < 16
  run(workdir)
  assert last_value_per_step(workdir) == last_value_per_step(reference)
  assert last_value_per_step(workdir, "eval") == last_value_per_step(reference, "eval")
  with open(os.path.join(workdir, "hf", "model.safetensors"), "rb") as a, \
       open(os.path.join(reference, "hf", "model.safetensors"), "rb") as b:
    assert a.read() == b.read()


def test_sigterm_checkpoints_then_a_corrupt_latest_falls_back(tmp_path):
  workdir = str(tmp_path)
  process = start(workdir)
  wait_for_checkpoint(workdir, 4, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode != 0 and "stopped by SIGTERM" in stderr, stderr[-2000:]
  stopped_at = int(stderr.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert saved_steps(workdir)[-1] == stopped_at

  steps = saved_steps(workdir)
  for path in glob.glob(os.path.join(workdir, "checkpoints", str(steps[-1]), "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(max(0, os.path.getsize(path) // 3))
  out = run(workdir, "--mode=eval")
  report = json.loads(out.stdout[out.stdout.rindex('{\n "step"'):])
  assert report["step"] == steps[-2]
  assert np.isfinite(report["loss"])
  assert "could not be restored" in out.stderr


def test_bad_config_and_mismatched_workdir_get_clear_errors(straight_run):
  workdir, _ = straight_run
  out = run(workdir, "--config.model.position_encoding_type=sinusoidal", check=False)
  assert out.returncode != 0 and "position_encoding_type" in out.stderr
  out = run(workdir, "--config.model.d_model=96", "--mode=eval", check=False)
  assert out.returncode != 0 and "different architecture" in out.stderr and "d_model" in out.stderr


def test_missing_corpus_file_is_a_one_line_error(tmp_path):
  out = run(str(tmp_path / "run"), f"--config.data.corpus={tmp_path / 'missing.txt'}", check=False)
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == f"error: corpus file {str(tmp_path / 'missing.txt')!r} does not exist"


def test_divergence_stops_the_run_and_exports_nothing(tmp_path):
  """At learning rate 1e4 every update after the first is non-finite: the run must say so and fail, not finish. One
  decoder bucket: the rate makes new programs, and one train step compiles in half the time of two."""
  workdir = str(tmp_path / "run")
  out = run(workdir, "--config.train.learning_rate=1e4", "--config.train.max_nonfinite_steps=3",
            "--config.data.decoder_length_buckets=(32,)", check=False)
  assert out.returncode != 0, out.stdout[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith("diverged: "), out.stderr[-2000:]
  assert not os.path.exists(os.path.join(workdir, "hf"))


def test_a_second_run_on_a_busy_workdir_stops_in_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  first = start(workdir)
  try:
    # The run takes the lock before it compiles anything, then names itself in the lock file.
    lock = pathlib.Path(workdir, "run.lock")
    wait_until(lambda: lock.exists() and f"process {first.pid} " in lock.read_text(), "lock naming the run", first)
    out = run(workdir, check=False)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert f"is in use by the run of process {first.pid} " in out.stderr
  finally:
    first.kill()
    first.wait()


def main_error(*argv) -> tuple[int, str]:
  """Runs main.py expecting a failure: (exit code, its one error line)."""
  out = subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
  assert out.stderr.startswith("error: "), out.stderr[-2000:]
  return out.returncode, out.stderr.strip()


@pytest.mark.parametrize("case,code", [("missing config file", 2), ("workdir is a file", 2),
                                       ("read-only workdir", 2),
                                       ("import_hf from a directory without a checkpoint", 1)])
def test_errors_are_one_line(case, code, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  argv = {"missing config file": ["--config=configs/missing.py"],
          "workdir is a file": ["--config=configs/tiny_fr.py", f"--config.workdir={a_file}"],
          # /sys is a read-only file system: refused even to root, who ignores permission bits.
          "read-only workdir": ["--config=configs/tiny_fr.py", "--config.workdir=/sys/fat5_jax_run"],
          "import_hf from a directory without a checkpoint": [
              "--config=configs/tiny_fr.py", "--mode=import_hf", f"--hf_dir={tmp_path}",
              f"--config.workdir={tmp_path / 'run'}"]}[case]
  assert main_error(*argv)[0] == code


def test_export_of_alibi_weights_is_one_line(tmp_path):
  from configs import tiny_fr
  from fat5_jax import checkpoint, model as model_lib
  from fat5_jax.config import from_config_dict
  from flax import nnx

  config = tiny_fr.get_config()
  config.workdir = str(tmp_path)
  config.model.position_encoding_type = "alibi"
  config = from_config_dict(config)
  saver = checkpoint.Checkpointer(config.workdir)
  params = model_lib.parameters(model_lib.T5(config.model, rngs=nnx.Rngs(0)))
  saver.save(0, {"params": params}, config=config, force=True)
  saver.close()
  code, line = main_error("--config=configs/tiny_fr.py", f"--config.workdir={tmp_path}", "--mode=export_hf",
                          "--config.model.position_encoding_type=alibi")
  assert code == 1 and "alibi" in line and "Hugging Face" in line, line
  assert not os.path.exists(os.path.join(tmp_path, "hf", "model.safetensors"))


def test_export_refuses_a_tokenizer_changed_after_the_run(straight_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight_run[0], workdir)
  with open(os.path.join(workdir, "tokenizer", "spm.model"), "ab") as f:
    f.write(b"\0")
  code, line = main_error(*command(workdir, "--mode=export_hf")[2:])
  assert code == 2 and "changed after it was recorded" in line, line


def test_predict_writes_one_output_per_input(straight_run, tmp_path):
  inputs = tmp_path / "inputs.txt"
  inputs.write_text("Paris est la capitale de la France.\n\nLe chat dort sur le canapé.\n", encoding="utf-8")
  output = tmp_path / "predictions.jsonl"
  run(straight_run[0], "--mode=predict", f"--input={inputs}", f"--output={output}", "--num_beams=2")
  records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
  assert [r["input"] for r in records] == ["Paris est la capitale de la France.", "Le chat dort sur le canapé."]
  assert all(isinstance(r["output"], str) for r in records)
  code, line = main_error(*command(straight_run[0], "--mode=predict", f"--input={tmp_path / 'missing.txt'}",
                                   f"--output={output}")[2:])
  assert code == 2 and "no such file" in line, line
