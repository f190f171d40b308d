"""Export of fine-tuned encoder heads: Hugging Face's classes loaded by transformers in float32 against our model on
random inputs with padding, FAT5's state-dict names, and `--mode=export_hf` on a fine-tuning workdir."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from fat5_jax import checkpoint, cli, heads, hf  # noqa: E402
from fat5_jax.train import finetune  # noqa: E402
from fat5_jax.config import from_config_dict, to_config_dict  # noqa: E402
from tests.interop.test_hf import _fat5_names  # noqa: E402

# num_heads x d_kv (15) != d_model (24), GEGLU, two layers: every name and orientation of the encoder shows.
MODEL = dict(vocab_size=96, d_model=24, d_kv=5, num_heads=3, d_ff=40, num_layers=2, num_decoder_layers=2,
             feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
             dropout_rate=0.0, dtype="float32", param_dtype="float32", attention_impl="xla", kernel_backend="xla")
LABELS = 5


def _config(workdir="/tmp/unused", head="seq2seq", **model_fields):
  config = to_config_dict()
  config.workdir = str(workdir)
  config.model.update({**MODEL, **model_fields})
  config.data.update(tokenizer_vocab_size=MODEL["vocab_size"], num_sentinels=8)
  config.finetune.head = head
  return from_config_dict(config)


def _params(config, head: str) -> dict:
  """A head's parameters, every one perturbed (norm weights off 1, a bias off 0) so that no mix-up can hide."""
  params = heads.init_parameters(config.model, head, LABELS, seed=0)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _model(config, head: str) -> heads.EncoderWithHead:
  model = heads.from_parameters(config.model, head, LABELS, _params(config, head))
  model.eval()
  return model


def _inputs():
  """Random ids [2, 11], the second row right-padded after 6 tokens; its mask."""
  rng = np.random.default_rng(2)
  ids, mask = rng.integers(2, MODEL["vocab_size"], (2, 11)), np.ones((2, 11), np.int32)
  mask[1, 6:] = 0
  return ids * mask, mask


def _our_logits(model):
  ids, mask = _inputs()
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def _our_hidden(model):
  ids, mask = _inputs()
  return np.asarray(model.encoder(model.shared(jnp.asarray(ids)), segment_ids=jnp.asarray(mask), positions=None))


