"""Train state and the jitted, sharded train and eval steps.

The train state is a plain pytree {"params", "opt_state", "step"} created directly sharded on the mesh. A step
takes `grad_accum_steps` micro-batches stacked on a leading axis and scans over them; the dropout key of every
micro-batch derives from (seed, step, micro-batch), so a resumed run computes exactly what a straight run does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fat5_jax import losses, optim, sharding
from fat5_jax import model as model_lib
from fat5_jax.config import Config, ConfigError
from fat5_jax.ops import ops_for


class Trainer:
  """Builds the model and optimizer for a config and compiles the steps over a mesh."""

  def __init__(self, config: Config, mesh: jax.sharding.Mesh):
    tc = config.train
    if tc.batch_size % mesh.size:
      raise ConfigError(f"train.batch_size={tc.batch_size} rows per micro-batch do not split over the {mesh.size} "
                        f"devices: make it a multiple of {mesh.size}")
    self.config, self.mesh = config, mesh
    self.tx = optim.make_optimizer(config.train, config.model.param_dtype)
    self.ops = ops_for(config.model)  # runs the lm_head loss: the seam picks its kernel, as for the model
    self.schedule = optim.make_schedule(config.train)

    abstract_state = jax.eval_shape(self._fresh_state)
    self.state_shardings = sharding.parameter_shardings(abstract_state, mesh)  # moments follow their parameter
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, self.state_shardings)
    self._init = jax.jit(self._fresh_state, out_shardings=self.state_shardings)
    self.uses_dropout = config.model.dropout_rate > 0
    batch = sharding.batch_sharding(mesh, leading_axes=1)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch),
                              out_shardings=(self.state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_sums, in_shardings=(self.state_shardings["params"],
                                                            sharding.batch_sharding(mesh)))

  def _fresh_params(self) -> dict:
    seed = self.config.train.seed
    return model_lib.parameters(model_lib.T5(self.config.model, rngs=nnx.Rngs(params=seed, dropout=seed)))

  def _fresh_state(self, params=None) -> dict:
    params = self._fresh_params() if params is None else params
    return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros([], jnp.int32)}

  def init_state(self):
    return self._init()

  def init_opt_state(self, params):
    """Optimizer state for given parameters (a fine-tuning start from imported weights)."""
    shardings = self.state_shardings["opt_state"]
    return jax.jit(self.tx.init, out_shardings=shardings)(params)

  def model(self, params, dropout_key=None) -> model_lib.T5:
    """The model over `params`: training mode with dropout drawn from `dropout_key`, else deterministic."""
    tc = self.config.train
    return model_lib.with_dropout(model_lib.from_parameters(self.config.model, params, tc.seed, tc.remat),
                                  dropout_key)

  def _loss(self, params, batch, dropout_key=None):
    # The seam reads the mesh to run each kernel on its device's rows (shard_map) and to keep activations split.
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      # FSDP: each weight is gathered whole where it is used (its gradient reduce-scattered back), so that XLA never
      # chooses to gather the activations instead.
      params = jax.lax.with_sharding_constraint(params,
                                                jax.tree.map(lambda _: sharding.replicated(self.mesh), params))
      return self._model_loss(self.model(params, dropout_key), batch)

  def _model_loss(self, model: model_lib.T5, batch: dict):
    """(loss, metric sums) of the seq2seq batch: the cross-entropy of the decoder's targets."""
    tc = self.config.train
    # Packed segments are contiguous with positions restarting at 0, so only FIRE (absolute query positions) needs
    # them; without them the flash kernel takes its faster path.
    positions = lambda key: batch[key] if self.config.model.position_encoding_type == "fire" else None
    # Unpacked rows (one example or stream chunk each, id 1 then padding) pass their ids as token masks: the
    # attention then masks keys alone (`Ops.attention`).
    ids = lambda key: batch[key] if self.config.data.pack else batch[key] > 0
    encoded = model.encode(batch["encoder_input_tokens"], segment_ids=ids("encoder_segment_ids"),
                           positions=positions("encoder_positions"))
    hidden = model.decode(batch["decoder_input_tokens"], encoded, encoder_segment_ids=ids("encoder_segment_ids"),
                          decoder_segment_ids=ids("decoder_segment_ids"),
                          decoder_positions=positions("decoder_positions"))
    return self.ops.lm_head_loss(hidden, model.lm_head_kernel(), batch["decoder_target_tokens"],
                                 batch["decoder_loss_weights"], z_loss=tc.z_loss, label_smoothing=tc.label_smoothing)

  def _train_step(self, state, micro_batches):
    step = state["step"]
    num_micro = jax.tree.leaves(micro_batches)[0].shape[0]
    base_key = jax.random.fold_in(jax.random.key(self.config.train.seed), step)

    def loss_and_grad(params, indexed):
      index, batch = indexed
      key = jax.random.fold_in(base_key, index) if self.uses_dropout else None
      return jax.value_and_grad(self._loss, has_aux=True)(params, batch, key)

    grads, sums = optim.accumulate_gradients(loss_and_grad, state["params"], (jnp.arange(num_micro), micro_batches))
    with jax.named_scope("optimizer"):  # benchmarks/profile_step.py counts the kernels under it as the update's
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
    """Host numpy rows -> global device arrays, split into micro-batches on a leading axis when asked. Every process
    must give the same shapes (the data layer agrees on the decoder bucket of each batch)."""
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
