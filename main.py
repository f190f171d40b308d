"""FAT5-JAX command line: `python main.py --config=configs/tiny_fr.py [--mode=...] [--config.train.steps=...]`.

Modes (fat5_jax/cli.py):
  train         text -> tokenizer -> UL2 batches -> sharded training -> checkpoints -> Hugging Face export
  finetune      a task (config.finetune) from pretrained weights -> best checkpoint -> test results.json
  eval          evaluation loss of the checkpoint (a finished fine-tuning's best, else the newest) on held-out text
  predict       generated text for each line of --input (or JSON Lines "text") -> --output JSON Lines
  summary       resolved config, parameters per module, training FLOPs per row
  inspect_data  decoded UL2 examples per denoiser, statistics, {workdir}/inspect_data.jsonl
  import_hf     Hugging Face / FAT5 checkpoint in --hf_dir -> step-0 checkpoint in the config's workdir
  export_hf     that checkpoint -> Hugging Face directory --export_dir

Several hosts: the same command on each, one process per host, with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set (or under SLURM's srun); see docs/training.md.
"""

import dataclasses
import json
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from fat5_jax import cli
from fat5_jax.config import ConfigError, check_override_names, finetune_workdir, from_config_dict

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_fr.py", "Run configuration (a configs/*.py file).")
_MODE = flags.DEFINE_enum("mode", "train", cli.MODES, "What to do.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "import_hf: local Hugging Face or FAT5 checkpoint directory.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "export_hf: output directory (default {workdir}/hf).")
_INPUT = flags.DEFINE_string("input", None, "predict: inputs, one per line, or JSON Lines with a \"text\" field.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: JSON Lines of {input, output} to write.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 1, "predict: beams of the beam search (1: greedy).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the resolved config, and tracebacks of errors.")
USAGE_ERROR = 2  # a config or command line that cannot run: nothing was done


def fail(message: str, code: int = 1):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain narrate every file at INFO
  try:
    config = from_config_dict(_CONFIG.value)
  except ConfigError as error:
    fail(f"invalid config {config_flags.get_config_filename(flags.FLAGS['config'])}: {error}", USAGE_ERROR)
  if _MODE.value == "import_hf" and not _HF_DIR.value:
    fail("--mode=import_hf needs --hf_dir=DIR", USAGE_ERROR)
  if _MODE.value == "predict" and not (_INPUT.value and _OUTPUT.value):
    fail("--mode=predict needs --input=FILE and --output=FILE", USAGE_ERROR)
  if _MODE.value == "predict" and not os.path.isfile(_INPUT.value):
    fail(f"--input={_INPUT.value}: no such file", USAGE_ERROR)
  if os.path.exists(config.workdir) and not os.path.isdir(config.workdir):
    fail(f"workdir {config.workdir} is a file: set --config.workdir to a directory", USAGE_ERROR)
  if _MODE.value != "summary":
    unwritable = workdir_problem(config.workdir)
    if unwritable:
      fail(f"workdir {config.workdir} cannot be written ({unwritable}): set --config.workdir to a writable "
           "directory", USAGE_ERROR)
  if _MODE.value == "finetune":
    unwritable = workdir_problem(finetune_workdir(config))
    if unwritable:
      fail(f"finetune workdir {finetune_workdir(config)} cannot be written ({unwritable}): set "
           "--config.finetune.workdir to a writable directory", USAGE_ERROR)
  if _VERBOSE.value:
    print(json.dumps(dataclasses.asdict(config), indent=1, default=str))
  try:
    cli.run(_MODE.value, config, hf_dir=_HF_DIR.value, export_dir=_EXPORT_DIR.value,
            predict_files=(_INPUT.value, _OUTPUT.value), num_beams=_NUM_BEAMS.value)
  except (ConfigError, ValueError, OSError) as error:  # our validation or the file system: one line
    if _VERBOSE.value:
      raise
    fail(str(error), USAGE_ERROR if isinstance(error, ConfigError) else 1)


def workdir_problem(workdir: str) -> str | None:
  """Why `workdir` cannot hold a run (created if missing), None when it can: checked by writing, since a read-only
  file system refuses even root."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      return None
  except OSError as error:
    return error.strerror or str(error)


def check_command_line(argv: list[str]):
  """What would otherwise fail inside flag parsing with a traceback: a missing config file, unknown fields."""
  for arg in argv:
    if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1].split(":", 1)[0]):
      raise ConfigError(f"no config file {arg.split('=', 1)[1]!r}: pass one of configs/*.py or your own")
  check_override_names(argv)


if __name__ == "__main__":
  try:
    check_command_line(sys.argv)
  except ConfigError as error:
    fail(str(error), USAGE_ERROR)
  app.run(main)
