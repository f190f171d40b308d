"""AdamWScale (nanoT5 / FAT5) as an Optax transformation, with Kahan-compensated bf16 parameters, schedules,
gradient accumulation and a non-finite-gradient guard.

Everything here is a plain `optax.GradientTransformation` applied with `optax.apply_updates`, so it drops into any
Optax code. `make_optimizer(train_config, param_dtype)` builds the chain a run uses. docs/optim.md has the maths.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from fat5_jax.config import ConfigError, TrainConfig

RMS_FLOOR = 1e-3  # nanoT5: the step of a tensor whose RMS is below this is scaled as if its RMS were this.
NO_DECAY_WORDS = ("norm", "bias", "position")  # RMSNorm scales, relative-bias tables, FIRE/position modules.
LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --------------------------------------------------------------------------------------------------------------------
# AdamWScale
# --------------------------------------------------------------------------------------------------------------------


class AdamWScaleState(NamedTuple):
  count: jax.Array  # int32: updates done so far (the schedule is read at `count`, bias correction uses count + 1).
  mu: Any  # first moments, moment_dtype
  nu: Any  # second moments, moment_dtype
  compensation: Any  # Kahan: what each parameter still owes, in the parameter's dtype; None without Kahan.


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _resolve_mask(mask, params):
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  return mask(params) if callable(mask) else mask


def _kahan_apply(param, compensation, update):
  """Adds the float32 `update` plus what the parameter still owes; returns (update to apply, new compensation).

  The update returned is float32 `target - param` (both bf16). `optax.apply_updates` computes `param + update` in
  float32 and casts back to bf16, which lands exactly on `target`: when the two are of similar size the subtraction
  is exact (Sterbenz; under cancellation `target` sits on `param`'s float32 grid), and otherwise its rounding error
  is a few float32 ulps, far from a bf16 rounding midpoint. A bf16 update would not do: once `target` and `param`
  differ by more than a factor 2 (crossing zero, say) their difference can need more than bf16's 8 bits.
  """
  owed = compensation.astype(jnp.float32) + update
  param32 = param.astype(jnp.float32)
  # Round to the parameter's grid with reduce_precision, not a float32 -> bf16 -> float32 round trip: XLA on a GPU
  # may drop such a round trip (excess precision is allowed by default), which zeroed every compensation there.
  finfo = jnp.finfo(param.dtype)
  target = lax.reduce_precision(param32 + owed, exponent_bits=finfo.nexp, mantissa_bits=finfo.nmant)
  applied = target - param32
  return applied, (owed - applied).astype(compensation.dtype)


def adamw_scale(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                weight_decay: float = 0.0, kahan: bool = False, moment_dtype: Any = jnp.float32,
                weight_decay_mask: Any = None) -> optax.GradientTransformation:
  """AdamWScale: Adam whose step is scaled per tensor by max(1e-3, RMS(parameter)), then decoupled weight decay.

  Matches nanoT5's `AdamWScale.step` (and FAT5's), in its order, per tensor p with gradient g at step t = count + 1:

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    step_size = lr * sqrt(1 - b2^t) / (1 - b1^t) * max(1e-3, RMS(p))       # RMS of p before this step
    p = p - step_size * m / (sqrt(v) + eps)                                 # eps outside the bias correction
    p = p - lr * wd * p                                                     # on the updated p, unscaled lr

  The returned update is float32 and holds both terms. All maths runs in float32 whatever the parameter and moment
  dtypes.

  Args:
    learning_rate: a float or an Optax schedule of the update count.
    b1, b2, eps: Adam's coefficients (nanoT5 / FAT5 defaults).
    weight_decay: decoupled weight decay.
    kahan: keep a compensation buffer per parameter (in its dtype) so that updates below half an ulp of a bf16
      parameter accumulate instead of being rounded away. Meant for bf16/f16 parameters.
    moment_dtype: dtype in which m and v are stored (float32 or bfloat16).
    weight_decay_mask: None (decay everything), a pytree of bools like the params (True: decay), or a callable
      params -> such a pytree, e.g. `decay_mask`.
  """
  return _adam(learning_rate, b1, b2, eps, weight_decay, kahan, moment_dtype, weight_decay_mask, rms_scaled=True)


def adamw(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
          weight_decay: float = 0.0, kahan: bool = False, moment_dtype: Any = jnp.float32,
          weight_decay_mask: Any = None) -> optax.GradientTransformation:
  """Plain AdamW, `torch.optim.AdamW`'s update: no RMS scaling, eps inside the bias correction, and the decay
  applied to the parameter before this step (the same value, as the Adam term does not depend on p):

    p = p - lr * wd * p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

  Same arguments, float32 maths and Kahan option as `adamw_scale`; it exists to check the trainer against
  transformers + PyTorch step for step, and for runs that want the textbook optimizer.
  """
  return _adam(learning_rate, b1, b2, eps, weight_decay, kahan, moment_dtype, weight_decay_mask, rms_scaled=False)


def _adam(learning_rate, b1, b2, eps, weight_decay, kahan, moment_dtype, weight_decay_mask, *,
          rms_scaled: bool) -> optax.GradientTransformation:
  name = "adamw_scale" if rms_scaled else "adamw"
  if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
    raise ValueError(f"{name}: b1 and b2 must be in [0, 1), got b1={b1}, b2={b2}")
  if eps <= 0.0 or weight_decay < 0.0:
    raise ValueError(f"{name}: eps must be > 0 and weight_decay >= 0, got eps={eps}, weight_decay={weight_decay}")
  moment_dtype = jnp.dtype(moment_dtype)
  if not jnp.issubdtype(moment_dtype, jnp.floating):
    raise ValueError(f"{name}: moment_dtype must be a float dtype, got {moment_dtype}")
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), moment_dtype)
    return AdamWScaleState(
        count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params),
        compensation=jax.tree.map(jnp.zeros_like, params) if kahan else None)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError(f"{name} needs the current params: call update(grads, state, params)")
    t = (state.count + 1).astype(jnp.float32)
    lr = jnp.asarray(schedule(state.count), jnp.float32)
    bias_scale = jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
    decays = _resolve_mask(weight_decay_mask, params)

    def leaf(g, m, v, p, decay):
      g = g.astype(jnp.float32)
      m = b1 * m.astype(jnp.float32) + (1.0 - b1) * g
      v = b2 * v.astype(jnp.float32) + (1.0 - b2) * jnp.square(g)
      if rms_scaled:
        step_size = lr * bias_scale * jnp.maximum(RMS_FLOOR, _rms(p))
        update = -step_size * m / (jnp.sqrt(v) + eps)
        if weight_decay:  # nanoT5 decays the already-updated parameter: p' = (p + update)(1 - lr wd).
          update = update - lr * (weight_decay * decay) * (p.astype(jnp.float32) + update)
      else:
        update = -lr / (1.0 - b1 ** t) * m / (jnp.sqrt(v) / jnp.sqrt(1.0 - b2 ** t) + eps)
        if weight_decay:
          update = update - lr * (weight_decay * decay) * p.astype(jnp.float32)
      return update, m.astype(moment_dtype), v.astype(moment_dtype)

    treedef = jax.tree.structure(grads)
    leaves = [treedef.flatten_up_to(tree) for tree in (grads, state.mu, state.nu, params, decays)]
    updates, mu, nu = zip(*map(leaf, *leaves))
    compensation = None
    if kahan:
      updates, compensation = zip(*map(_kahan_apply, leaves[3], treedef.flatten_up_to(state.compensation), updates))
      compensation = treedef.unflatten(compensation)
    new_state = AdamWScaleState(count=optax.safe_increment(state.count), mu=treedef.unflatten(mu),
                                nu=treedef.unflatten(nu), compensation=compensation)
    return treedef.unflatten(updates), new_state

  return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------------------------------
# Weight-decay mask
# --------------------------------------------------------------------------------------------------------------------


def should_decay(path: tuple[str, ...], leaf) -> bool:
  """The weight-decay rule: decay matrices, never norms, biases or position modules.

  A leaf is decayed when it has at least 2 dimensions and no name on its path contains (case-insensitively) one of
  NO_DECAY_WORDS: that spares RMSNorm scales (`*_norm`), the relative-attention-bias tables
  (`relative_attention_bias`) and everything under a `position` module (FIRE's MLP), whatever their shape.
  """
  names = [name.lower() for name in path]
  return jnp.ndim(leaf) >= 2 and not any(word in name for name in names for word in NO_DECAY_WORDS)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def decay_mask(params) -> Any:
  """A pytree of bools like `params`: `should_decay` applied to each leaf's path (as a tuple of names)."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: should_decay(tuple(map(_key_name, path)), leaf), params)


# --------------------------------------------------------------------------------------------------------------------
# Non-finite guard
# --------------------------------------------------------------------------------------------------------------------


class SkipNonFiniteState(NamedTuple):
  skipped: jax.Array  # int32: updates skipped so far because a gradient held a NaN or an Inf.
  inner_state: Any


def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps `inner` so that a gradient with any NaN/Inf (or a norm that overflows float32) yields zero updates and
  leaves `inner`'s state untouched.

  Unlike `optax.apply_if_finite`, it never gives up after consecutive failures (that would write NaNs into the
  parameters) and its zero updates take the dtypes `inner` returns (float32 here, even for bf16 gradients).
  """

  def init(params):
    return SkipNonFiniteState(skipped=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update(grads, state, params=None):
    # One reduction per gradient, the one the clip and the logged norm take too (XLA merges the identical sums): a
    # NaN or Inf anywhere makes the squared norm non-finite (so does a norm above float32's 1.8e19).
    finite = jnp.isfinite(optax.tree.norm(grads, squared=True))
    # Selected, not branched with lax.cond: on a GPU a conditional copies its predicate to the host and waits for
    # the whole backward before the host launches the update's hundreds of small kernels one by one; selects fuse
    # into those kernels, which stay queued (and in command buffers) ahead of the GPU.
    updates, inner_state = inner.update(grads, state.inner_state, params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    return updates, SkipNonFiniteState(skipped=skipped, inner_state=inner_state)

  return optax.GradientTransformation(init, update)


def skipped_steps(opt_state) -> jax.Array:
  """Updates skipped for non-finite gradients so far, read from the state of `make_optimizer`'s chain."""
  found = [s.skipped for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, SkipNonFiniteState))
           if isinstance(s, SkipNonFiniteState)]
  if len(found) != 1:
    raise ValueError(f"expected one skip_non_finite state in the optimizer state, found {len(found)}")
  return found[0]


