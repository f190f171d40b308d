"""Hugging Face / FAT5 interop: random small PyTorch T5 models (no download) against our model, both directions."""

import json
import os
import re
import stat

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from fat5_jax import cli, data, hf  # noqa: E402
from fat5_jax.config import from_config_dict, model_config, to_config_dict  # noqa: E402
from fat5_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from fat5_jax.model import T5  # noqa: E402

SMALL = dict(vocab_size=96, d_model=24, d_ff=40, relative_attention_num_buckets=8, relative_attention_max_distance=16,
             dropout_rate=0.0)


def _hf_model(out_dir, *, untied: bool, seed=0, **config):
  """A random T5ForConditionalGeneration saved with save_pretrained; untied gives lm_head its own parameter."""
  torch.manual_seed(seed)
  hf_config = transformers.T5Config(**{**SMALL, **config}, tie_word_embeddings=not untied)
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  if untied:  # transformers 5 ties in __init__ whatever the config says
    model.lm_head.weight = torch.nn.Parameter(torch.randn(hf_config.vocab_size, hf_config.d_model))
  model.save_pretrained(out_dir)
  return model


def _inputs(vocab_size, seed=1):
  """Random encoder / decoder ids with right padding in the second row."""
  rng = np.random.default_rng(seed)
  ids, dec = rng.integers(2, vocab_size, (2, 11)), rng.integers(2, vocab_size, (2, 7))
  mask, dec_mask = np.ones_like(ids), np.ones_like(dec)
  mask[1, 6:], dec_mask[1, 4:] = 0, 0
  return ids, mask, dec, dec_mask


def _hf_logits(model, inputs):
  ids, mask, dec, dec_mask = (torch.tensor(x) for x in inputs)
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
  return out.logits.numpy()


def _our_logits(model, inputs):
  ids, mask, dec, dec_mask = (jnp.asarray(x) for x in inputs)
  # One compiled call: op by op, a forward pass takes seconds on a CPU.
  return np.asarray(nnx.jit(lambda model: model(ids, dec, mask, dec_mask))(model))


def _assert_logits_match(hf_model, model, vocab_size, atol=1e-4):
  inputs = _inputs(vocab_size)
  real = inputs[3].astype(bool)  # our padded queries output zeros, Hugging Face's do not: compare real positions
  np.testing.assert_allclose(_our_logits(model, inputs)[real], _hf_logits(hf_model, inputs)[real], atol=atol, rtol=0)


def _state(model) -> dict:
  return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


CASES = {
    # d_kv x heads (15) != d_model (24), more decoder than encoder layers, GEGLU, untied (T5 v1.1 / FLAN-T5).
    "gated_gelu_untied_odd": dict(untied=True, d_kv=5, num_heads=3, num_layers=2, num_decoder_layers=3,
                                  feed_forward_proj="gated-gelu"),
    # Original T5: ReLU, tied embeddings with the d_model**-0.5 rescaling.
    "relu_tied": dict(untied=False, d_kv=8, num_heads=2, num_layers=2, feed_forward_proj="relu"),
    # Exact GELU, fewer decoder layers.
    "gelu_untied_short_decoder": dict(untied=True, d_kv=6, num_heads=4, num_layers=3, num_decoder_layers=1,
                                      feed_forward_proj="gelu"),
}


@pytest.mark.parametrize("case", CASES)
def test_hf_logits_and_round_trip(case, tmp_path):
  hf_model = _hf_model(tmp_path / "hf", **CASES[case])
  config, model = hf.from_hf(str(tmp_path / "hf"))
  assert config.tie_word_embeddings == (not CASES[case]["untied"])
  assert (config.dtype, config.param_dtype) == ("float32", "float32")
  _assert_logits_match(hf_model, model, config.vocab_size)

  hf.to_hf(config, model, str(tmp_path / "out"))
  written = load_file(str(tmp_path / "out" / "model.safetensors"))
  original = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert written.keys() == original.keys()
  for name, tensor in original.items():
    assert torch.equal(written[name], tensor), name  # bit-identical

  reloaded, info = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "out"),
                                                                           output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  inputs = _inputs(config.vocab_size)
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), inputs), _hf_logits(hf_model, inputs))


def test_reads_pytorch_bin_and_sharded_safetensors(tmp_path):
  hf_model = _hf_model(tmp_path / "single", untied=True, d_kv=4, num_heads=2, num_layers=2,
                       feed_forward_proj="gated-gelu")
  _, reference = hf.from_hf(str(tmp_path / "single"))
  # A PyTorch pickle holds every name of the shared embedding (shared, encoder/decoder.embed_tokens).
  os.makedirs(tmp_path / "bin")
  torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  os.link(tmp_path / "single" / "config.json", tmp_path / "bin" / "config.json")
  hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  for name in ("bin", "sharded"):
    _, model = hf.from_hf(str(tmp_path / name))
    chex.assert_trees_all_equal(_state(model), _state(reference))


