"""The jitted train step: accumulation, sharding over a mesh, metrics. Uses random packed batches (no corpus)."""

import importlib
import json
import os
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from fat5_jax import config as config_lib, flops, sharding
from fat5_jax.config import ConfigError
from fat5_jax.train import Trainer, distributed, local_job

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(model_overrides=None, **train_overrides):
  values = importlib.import_module("configs.tiny_fr").get_config()
  # One layer each: what these tests check (accumulation, sharding, dropout, the update) does not depend on depth,
  # and a second layer nearly doubles each compilation (a train step: 7.8 s, 14.0 s with two).
  values.model.update(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=1, num_decoder_layers=1,
                      **(model_overrides or {}))
  values.data.update(tokenizer_vocab_size=512, encoder_length=32, decoder_length=16, decoder_length_buckets=(16,))
  values.train.update({"batch_size": 16, "grad_accum_steps": 1, "warmup_steps": 2, "learning_rate": 1e-2,
                       **train_overrides})
  return config_lib.from_config_dict(values)


def random_packed_batch(seed, rows, encoder_length, decoder_length, vocab):
  """Rows holding two segments each, with per-segment positions and a padded tail."""
  rng = np.random.default_rng(seed)

  def segments(length):
    cut = rng.integers(2, length - 3, size=rows)
    end = rng.integers(cut + 2, length + 1)
    index = np.arange(length)[None, :]
    ids = np.where(index < cut[:, None], 1, np.where(index < end[:, None], 2, 0)).astype(np.int32)
    positions = np.where(ids == 2, index - cut[:, None], index) * (ids > 0)
    return ids, positions.astype(np.int32)

  enc_ids, enc_pos = segments(encoder_length)
  dec_ids, dec_pos = segments(decoder_length)
  tokens = lambda length: rng.integers(2, vocab, size=(rows, length)).astype(np.int32)
  return dict(encoder_input_tokens=tokens(encoder_length) * (enc_ids > 0), encoder_segment_ids=enc_ids,
              encoder_positions=enc_pos, decoder_input_tokens=tokens(decoder_length) * (dec_ids > 0),
              decoder_target_tokens=tokens(decoder_length) * (dec_ids > 0), decoder_segment_ids=dec_ids,
              decoder_positions=dec_pos, decoder_loss_weights=(dec_ids > 0).astype(np.float32))


def make_trainer(config, devices=None):
  return Trainer(config, sharding.make_mesh(config.train, devices))


@pytest.fixture(scope="module")
def trainer():
  """tiny_config()'s Trainer, shared: the tests that run its train step compile it once (8 s on 2 cores)."""
  return make_trainer(tiny_config())


def run_steps(trainer, batches):
  state = trainer.init_state()
  history = []
  micro_batches = trainer.config.train.grad_accum_steps
  for batch in batches:
    state, metrics = trainer.train_step(state, trainer.put_batch(batch, micro_batches=micro_batches))
    history.append({k: float(v) for k, v in metrics.items()})
  return jax.device_get(state["params"]), history


def test_accumulating_four_micro_batches_equals_one_concatenated_step(trainer):
  batch = random_packed_batch(0, 16, 32, 16, 512)
  assert trainer.config.train.grad_accum_steps == 1
  params_one, metrics_one = run_steps(trainer, [batch])
  params_four, metrics_four = run_steps(make_trainer(tiny_config(grad_accum_steps=4)), [batch])
  chex.assert_trees_all_close(params_four, params_one, atol=2e-6, rtol=1e-5)
  for key in ("loss", "accuracy", "tokens", "grad_norm", "z_loss"):
    np.testing.assert_allclose(metrics_four[0][key], metrics_one[0][key], rtol=1e-5)
  assert metrics_one[0]["tokens"] == batch["decoder_loss_weights"].sum()


def test_training_reduces_loss_on_a_repeated_batch(trainer):
  batch = random_packed_batch(1, 16, 32, 16, 512)
  _, history = run_steps(trainer, [batch] * 12)
  assert history[-1]["loss"] < 0.7 * history[0]["loss"], [h["loss"] for h in history]
  assert all(h["skipped_steps"] == 0 for h in history)
  assert history[0]["learning_rate"] < history[2]["learning_rate"]  # warm-up