def _assert_close(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def _loads_cleanly(cls, path):
  model, info = cls.from_pretrained(str(path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return model.eval()


def _written(path) -> tuple[dict, dict]:
  with open(path / "config.json") as f:
    return json.load(f), load_file(str(path / hf.MODEL_FILE))


def test_token_classification_is_t5_for_token_classification(tmp_path):
  config = _config()
  model = _model(config, "token_classification")
  hf.to_hf(config.model, model, str(tmp_path))
  assert not os.path.exists(tmp_path / hf.HEAD_FILE)
  theirs = _loads_cleanly(transformers.T5ForTokenClassification, tmp_path)
  assert theirs.config.num_labels == LABELS and theirs.config.classifier_dropout == 0.0
  ids, mask = _inputs()
  with torch.no_grad():
    logits = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  real = mask.astype(bool)  # padded positions output what each side happens to compute
  _assert_close(_our_logits(model)[real], logits[real])

  # The encoder alone, as of every head: T5EncoderModel drops the `transformer.` prefix and leaves the classifier.
  encoder, info = transformers.T5EncoderModel.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and info["unexpected_keys"] == {"classifier.weight", "classifier.bias"}
  with torch.no_grad():
    hidden = encoder.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  _assert_close(_our_hidden(model)[real], hidden.numpy()[real])


def _documented_head(head: str, hidden: torch.Tensor, mask: torch.Tensor, dense: dict, epsilon: float):
  """What config.json's encoder_head.logits says, restated in PyTorch on transformers' encoder output."""
  if head == "classification":
    real = mask[..., None].float()
    hidden = (hidden * real).sum(1) / real.sum(1)
    hidden = hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + epsilon)
  return torch.nn.functional.linear(hidden, dense["weight"], dense["bias"])


@pytest.mark.parametrize("head", ["classification", "question_answering"])
def test_other_heads_are_t5_encoder_model_and_the_documented_head(head, tmp_path):
  config = _config()
  model = _model(config, head)
  hf.to_hf(config.model, model, str(tmp_path))
  written, _ = _written(tmp_path)
  assert written["architectures"] == ["T5EncoderModel"] and written["encoder_head"]["weights"] == hf.HEAD_FILE
  encoder = _loads_cleanly(transformers.T5EncoderModel, tmp_path)
  ids, mask = (torch.tensor(x) for x in _inputs())
  with torch.no_grad():
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
  real = mask.numpy().astype(bool)
  _assert_close(_our_hidden(model)[real], hidden.numpy()[real])

  dense_name = hf.HEAD_CLASSES["hf"][head].dense
  dense = {k.removeprefix(f"{dense_name}."): v for k, v in load_file(str(tmp_path / hf.HEAD_FILE)).items()}
  with torch.no_grad():
    logits = _documented_head(head, hidden, mask, dense, written["layer_norm_epsilon"]).numpy()
  ours = _our_logits(model)
  if head == "question_answering":  # per token: the real ones
    ours, logits = ours[real], logits[real]
  _assert_close(ours, logits)


def _fat5_encoder_names(config) -> set:
  """FlashT5EncoderModel's names: FlashT5ForConditionalGeneration's without the decoder and lm_head (catie-aq/flashT5
  src/model/modeling_flash_t5.py; the encoder-head classes of custom_heads_flash_t5.py hold the same `shared` and
  `encoder`)."""
  names = _fat5_names(config.model.num_layers, 0, gated=True, t5_bias=True)
  return {n for n in names if n == "shared.weight" or n.startswith("encoder.")}


# Each head's FAT5 class, the name of its dense layer and whether the class holds it (custom_heads_flash_t5.py).
FAT5_HEADS = {"classification": ("FlashT5EncoderModel", "classifier", False),
              "token_classification": ("FlashT5ForTokenClassification", "classifier", True),
              "question_answering": ("FlashT5ForQuestionAnswering", "qa_outputs", True)}


@pytest.mark.parametrize("head", FAT5_HEADS)
def test_fat5_layout_names_and_config(head, tmp_path):
  config = _config()
  model = _model(config, head)
  hf.to_hf(config.model, model, str(tmp_path), layout="fat5")
  written, tensors = _written(tmp_path)
  architecture, dense, in_model = FAT5_HEADS[head]
  head_names = {f"{dense}.weight", f"{dense}.bias"}
  assert set(tensors) == _fat5_encoder_names(config) | (head_names if in_model else set())
  head_tensors = tensors if in_model else load_file(str(tmp_path / hf.HEAD_FILE))
  assert head_names <= set(head_tensors)
  np.testing.assert_array_equal(head_tensors[f"{dense}.weight"].numpy(), np.asarray(model.head_kernel[...]).T)
  np.testing.assert_array_equal(head_tensors[f"{dense}.bias"].numpy(), np.asarray(model.head_bias[...]))
  # The encoder's tensors are those of the Hugging Face export (verified above), under FAT5's names.
  hf.to_hf(config.model, model, str(tmp_path / "hf"))
  hf_tensors = load_file(str(tmp_path / "hf" / hf.MODEL_FILE))
  hf_prefix = hf.HEAD_CLASSES["hf"][head].prefix
  for path, _ in nnx.to_flat_state(nnx.state(model.encoder, nnx.Param)):
    path = "encoder." + ".".join(map(str, path))
    fat5_name, hf_name = hf.their_name(hf.FAT5_LAYOUT, path)[0], hf_prefix + hf.their_name(hf.HF_LAYOUT, path)[0]
    assert torch.equal(tensors[fat5_name], hf_tensors[hf_name]), path
  assert torch.equal(tensors["shared.weight"], hf_tensors[f"{hf_prefix}shared.weight"])
  assert torch.equal(tensors["encoder.embed_tokens.weight"], tensors["shared.weight"])

  assert written["architectures"] == [architecture] and written["model_type"] == "flash_t5"
  assert written["auto_map"]["AutoModel"] == "modeling_flash_t5.FlashT5EncoderModel"
  if in_model:
    assert f"custom_heads_flash_t5.{architecture}" in written["auto_map"].values()
  # FAT5's head classes size their dense layer by num_labels (2 for question answering).
  assert len(written["id2label"]) == (2 if head == "question_answering" else LABELS)
  assert written["is_encoder_decoder"] is False and written["tie_word_embeddings"] is False


def _fine_tuned_workdir(workdir, head: str, **model_fields):
  """A fine-tuning workdir as --mode=finetune leaves it: a checkpoint of the head's parameters and the run's config."""
  config = _config(workdir, head, **model_fields)
  saver = checkpoint.Checkpointer(config.workdir)
  saver.save(7, {"params": _params(config, head)}, config=config, force=True)
  saver.close()
  return config


def test_export_hf_mode_writes_both_layouts_of_a_fine_tuned_head(tmp_path, capsys):
  head = "token_classification"
  _fine_tuned_workdir(tmp_path / "run", head)
  tags = ["B", "I", "O", "É", "X"][:LABELS]  # as a fine-tuning records its task's labels
  with open(tmp_path / "run" / finetune.LABELS_FILE, "w") as f:
    json.dump(tags, f)
  # The command line's config need not name the head: the checkpoint does.
  cli.export_hf(_config(tmp_path / "run"), str(tmp_path / "out"))
  assert "exported step 7 to" in capsys.readouterr().out
  for layout in hf.LAYOUTS:
    written, _ = _written(tmp_path / "out" / layout)
    assert written["architectures"] == [hf.HEAD_CLASSES[layout][head].architecture]
    assert written["encoder_head"]["type"] == head
    assert written["id2label"] == {str(i): tag for i, tag in enumerate(tags)}
  theirs = _loads_cleanly(transformers.T5ForTokenClassification, tmp_path / "out" / "hf")
  ids, mask = _inputs()
  with torch.no_grad():
    logits = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  real = mask.astype(bool)
  _assert_close(_our_logits(_model(_config(), head))[real], logits[real])


def test_export_of_a_head_that_one_layout_cannot_express_writes_nothing(tmp_path):
  _fine_tuned_workdir(tmp_path / "run", "classification", position_encoding_type="alibi")
  with pytest.raises(ValueError, match="position_encoding_type='alibi' cannot be exported to Hugging Face"):
    cli.export_hf(_config(tmp_path / "run", position_encoding_type="alibi"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
