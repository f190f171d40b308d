"""Run as a script under 8 simulated CPU devices (tests/train/test_sharded.py): for each mesh, the activation
all-gathers in the compiled train step and the loss and gradients against one device, printed as JSON."""

import json
import re
import sys

import jax
import numpy as np

from configs import tiny_fr
from fat5_jax import sharding
from fat5_jax.config import from_config_dict
from fat5_jax.train.trainer import Trainer

ROWS = 24  # equals no model dimension, so a gathered dimension of 24 rows (or 24 x length tokens) is a batch one
ENCODER_LENGTH, DECODER_LENGTH = 64, 32


def config(attention_impl, kernel_backend, data, fsdp):
  c = tiny_fr.get_config()
  c.model.update(d_model=64, d_kv=32, d_ff=128, num_heads=2, num_layers=1, num_decoder_layers=1,
                 attention_impl=attention_impl, kernel_backend=kernel_backend)
  c.data.update(encoder_length=ENCODER_LENGTH, decoder_length=DECODER_LENGTH, decoder_length_buckets=(32,))
  c.train.update(batch_size=ROWS, grad_accum_steps=1, mesh_data=data, mesh_fsdp=fsdp)
  return from_config_dict(c)


def packed_batch(seed=0):
  """Random tokens in two segments per row then padding, as the packer lays them out."""
  rng = np.random.default_rng(seed)

  def segments(length):
    cut, end = sorted(rng.integers(1, length, size=2))
    ids = np.zeros((ROWS, length), np.int32)
    ids[:, :cut], ids[:, cut:end] = 1, 2
    return np.where(np.arange(length) < rng.integers(cut + 1, length + 1, size=(ROWS, 1)), ids, 0)

  enc, dec = segments(ENCODER_LENGTH), segments(DECODER_LENGTH)
  tokens = lambda ids: np.where(ids > 0, rng.integers(3, 4000, size=ids.shape), 0).astype(np.int32)
  return {"encoder_input_tokens": tokens(enc), "encoder_segment_ids": enc, "decoder_input_tokens": tokens(dec),
          "decoder_target_tokens": tokens(dec), "decoder_segment_ids": dec,
          "decoder_loss_weights": (dec > 0).astype(np.float32)}


def activation_gathers(hlo: str) -> list[str]:
  """Result shapes of all-gathers with the global rows or tokens as a dimension and >= 8 values per token."""
  batch_dims = {ROWS, ROWS * ENCODER_LENGTH, ROWS * DECODER_LENGTH}
  found = []
  for line in hlo.splitlines():
    if "all-gather(" not in line and "all-gather-start(" not in line:
      continue
    for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", line.split("=", 1)[1].split("all-gather")[0]):
      shape = [int(d) for d in dims.split(",") if d]
      for axis, size in enumerate(shape):
        tokens = size if size != ROWS else size * (shape[axis + 1] if axis + 1 < len(shape) else 1)
        if size in batch_dims and np.prod(shape) // tokens >= 8:
          found.append(f"[{dims}]")
          break
  return found


def main(attention_impl, kernel_backend, meshes):
  batch = packed_batch()
  one = Trainer(config(attention_impl, kernel_backend, 1, 1), jax.sharding.Mesh(np.array(jax.devices()[:1])
                                                                                .reshape(1, 1), sharding.BATCH_AXES))
  params = one.init_state()["params"]
  grad = lambda trainer: jax.jit(jax.value_and_grad(trainer._loss, has_aux=True))
  (loss, _), grads = grad(one)(params, one.put_batch(batch))
  host_grads = jax.device_get(grads)
  results = {}
  for data, fsdp in meshes:
    trainer = Trainer(config(attention_impl, kernel_backend, data, fsdp), sharding.make_mesh(
        config(attention_impl, kernel_backend, data, fsdp).train))
    state = trainer.init_state()
    micro = trainer.put_batch(batch, micro_batches=1)
    hlo = trainer.train_step.lower(state, micro).compile().as_text()
    sharded_params = jax.device_put(params, trainer.state_shardings["params"])
    (sharded_loss, _), sharded_grads = grad(trainer)(sharded_params, trainer.put_batch(batch))
    grad_error = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                     for a, b in zip(jax.tree.leaves(jax.device_get(sharded_grads)), jax.tree.leaves(host_grads)))
    results[f"data={data},fsdp={fsdp}"] = {
        "activation_gathers": activation_gathers(hlo), "loss": float(sharded_loss), "one_device_loss": float(loss),
        "max_relative_grad_error": grad_error}
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], [tuple(int(n) for n in m.split("x")) for m in sys.argv[3:]])