def test_the_update_reduces_each_parameter_and_its_gradient_once(trainer):
  """The optimizer's reductions in the compiled step: per parameter its gradient's squared sum (shared by the
  non-finite guard, the clip and the logged norm) and its own RMS, no more. On a GPU each is a kernel launch of its
  own, and the small_fr step's launches take host time (benchmarks/README.md, "Long context")."""
  state = trainer.init_state()
  batch = trainer.put_batch(random_packed_batch(0, 16, 32, 16, 512), micro_batches=1)
  hlo = trainer.train_step.lower(state, batch).compile().as_text()
  reductions = [line for line in hlo.splitlines() if " reduce(" in line and "/optimizer/" in line]
  assert len(reductions) == 2 * len(jax.tree.leaves(state["params"]))


def test_parameter_specs_shard_large_tensors_only():
  assert sharding.parameter_spec((512, 2048), 2) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding.parameter_spec((512,), 2) == jax.sharding.PartitionSpec()
  assert sharding.parameter_spec((32, 8), 8) == jax.sharding.PartitionSpec()
  assert sharding.parameter_spec((1000, 999), 8) == jax.sharding.PartitionSpec("fsdp", None)  # 999 % 8 != 0
  assert sharding.parameter_spec((999, 999), 8) == jax.sharding.PartitionSpec()


def test_mesh_must_cover_the_devices_and_the_hint_fits_the_case():
  devices = [jax.devices()[0]] * 8  # the mesh is only shaped, never used
  with pytest.raises(ConfigError, match="does not cover the 8 devices: set train.mesh_data=-1"):
    sharding.make_mesh(tiny_config(mesh_data=3, mesh_fsdp=1).train, devices)
  with pytest.raises(ConfigError, match="does not cover the 8 devices: train.mesh_fsdp must divide"):
    sharding.make_mesh(tiny_config(mesh_data=-1, mesh_fsdp=3).train, devices)


def test_each_micro_batch_splits_over_the_devices_whatever_the_accumulation():
  make_trainer(tiny_config(batch_size=6, grad_accum_steps=4))  # 6 rows a micro-batch, 4 micro-batches a step
  devices = [jax.devices()[0]] * 4  # the mesh is only shaped: the check comes before anything runs on it
  with pytest.raises(ConfigError, match=r"^train\.batch_size=6 rows per micro-batch do not split over the 4 devices"):
    make_trainer(tiny_config(batch_size=6), devices)


def test_flops_per_row_of_small_fr_matches_the_reference():
  config = config_lib.from_config_dict(importlib.import_module("configs.small_fr").get_config())
  assert flops.training_flops_per_row(config.model, 512, 512) == pytest.approx(448e9, rel=1e-3)