# --------------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------------


def make_schedule(train_config: TrainConfig) -> optax.Schedule:
  """The learning rate as a function of the update count (0 for the first update).

  Linear warm-up from `warmup_init_fraction * learning_rate` to `learning_rate` over `warmup_steps` (FAT5: from
  0.5x), then, over the remaining steps, decaying to and never below `min_learning_rate`:
    constant: stays at the peak;
    linear: straight line to the floor at `steps`;
    cosine: half cosine to the floor at `steps` (FAT5: CosineAnnealingLR with eta_min 1e-5);
    wsd: warmup-stable-decay: the peak until the last `decay_fraction * steps` steps, then a straight line;
    inverse_sqrt: peak * sqrt(warmup_steps / step) (T5's schedule, shifted to meet the warm-up).
  """
  tc = train_config
  peak, floor, warmup, total = tc.learning_rate, tc.min_learning_rate, tc.warmup_steps, tc.steps
  if tc.schedule == "wsd":
    decay_start = max(warmup, total - max(1, round(tc.decay_fraction * total)))
  elif tc.schedule in ("constant", "linear", "cosine", "inverse_sqrt"):
    decay_start = warmup
  else:
    raise ConfigError(f"train.schedule={tc.schedule!r} is not one of constant, linear, cosine, wsd, inverse_sqrt")
  decay_length = max(1, total - decay_start)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    warm = peak * (tc.warmup_init_fraction + (1.0 - tc.warmup_init_fraction) * step / max(1, warmup))
    progress = jnp.clip((step - decay_start) / decay_length, 0.0, 1.0)
    if tc.schedule == "constant":
      decayed = jnp.full_like(step, peak)
    elif tc.schedule in ("linear", "wsd"):
      decayed = floor + (peak - floor) * (1.0 - progress)
    elif tc.schedule == "cosine":
      decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      decayed = jnp.maximum(floor, peak * jnp.sqrt(max(1, warmup) / jnp.maximum(step, max(1, warmup))))
    return jnp.where(step < warmup, warm, decayed)

  return schedule


