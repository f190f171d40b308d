"""predict: a workdir's checkpoint and tokenizer, a file of inputs -> JSON Lines of generated text."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fat5_jax import checkpoint, data
from fat5_jax import model as model_lib
from fat5_jax import predict as predict_lib
from fat5_jax.config import from_config_dict, to_config_dict
from fat5_jax.generate import generate

INPUTS = ["Le chat dort sur le tapis.", "Paris est la capitale de la France, et une ville très peuplée.", "été"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny run's step-0 checkpoint and its tokenizer (trained on wiki_fr as the data tests train theirs)."""
  config = to_config_dict()
  config.workdir = str(tmp_path_factory.mktemp("run"))
  config.model.update(vocab_size=1024, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
                      dtype="float32")
  config.data.update(encoder_length=16, decoder_length=8, decoder_length_buckets=(8,), tokenizer_vocab_size=1024,
                     num_sentinels=64, tokenizer_max_sentences=3000)
  config = from_config_dict(config)
  tokenizer = data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)
  model = model_lib.T5(config.model, rngs=nnx.Rngs(0))
  saver = checkpoint.Checkpointer(config.workdir)
  saver.save(0, {"params": model_lib.parameters(model)}, config=config, force=True)
  saver.close()
  return config, tokenizer, model


def _read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _expected(config, tokenizer, model, text, **options):
  """What the checkpoint generates for `text` alone: its pieces and EOS, truncated to data.encoder_length."""
  ids = (tokenizer.encode(text)[:config.data.encoder_length - 1] + [1])
  tokens = np.asarray(generate(model, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32),
                               max_length=config.data.decoder_length, **options))[0].tolist()
  return tokenizer.decode(tokens[:tokens.index(1)] if 1 in tokens else tokens)


@pytest.mark.parametrize("options", [dict(), dict(num_beams=2, length_penalty=0.5)])
def test_text_lines_in_order_with_the_checkpoints_generation(options, workdir, tmp_path):
  config, tokenizer, model = workdir
  (tmp_path / "inputs.txt").write_text("\n".join([INPUTS[0], "", *INPUTS[1:]]) + "\n", encoding="utf-8")
  output = tmp_path / "out" / "predictions.jsonl"
  assert predict_lib.predict(config, str(tmp_path / "inputs.txt"), str(output), batch_size=2, **options) == 3
  records = _read(output)
  assert [r["input"] for r in records] == INPUTS  # the blank line skipped
  assert len(tokenizer.encode(INPUTS[1])) > config.data.encoder_length  # truncated, and batched with a shorter one
  assert [r["output"] for r in records] == [_expected(config, tokenizer, model, t, **options) for t in INPUTS]
  assert not list((tmp_path / "out").glob("*.partial"))


def test_json_lines_with_sampling_follow_the_seed(workdir, tmp_path):
  config = workdir[0]
  (tmp_path / "inputs.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                                 for i, t in enumerate(INPUTS)), encoding="utf-8")

  def sampled(seed):
    predict_lib.predict(config, str(tmp_path / "inputs.jsonl"), str(tmp_path / "out.jsonl"), do_sample=True,
                        temperature=2.0, seed=seed)
    return _read(tmp_path / "out.jsonl")

  first = sampled(0)
  assert [r["input"] for r in first] == INPUTS
  assert sampled(0) == first and sampled(1) != first


def test_failures_leave_no_output(workdir, tmp_path):
  config = workdir[0]
  (tmp_path / "inputs.jsonl").write_text('{"text": "bonjour"}\n{"label": 3}\n', encoding="utf-8")
  with pytest.raises(ValueError, match="record 2 has no string field 'text'"):
    predict_lib.predict(config, str(tmp_path / "inputs.jsonl"), str(tmp_path / "out.jsonl"))
  (tmp_path / "inputs.txt").write_text("bonjour\n", encoding="utf-8")
  (tmp_path / "taken" / "full").mkdir(parents=True)  # the rename onto a non-empty directory fails
  with pytest.raises(OSError):
    predict_lib.predict(config, str(tmp_path / "inputs.txt"), str(tmp_path / "taken"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.jsonl", "inputs.txt", "taken"]
