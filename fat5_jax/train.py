"""Train state, the jitted and sharded train and eval steps, and the training loop of `main.py`.

The train state is a plain pytree {"params", "opt_state", "step"} created directly sharded on the mesh. A step
takes `grad_accum_steps` micro-batches stacked on a leading axis and scans over them; the dropout key of every
micro-batch derives from (seed, step, micro-batch), so a resumed run computes exactly what a straight run does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fat5_jax import checkpoint, flops, losses, optim, sharding
from fat5_jax.config import Config, ConfigError
from fat5_jax.model import T5, parameters, resolve_kernel_impl
from pallas_kernels.cross_entropy import default_impl as fastest_cross_entropy_impl

log = logging.getLogger(__name__)

# Dense bf16 peak of the chips we know, for MFU (per device).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


class Trainer:
  """Builds the model and optimizer for a config and compiles the steps over a mesh."""

  def __init__(self, config: Config, mesh: jax.sharding.Mesh):
    if config.train.batch_size % mesh.size:
      raise ConfigError(f"train.batch_size={config.train.batch_size} rows cannot be split evenly over the "
                       f"{mesh.size} devices of the mesh")
    self.config, self.mesh = config, mesh
    self.tx = optim.make_optimizer(config.train, config.model.param_dtype)
    self.loss_impl = resolve_kernel_impl(config.model.kernel_impl, fastest_cross_entropy_impl())
    self.schedule = optim.make_schedule(config.train)

    seed = config.train.seed
    new_model = lambda: T5(config.model, rngs=nnx.Rngs(params=seed, dropout=seed))

    def init_state():
      params = parameters(new_model())
      return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros([], jnp.int32)}

    self.graphdef = nnx.split(nnx.eval_shape(new_model), nnx.Param, ...)[0]
    abstract_state = jax.eval_shape(init_state)
    self.state_shardings = sharding.parameter_shardings(abstract_state, mesh)  # moments follow their parameter
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, self.state_shardings)
    self._init = jax.jit(init_state, out_shardings=self.state_shardings)
    # The non-parameter state: the dropout streams, reseeded every step.
    self.rest = jax.jit(lambda: nnx.to_pure_dict(nnx.split(new_model(), nnx.Param, ...)[2]))()
    self.uses_dropout = config.model.dropout_rate > 0
    batch = sharding.batch_sharding(mesh, leading_axes=1)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch),
                              out_shardings=(self.state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_sums, in_shardings=(self.state_shardings["params"],
                                                            sharding.batch_sharding(mesh)))

  def init_state(self):
    return self._init()

  def init_opt_state(self, params):
    """Optimizer state for given parameters (a fine-tuning start from imported weights)."""
    shardings = self.state_shardings["opt_state"]
    return jax.jit(self.tx.init, out_shardings=shardings)(params)

  def model(self, params, dropout_key=None) -> T5:
    """The model over `params`: training mode with dropout drawn from `dropout_key`, else deterministic."""
    model = nnx.merge(self.graphdef, params, self.rest)
    if dropout_key is None:
      model.eval()
    else:
      nnx.reseed(model, dropout=dropout_key)
    return model

  def _loss(self, params, batch, dropout_key=None):
    tc = self.config.train
    model = self.model(params, dropout_key)
    # Packed segments are contiguous with positions restarting at 0, so only FIRE (absolute query positions) needs
    # them; without them the flash kernel takes its faster path.
    positions = lambda key: batch[key] if self.config.model.position_encoding_type == "fire" else None
    encoded = model.encode(batch["encoder_input_tokens"], segment_ids=batch["encoder_segment_ids"],
                           positions=positions("encoder_positions"))
    hidden = model.decode(batch["decoder_input_tokens"], encoded, encoder_segment_ids=batch["encoder_segment_ids"],
                          decoder_segment_ids=batch["decoder_segment_ids"],
                          decoder_positions=positions("decoder_positions"))
    return losses.lm_head_loss(hidden, model.lm_head_kernel(), batch["decoder_target_tokens"],
                               batch["decoder_loss_weights"], z_loss=tc.z_loss, label_smoothing=tc.label_smoothing,
                               impl=self.loss_impl)

  def _train_step(self, state, micro_batches):
    step = state["step"]
    num_micro = jax.tree.leaves(micro_batches)[0].shape[0]
    base_key = jax.random.fold_in(jax.random.key(self.config.train.seed), step)

    def loss_and_grad(params, indexed):
      index, batch = indexed
      key = jax.random.fold_in(base_key, index) if self.uses_dropout else None
      return jax.value_and_grad(self._loss, has_aux=True)(params, batch, key)

    grads, sums = optim.accumulate_gradients(loss_and_grad, state["params"], (jnp.arange(num_micro), micro_batches))
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = losses.normalize_metrics(sums)
    # The schedule counts applied updates only, so skipped (non-finite) steps do not advance it.
    applied = step - optim.skipped_steps(state["opt_state"])
    metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=self.schedule(applied),
                   skipped_steps=optim.skipped_steps(opt_state).astype(jnp.float32))
    return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

  def _eval_sums(self, params, batch):
    return self._loss(params, batch)[1]

  def put_batch(self, batch: dict, *, micro_batches: int | None = None) -> dict:
    """Host numpy rows -> global device arrays, split into micro-batches on a leading axis when asked."""
    if jax.process_count() > 1:
      batch = _pad_decoder_to_global_length(batch)
    if micro_batches is not None:
      batch = {k: v.reshape(micro_batches, v.shape[0] // micro_batches, *v.shape[1:]) for k, v in batch.items()}
    target = sharding.batch_sharding(self.mesh, leading_axes=0 if micro_batches is None else 1)
    return {k: jax.make_array_from_process_local_data(target, np.asarray(v)) for k, v in batch.items()}

  def evaluate(self, params, eval_batches) -> dict:
    total = None
    for batch in eval_batches:
      sums = self.eval_step(params, self.put_batch(batch))
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return {k: float(v) for k, v in losses.normalize_metrics(total).items()}


def _pad_decoder_to_global_length(batch: dict) -> dict:
  """Each process picks its decoder bucket from its own rows: pad every process to the longest (zeros are padding)."""
  from jax.experimental import multihost_utils

  length = batch["decoder_input_tokens"].shape[1]
  longest = int(np.max(multihost_utils.process_allgather(np.asarray(length))))
  pad = lambda v: np.pad(v, [(0, 0), (0, longest - length)]) if v.ndim == 2 else v
  return {k: pad(v) if k.startswith("decoder_") else v for k, v in batch.items()}


def _process_shard() -> dict[str, int]:
  """This process's part of the data: its index and the process count."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def _main_process_first(name: str, fn):
  """Runs `fn` on process 0 (tokenizer training, pre-tokenization), then on the others, which find it cached."""
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return fn()
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return result if jax.process_index() == 0 else fn()


