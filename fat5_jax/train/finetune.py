"""Fine-tuning (`--mode=finetune`): a task's train split from pretrained (or fresh) weights, the best checkpoint by
the validation metric, and the test split evaluated once with it into `{finetune workdir}/results.json`.

The fine-tuning workdir is laid out like a pretraining one (checkpoints/, tokenizer/spm.model, config.json,
metrics.jsonl), so a seq2seq fine-tuning can itself be the `init_from` of another, or be exported. Its checkpoints
hold the run's resolved config: the architecture of `init_from`, and a `train` section restating the fine-tuning
optimizer, so that the pretraining Trainer and checkpoint checks apply unchanged.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from fat5_jax import checkpoint, generate, heads, hf, losses, sharding, task_metrics
from fat5_jax import model as model_lib
from fat5_jax.config import FILES_TASK, Config, ConfigError, FinetuneConfig, finetune_workdir, model_config
from fat5_jax.data import tasks, tokenizer as tokenizer_lib
from fat5_jax.metrics import MetricWriter
from fat5_jax.train import distributed, workdir_lock
from fat5_jax.train.trainer import Trainer

# Model fields that are the run's choice whatever the weights were trained with (as import_hf keeps them).
RUN_MODEL_FIELDS = ("param_dtype", "dtype", "attention_impl", "kernel_backend", "dropout_rate")
LABELS_FILE = "labels.json"  # the task's label names in id order, for exports of an encoder head
# Fine-tuning settings that a resumed run must share with its checkpoints (steps and eval_every may change).
RESUME_FIELDS = ("task", "train_file", "validation_file", "test_file", "input_field", "target_field", "init_from",
                 "head", "optimizer", "learning_rate", "batch_size", "train_examples", "input_length", "target_length",
                 "seed")
TRAIN_EXAMPLES_SEED = 0  # the one shuffle `finetune.train_examples` takes its first N from, whatever finetune.seed


def finetune(config: Config) -> dict:
  """Fine-tunes as `config.finetune` says and returns the results written to results.json."""
  workdir = finetune_workdir(config)
  with workdir_lock.held(workdir):
    return _finetune(config, workdir)


def _load_splits(config: Config) -> tuple[tasks.Task, dict[str, list[dict]]]:
  ft = config.finetune
  files = None
  if ft.task == FILES_TASK:
    files = {split: path for split, path in (("train", ft.train_file), ("validation", ft.validation_file),
                                             ("test", ft.test_file)) if path}
  splits = {}
  for split in tasks.SPLITS:
    task, splits[split] = tasks.load_task(ft.task, split, validation_fraction=config.data.validation_fraction,
                                          input_field=ft.input_field, target_field=ft.target_field, files=files)
  empty = [split for split, examples in splits.items() if not examples]
  if empty:
    raise ConfigError(f"task {ft.task}: the {', '.join(empty)} split(s) hold no example")
  if ft.train_examples > len(splits["train"]):
    raise ConfigError(f"finetune.train_examples={ft.train_examples} but task {ft.task}'s train split holds "
                      f"{len(splits['train'])} examples: give at most that, or 0 for all")
  if ft.train_examples:
    order = np.random.default_rng(TRAIN_EXAMPLES_SEED).permutation(len(splits["train"]))
    splits["train"] = [splits["train"][i] for i in order[:ft.train_examples]]
  if ft.head not in tasks.KIND_HEADS[task.kind]:
    raise ConfigError(f"task {ft.task} is {task.kind}: finetune.head={ft.head!r} cannot learn it; use "
                      f"{' or '.join(tasks.KIND_HEADS[task.kind])}")
  return task, splits


def _starting_point(config: Config, mesh) -> tuple[Config, dict | None, str]:
  """(config with the weights' architecture, their T5 parameters or None for a fresh model, tokenizer path)."""
  source = config.finetune.init_from
  run_fields = {k: getattr(config.model, k) for k in RUN_MODEL_FIELDS}
  if not source:
    tokenizer = distributed.main_process_first("tokenizer", lambda: tokenizer_lib.load_tokenizer(
        config.data, config.workdir, config.model.vocab_size))
    return config, None, tokenizer.path
  if os.path.isdir(os.path.join(source, "checkpoints")):
    checkpointer = checkpoint.Checkpointer(source)
    steps = checkpointer.all_steps()
    if not steps:
      raise ConfigError(f"finetune.init_from={source} holds no checkpoint")
    saved = checkpointer.saved_config(steps[-1])["model"]
    checkpointer.close()
    config = dataclasses.replace(config, model=model_config(**{**saved, **run_fields}))
    abstract = nnx.to_pure_dict(model_lib.abstract_parameters(config.model))
    abstract = jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), abstract,
                            sharding.parameter_shardings(abstract, mesh))
    _, params = checkpoint.restore_params(dataclasses.replace(config, workdir=source), abstract)
    tokenizer_path = tokenizer_lib.model_path(source)
  elif os.path.isfile(os.path.join(source, "config.json")):
    model_cfg, model = hf.from_hf(source, **run_fields)
    config, params = dataclasses.replace(config, model=model_cfg), model_lib.parameters(model)
    tokenizer_path = os.path.join(source, "spiece.model")
  else:
    raise ConfigError(f"finetune.init_from={source} is neither a workdir of ours (no checkpoints/) nor a Hugging "
                      "Face or FAT5 directory (no config.json)")
  if not os.path.isfile(tokenizer_path):
    raise ConfigError(f"finetune.init_from={source} has no tokenizer ({tokenizer_path}): its weights' ids mean "
                      "nothing without it")
  return config, params, tokenizer_path


