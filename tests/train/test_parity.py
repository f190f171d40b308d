"""Our whole training step against an independent implementation: a fresh model exported to Hugging Face and
trained by transformers' PyTorch T5 on the same unpacked rows, 20 steps, with the same optimizer (torch.optim.AdamW
for train.optimizer=adamw; a PyTorch restatement of nanoT5's AdamWScale for the default)."""

import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fat5_jax import config as config_lib, hf, sharding  # noqa: E402
from fat5_jax import model as model_lib  # noqa: E402
from fat5_jax.train import Trainer  # noqa: E402

STEPS, ROWS, ENCODER_LENGTH, DECODER_LENGTH, VOCAB = 20, 4, 12, 8, 128
Z_LOSS, WEIGHT_DECAY, B1, B2, EPS = 1e-4, 0.01, 0.9, 0.999, 1e-6
NO_DECAY_WORDS = ("layer_norm", "relative_attention_bias")  # Hugging Face's names of what our decay mask spares


def _config(optimizer: str, learning_rate: float) -> config_lib.Config:
  values = config_lib.to_config_dict()
  values.model.update(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                      param_dtype="float32", dtype="float32", attention_impl="xla", kernel_backend="xla")
  values.data.update(tokenizer_vocab_size=VOCAB, num_sentinels=8, encoder_length=ENCODER_LENGTH,
                     decoder_length=DECODER_LENGTH, decoder_length_buckets=(DECODER_LENGTH,))
  # Float32 parameters, no clipping, a constant rate: what is compared is the model, the loss and the optimizer.
  values.train.update(optimizer=optimizer, learning_rate=learning_rate, schedule="constant", warmup_steps=0,
                      batch_size=ROWS, grad_accum_steps=1, clip_norm=0.0, weight_decay=WEIGHT_DECAY, b1=B1, b2=B2,
                      eps=EPS, z_loss=Z_LOSS, label_smoothing=0.0, kahan=False, steps=STEPS)
  return config_lib.from_config_dict(values)


def _unpacked_batch(rng) -> dict:
  """Rows of one example each, of random lengths, padded at the end (token 0): the trainer's batch layout."""
  def rows(length, minimum):
    lengths = rng.integers(minimum, length + 1, size=ROWS)
    segment_ids = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return rng.integers(2, VOCAB, size=(ROWS, length)).astype(np.int32) * segment_ids, segment_ids

  inputs, encoder_segment_ids = rows(ENCODER_LENGTH, 3)
  targets, decoder_segment_ids = rows(DECODER_LENGTH, 2)
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0))) * decoder_segment_ids  # shifted right, start token 0
  positions = lambda segment_ids: (np.cumsum(segment_ids, axis=1) - 1) * segment_ids
  return dict(encoder_input_tokens=inputs, encoder_segment_ids=encoder_segment_ids,
              encoder_positions=positions(encoder_segment_ids), decoder_input_tokens=decoder_inputs,
              decoder_target_tokens=targets, decoder_segment_ids=decoder_segment_ids,
              decoder_positions=positions(decoder_segment_ids),
              decoder_loss_weights=decoder_segment_ids.astype(np.float32))


def _torch_loss(reference, batch) -> "torch.Tensor":
  """Our loss restated: per real target token lse - logit[target] + z_loss * lse^2, summed and divided by the
  number of real target tokens (not by the rows)."""
  tensor = lambda key: torch.as_tensor(batch[key], dtype=torch.long)
  logits = reference(input_ids=tensor("encoder_input_tokens"), attention_mask=tensor("encoder_segment_ids"),
                     decoder_input_ids=tensor("decoder_input_tokens"),
                     decoder_attention_mask=tensor("decoder_segment_ids")).logits.float()
  lse = torch.logsumexp(logits, dim=-1)
  target_logit = torch.gather(logits, -1, tensor("decoder_target_tokens")[..., None])[..., 0]
  weights = torch.as_tensor(batch["decoder_loss_weights"])
  return torch.sum(weights * (lse - target_logit + Z_LOSS * lse ** 2)) / torch.sum(weights)


class TorchAdamWScale(torch.optim.Optimizer):
  """nanoT5's AdamWScale, restated: Adam with bias correction, eps outside it, the step scaled by
  max(1e-3, RMS(p)) of the parameter before the step, then decay of the updated parameter."""

  def __init__(self, params, lr, betas, eps, weight_decay):
    super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      (b1, b2), lr = group["betas"], group["lr"]
      for p in group["params"]:
        state = self.state[p]
        if not state:
          state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        state["step"] += 1
        t, m, v = state["step"], state["m"], state["v"]
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * max(1e-3, p.pow(2).mean().sqrt().item())
        p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
        p.add_(p, alpha=-lr * group["weight_decay"])


def _parameter_groups(reference):
  """Our decay mask in Hugging Face's names: matrices decay, norms and the relative-bias tables do not."""
  decays = lambda name: not any(word in name for word in NO_DECAY_WORDS)
  named = list(reference.named_parameters())
  return [{"params": [p for n, p in named if decays(n)], "weight_decay": WEIGHT_DECAY},
          {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]


@pytest.mark.parametrize("optimizer,learning_rate", [("adamw", 2e-3), ("adamw_scale", 2e-2)])
def test_training_matches_transformers_step_for_step(optimizer, learning_rate, tmp_path):
  config = _config(optimizer, learning_rate)
  trainer = Trainer(config, sharding.make_mesh(config.train, jax.devices()[:1]))
  state = trainer.init_state()
  fresh = model_lib.from_parameters(config.model, jax.device_get(state["params"]))
  hf.to_hf(config.model, fresh, str(tmp_path))
  reference = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path), torch_dtype=torch.float32)
  reference.train()
  groups = _parameter_groups(reference)
  if optimizer == "adamw":
    torch_optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(B1, B2), eps=EPS)
  else:
    torch_optimizer = TorchAdamWScale(groups, lr=learning_rate, betas=(B1, B2), eps=EPS, weight_decay=WEIGHT_DECAY)

  rng = np.random.default_rng(0)
  ours, theirs = [], []
  for _ in range(STEPS):
    batch = _unpacked_batch(rng)
    state, metrics = trainer.train_step(state, trainer.put_batch(batch, micro_batches=1))
    ours.append(float(metrics["loss"]))
    torch_optimizer.zero_grad()
    loss = _torch_loss(reference, batch)
    loss.backward()
    torch_optimizer.step()
    theirs.append(loss.item())

  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours[-1] < ours[0] - 0.05  # it trained: the comparison is not between two frozen models
  np.testing.assert_allclose(ours, theirs, rtol=1e-4)
  trained = hf.tensors_from_params(config.model, model_lib.from_parameters(
      config.model, jax.device_get(state["params"])), "hf")
  initial = hf.tensors_from_params(config.model, fresh, "hf")
  for name, parameter in reference.state_dict().items():
    if name not in trained:  # the embedding's aliases in the stacks
      continue
    moved = np.abs(trained[name] - initial[name]).max()
    error = np.abs(trained[name] - parameter.numpy()).max()
    # Measured: below 1e-4 of what the weights moved, 1.1e-3 for the embedding, whose rare tokens' near-zero
    # gradients make Adam's m / sqrt(v) sensitive to the last bits.
    assert error <= 1e-2 * moved + 1e-6, name
