"""FAT5-JAX command line: `python main.py --config=configs/tiny_fr.py [--mode=...] [--config.train.steps=...]`.

Modes:
  train         text -> tokenizer -> UL2 batches -> sharded training -> checkpoints -> Hugging Face export
  eval          evaluation loss of the latest checkpoint on the held-out split
  summary       resolved config, parameters per module, training FLOPs per row
  inspect_data  decoded UL2 examples per denoiser, statistics, {workdir}/inspect_data.jsonl
  import_hf     Hugging Face / FAT5 checkpoint in --hf_dir -> step-0 checkpoint in the config's workdir
  export_hf     latest checkpoint -> Hugging Face directory --export_dir
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "summary", "inspect_data", "import_hf", "export_hf")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_fr.py", "Run configuration (a configs/*.py file).")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "import_hf: local Hugging Face or FAT5 checkpoint directory.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "export_hf: output directory (default {workdir}/hf).")


def parameter_table(model) -> list[tuple[str, int]]:
  """Parameters per module, grouping the layers of a stack (e.g. `encoder.blocks.*.mlp`)."""
  import jax
  from fat5_jax import model as model_lib

  counts = collections.OrderedDict()
  for path, leaf in jax.tree.leaves_with_path(model_lib.parameters(model)):
    keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    if len(keys) > 2 and keys[1] == "blocks":
      keys = keys[:2] + ["*"] + keys[3:4]
    name = ".".join(keys[:4] if keys[1:2] == ["blocks"] else keys[:2])
    counts[name] = counts.get(name, 0) + leaf.size
  return list(counts.items())


def summary(config):
  from flax import nnx
  from fat5_jax import flops, model as model_lib

  model = nnx.eval_shape(lambda: model_lib.T5(config.model, rngs=nnx.Rngs(0)))
  table = parameter_table(model)
  total = model_lib.count_parameters(model)
  width = max(len(name) for name, _ in table)
  print(f"{'module':<{width}}  {'parameters':>14}")
  for name, count in table:
    print(f"{name:<{width}}  {count:>14,}")
  print(f"{'total':<{width}}  {total:>14,}")
  row_flops = flops.training_flops_per_row(config.model, config.data.encoder_length, config.data.decoder_length)
  print(f"training FLOPs per row ({config.data.encoder_length}/{config.data.decoder_length} tokens): "
        f"{row_flops / 1e9:,.1f} GFLOP")


def import_hf(config, hf_dir: str):
  from fat5_jax import checkpoint, hf, model as model_lib
  from fat5_jax.config import architecture_differences

  # The run's choices, not the checkpoint's: dtypes, implementations, dropout (HF configs carry 0.1).
  run_fields = ("param_dtype", "dtype", "attention_impl", "kernel_impl", "dropout_rate")
  keep = {k: getattr(config.model, k) for k in run_fields}
  model_config, model = hf.from_hf(hf_dir, **keep)
  diff = architecture_differences(dataclasses.asdict(model_config), config.model)
  if diff:
    raise SystemExit(f"{hf_dir} does not match the configured architecture (field: checkpoint vs config): "
                     + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items()))
  checkpointer = checkpoint.Checkpointer(config.workdir)
  if checkpointer.all_steps():
    raise SystemExit(f"{checkpointer.directory} already holds checkpoints {checkpointer.all_steps()}; "
                     "import into an empty workdir")
  config = dataclasses.replace(config, model=model_config)
  checkpointer.save(0, {"params": model_lib.parameters(model)}, config=config, force=True)
  checkpointer.close()
  print(f"imported {hf_dir} as step 0 of {checkpointer.directory}")


def restore_model(config):
  """The model of the latest checkpoint in the workdir."""
  from flax import nnx
  from fat5_jax import checkpoint, model as model_lib

  checkpointer = checkpoint.Checkpointer(config.workdir)
  checkpointer.check_architecture(config)
  params = model_lib.abstract_parameters(config.model)
  step, state = checkpointer.restore({"params": nnx.to_pure_dict(params)})
  checkpointer.close()
  if step is None:
    raise SystemExit(f"no checkpoint in {checkpointer.directory}: train or import_hf first")
  nnx.replace_by_pure_dict(params, state["params"])
  return step, model_lib.from_parameters(config.model, params)


def export_hf(config, export_dir: str):
  import os
  from fat5_jax import hf

  step, model = restore_model(config)
  export_dir = export_dir or os.path.join(config.workdir, "hf")
  hf.to_hf(config.model, model, export_dir)
  print(f"exported step {step} to {export_dir}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain narrate every file at INFO
  from fat5_jax.config import ConfigError, from_config_dict

  try:
    config = from_config_dict(_CONFIG.value)
  except ConfigError as error:
    sys.exit(f"invalid config {flags.FLAGS['config'].value!r}: {error}")
  print(json.dumps(dataclasses.asdict(config), indent=1, default=str))
  try:
    run(config, _MODE.value)
  except ConfigError as error:  # found while running (data, tokenizer): one line, no traceback
    sys.exit(f"error: {error}")


def run(config, mode: str):
  """Run one --mode on a validated config."""
  if mode == "summary":
    summary(config)
  elif mode == "import_hf":
    if not _HF_DIR.value:
      sys.exit("--mode=import_hf needs --hf_dir=DIR")
    import_hf(config, _HF_DIR.value)
  elif mode == "export_hf":
    export_hf(config, _EXPORT_DIR.value)
  elif mode == "inspect_data":
    from fat5_jax import data
    tokenizer = data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)
    import os
    data.inspect_data(config, tokenizer, os.path.join(config.workdir, "inspect_data.jsonl"))
  else:
    from fat5_jax import train
    (train.train if mode == "train" else train.evaluate_latest)(config)


if __name__ == "__main__":
  app.run(main)