# --------------------------------------------------------------------------------------------------------------------
# The chain a run uses
# --------------------------------------------------------------------------------------------------------------------


OPTIMIZERS = {"adamw_scale": adamw_scale, "adamw": adamw}


def make_optimizer(train_config: TrainConfig, param_dtype: Any) -> optax.GradientTransformation:
  """skip_non_finite(clip_by_global_norm -> adamw_scale, or adamw per `train_config.optimizer`) as it asks.

  Kahan compensation is on when the parameters are bf16/f16 and `train_config.kahan`; float32 parameters are their
  own master copy (the model still computes in `model.dtype`). Weight decay follows `decay_mask`.
  """
  kahan = train_config.kahan and jnp.dtype(param_dtype) in LOW_PRECISION
  chain = [optax.clip_by_global_norm(train_config.clip_norm)] if train_config.clip_norm > 0 else []
  chain.append(OPTIMIZERS[train_config.optimizer](
      make_schedule(train_config), b1=train_config.b1, b2=train_config.b2, eps=train_config.eps,
      weight_decay=train_config.weight_decay, kahan=kahan, moment_dtype=train_config.moment_dtype,
      weight_decay_mask=decay_mask))
  return skip_non_finite(optax.chain(*chain))


# --------------------------------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------------------------------


def accumulate_gradients(loss_and_grad_fn: Callable, params, micro_batches) -> tuple[Any, dict]:
  """Mean gradient over real tokens of several micro-batches, summed in a `lax.scan` (one compiled body).

  `loss_and_grad_fn(params, batch) -> ((loss_sum, metric_sums), grads_of_loss_sum)`, e.g.
  `jax.value_and_grad(loss_fn, has_aux=True)` where `loss_fn` returns the *sum* of its per-token losses and a dict
  of sums holding "tokens". `micro_batches` is a pytree whose leaves have a leading micro-batch axis. Gradients are
  summed in float32 and divided once by the total token count, so the result equals one step on the concatenated
  batch. Returns (float32 grads, metric sums over all micro-batches).
  """
  leaves = jax.tree.leaves(micro_batches)
  if not leaves or any(jnp.ndim(x) == 0 or x.shape[0] != leaves[0].shape[0] for x in leaves):
    raise ValueError("accumulate_gradients: micro_batches leaves need one shared leading micro-batch axis")
  first = jax.tree.map(lambda x: x[0], micro_batches)
  (_, metric_shapes), _ = jax.eval_shape(loss_and_grad_fn, params, first)
  if "tokens" not in metric_shapes:
    raise ValueError(f"accumulate_gradients: the metric sums need a 'tokens' entry, got {sorted(metric_shapes)}")
  zeros = lambda s: jnp.zeros(jnp.shape(s), jnp.float32)

  def body(carry, batch):
    grad_sum, metric_sum = carry
    (_, metrics), grads = loss_and_grad_fn(params, batch)
    add = lambda total, x: total + x.astype(jnp.float32)
    return (jax.tree.map(add, grad_sum, grads), jax.tree.map(add, metric_sum, metrics)), None

  carry = (jax.tree.map(zeros, params), jax.tree.map(zeros, metric_shapes))
  (grad_sum, metric_sum), _ = jax.lax.scan(body, carry, micro_batches)
  tokens = metric_sum["tokens"]
  grads = jax.tree.map(lambda g: jnp.where(tokens > 0, g / jnp.maximum(tokens, 1e-9), 0.0), grad_sum)
  return grads, metric_sum