def _run_config(config: Config, workdir: str, train_size: int) -> Config:
  """The resolved config the Trainer and the checkpoints read: the fine-tuning optimizer as a `train` section
  (linear decay to 0, no warm-up, one micro-batch), the lengths as a `data` section."""
  ft = config.finetune
  steps = ft.steps or math.ceil(ft.epochs * train_size / ft.batch_size)
  train_config = dataclasses.replace(
      config.train, steps=steps, batch_size=ft.batch_size, grad_accum_steps=1, optimizer=ft.optimizer,
      learning_rate=ft.learning_rate, schedule="linear", warmup_steps=0, min_learning_rate=0.0, seed=ft.seed,
      eval_every=ft.eval_every, keep_checkpoints=1)
  data_config = dataclasses.replace(config.data, encoder_length=ft.input_length, decoder_length=ft.target_length,
                                    decoder_length_buckets=(ft.target_length,))
  return dataclasses.replace(config, workdir=workdir, train=train_config, data=data_config)


class EncoderHeadTrainer(Trainer):
  """The Trainer (state, sharded jitted steps, batches) for an encoder-only head. Its evaluation step also returns
  the logits, which the Evaluator reads as labels, tags or spans."""

  def __init__(self, config: Config, mesh: jax.sharding.Mesh, num_labels: int):
    if config.train.batch_size % mesh.size:
      raise ConfigError(f"finetune.batch_size={config.train.batch_size} is not a multiple of the {mesh.size} devices: "
                        "every device takes as many rows")
    self.head, self.num_labels = config.finetune.head, num_labels
    super().__init__(config, mesh)

  def _fresh_params(self, pretrained: dict | None = None) -> dict:
    return heads.init_parameters(self.config.model, self.head, self.num_labels, self.config.train.seed, pretrained)

  def initial_state(self, pretrained: dict | None):
    """A fresh head over the pretrained embedding and encoder (or over a fresh encoder), placed on the mesh."""
    return jax.jit(lambda p: self._fresh_state(self._fresh_params(p)), out_shardings=self.state_shardings)(pretrained)

  def model(self, params, dropout_key=None) -> heads.EncoderWithHead:
    return model_lib.with_dropout(
        heads.from_parameters(self.config.model, self.head, self.num_labels, params, self.config.train.seed),
        dropout_key)

  def _model_loss(self, model: heads.EncoderWithHead, batch: dict):
    return heads.head_loss(model, batch)

  def _eval_sums(self, params, batch):
    """(metric sums, float32 logits) of a batch."""
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      logits = self.model(params)(batch["encoder_input_tokens"], batch["encoder_segment_ids"])
    return heads.logits_loss(self.head, logits, batch)[1], logits