def _max_error(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def _sharded_run(mesh_data, mesh_fsdp, workdir):
  """On the 8 simulated devices: two steps on `mesh_data x mesh_fsdp` and on one device (max parameter error), and
  a single-device checkpoint restored onto the mesh (max error, and whether it came back sharded)."""
  from fat5_jax import checkpoint

  batches = [random_packed_batch(seed, 16, 32, 16, 512) for seed in (3, 4)]
  single = make_trainer(tiny_config(grad_accum_steps=2), jax.devices()[:1])
  reference, ref_history = run_steps(single, batches)
  config = tiny_config(grad_accum_steps=2, mesh_data=mesh_data, mesh_fsdp=mesh_fsdp)
  mesh_trainer = make_trainer(config)
  sharded, history = run_steps(mesh_trainer, batches)

  saved = single.init_state()
  checkpointer = checkpoint.Checkpointer(workdir)
  checkpointer.save(0, saved, config=config, force=True)
  checkpointer.wait()
  _, restored = checkpointer.restore(mesh_trainer.abstract_state)
  head = restored["params"]["lm_head"]  # large enough to be sharded
  return {"max_param_error": _max_error(reference, sharded), "loss": [h["loss"] for h in history],
          "ref_loss": [h["loss"] for h in ref_history], "restore_error": _max_error(saved, restored),
          "restored_devices": len(head.sharding.device_set), "restored_spec": str(head.sharding.spec)}


@pytest.mark.parametrize("mesh_data,mesh_fsdp", [(4, 2)])  # both axes; tests/train/test_sharded.py runs 1x8 too
def test_sharded_step_matches_single_device_and_restores_resharded(mesh_data, mesh_fsdp, tmp_path):
  env = dict(os.environ, **local_job.simulated_cpu_devices(8))
  code = ("import json; from tests.train import test_train as t; "
          f"print(json.dumps(t._sharded_run({mesh_data}, {mesh_fsdp}, {str(tmp_path)!r})))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["max_param_error"] < 1e-5, result
  np.testing.assert_allclose(result["loss"], result["ref_loss"], rtol=1e-5)
  assert result["restore_error"] == 0.0 and result["restored_devices"] == 8, result
  assert "fsdp" in result["restored_spec"], result


def test_dropout_trains_stochastically_and_evaluates_deterministically():
  trainer = make_trainer(tiny_config({"dropout_rate": 0.3}))
  params = trainer.init_state()["params"]
  batch = trainer.put_batch(random_packed_batch(5, 16, 32, 16, 512))
  loss = jax.jit(trainer._loss)  # as the train and eval steps run it (eagerly: 12 s of op-by-op compiles, 5 s jitted)
  deterministic = [float(loss(params, batch)[0]) for _ in range(2)]
  keyed = [float(loss(params, batch, jax.random.key(i))[0]) for i in range(2)]
  assert deterministic[0] == deterministic[1]
  assert len({keyed[0], keyed[1], deterministic[0]}) == 3


def test_decoder_buckets_are_padded_to_the_longest_process_of_each_batch(monkeypatch):
  batches = [random_packed_batch(6, 4, 32, 16, 512), random_packed_batch(7, 4, 32, 32, 512)]
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  asked = []
  # Three processes: this one and two whose buckets were (32, 16) and (16, 32).
  monkeypatch.setattr(distributed._HostAllGather, "__call__",
                      lambda self, lengths: asked.append(lengths) or [lengths, [32, 16], [16, 32]])
  padded = distributed.DecoderLengths("test")(batches)
  assert asked == [[16, 32]]  # one round for all the batches
  for before, after in zip(batches, padded):
    for key, value in after.items():
      if key.startswith("decoder_"):
        assert value.shape == (4, 32)
        np.testing.assert_array_equal(value[:, :before[key].shape[1]], before[key])
        assert not value[:, before[key].shape[1]:].any()  # zeros: padding segment, no loss weight
      else:
        assert value is before[key]


def test_one_process_agrees_nothing_and_passes_batches_through():
  batches = [random_packed_batch(6, 4, 32, 16, 512)]
  assert distributed.DecoderLengths("test")(batches) is batches


def test_throughput_window_leaves_out_excluded_spans_and_empty_windows():
  from fat5_jax.train.loop import ThroughputWindow
  state = jax.block_until_ready({"params": jax.numpy.zeros(3)})
  window = ThroughputWindow()
  assert window.rates(512, None) == {}  # a window whose steps all compiled reports no throughput
  with window.excluding(state):
    time.sleep(0.3)  # an evaluation, a save, a compiling step
  window.add(100, 1e12, encoder_fill=1.0)
  window.add(300, 1e12, encoder_fill=0.6)
  rates = window.rates(512, peak_flops=1e15)
  assert rates["encoder_fill"] == pytest.approx(0.7)  # weighted by rows
  assert rates["rows_per_s"] > 400 / 0.3 * 10, rates  # the window lasted microseconds, not the 0.3 s
  assert rates["encoder_tokens_per_s"] == pytest.approx(512 * rates["rows_per_s"])
  assert rates["mfu"] == pytest.approx(rates["tflops_per_s"] * 1e12 / (1e15 * jax.device_count()))
  time.sleep(0.1)
  window.add(10, 0.0, encoder_fill=1.0)
  assert window.rates(512, None)["rows_per_s"] < 10 / 0.1  # a fresh window: its own time only
