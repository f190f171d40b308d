"""The modes of `main.py`: each takes a validated Config (and its mode's options) and does one job."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import nnx

from fat5_jax import checkpoint, data, flops, heads, hf, predict, sharding, train
from fat5_jax import model as model_lib
from fat5_jax.config import Config, architecture_differences
from fat5_jax.data import tokenizer as tokenizer_lib
from fat5_jax.train import distributed

MODES = ("train", "finetune", "eval", "predict", "summary", "inspect_data", "import_hf", "export_hf")
# Modes that read or write checkpoints: with several processes, all of them take part (fat5_jax/train/distributed.py).
DISTRIBUTED_MODES = ("train", "eval", "import_hf", "export_hf")


def run(mode: str, config: Config, *, hf_dir: str | None = None, export_dir: str | None = None,
        predict_files: tuple[str, str] | None = None, num_beams: int = 1):
  """Runs one of MODES on a validated config. `hf_dir`: import_hf's source; `export_dir`: export_hf's target;
  `predict_files`: predict's (input, output) files, decoded with `num_beams` beams (1: greedy)."""
  if mode in DISTRIBUTED_MODES:
    distributed.initialize()
  elif distributed.launched_as_several_processes():  # each process would run the whole job, in the same workdir
    raise ValueError(f"--mode={mode} runs in one process: launch it once, without JAX_NUM_PROCESSES > 1 or srun's "
                     "several tasks")
  if mode == "train":
    train.train(config)
  elif mode == "finetune":
    train.finetune.finetune(config)
  elif mode == "eval":
    train.evaluate_latest(config)
  elif mode == "predict":
    predict.predict(config, *predict_files, num_beams=num_beams)
  elif mode == "summary":
    summary(config)
  elif mode == "inspect_data":
    tokenizer = data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)
    data.inspect_data(config, tokenizer, os.path.join(config.workdir, "inspect_data.jsonl"))
  elif mode == "import_hf":
    import_hf(config, hf_dir)
  elif mode == "export_hf":
    export_hf(config, export_dir or os.path.join(config.workdir, "hf"))
  else:
    raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")


def summary(config: Config):
  """Parameters per module and in total, and the training FLOPs of one row."""
  model = nnx.eval_shape(lambda: model_lib.T5(config.model, rngs=nnx.Rngs(0)))
  table = model_lib.parameter_table(model)
  total = model_lib.count_parameters(model)
  width = max(len(name) for name, _ in table)
  print(f"{'module':<{width}}  {'parameters':>14}")
  for name, count in table:
    print(f"{name:<{width}}  {count:>14,}")
  print(f"{'total':<{width}}  {total:>14,}")
  row_flops = flops.training_flops_per_row(config.model, config.data.encoder_length, config.data.decoder_length)
  print(f"training FLOPs per row ({config.data.encoder_length}/{config.data.decoder_length} tokens): "
        f"{row_flops / 1e9:,.1f} GFLOP")


def _parameter_shardings(config: Config, abstract_params):
  """Where each parameter lives on the run's mesh (as in training): checkpoints are written and read by all
  processes, each its own shards."""
  return sharding.parameter_shardings(abstract_params, sharding.make_mesh(config.train))


def import_hf(config: Config, hf_dir: str):
  """A Hugging Face or FAT5 checkpoint directory -> step 0 (parameters only) of the config's empty workdir, and its
  spiece.model -> the workdir's tokenizer: the weights' ids mean something only with their own tokenizer. Every
  process reads the checkpoint directory; process 0 alone copies the tokenizer and prints."""
  # The run's choices, not the checkpoint's: dtypes, implementations, dropout (HF configs carry 0.1).
  run_fields = ("param_dtype", "dtype", "attention_impl", "kernel_backend", "dropout_rate")
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
  tokenizer_path = distributed.main_process_only(
      "tokenizer import", lambda: tokenizer_lib.import_tokenizer(hf_dir, config.workdir, config.data))
  config = dataclasses.replace(config, model=model_config)
  params = jax.device_get(model_lib.parameters(model))
  params = jax.tree.map(lambda value, where: jax.make_array_from_callback(value.shape, where, value.__getitem__),
                        params, _parameter_shardings(config, params))
  checkpointer.save(0, {"params": params}, config=config, force=True)
  checkpointer.close()
  if jax.process_index() == 0:
    print(f"imported {hf_dir} as step 0 of {checkpointer.directory}, "
          + (f"its tokenizer as {tokenizer_path}" if tokenizer_path else
             "without a tokenizer (it has no spiece.model): set data.tokenizer_path to train or evaluate it"))


def export_hf(config: Config, export_dir: str):
  """The checkpoint `checkpoint.restore_params` chooses -> a Hugging Face directory, written by process 0 (parameters
  reach it one at a time). A fine-tuned encoder head goes to `{export_dir}/hf` and `{export_dir}/fat5`, each in the
  class `hf.HEAD_CLASSES` gives it there."""
  head = _encoder_head(config.workdir)
  abstract_state = model_lib.abstract_parameters(config.model) if head is None else nnx.state(
      nnx.eval_shape(lambda: heads.EncoderWithHead(config.model, *head, rngs=nnx.Rngs(0))), nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract_state)
  abstract_params = jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
                                 abstract_params, _parameter_shardings(config, abstract_params))
  step, params = checkpoint.restore_params(config, abstract_params)
  tokenizer = tokenizer_lib.recorded_tokenizer(config.data, config.workdir)
  params = distributed.gather_to_main_process(params)
  if jax.process_index() != 0:
    return
  if head is None:
    hf.to_hf(config.model, model_lib.from_parameters(config.model, params), export_dir, tokenizer=tokenizer)
    written = export_dir
  else:
    directories = hf.head_to_hf(config.model, heads.from_parameters(config.model, *head, params), export_dir,
                                tokenizer=tokenizer, labels=_label_names(config.workdir))
    written = ", ".join(f"{path} ({architecture})" for path, architecture in directories.items())
  print(f"exported step {step} to {written}" + ("" if tokenizer else
        f" without a tokenizer ({config.workdir} has none): copy the weights' spiece.model beside them"))


def _label_names(workdir: str) -> list[str] | None:
  """The label names a fine-tuning recorded in `workdir`, None without them."""
  path = os.path.join(workdir, train.finetune.LABELS_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _encoder_head(workdir: str) -> tuple[str, int] | None:
  """(head, outputs) of a fine-tuned encoder head's checkpoints in `workdir`; None for a T5's (pretrained, imported,
  seq2seq fine-tuning) or no checkpoint (restore_params then says so). The head's kernel tells them apart, since
  every run records a finetune section."""
  checkpointer = checkpoint.Checkpointer(workdir)
  try:
    newest = checkpointer.newest_readable()
  finally:
    checkpointer.close()
  if newest is None:
    return None
  _, saved_config, metadata = newest
  params = metadata["state"]["params"]
  if "head_kernel" not in params:
    return None
  return saved_config["finetune"]["head"], params["head_kernel"].shape[-1]