def _rewrite(src, dst, config_update: dict, keep_lm_head: bool, lm_head=None):
  """A copy of checkpoint `src` with config.json fields changed and lm_head.weight dropped or replaced."""
  os.makedirs(dst)
  with open(src / "config.json") as f:
    config = json.load(f)
  config = {k: v for k, v in config.items() if k != "scale_decoder_outputs"}
  config.update(config_update)
  with open(dst / "config.json", "w") as f:
    json.dump(config, f)
  tensors = load_file(str(src / "model.safetensors"))
  if lm_head is not None:
    tensors["lm_head.weight"] = lm_head
  if not keep_lm_head:
    tensors.pop("lm_head.weight", None)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


# (config.json fields, lm_head.weight in the file, whether it equals shared.weight) -> our tie_word_embeddings
TIE_VARIANTS = {
    "v4_untied": ({"tie_word_embeddings": False}, True, False, False),
    "v4_tied_original_t5": ({"tie_word_embeddings": True}, False, None, True),
    "v5_untied": ({"tie_word_embeddings": True, "scale_decoder_outputs": False}, True, False, False),
    "v5_tied": ({"tie_word_embeddings": True, "scale_decoder_outputs": True}, True, True, True),
    # Tied weights but no rescaling (a v5 model built with tie_word_embeddings=False and never untied): our model
    # cannot share without rescaling, so it gets an untied copy.
    "v5_tied_unscaled": ({"tie_word_embeddings": True, "scale_decoder_outputs": False}, False, None, False),
    # Untied with rescaling: the rescaling is folded into our lm_head.
    "v5_untied_scaled": ({"tie_word_embeddings": True, "scale_decoder_outputs": True}, True, False, False),
}


@pytest.mark.parametrize("variant", TIE_VARIANTS)
def test_tied_and_untied_configs_of_transformers_4_and_5(variant, tmp_path):
  update, keep, equal, tied = TIE_VARIANTS[variant]
  _hf_model(tmp_path / "base", untied=True, d_kv=4, num_heads=2, num_layers=1, feed_forward_proj="gated-gelu")
  shared = load_file(str(tmp_path / "base" / "model.safetensors"))["shared.weight"]
  _rewrite(tmp_path / "base", tmp_path / "ckpt", update, keep, lm_head=shared.clone() if equal else None)
  config, model = hf.from_hf(str(tmp_path / "ckpt"))
  assert config.tie_word_embeddings == tied
  reference = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "ckpt")).eval()
  _assert_logits_match(reference, model, config.vocab_size)