class _StopSignal:
  """Turns SIGTERM / SIGINT (preemption, Ctrl-C) into a flag the loop checks after each step."""

  def __init__(self):
    self.received = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    if self.received is not None:  # a second signal: give up waiting
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    log.warning("%s received: saving a checkpoint, then stopping", self.received)

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _restore_or_init(trainer: Trainer, checkpointer: checkpoint.Checkpointer, data_iterator):
  """Latest checkpoint (full state, or imported parameters with a fresh optimizer), else a new state."""
  step, restored = checkpointer.restore(trainer.abstract_state, data_iterator=data_iterator)
  if step is None:
    return trainer.init_state()
  checkpointer.discard_newer_than(step)
  if "opt_state" not in restored:
    print(f"step {step} holds parameters only (an import): starting a fresh optimizer")
    restored = {"params": restored["params"], "opt_state": trainer.init_opt_state(restored["params"]),
                "step": jnp.asarray(step, jnp.int32)}
  print(f"resumed from step {step} of {checkpointer.directory}")
  return restored


def train(config: Config) -> dict:
  """The main job: data -> sharded training with evaluation and checkpoints -> plot, export, sample predictions."""
  from tqdm import tqdm

  from fat5_jax import data
  from fat5_jax.metrics import MetricWriter

  sharding.initialize_distributed()
  tc, workdir = config.train, config.workdir
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  tokenizer = _main_process_first(
      "tokenizer", lambda: data.load_tokenizer(config.data, workdir, config.model.vocab_size))
  mesh = sharding.make_mesh(tc)
  trainer = Trainer(config, mesh)
  checkpointer = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints)
  checkpointer.check_architecture(config)
  train_iterator = _main_process_first("token cache", lambda: data.make_train_iterator(
      config, tokenizer, **_process_shard()))
  state = _restore_or_init(trainer, checkpointer, train_iterator)
  eval_batches = list(data.make_eval_batches(config, tokenizer, tc.eval_steps, **_process_shard()))
  writer = MetricWriter(workdir, enabled=is_main)
  start = int(state["step"])
  save = lambda eval_loss=None, force=False: checkpointer.save(
      int(state["step"]), state, config=config, tokenizer_path=tokenizer.path, data_iterator=train_iterator,
      eval_loss=eval_loss, force=force)
  stop = _StopSignal()
  peak = peak_flops(jax.devices()[0])
  bar = tqdm(total=tc.steps, initial=start, disable=not is_main, dynamic_ncols=True, desc="train")
  if start == 0:  # the starting point of the validation curve
    writer.write(0, "eval", trainer.evaluate(state["params"], eval_batches))
  window = {"rows": 0, "flops": 0.0, "time": time.perf_counter()}
  tracing = False
  try:
    for step in range(start, tc.steps):
      if tc.profile_steps and step == tc.profile_steps[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        tracing = True
      batch = next(train_iterator)
      rows, decoder_length = batch["decoder_input_tokens"].shape
      state, metrics = trainer.train_step(state, trainer.put_batch(batch, micro_batches=tc.grad_accum_steps))
      window["rows"] += rows * jax.process_count()
      window["flops"] += rows * jax.process_count() * flops.training_flops_per_row(
          config.model, config.data.encoder_length, decoder_length)
      done = step + 1
      if tracing and done == tc.profile_steps[0] + tc.profile_steps[1]:
        jax.profiler.stop_trace()
        tracing = False
      if done % tc.log_every == 0 or done == tc.steps:
        metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
        elapsed = time.perf_counter() - window["time"]
        metrics.update(rows_per_s=window["rows"] / elapsed, tflops_per_s=window["flops"] / elapsed / 1e12,
                       encoder_tokens_per_s=window["rows"] * config.data.encoder_length / elapsed)
        if peak:
          metrics["mfu"] = window["flops"] / elapsed / (peak * jax.device_count())
        window = {"rows": 0, "flops": 0.0, "time": time.perf_counter()}
        writer.write(done, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", rows_s=f"{metrics['rows_per_s']:.0f}",
                        tok_s=f"{metrics['encoder_tokens_per_s']:.0f}")
      eval_loss = None
      if done % tc.eval_every == 0 or done == tc.steps:
        eval_metrics = trainer.evaluate(state["params"], eval_batches)
        writer.write(done, "eval", eval_metrics)
        eval_loss = eval_metrics["loss"]
        bar.write(f"step {done}: eval loss {eval_loss:.4f}, accuracy {eval_metrics['accuracy']:.3f}")
      if done % tc.checkpoint_every == 0 or done == tc.steps or eval_loss is not None or stop.received:
        save(eval_loss, force=stop.received is not None or done == tc.steps)
      bar.update(1)
      if stop.received:
        break
  finally:
    if tracing:
      jax.profiler.stop_trace()
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    stop.restore()
  if stop.received:
    raise SystemExit(f"stopped by {stop.received} at step {int(state['step'])}; the same command resumes")
  # Every process takes part in gathering FSDP-sharded parameters; the main one then exports and predicts.
  params = jax.device_get(jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(state["params"]))
  if is_main:
    _finish(config, trainer, params, tokenizer, eval_batches)
  return state


def _finish(config: Config, trainer: Trainer, params, tokenizer, eval_batches):
  """Loss plot, Hugging Face export (when the architecture has one) and decoded predictions on validation rows."""
  from fat5_jax import generate, hf
  from fat5_jax.metrics import plot_losses

  workdir = config.workdir
  print(f"loss curves: {plot_losses(os.path.join(workdir, 'metrics.jsonl'), os.path.join(workdir, 'loss.png'))}")
  model = trainer.model(params)
  try:
    hf.to_hf(config.model, model, os.path.join(workdir, "hf"))
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


def evaluate_latest(config: Config) -> dict:
  """Evaluation loss of the newest checkpoint on the held-out split."""
  from fat5_jax import data

  tokenizer = data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)
  trainer = Trainer(config, sharding.make_mesh(config.train))
  checkpointer = checkpoint.Checkpointer(config.workdir)
  checkpointer.check_architecture(config)
  step, state = checkpointer.restore({"params": trainer.abstract_state["params"]})
  checkpointer.close()
  if step is None:
    raise SystemExit(f"no checkpoint in {checkpointer.directory}")
  eval_batches = data.make_eval_batches(config, tokenizer, config.train.eval_steps, **_process_shard())
  metrics = trainer.evaluate(state["params"], eval_batches)
  print(json.dumps({"step": step, **metrics}, indent=1))
  return metrics
