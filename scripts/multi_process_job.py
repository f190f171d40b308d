"""The main job as one process per GPU on one host, through jax.distributed (the multi-host code path), checked
against one process that drives all the GPUs on the same rows.

  python scripts/multi_process_job.py --processes 2 --out OUT/multi_process_job.json        # 2 GPUs: > 8 min
  python scripts/multi_process_job.py --processes 2 --cpu-devices-each 2 --tiny \\
    --out /tmp/multi_process_job.json                                                      # a CPU check: ~3 min

On the embedded corpus, each run in its workdir under --dir (default: a temporary directory):
  1. `one_process`: one process with all N devices reads the data shards of all N processes (what they read
     together) and trains --steps steps: the reference losses. Its tokenizer serves the other runs.
  2. `processes`: `main.py` launched N times with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
     process i on GPU i (CUDA_VISIBLE_DEVICES; or simulated CPU devices with --cpu-devices-each), trains the same; once
     checkpoint --checkpoint-every is written, process 1 gets a SIGTERM: all must stop after one same step, saved.
  3. The same command again resumes them to the end, where the run exports itself to {workdir}/hf.
  4. `--mode=export_hf` as N processes to {workdir}/export, which must hold the same weights as {workdir}/hf.
The per-step training losses (and evaluation losses) of 2 + 3 are compared with 1's; GPUs do not promise the same
rounding from one program to the other (here: NCCL within one process against across processes), so they must agree
within --rtol. Writes --out (steps, stop step, both runs' losses, their largest differences, wall times, exported
files, checks, commands); exits with 1 when a check fails.

Default run: small_fr's architecture, kernels and optimizer, 16 rows per device per step, one decoder bucket (512) so
that each launch compiles one training step; --tiny: tiny_fr at 64 + 32 tokens, 2 rows per device. `--config.X=Y`
arguments go to every run (e.g. `--config.data.tokenizer_path=spm.model`: no tokenizer training).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import sys
import tempfile
import time

import jax  # its version only: this process leaves the devices to the runs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fat5_jax.train import local_job  # noqa: E402  (after the checkout joins the path)
from fat5_jax.train.local_job import last_value_per_step, saved_steps  # noqa: E402

RUNS = {
    "small_fr": ("configs/small_fr.py", 16, ["--config.data.decoder_length_buckets=(512,)",
                                             "--config.train.grad_accum_steps=1"]),
    "tiny_fr": ("configs/tiny_fr.py", 2, ["--config.data.encoder_length=64", "--config.data.decoder_length=32",
                                          "--config.data.decoder_length_buckets=(16,32)"]),
}
TIMEOUT_S = 600  # per launch: longer is a hang (a process waiting for another)


def largest_differences(ours: dict, reference: dict) -> dict:
  """Largest absolute and relative difference of `ours` from `reference` over their common steps."""
  steps = sorted(set(ours) & set(reference))
  absolute = [abs(ours[step] - reference[step]) for step in steps]
  relative = [a / abs(reference[step]) for a, step in zip(absolute, steps)]
  return {"steps": len(steps), "max_abs_diff": max(absolute, default=None),
          "max_rel_diff": max(relative, default=None)}


def exported_files(directory: str) -> dict[str, int]:
  if not os.path.isdir(directory):  # a failed check, not a crash before the summary is written
    return {}
  return {name: os.path.getsize(os.path.join(directory, name)) for name in sorted(os.listdir(directory))}


def same_bytes(a: str, b: str) -> bool:
  if not (os.path.isfile(a) and os.path.isfile(b)):
    return False
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   epilog="Other arguments: --config.FIELD=VALUE overrides for every run.")
  parser.add_argument("--processes", type=int, default=2, help="processes, one per GPU")
  parser.add_argument("--cpu-devices-each", type=int, help="run on the CPU, each process with this many simulated "
                                                           "devices (a check of the script without GPUs)")
  parser.add_argument("--tiny", action="store_true", help="tiny_fr at short rows instead of small_fr")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--checkpoint-every", type=int, default=25, help="also where process 1 gets its SIGTERM")
  parser.add_argument("--rtol", type=float, default=1e-2, help="largest relative loss difference from one process")
  parser.add_argument("--dir", help="workdirs and logs, a new or empty directory (default: a new "
                                    "temporary directory)")
  parser.add_argument("--out", default="multi_process_job.json", help="summary JSON")
  args, overrides = parser.parse_known_args()
  unknown = [arg for arg in overrides if not arg.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (main.py overrides are --config.FIELD=VALUE)")
  if args.processes < 2:
    parser.error(f"--processes={args.processes}: a multi-process job needs at least 2")
  if not 0 < args.checkpoint_every < args.steps:
    parser.error(f"--checkpoint-every={args.checkpoint_every} must fall within the {args.steps} steps, so that the "
                 "SIGTERM comes mid-run")
  if args.dir and os.path.isdir(args.dir) and os.listdir(args.dir):
    parser.error(f"--dir={args.dir} is not empty: its workdirs would resume earlier runs; give a new or empty one")
  devices = local_job.Devices(args.processes, args.cpu_devices_each)
  root = args.dir or tempfile.mkdtemp(prefix="multi_process_job_")
  # Every launch inherits one compilation cache: the resume and the export then load the job's compiled programs
  # instead of compiling them again (on two H200s the first two launches took 274 s and 211 s, mostly compiling).
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "compilation_cache"))
  config, rows_per_device, run_overrides = RUNS["tiny_fr" if args.tiny else "small_fr"]
  rows = rows_per_device * args.processes * (args.cpu_devices_each or 1)
  settings = [f"--config={config}", *run_overrides, f"--config.train.batch_size={rows}",
              f"--config.train.steps={args.steps}", "--config.train.log_every=1",
              f"--config.train.checkpoint_every={args.checkpoint_every}",
              f"--config.train.eval_every={args.steps // 2}", "--config.train.eval_steps=2", *overrides]
  reference, workdir = os.path.join(root, "one_process"), os.path.join(root, "processes")
  tokenizer = os.path.join(reference, "tokenizer", "spm.model")
  train = [*settings, f"--config.workdir={workdir}", f"--config.data.tokenizer_path={tokenizer}"]
  export = [*train, "--mode=export_hf", f"--export_dir={os.path.join(workdir, 'export')}"]
  logs = lambda phase: os.path.join(root, "logs", phase)
  wall_s = {}

  def timed(phase, fn):
    start = time.perf_counter()
    result = fn()
    wall_s[phase] = time.perf_counter() - start
    print(f"{phase}: {wall_s[phase]:.0f} s", flush=True)
    return result

  def preempted():
    with local_job.processes(train, devices, logs("preempted")) as launched:
      local_job.wait_for_checkpoint(workdir, args.checkpoint_every, launched, TIMEOUT_S)
      launched[1].send_signal(signal.SIGTERM)
      return local_job.finish(launched, TIMEOUT_S)

  try:
    timed("one_process", lambda: local_job.run_one_process([*settings, f"--config.workdir={reference}"], devices,
                                                           TIMEOUT_S))
    stopped = timed("preempted", preempted)
    saved_at_stop = saved_steps(workdir)
    timed("resumed", lambda: local_job.run_processes(train, devices, logs("resumed"), TIMEOUT_S))
    timed("export", lambda: local_job.run_processes(export, devices, logs("export"), TIMEOUT_S))
  except (RuntimeError, TimeoutError) as error:
    raise SystemExit(f"{error}\n(workdirs and logs in {root})") from None
  stops = [local_job.preemption_stop_step(stderr) for _, _, stderr in stopped]

  ours, theirs = last_value_per_step(workdir), last_value_per_step(reference)
  ours_eval, theirs_eval = last_value_per_step(workdir, "eval"), last_value_per_step(reference, "eval")
  train_diff, eval_diff = largest_differences(ours, theirs), largest_differences(ours_eval, theirs_eval)
  weights = lambda directory: os.path.join(workdir, directory, "model.safetensors")
  within_rtol = lambda diff: diff["max_rel_diff"] is not None and diff["max_rel_diff"] <= args.rtol
  checks = {
      "every_process_stopped_on_the_preemption_notice": all(code and stop is not None for (code, _, _), stop
                                                            in zip(stopped, stops)),
      "same_stop_step_mid_run": len(set(stops)) == 1 and stops[0] is not None and stops[0] < args.steps,
      "checkpoint_of_the_stop_step": bool(saved_at_stop) and saved_at_stop[-1] == stops[0],
      "resumed_to_the_end": sorted(ours) == list(range(1, args.steps + 1)),
      "losses_match_one_process": sorted(ours) == sorted(theirs) and within_rtol(train_diff)
                                  and within_rtol(eval_diff),
      "export_matches_the_run_export": same_bytes(weights("export"), weights("hf")),
  }
  summary = {
      "environment": {"python": platform.python_version(), "jax": jax.__version__, "date": datetime.datetime.now(
          datetime.timezone.utc).isoformat(), "command": " ".join(["python"] + sys.argv)},
      "processes": args.processes, "devices_per_process": args.cpu_devices_each or 1,
      "platform": "cpu" if args.cpu_devices_each else "gpu", "config": config, "rows_per_step": rows,
      "steps": args.steps, "sigterm_after_checkpoint": args.checkpoint_every, "stop_steps": stops,
      "saved_steps_at_stop": saved_at_stop, "train_loss": {"processes": ours, "one_process": theirs, **train_diff},
      "eval_loss": {"processes": ours_eval, "one_process": theirs_eval, **eval_diff}, "rtol": args.rtol,
      "wall_s": wall_s, "export": exported_files(os.path.join(workdir, "export")), "checks": checks,
      "main_py_arguments": {"train": train, "export": export}, "dir": root}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(summary, f, indent=1)
  differences = {"train": train_diff, "eval": eval_diff}
  print(f"wrote {args.out}: stop steps {stops}; largest relative loss differences from one process: "
        + ", ".join(f"{split} {diff['max_rel_diff']:.3g}" for split, diff in differences.items() if diff["steps"]))
  failed = [name for name, ok in checks.items() if not ok]
  if failed:
    raise SystemExit(f"failed: {', '.join(failed)} (logs in {root}/logs)")
  print("all checks passed:", ", ".join(checks))


if __name__ == "__main__":
  main()