def test_untied_export_loads_untied_and_unscaled(tmp_path):
  """What to_hf writes for an untied model: both tensors and tie_word_embeddings=false (read alike by 4 and 5)."""
  config = model_config(**SMALL, d_kv=4, num_heads=2, num_layers=1, num_decoder_layers=1, dtype="float32")
  model = T5(config, rngs=nnx.Rngs(0))
  hf.to_hf(config, model, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  assert written["tie_word_embeddings"] is False and written["scale_decoder_outputs"] is False
  assert {"shared.weight", "lm_head.weight"} <= load_file(str(tmp_path / "model.safetensors")).keys()
  reference = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  assert reference.lm_head.weight is not reference.shared.weight and not reference.config.scale_decoder_outputs
  _assert_logits_match(reference, model, config.vocab_size)


def test_mt5_model_type_and_load_params(tmp_path):
  _hf_model(tmp_path / "ckpt", untied=True, d_kv=4, num_heads=2, num_layers=1, feed_forward_proj="gated-gelu")
  with open(tmp_path / "ckpt" / "config.json") as f:
    config_json = json.load(f)
  with open(tmp_path / "ckpt" / "config.json", "w") as f:
    json.dump({**config_json, "model_type": "mt5", "architectures": ["MT5ForConditionalGeneration"]}, f)
  config, loaded = hf.from_hf(str(tmp_path / "ckpt"), dtype="bfloat16")
  assert config.dtype == "bfloat16" and config.param_dtype == "float32"
  model = T5(config, rngs=nnx.Rngs(3))
  hf.load_params(model, str(tmp_path / "ckpt"))
  chex.assert_trees_all_equal(_state(model), _state(loaded))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  _hf_model(tmp_path / "base", untied=True, d_kv=5, num_heads=3, num_layers=1, feed_forward_proj="gated-gelu")
  _rewrite(tmp_path / "base", tmp_path / "bad", {"num_heads": 4}, keep_lm_head=True)
  with pytest.raises(ValueError, match=r"Attention\.[qkv]\.weight: checkpoint shape \(15, 24\) does not fit "
                                       r".* \(24, 20\).*num_heads x d_kv = 4 x 5"):
    hf.from_hf(str(tmp_path / "bad"))


def test_missing_and_unexpected_tensors_are_errors(tmp_path):
  _hf_model(tmp_path / "base", untied=True, d_kv=4, num_heads=2, num_layers=2, feed_forward_proj="gated-gelu")
  _rewrite(tmp_path / "base", tmp_path / "fewer_layers", {"num_layers": 1, "num_decoder_layers": 2}, True)
  with pytest.raises(ValueError, match=r"does not use.*encoder\.block\.1\."):
    hf.from_hf(str(tmp_path / "fewer_layers"))
  _rewrite(tmp_path / "base", tmp_path / "more_layers", {"num_layers": 3, "num_decoder_layers": 2}, True)
  with pytest.raises(ValueError, match=r"lacks .*encoder\.block\.2\."):
    hf.from_hf(str(tmp_path / "more_layers"))
  with pytest.raises(ValueError, match="no config.json"):
    hf.from_hf(str(tmp_path))


@pytest.mark.parametrize("override,message", [
    (dict(position_encoding_type="alibi"), "cannot be exported to Hugging Face"),
    (dict(position_encoding_type="rope"), "cannot be exported to Hugging Face"),
    (dict(attention_scale=0.125), "always uses 1.0"),
])
def test_hf_export_of_what_t5_cannot_express_is_an_error(override, message, tmp_path):
  config = model_config(**SMALL, d_kv=4, num_heads=2, num_layers=1, num_decoder_layers=1, **override)
  model = nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=message):
    hf.to_hf(config, model, str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# FAT5 (catie-aq/flashT5 FlashT5ForConditionalGeneration)

def _fat5_names(num_layers: int, num_decoder_layers: int, *, gated: bool, t5_bias: bool) -> set:
  """The state-dict names of FlashT5ForConditionalGeneration, as read in catie-aq/flashT5's
  src/model/modeling_flash_t5.py (FlashT5Stack.block[i].{self_attention_layer, cross_attention_layer, ff_layer})."""
  names = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
           "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"}
  mlp = ("act.wi_0", "act.wi_1") if gated else ("act.wi",)
  for stack, layers in (("encoder", num_layers), ("decoder", num_decoder_layers)):
    if t5_bias:
      names.add(f"{stack}.block.0.self_attention_layer.self_attention.pe_encoding.relative_attention_bias.weight")
    for i in range(layers):
      block = f"{stack}.block.{i}"
      names |= {f"{block}.self_attention_layer.self_attention.{w}.weight" for w in ("Wq", "Wk", "Wv", "o")}
      names |= {f"{block}.self_attention_layer.layer_norm.weight", f"{block}.ff_layer.layer_norm.weight",
                f"{block}.ff_layer.wo.weight"}
      names |= {f"{block}.ff_layer.{w}.weight" for w in mlp}
      if stack == "decoder":
        names |= {f"{block}.cross_attention_layer.cross_attention.{w}.weight" for w in ("Wq", "Wk", "Wv", "o")}
        names.add(f"{block}.cross_attention_layer.layer_norm.weight")
  return names


FAT5_CASES = {
    "t5_geglu": dict(position_encoding_type="t5", feed_forward_proj="gated-gelu"),
    "alibi_relu": dict(position_encoding_type="alibi", feed_forward_proj="relu", attention_scale=0.125, num_heads=4),
    "none_gated_relu_bf16": dict(position_encoding_type="none", feed_forward_proj="gated-relu",
                                 param_dtype="bfloat16"),
}


@pytest.mark.parametrize("case", FAT5_CASES)
def test_fat5_round_trip_and_names(case, tmp_path):
  override = FAT5_CASES[case]
  config = model_config(**SMALL, d_kv=5, num_layers=2, num_decoder_layers=3, dtype="float32",
                        **{"param_dtype": "float32", "num_heads": 3, **override})
  model = T5(config, rngs=nnx.Rngs(1))
  hf.to_hf(config, model, str(tmp_path), layout="fat5")
  names = set(load_file(str(tmp_path / "model.safetensors")).keys())
  assert names == _fat5_names(2, 3, gated=config.feed_forward_proj.startswith("gated-"),
                              t5_bias=config.position_encoding_type == "t5")
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  assert written["model_type"] == "flash_t5" and written["architectures"] == ["FlashT5ForConditionalGeneration"]
  assert written["tie_word_embeddings"] is False and written["attention_scale"] == config.attention_scale
  assert written["position_encoding_type"] == {"t5": "t5", "alibi": "ALiBi", "none": "none"}[
      config.position_encoding_type]

  loaded_config, loaded = hf.from_hf(str(tmp_path), param_dtype=config.param_dtype)
  assert loaded_config == config
  chex.assert_trees_all_equal(_state(loaded), _state(model))  # bit-identical, bfloat16 included