def _use_tokenizer(tokenizer_path: str, workdir: str) -> str:
  """The weights' tokenizer as {workdir}/tokenizer/spm.model (what export and prediction read); a resumed run must
  find the same file there."""
  path = tokenizer_lib.model_path(workdir)
  if os.path.exists(path):
    if not filecmp.cmp(path, tokenizer_path, shallow=False):
      raise ConfigError(f"{path} differs from the tokenizer of the weights ({tokenizer_path}): this workdir was "
                        "fine-tuned from other weights; set another finetune.workdir")
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  shutil.copyfile(tokenizer_path, path + ".tmp")
  os.replace(path + ".tmp", path)
  return path


def _check_resume(checkpointer: checkpoint.Checkpointer, config: Config, abstract_state: dict):
  """The fine-tuning settings of RESUME_FIELDS (first: they say best what differs), then the pretraining checks
  (architecture, state arrays)."""
  steps = checkpointer.all_steps()
  if not steps:
    return
  as_saved = lambda finetune_config: json.loads(json.dumps(dataclasses.asdict(finetune_config)))  # JSON's types
  ours = as_saved(config.finetune)
  # A field newer than the checkpoint was saved at its default, which keeps the earlier behaviour.
  saved = {**as_saved(FinetuneConfig()), **checkpointer.saved_config(steps[-1]).get("finetune", {})}
  diff = {f"finetune.{k}": (saved.get(k), ours[k]) for k in RESUME_FIELDS if saved.get(k) != ours[k]}
  if diff:
    raise checkpoint.CheckpointMismatchError(
        f"{checkpointer.directory} holds step {steps[-1]} of another fine-tuning (field: saved vs configured): "
        + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
        + ". Either run with the saved settings, or set another finetune.workdir; nothing was changed.")
  checkpointer.check_resume(config, abstract_state)


