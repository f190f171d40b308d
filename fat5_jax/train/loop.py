"""The training loop of `main.py`, its end (loss plot, Hugging Face export, sample predictions), and evaluation of
the latest checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fat5_jax import checkpoint, data, flops, generate, hf, optim, sharding
from fat5_jax.config import Config
from fat5_jax.data import packing, pipeline
from fat5_jax.metrics import MetricWriter, SkippedRun, WindowMeans, plot_losses
from fat5_jax.train import distributed, workdir_lock
from fat5_jax.train.trainer import Trainer


class Diverged(SystemExit):
  """Training went non-finite: the run stops with this message and a non-zero exit, exporting nothing."""


def _restore_or_init(trainer: Trainer, checkpointer: checkpoint.Checkpointer, data_iterator):
  """Latest checkpoint (full state, or imported parameters with a fresh optimizer), else a new state. Damaged newer
  steps are renamed aside by the restore, so the steps this run saves cannot collide with them."""
  step, restored = checkpointer.restore(trainer.abstract_state, data_iterator=data_iterator)
  if step is None:
    return trainer.init_state()
  if "opt_state" not in restored:
    print(f"step {step} holds parameters only (an import): starting a fresh optimizer")
    restored = {"params": restored["params"], "opt_state": trainer.init_opt_state(restored["params"]),
                "step": jnp.asarray(step, jnp.int32)}
  print(f"resumed from step {step} of {checkpointer.directory}")
  return restored


class ThroughputWindow:
  """Rows and training FLOPs per second over a logging window: the counted rows over the window's wall time, less
  the time spent outside training steps (evaluation, checkpoint saves) and in steps that compile (a new decoder
  length: the first step, and the first of each other bucket), whose rows are not counted either. Each excluded
  span starts once the steps before it are done, so the window times exactly its counted steps, as the device ran
  them. FLOPs count every position, padding included (FAT5's accounting); `encoder_fill` is the share of encoder
  positions that held tokens: the attention kernels skip the key tiles of padding, so rows far from full train
  faster than full ones."""

  def __init__(self):
    self.rows, self.flops, self.filled_rows, self.excluded, self.start = 0, 0.0, 0.0, 0.0, time.perf_counter()

  def add(self, rows: int, flops: float, encoder_fill: float) -> None:
    self.rows += rows
    self.flops += flops
    self.filled_rows += rows * encoder_fill

  @contextlib.contextmanager
  def excluding(self, state):
    jax.block_until_ready(state)  # the steps so far belong to the window
    begin = time.perf_counter()
    try:
      yield
    finally:
      self.excluded += time.perf_counter() - begin

  def rates(self, encoder_length: int, peak_flops: float | None) -> dict[str, float]:
    """The window's throughput metrics (none when all its steps compiled), then a fresh window."""
    elapsed = time.perf_counter() - self.start - self.excluded
    out = {}
    if self.rows:
      out.update(rows_per_s=self.rows / elapsed, tflops_per_s=self.flops / elapsed / 1e12,
                 encoder_tokens_per_s=self.rows * encoder_length / elapsed, encoder_fill=self.filled_rows / self.rows)
      if peak_flops:
        out["mfu"] = self.flops / elapsed / (peak_flops * jax.device_count())
    self.__init__()
    return out


def _with_resolved_workers(config: Config, checkpointer: checkpoint.Checkpointer) -> Config:
  """The config with data.num_workers resolved (pipeline.resolve_num_workers), printed once: the saved config and
  config.json record the count, so that a resume with -1 keeps it."""
  newest = checkpointer.newest_readable()  # the step a resume restores
  saved = newest[1]["data"]["num_workers"] if newest is not None and "data" in newest[2] else None
  workers = pipeline.resolve_num_workers(config.data.num_workers, saved)
  if jax.process_index() == 0:
    how = "configured" if config.data.num_workers >= 0 else "as saved" if saved is not None else "auto"
    print(f"data.num_workers={workers} ({how}): Grain worker processes of the train batches")
  return dataclasses.replace(config, data=dataclasses.replace(config.data, num_workers=workers))


def train(config: Config) -> dict:
  """The main job: data -> sharded training with evaluation and checkpoints -> plot, export, sample predictions."""
  distributed.initialize()
  with workdir_lock.held(config.workdir, enabled=jax.process_index() == 0):
    return _train(config)


def _train(config: Config) -> dict:
  tc, workdir = config.train, config.workdir
  is_main = jax.process_index() == 0
  tokenizer = distributed.main_process_first(
      "tokenizer", lambda: data.load_tokenizer(config.data, workdir, config.model.vocab_size))
  mesh = sharding.make_mesh(tc)
  trainer = Trainer(config, mesh)
  checkpointer = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints)
  checkpointer.check_resume(config, trainer.abstract_state)  # before the token cache: a refusal changes nothing
  config = _with_resolved_workers(config, checkpointer)
  if is_main:  # the resolved config of the run (main.py prints it only with --verbose)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(dataclasses.asdict(config), f, indent=1, default=str)
  train_iterator = distributed.main_process_first("token cache", lambda: data.make_train_iterator(
      config, tokenizer, **distributed.process_shard()))
  state = _restore_or_init(trainer, checkpointer, train_iterator)
  eval_batches = _eval_batches(config, tokenizer)
  train_decoder_lengths = distributed.DecoderLengths("train")

  def prepare(batch: dict) -> tuple[dict, int, int, float]:
    """Host rows -> (device batch, rows, decoder length, share of encoder positions holding tokens), the decoder
    length agreed between processes first."""
    [batch] = train_decoder_lengths([batch])
    return (trainer.put_batch(batch, micro_batches=tc.grad_accum_steps), *batch["decoder_input_tokens"].shape,
            1.0 - packing.padding_fractions(batch)["encoder_padding"])

  train_batches = pipeline.DevicePrefetch(train_iterator, prepare)
  writer = MetricWriter(workdir, enabled=is_main)
  start = int(state["step"])
  save = lambda eval_loss=None, force=False: checkpointer.save(
      int(state["step"]), state, config=config, tokenizer_path=tokenizer.path, data_iterator=train_batches,
      eval_loss=eval_loss, force=force)
  stop = distributed.StopSignal()
  peak = flops.peak_flops(jax.devices()[0])
  bar = tqdm(total=tc.steps, initial=start, disable=not is_main, dynamic_ncols=True, desc="train")
  if start == 0:  # the starting point of the validation curve
    writer.write(0, "eval", trainer.evaluate(state["params"], eval_batches))
  train_batches.prefetch()  # the pipeline's start-up (worker processes, first batch) stays out of the first window
  window, compiled_lengths = ThroughputWindow(), set()
  # A copy: the state is donated to the first step.
  window_means, skipped_run = WindowMeans(), SkippedRun(jnp.copy(optim.skipped_steps(state["opt_state"])))
  tracing = False
  try:
    for step in range(start, tc.steps):
      if tc.profile_steps and step == tc.profile_steps[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        tracing = True
      batch, rows, decoder_length, encoder_fill = next(train_batches)
      if decoder_length in compiled_lengths:
        state, metrics = trainer.train_step(state, batch)
        rows *= jax.process_count()
        window.add(rows, rows * flops.training_flops_per_row(config.model, config.data.encoder_length,
                                                            decoder_length), encoder_fill)
      else:
        with window.excluding(state):
          state, metrics = trainer.train_step(state, batch)
          jax.block_until_ready(state)
        compiled_lengths.add(decoder_length)
      done = step + 1
      if done < tc.steps:
        train_batches.prefetch()  # while the step runs
      window_means.add(metrics)
      skipped_run.add(metrics)
      checkpointer.check_saves()
      if tracing and done == tc.profile_steps[0] + tc.profile_steps[1]:
        jax.profiler.stop_trace()
        tracing = False
      if done % tc.log_every == 0 or done == tc.steps:
        metrics = window_means.means()  # waits for the window's steps
        metrics.update(window.rates(config.data.encoder_length, peak))
        writer.write(done, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", rows_s=f"{metrics.get('rows_per_s', 0):.0f}",
                        tok_s=f"{metrics.get('encoder_tokens_per_s', 0):.0f}",
                        fill=f"{metrics.get('encoder_fill', 0):.0%}")
        if tc.max_nonfinite_steps and int(skipped_run.length) >= tc.max_nonfinite_steps:
          raise Diverged(f"diverged: the last {int(skipped_run.length)} updates were skipped for non-finite "
                         f"gradients (train.max_nonfinite_steps={tc.max_nonfinite_steps}) at step {done}; the "
                         "checkpoints are kept; lower train.learning_rate or raise train.warmup_steps")
      eval_loss = None
      if done % tc.eval_every == 0 or done == tc.steps:
        with window.excluding(state):
          eval_metrics = trainer.evaluate(state["params"], eval_batches)
        writer.write(done, "eval", eval_metrics)
        eval_loss = eval_metrics["loss"]
        if not np.isfinite(eval_loss):
          raise Diverged(f"diverged: the evaluation loss at step {done} is {eval_loss}; the checkpoints are kept; "
                         "lower train.learning_rate or raise train.warmup_steps")
        bar.write(f"step {done}: eval loss {eval_loss:.4f}, accuracy {eval_metrics['accuracy']:.3f}")
      stopping = stop.should_stop(done)
      if done % tc.checkpoint_every == 0 or done == tc.steps or eval_loss is not None or stopping:
        with window.excluding(state):
          save(eval_loss, force=stopping or done == tc.steps)
      bar.update(1)
      if stopping:
        break
  finally:
    if tracing:
      jax.profiler.stop_trace()
    bar.close()
    train_batches.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    stop.restore()
  if stop.received:
    raise SystemExit(f"stopped by {stop.received} at step {int(state['step'])}; the same command resumes")
  # Every process takes part in gathering the sharded parameters; the main one then exports and predicts.
  params = distributed.gather_to_main_process(state["params"])
  if is_main:
    _finish(config, trainer, params, tokenizer, eval_batches)
  return state


def _finish(config: Config, trainer: Trainer, params, tokenizer, eval_batches):
  """Loss plot, Hugging Face export (when the architecture has one) and decoded predictions on validation rows."""
  workdir = config.workdir
  print(f"loss curves: {plot_losses(os.path.join(workdir, 'metrics.jsonl'), os.path.join(workdir, 'loss.png'))}")
  model = trainer.model(params)
  try:
    hf.to_hf(config.model, model, os.path.join(workdir, "hf"), tokenizer=tokenizer)
    print(f"Hugging Face export: {os.path.join(workdir, 'hf')}")
  except ValueError as reason:  # e.g. ALiBi or RoPE: transformers' T5 has only the bucketed bias
    print(f"no Hugging Face export: {reason}")
  batch = eval_batches[0]
  first = [int(i) for i in np.flatnonzero(batch["encoder_segment_ids"][:, 0])[:3]]
  for row in first:
    # The first segment of a packed row, on its own.
    length = int(np.sum(batch["encoder_segment_ids"][row] == 1))
    inputs = batch["encoder_input_tokens"][row:row + 1, :length]
    predicted = generate.greedy_decode(model, jnp.asarray(inputs), jnp.ones_like(inputs),
                                       max_length=config.data.decoder_length_buckets[0])
    target = batch["decoder_target_tokens"][row][batch["decoder_segment_ids"][row] == 1]
    print(f"input:     {tokenizer.decode(inputs[0].tolist())}\n"
          f"target:    {tokenizer.decode(target.tolist())}\n"
          f"predicted: {tokenizer.decode(np.asarray(predicted[0]).tolist())}\n")


def _eval_batches(config: Config, tokenizer: data.Tokenizer) -> list[dict]:
  """This process's validation batches, the same shapes on every process (agreed once, host to host)."""
  batches = distributed.main_process_first("validation cache", lambda: data.make_eval_batches(
      config, tokenizer, config.train.eval_steps, **distributed.process_shard()))
  return distributed.DecoderLengths("eval")(batches)


def evaluate_latest(config: Config) -> dict:
  """Evaluation loss of the newest checkpoint on the held-out split (printed by process 0)."""
  distributed.initialize()
  tokenizer = distributed.main_process_first(
      "tokenizer", lambda: data.load_tokenizer(config.data, config.workdir, config.model.vocab_size))
  trainer = Trainer(config, sharding.make_mesh(config.train))
  step, params = checkpoint.restore_params(config, trainer.abstract_state["params"])
  metrics = trainer.evaluate(params, _eval_batches(config, tokenizer))
  if jax.process_index() == 0:
    print(json.dumps({"step": step, **metrics}, indent=1))
  return metrics