def test_fat5_matches_hf_through_the_fat5_layout(tmp_path):
  """HF checkpoint -> ours -> FAT5 layout -> ours still computes Hugging Face's logits."""
  hf_model = _hf_model(tmp_path / "hf", untied=True, d_kv=5, num_heads=3, num_layers=2, num_decoder_layers=1,
                       feed_forward_proj="gated-gelu")
  config, model = hf.from_hf(str(tmp_path / "hf"))
  hf.to_hf(config, model, str(tmp_path / "fat5"), layout="fat5")
  fat5_config, fat5_model = hf.from_hf(str(tmp_path / "fat5"))
  assert fat5_config == config
  _assert_logits_match(hf_model, fat5_model, config.vocab_size)


def test_fat5_config_defaults_and_tied_export(tmp_path):
  config = model_config(**SMALL, d_kv=4, num_heads=4, num_layers=1, num_decoder_layers=1, dtype="float32",
                        tie_word_embeddings=True)
  model = T5(config, rngs=nnx.Rngs(2))
  hf.to_hf(config, model, str(tmp_path), layout="fat5")  # FAT5 cannot tie: the head is a rescaled copy
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  written.pop("attention_scale")  # FAT5's default when unset: 1/sqrt(num_heads)
  written["pad_token_id"] = -100  # FlashT5Config's default
  with open(tmp_path / "config.json", "w") as f:
    json.dump(written, f)
  loaded_config, _ = hf.from_hf(str(tmp_path))
  assert loaded_config.attention_scale == 0.5 and loaded_config.pad_token_id == 0
  loaded_config, loaded = hf.from_hf(str(tmp_path), attention_scale=1.0)
  assert not loaded_config.tie_word_embeddings
  inputs = _inputs(config.vocab_size)
  np.testing.assert_allclose(_our_logits(loaded, inputs), _our_logits(model, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields,message", [
    ({"position_encoding_type": "RoPE"}, "also rotates the values"),
    ({"position_encoding_type": "ALiBi", "alibi_mode": "asymetric"}, "asymmetric ALiBi"),
    ({"use_glu_mlp": False, "use_gelu_act": True}, "tanh GELU without a gate"),
])
def test_fat5_configs_we_cannot_reproduce_are_errors(fields, message, tmp_path):
  config = model_config(**SMALL, d_kv=4, num_heads=2, num_layers=1, num_decoder_layers=1)
  hf.to_hf(config, T5(config, rngs=nnx.Rngs(0)), str(tmp_path), layout="fat5")
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**written, **fields}, f)
  with pytest.raises(ValueError, match=message):
    hf.from_hf(str(tmp_path))


@pytest.mark.parametrize("override,message", [
    (dict(position_encoding_type="rope"), "cannot be exported to FAT5"),
    (dict(position_encoding_type="alibi", alibi_mode="asymmetric"), "asymmetric"),
    (dict(feed_forward_proj="gelu"), "cannot be exported to FAT5"),
])
def test_fat5_export_errors(override, message, tmp_path):
  config = model_config(**SMALL, d_kv=4, num_layers=1, num_decoder_layers=1, **{"num_heads": 2, **override})
  with pytest.raises(ValueError, match=message):
    hf.to_hf(config, nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))), str(tmp_path), layout="fat5")


# Tokenizer export.

FRENCH = ["[R] Le chat <extra_id_0> sur le tapis<extra_id_1>.",
          "[S] Élodie habite à Paris depuis 2019 : « l'œuvre » coûte 12,50 € 🙂",
          "[X]l'été<extra_id_63>  dernier, ŋ 漢字\tfin de l'année"]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tokenizer(request, tmp_path_factory):
  """A tiny sentencepiece tokenizer trained on wiki_fr, as the data tests train theirs."""
  config = to_config_dict()
  config.workdir = str(tmp_path_factory.mktemp(f"tokenizer_{request.param}"))
  config.model.vocab_size = 1024
  config.data.update(tokenizer_vocab_size=1024, num_sentinels=64, tokenizer_max_sentences=3000,
                     tokenizer_type=request.param)
  config = from_config_dict(config)
  return data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)