class Evaluator:
  """Loss and task metrics of a split: text (greedy decoding for seq2seq), label, tag or span predictions scored by
  task_metrics."""

  def __init__(self, config: Config, task: tasks.Task, trainer, tokenizer):
    self.config, self.task, self.trainer, self.tokenizer = config, task, trainer, tokenizer
    self.selection_metric = task_metrics.SELECTION_METRIC[task.kind]

  def batches(self, examples: list[dict]):
    ft = self.config.finetune
    return tasks.batches(examples, self.tokenizer, head=ft.head, rows=ft.batch_size, input_length=ft.input_length,
                         target_length=ft.target_length, seed=ft.seed, shuffle=False)

  def __call__(self, params, examples: list[dict]) -> dict[str, float]:
    seq2seq = self.config.finetune.head == "seq2seq"
    model = self.trainer.model(params) if seq2seq else None
    total, predicted, gold = None, [], []
    for start, batch in zip(range(0, len(examples), self.config.finetune.batch_size), self.batches(examples)):
      real = min(len(examples) - start, self.config.finetune.batch_size)
      if seq2seq:
        sums = self.trainer.eval_step(params, self.trainer.put_batch(batch))
        predicted += self._generate(model, batch)[:real]
      else:
        sums, logits = self.trainer.eval_step(params, self.trainer.put_batch(batch))
        self._read_logits(np.asarray(logits)[:real], {k: v[:real] for k, v in batch.items()}, predicted, gold)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    metrics = {"loss": float(losses.normalize_metrics(total)["loss"])}
    if self.task.kind == "generation":
      metrics.update(task_metrics.generation_metrics(predicted, [example["target"] for example in examples]))
    elif self.task.kind == "question_answering":
      metrics.update(task_metrics.span_metrics(predicted, gold))
    else:
      if seq2seq:  # the generated text is a label when it is one exactly
        label_ids = {label: i for i, label in enumerate(self.task.labels)}
        predicted = [label_ids.get(text.strip(), task_metrics.NO_LABEL) for text in predicted]
        gold = [example["label"] for example in examples]
      metrics.update(task_metrics.classification_metrics(predicted, gold, len(self.task.labels)))
    return metrics

  def _read_logits(self, logits: np.ndarray, batch: dict[str, np.ndarray], predicted: list, gold: list):
    """Appends the predictions and gold answers of a batch's real rows: a label per row (classification), a tag per
    labelled token (token_classification: a word's first piece within the input), a span per row
    (question_answering: the best one over the row's tokens; None as gold when the answer was cut off)."""
    head = self.config.finetune.head
    if head == "classification":
      predicted += np.argmax(logits, axis=-1).tolist()
      gold += batch["labels"].tolist()
    elif head == "token_classification":
      labelled = batch["label_weights"] > 0
      predicted += np.argmax(logits, axis=-1)[labelled].tolist()
      gold += batch["labels"][labelled].tolist()
    else:
      for row_logits, segment_ids, start, end, weight in zip(logits, batch["encoder_segment_ids"],
                                                             batch["start_positions"], batch["end_positions"],
                                                             batch["label_weights"]):
        predicted.append(task_metrics.best_span(row_logits[:, 0], row_logits[:, 1], segment_ids > 0))
        gold.append((int(start), int(end)) if weight > 0 else None)

  def _generate(self, model, batch) -> list[str]:
    segment_ids = jnp.asarray(batch["encoder_segment_ids"])
    tokens = np.asarray(generate.greedy_decode(model, jnp.asarray(batch["encoder_input_tokens"]), segment_ids,
                                               max_length=self.config.finetune.target_length))
    return [self.tokenizer.decode_generated(row) for row in tokens]