def _our_ids(tokenizer, text):
  """Our ids of a text with sentinels: each stretch between them encoded on its own, their ids in between."""
  ids = []
  for part in re.split(r"(<extra_id_\d+>)", text):
    sentinel = re.fullmatch(r"<extra_id_(\d+)>", part)
    ids += [tokenizer.sentinel_id(int(sentinel.group(1)))] if sentinel else tokenizer.encode(part)
  return ids


def test_export_carries_our_tokenizer(tokenizer, tmp_path):
  """AutoTokenizer on the export encodes and decodes as we do (sentinels, UL2 prefixes, byte fallback)."""
  config = model_config(**{**SMALL, "vocab_size": 1024}, d_kv=4, num_heads=2, num_layers=1)
  hf.to_hf(config, T5(config, rngs=nnx.Rngs(0)), str(tmp_path), tokenizer=tokenizer)
  for name in ("config.json", "model.safetensors", "spiece.model", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert len(theirs) == tokenizer.vocab_size
  assert (theirs.pad_token_id, theirs.eos_token_id, theirs.unk_token_id) == (0, 1, 2)
  assert theirs.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_63>"]) == [1023, 960]
  eos = tokenizer.eos_id
  for text in FRENCH:
    ids = _our_ids(tokenizer, text)
    assert any(tokenizer.prefix_id(p) in ids for p in ("[R]", "[S]", "[X]"))
    assert theirs(text)["input_ids"] == ids + [eos]  # T5's tokenizer appends eos
    # What a UL2 pipeline feeds the model: ids with sentinels, pad and eos, decoded with them shown.
    for row in (ids + [eos], ids[:4] + [tokenizer.sentinel_id(5)] + ids[4:] + [eos, 0, 0]):
      assert theirs.decode(row) == tokenizer.decode(row, show_special=True)


def _import_config(workdir, model_fields, **data_overrides):
  """The config of a run on imported weights: the architecture of `model_fields`, the tokenizer fixture's data."""
  config = to_config_dict()
  config.workdir = str(workdir)
  config.model.update(model_fields)
  config.data.update({**dict(tokenizer_vocab_size=1024, num_sentinels=64), **data_overrides})
  return from_config_dict(config)


def test_import_hf_brings_the_checkpoints_tokenizer_or_refuses_to_train_one(tokenizer, tmp_path):
  """FLAN-T5's case: imported weights run with their own spiece.model, never with a freshly trained tokenizer."""
  model_fields = {**SMALL, "vocab_size": 1024, "d_kv": 4, "num_heads": 2, "num_layers": 1}
  model_cfg = model_config(**model_fields)
  hf.to_hf(model_cfg, T5(model_cfg, rngs=nnx.Rngs(0)), str(tmp_path / "hf"), tokenizer=tokenizer)
  config = _import_config(tmp_path / "with", model_fields)
  cli.import_hf(config, str(tmp_path / "hf"))
  imported = data.load_tokenizer(config.data, config.workdir, config.model.vocab_size)
  assert imported.path == os.path.join(config.workdir, "tokenizer", "spm.model")
  assert tokenizer_lib.read_source(config.workdir)["source"] == "imported"
  with open(imported.path, "rb") as ours, open(tmp_path / "hf" / "spiece.model", "rb") as theirs:
    assert ours.read() == theirs.read()
  assert imported.encode(FRENCH[1]) == tokenizer.encode(FRENCH[1])
  with pytest.raises(ValueError, match=r"holds the tokenizer imported with the weights of .*hf.*; the config asks "
                                       r"data.tokenizer_path="):
    data.load_tokenizer(_import_config(tmp_path / "with", model_fields, tokenizer_path=__file__).data,
                        config.workdir, config.model.vocab_size)

  os.remove(tmp_path / "hf" / "spiece.model")
  config = _import_config(tmp_path / "without", model_fields)
  cli.import_hf(config, str(tmp_path / "hf"))
  for mode in ("train", "eval"):
    with pytest.raises(ValueError, match=r"imported from .*hf without their tokenizer.*set data.tokenizer_path"):
      cli.run(mode, config)
  assert not os.path.exists(os.path.join(config.workdir, "tokenizer", "spm.model"))
  given = _import_config(tmp_path / "without", model_fields, tokenizer_path=tokenizer.path)
  assert data.load_tokenizer(given.data, given.workdir, 1024).encode(FRENCH[0]) == tokenizer.encode(FRENCH[0])