def _finetune(config: Config, workdir: str) -> dict:
  ft = config.finetune
  task, splits = _load_splits(config)
  mesh = sharding.make_mesh(config.train)
  config, pretrained, tokenizer_path = _starting_point(config, mesh)
  tokenizer = tokenizer_lib.Tokenizer(_use_tokenizer(tokenizer_path, workdir), config.data.num_sentinels)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids, more than model.vocab_size="
                      f"{config.model.vocab_size}")
  config = _run_config(config, workdir, len(splits["train"]))
  tc = config.train
  if ft.head == "seq2seq":
    trainer = Trainer(config, mesh)
    initial_state = lambda: trainer.init_state() if pretrained is None else _with_optimizer(trainer, pretrained)
  else:
    trainer = EncoderHeadTrainer(config, mesh, len(task.labels))
    initial_state = lambda: trainer.initial_state(pretrained)
  checkpointer = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints)
  _check_resume(checkpointer, config, trainer.abstract_state)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(config), f, indent=1, default=str)
  with open(os.path.join(workdir, LABELS_FILE), "w") as f:
    json.dump(list(task.labels), f, ensure_ascii=False)
  step, state = checkpointer.restore(trainer.abstract_state)
  if step is None:
    state = initial_state()
  else:
    print(f"resumed from step {step} of {checkpointer.directory}")
  evaluate = Evaluator(config, task, trainer, tokenizer)
  writer = MetricWriter(workdir)
  steps_per_epoch = math.ceil(len(splits["train"]) / ft.batch_size)
  start = int(state["step"])
  stop = distributed.StopSignal()
  bar = tqdm(total=tc.steps, initial=start, dynamic_ncols=True, desc="finetune")
  train_batches = None
  try:
    for step in range(start, tc.steps):
      epoch, index = divmod(step, steps_per_epoch)
      if train_batches is None or index == 0:  # each epoch its own order; a resumed run skips what was done
        train_batches = tasks.batches(splits["train"], tokenizer, head=ft.head, rows=ft.batch_size,
                                      input_length=ft.input_length, target_length=ft.target_length,
                                      seed=ft.seed + epoch, shuffle=True)
        for _ in range(index):
          next(train_batches)
      state, metrics = trainer.train_step(state, trainer.put_batch(next(train_batches), micro_batches=1))
      done = step + 1
      if done % tc.log_every == 0 or done == tc.steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        writer.write(done, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
      selection = None
      if done % tc.eval_every == 0 or done == tc.steps:
        eval_metrics = evaluate(state["params"], splits["validation"])
        writer.write(done, "eval", eval_metrics)
        selection = eval_metrics[evaluate.selection_metric]
        bar.write(f"step {done}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
      stopping = stop.should_stop(done)
      if selection is not None or stopping:
        # The Checkpointer keeps the step of lowest `eval_loss`: the negated validation metric keeps the best.
        checkpointer.save(done, state, config=config, tokenizer_path=tokenizer.path,
                          eval_loss=None if selection is None else -selection, force=True)
      bar.update(1)
      if stopping:
        break
  finally:
    bar.close()
    checkpointer.wait()
    writer.close()
    stop.restore()
  if stop.received:
    checkpointer.close()
    raise SystemExit(f"stopped by {stop.received} at step {int(state['step'])}; the same command resumes")
  best_step, best = _best_step(workdir, checkpointer.all_steps(), evaluate.selection_metric)
  _, state = checkpointer.restore({"params": trainer.abstract_state["params"]}, step=best_step)
  params = state["params"]
  checkpointer.close()
  results = {"task": task.name, "head": ft.head, "init_from": ft.init_from, "steps": tc.steps,
             "best_step": best_step, "sizes": {split: len(examples) for split, examples in splits.items()},
             "validation": best, "test": evaluate(params, splits["test"]),
             "baselines": tasks.majority_baseline(task, splits["train"], splits["test"])}
  with open(os.path.join(workdir, checkpoint.RESULTS_FILE), "w") as f:
    json.dump(results, f, indent=1)
  print(results_table(results))
  return results


def _with_optimizer(trainer: Trainer, params: dict) -> dict:
  params = jax.device_put(params, trainer.state_shardings["params"])
  return {"params": params, "opt_state": trainer.init_opt_state(params), "step": jnp.zeros([], jnp.int32)}


def _best_step(workdir: str, saved_steps: list[int], metric: str) -> tuple[int, dict]:
  """(step, validation metrics) of the saved step with the best validation `metric` (the last evaluation of a step
  counts, for a step evaluated again after a resume)."""
  evaluations = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == "eval" and record["step"] in saved_steps:
        evaluations[record["step"]] = {k: v for k, v in record.items() if k not in ("step", "split")}
  if not evaluations:
    raise ConfigError(f"no evaluated checkpoint in {workdir}: nothing to test")
  step = max(evaluations, key=lambda s: (evaluations[s][metric], -s))
  return step, evaluations[step]


def results_table(results: dict) -> str:
  """The test metrics beside the baselines, as a Markdown table."""
  baselines = results["baselines"]
  start = f"from {results['init_from']}" if results["init_from"] else "from scratch"
  lines = [f"{results['task']}, head {results['head']}, {start}: test split ({results['sizes']['test']} examples) "
           f"with the best checkpoint (step {results['best_step']} of {results['steps']})", "",
           _row(["metric", "test", *baselines]), "|---" * (2 + len(baselines)) + "|"]
  for name, value in results["test"].items():
    baseline = [f"{baselines[b]:.4f}" if name == "accuracy" else "" for b in baselines]
    lines.append(_row([name, f"{value:.4f}", *baseline]))
  return "\n".join(lines)


def _row(cells: list[str]) -> str:
  return "| " + " | ".join(cells) + " |"
