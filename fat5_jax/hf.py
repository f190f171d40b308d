"""Hugging Face T5 and FAT5 PyTorch checkpoints <-> our model, in both directions, with no network.

Two layouts share one code path: `hf` (transformers' `T5ForConditionalGeneration`: T5, T5 v1.1, FLAN-T5, mT5) and
`fat5` (catie-aq/flashT5's `FlashT5ForConditionalGeneration`). Each layout is one table of rules
(our parameter path, their tensor name, codec); loading and saving both walk our parameters and look their names up
in that table, so the two directions cannot drift apart. Their linear weights are [out, in], ours [in, out].

Tied embeddings: transformers 4 reads `tie_word_embeddings` as "share the lm_head" and "scale the decoder output by
d_model**-0.5"; transformers 5 always ties in the config, keeps the rescaling in `scale_decoder_outputs`, and unties
only when the checkpoint holds an `lm_head.weight` that differs from `shared.weight`. We read tying from the tensors
present and the rescaling from `scale_decoder_outputs` when it is there, and write what both versions load alike.

A fine-tuned encoder head (`heads.EncoderWithHead`) exports to the class of each layout that computes it, or to the
encoder class and a separate file for the head's dense layer where no class does (HEAD_CLASSES).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import re
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from fat5_jax.config import ModelConfig, model_config
from fat5_jax.heads import EncoderWithHead
from fat5_jax.model import T5, abstract_parameters, from_parameters

if TYPE_CHECKING:
  from fat5_jax.data.tokenizer import Tokenizer

LAYOUTS = ("hf", "fat5")
MODEL_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"  # an encoder head's dense layer, where the class written has no such head

# (to theirs, from theirs): how one tensor changes between our layout and theirs.
Codec = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
SAME: Codec = (lambda x: x, lambda x: x)
TRANSPOSE: Codec = (lambda x: x.T, lambda x: x.T)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Tensor names of one checkpoint family.

  rules: (our path, their name, codec); in our paths `{s}` is the stack (encoder|decoder), `{i}` a block index and
  `{w}` a weight name, and their name repeats them. The first rule matching a path wins.
  embedding_aliases: other names the shared embedding may be saved under (PyTorch keeps one tensor under several
  names); read when `shared.weight` is absent, ignored otherwise.
  write_aliases: also write the embedding under its aliases (FAT5 has no tied-weight list, so its loader expects
  every name of its state dict).
  ignored: names that may sit in a checkpoint and carry nothing for us.
  """
  name: str
  rules: tuple[tuple[str, str, Codec], ...]
  embedding_aliases: tuple[str, ...] = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
  write_aliases: bool = False
  ignored: tuple[str, ...] = ()


def _projections(ours: str, theirs: str, names: tuple[tuple[str, str], ...]):
  return tuple((ours.format(w=a), theirs.format(w=b), TRANSPOSE) for a, b in names)


_QKVO = (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o"))
HF_LAYOUT = Layout(
    name="hf",
    rules=(
        ("shared.embedding", "shared.weight", SAME),
        ("lm_head", "lm_head.weight", TRANSPOSE),
        ("{s}.position.relative_attention_bias", "{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         SAME),
        *_projections("{{s}}.blocks.{{i}}.self_attention.{w}", "{{s}}.block.{{i}}.layer.0.SelfAttention.{w}.weight",
                      _QKVO),
        ("{s}.blocks.{i}.self_attention_norm.weight", "{s}.block.{i}.layer.0.layer_norm.weight", SAME),
        *_projections("decoder.blocks.{{i}}.cross_attention.{w}",
                      "decoder.block.{{i}}.layer.1.EncDecAttention.{w}.weight", _QKVO),
        ("decoder.blocks.{i}.cross_attention_norm.weight", "decoder.block.{i}.layer.1.layer_norm.weight", SAME),
        ("encoder.blocks.{i}.mlp.{w}", "encoder.block.{i}.layer.1.DenseReluDense.{w}.weight", TRANSPOSE),
        ("encoder.blocks.{i}.mlp_norm.weight", "encoder.block.{i}.layer.1.layer_norm.weight", SAME),
        ("decoder.blocks.{i}.mlp.{w}", "decoder.block.{i}.layer.2.DenseReluDense.{w}.weight", TRANSPOSE),
        ("decoder.blocks.{i}.mlp_norm.weight", "decoder.block.{i}.layer.2.layer_norm.weight", SAME),
        ("{s}.final_norm.weight", "{s}.final_layer_norm.weight", SAME),
    ),
    # Old checkpoints carry a cross-attention bias table that T5 never uses.
    ignored=("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",),
)

_FAT5_QKVO = (("q", "Wq"), ("k", "Wk"), ("v", "Wv"), ("o", "o"))
FAT5_LAYOUT = Layout(
    name="fat5",
    rules=(
        ("shared.embedding", "shared.weight", SAME),
        ("lm_head", "lm_head.weight", TRANSPOSE),
        # FAT5 keeps the table in layer 0's attention and passes the bias on to the other layers.
        ("{s}.position.relative_attention_bias",
         "{s}.block.0.self_attention_layer.self_attention.pe_encoding.relative_attention_bias.weight", SAME),
        *_projections("{{s}}.blocks.{{i}}.self_attention.{w}",
                      "{{s}}.block.{{i}}.self_attention_layer.self_attention.{w}.weight", _FAT5_QKVO),
        ("{s}.blocks.{i}.self_attention_norm.weight", "{s}.block.{i}.self_attention_layer.layer_norm.weight", SAME),
        *_projections("decoder.blocks.{{i}}.cross_attention.{w}",
                      "decoder.block.{{i}}.cross_attention_layer.cross_attention.{w}.weight", _FAT5_QKVO),
        ("decoder.blocks.{i}.cross_attention_norm.weight", "decoder.block.{i}.cross_attention_layer.layer_norm.weight",
         SAME),
        ("{s}.blocks.{i}.mlp.wo", "{s}.block.{i}.ff_layer.wo.weight", TRANSPOSE),
        ("{s}.blocks.{i}.mlp.{w}", "{s}.block.{i}.ff_layer.act.{w}.weight", TRANSPOSE),
        ("{s}.blocks.{i}.mlp_norm.weight", "{s}.block.{i}.ff_layer.layer_norm.weight", SAME),
        ("{s}.final_norm.weight", "{s}.final_layer_norm.weight", SAME),
    ),
    write_aliases=True,
)
_LAYOUTS = {"hf": HF_LAYOUT, "fat5": FAT5_LAYOUT}

_PLACEHOLDERS = {"s": r"(?P<s>encoder|decoder)", "i": r"(?P<i>\d+)", "w": r"(?P<w>\w+)"}


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
  parts = re.split(r"\{(\w)\}", pattern)  # literal, name, literal, name, ...
  return re.compile("".join(re.escape(p) if k % 2 == 0 else _PLACEHOLDERS[p] for k, p in enumerate(parts)) + "$")


def their_name(layout: Layout, path: str) -> tuple[str, Codec]:
  """The checkpoint name of our parameter `path` (e.g. "encoder.blocks.0.mlp.wo") and how to convert it."""
  for ours, theirs, codec in layout.rules:
    match = _compile(ours).match(path)
    if match:
      return theirs.format(**match.groupdict()), codec
  raise ValueError(f"no {layout.name} name for our parameter {path!r}: fat5_jax.hf has no rule for it")


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

FAT5_AUTO_MAP = {
    "AutoModel": "modeling_flash_t5.FlashT5EncoderModel",
    "AutoModelForSeq2SeqLM": "modeling_flash_t5.FlashT5ForConditionalGeneration",
}
_FAT5_POSITIONS = {"t5": "t5", "ALiBi": "alibi", "none": "none"}
_FAT5_UNSUPPORTED_POSITIONS = {  # by lowercase name: FAT5 writes "RoPE" / "FIRE", we write "rope" / "fire"
    "rope": "FAT5's RoPE also rotates the values and the cross-attention queries and keys; ours rotates self-attention "
            "queries and keys only",
    "fire": "FAT5's FIRE adds an output bias and an L multiplier that our FIRE module does not have",
}


def detect_layout(config_json: dict, names=()) -> str:
  """'fat5' for a FlashT5 checkpoint (by model_type, architectures or tensor names), else 'hf'."""
  architectures = " ".join(config_json.get("architectures") or ())
  if (config_json.get("model_type") == "flash_t5" or "FlashT5" in architectures
      or any(".self_attention_layer." in n for n in names)):
    return "fat5"
  return "hf"


def _first(value):
  return value[0] if isinstance(value, (list, tuple)) else value


def _common_fields(j: dict) -> dict:
  num_layers = j["num_layers"]
  pad = j.get("pad_token_id")
  pad = 0 if pad is None or pad < 0 else pad  # FAT5 stores -100 (its label ignore id); T5 pads with 0
  fields = dict(
      vocab_size=j["vocab_size"], d_model=j["d_model"], d_kv=j["d_kv"], d_ff=j["d_ff"], num_heads=j["num_heads"],
      num_layers=num_layers, num_decoder_layers=j.get("num_decoder_layers") or num_layers,
      relative_attention_num_buckets=j.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=j.get("relative_attention_max_distance", 128),
      dropout_rate=float(j.get("dropout_rate", 0.1)), layer_norm_epsilon=float(j.get("layer_norm_epsilon", 1e-6)),
      initializer_factor=float(j.get("initializer_factor", 1.0)), pad_token_id=pad,
      eos_token_id=_first(j.get("eos_token_id", 1)), decoder_start_token_id=j.get("decoder_start_token_id", pad))
  if fields["decoder_start_token_id"] is None or fields["decoder_start_token_id"] < 0:
    fields["decoder_start_token_id"] = pad
  return fields


def _fat5_fields(j: dict) -> dict:
  gated, gelu = j.get("use_glu_mlp", False), j.get("use_gelu_act", True)
  if gelu and not gated:
    raise ValueError("FAT5 checkpoint with use_glu_mlp=false and use_gelu_act=true uses the tanh GELU without a "
                     "gate; our plain 'gelu' is the exact one, so its outputs would change")
  kind = j.get("position_encoding_type", "t5")
  if kind.lower() in _FAT5_UNSUPPORTED_POSITIONS:
    raise ValueError(f"FAT5 position_encoding_type={kind!r} cannot be mapped: "
                     f"{_FAT5_UNSUPPORTED_POSITIONS[kind.lower()]}")
  if kind == "ALiBi" and j.get("alibi_mode", "symetric") != "symetric":
    raise ValueError("FAT5's asymmetric ALiBi (half the heads see only the past, half only the future) differs from "
                     "ours (every head has a slope for each side); only alibi_mode='symetric' maps")
  scale = j.get("attention_scale")
  return dict(feed_forward_proj=("gated-" if gated else "") + ("gelu" if gelu else "relu"),
              position_encoding_type=_FAT5_POSITIONS.get(kind, "none"),  # FAT5 adds no position for other names
              # Unset, FAT5 scales by 1/sqrt(num_heads): keep what the checkpoint was trained with.
              attention_scale=float(scale) if scale is not None else j["num_heads"] ** -0.5,
              tie_word_embeddings=False)


def model_config_from_json(config_json: dict, *, layout: str, tied: bool | None = None,
                           **overrides) -> ModelConfig:
  """ModelConfig of a Hugging Face T5 or FAT5 config.json; computes in float32 unless `overrides` say otherwise.

  tied: whether the checkpoint shares its embedding with the lm_head (None: what config.json says).
  """
  fields = _common_fields(config_json)
  if layout == "fat5":
    fields.update(_fat5_fields(config_json))
  else:
    model_type = config_json.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
      raise ValueError(f"config.json model_type={model_type!r}: expected t5, mt5 or flash_t5")
    fields.update(feed_forward_proj=config_json.get("feed_forward_proj", "relu"), position_encoding_type="t5",
                  tie_word_embeddings=_scales_decoder_output(config_json) if tied is None else
                  tied and _scales_decoder_output(config_json))
  fields.update(param_dtype="float32", dtype="float32")
  fields.update(overrides)
  return model_config(**fields)


def _scales_decoder_output(config_json: dict) -> bool:
  """T5's d_model**-0.5 on the decoder output: transformers 5 names it, transformers 4 reads tie_word_embeddings."""
  if "scale_decoder_outputs" in config_json:
    return bool(config_json["scale_decoder_outputs"])
  return bool(config_json.get("tie_word_embeddings", True))


def hf_config_dict(config: ModelConfig, layout: str = "hf") -> dict:
  """The config.json of `config` in `layout`; raises ValueError where that layout cannot express the model."""
  _check_exportable(config, layout)
  c = config
  activation = c.feed_forward_proj.removeprefix("gated-")
  result = dict(
      d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_heads=c.num_heads, num_layers=c.num_layers,
      num_decoder_layers=c.num_decoder_layers, feed_forward_proj=c.feed_forward_proj,
      dense_act_fn="gelu_new" if c.feed_forward_proj == "gated-gelu" else activation,
      is_gated_act=c.feed_forward_proj.startswith("gated-"),
      relative_attention_num_buckets=c.relative_attention_num_buckets,
      relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=c.dropout_rate,
      layer_norm_epsilon=c.layer_norm_epsilon, initializer_factor=c.initializer_factor, vocab_size=c.vocab_size,
      pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id, decoder_start_token_id=c.decoder_start_token_id,
      is_encoder_decoder=True, use_cache=True, torch_dtype=c.param_dtype)
  if layout == "hf":
    # Both written so transformers 4 (reads tie_word_embeddings) and 5 (reads scale_decoder_outputs) agree.
    result.update(architectures=["T5ForConditionalGeneration"], model_type="t5",
                  tie_word_embeddings=c.tie_word_embeddings, scale_decoder_outputs=c.tie_word_embeddings)
  else:
    result.update(
        architectures=["FlashT5ForConditionalGeneration"], model_type="flash_t5", auto_map=FAT5_AUTO_MAP,
        tie_word_embeddings=False, use_glu_mlp=c.feed_forward_proj.startswith("gated-"),
        use_gelu_act=activation == "gelu",
        position_encoding_type={v: k for k, v in _FAT5_POSITIONS.items()}[c.position_encoding_type],
        alibi_mode="symetric", attention_scale=c.attention_scale, attention_type="ref",
        attention_dropout_rate=0.0, use_randomized_position_encoding=False, use_full_bias_size=False,
        use_masking=False, use_triton_layernorm=False, use_triton_crossentropy=False)
  return result


def _check_exportable(config: ModelConfig, layout: str):
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
  if layout == "hf":
    if config.position_encoding_type != "t5":
      raise ValueError(f"position_encoding_type={config.position_encoding_type!r} cannot be exported to Hugging Face "
                       "T5, which only has the bucketed relative bias ('t5'); export it with layout='fat5' if FAT5 "
                       "supports it, or keep it in our checkpoints")
    if config.attention_scale != 1.0:
      raise ValueError(f"attention_scale={config.attention_scale}: Hugging Face T5 always uses 1.0")
    return
  if config.position_encoding_type not in _FAT5_POSITIONS.values():
    raise ValueError(f"position_encoding_type={config.position_encoding_type!r} cannot be exported to FAT5: "
                     f"{_FAT5_UNSUPPORTED_POSITIONS[config.position_encoding_type]}")
  if config.position_encoding_type == "alibi" and config.alibi_mode != "symmetric":
    raise ValueError("alibi_mode='asymmetric' cannot be exported to FAT5, whose asymmetric ALiBi gives half the "
                     "heads only the past and half only the future")
  if config.feed_forward_proj not in ("gated-gelu", "gated-relu", "relu"):
    raise ValueError(f"feed_forward_proj={config.feed_forward_proj!r} cannot be exported to FAT5, which has "
                     "gated-gelu (tanh), gated-relu and relu only")


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing tensors

def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.flax import load_file  # the numpy loader refuses bfloat16

  return {name: np.asarray(t) for name, t in load_file(path).items()}


def _write_safetensors(path: str, tensors: dict[str, np.ndarray]):
  from safetensors.flax import save_file

  # transformers refuses files without the "pt" format tag.
  save_file({name: jax.numpy.asarray(t) for name, t in tensors.items()}, path, metadata={"format": "pt"})


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  import torch  # only PyTorch pickles need it

  state = torch.load(path, map_location="cpu", weights_only=True)
  out = {}
  for name, t in state.items():
    t = t.detach().contiguous()
    out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
  return out


def read_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """config.json and every tensor of a local checkpoint directory (safetensors, PyTorch .bin, or sharded)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"{path!r} has no config.json: expected a local Hugging Face checkpoint directory")
  with open(config_path) as f:
    config_json = json.load(f)
  for index, reader in (("model.safetensors.index.json", _read_safetensors),
                        ("pytorch_model.bin.index.json", _read_torch_bin)):
    if os.path.isfile(os.path.join(path, index)):
      with open(os.path.join(path, index)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      tensors = {}
      for shard in shards:
        tensors.update(reader(os.path.join(path, shard)))
      return config_json, tensors
  for single, reader in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_torch_bin)):
    if os.path.isfile(os.path.join(path, single)):
      return config_json, reader(os.path.join(path, single))
  raise ValueError(f"{path!r} has no model.safetensors, pytorch_model.bin or sharded index")


# ---------------------------------------------------------------------------------------------------------------
# Tensors <-> our parameters


def _flat_params(model_or_state) -> dict[str, nnx.Variable]:
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def _untie(config_json: dict, tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
  """Tensors with `lm_head.weight` as our untied head computes it (tied heads and rescaling folded in)."""
  if config.tie_word_embeddings or "shared.weight" not in tensors:
    return tensors
  tensors = dict(tensors)
  head = tensors.get("lm_head.weight", tensors["shared.weight"])
  if _checkpoint_scales(config_json, tensors):
    head = (head.astype(np.float32) * np.float32(config.d_model ** -0.5)).astype(head.dtype)
  tensors["lm_head.weight"] = head
  return tensors


def _checkpoint_tied(tensors: dict[str, np.ndarray]) -> bool:
  head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
  return head is None or (shared is not None and np.array_equal(head, shared))


def _checkpoint_scales(config_json: dict, tensors: dict[str, np.ndarray]) -> bool:
  return detect_layout(config_json, tensors) == "hf" and _scales_decoder_output(config_json)


def _with_embedding(tensors: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
  if "shared.weight" in tensors:
    return tensors
  for alias in layout.embedding_aliases:
    if alias in tensors:
      return {**tensors, "shared.weight": tensors[alias]}
  return tensors


def params_from_tensors(config: ModelConfig, config_json: dict, tensors: dict[str, np.ndarray],
                        expected: dict[str, jax.ShapeDtypeStruct], layout: str) -> dict[str, np.ndarray]:
  """Our parameters (path -> array in param_dtype) from checkpoint tensors; every tensor used, every shape checked."""
  rules = _LAYOUTS[layout]
  tensors = _untie(config_json, _with_embedding(tensors, rules), config)
  if config.tie_word_embeddings and not (_checkpoint_tied(tensors) and _checkpoint_scales(config_json, tensors)):
    raise ValueError("tie_word_embeddings=True, but the checkpoint's lm_head differs from its embedding or does not "
                     "rescale the decoder output; load it untied")
  params, used, missing = {}, set(), []
  for path, target in expected.items():
    name, (_, from_theirs) = their_name(rules, path)
    if name not in tensors:
      missing.append(name)
      continue
    value = from_theirs(tensors[name])
    if value.shape != tuple(target.shape):
      raise ValueError(
          f"{name}: checkpoint shape {tuple(tensors[name].shape)} does not fit our {path} of shape "
          f"{tuple(target.shape)} (theirs is [out, in] for linear weights); check num_heads x d_kv = "
          f"{config.num_heads} x {config.d_kv} = {config.num_heads * config.d_kv}, d_model={config.d_model}, "
          f"d_ff={config.d_ff}, vocab_size={config.vocab_size} and the layer counts in config.json")
    params[path] = np.asarray(value).astype(target.dtype)
    used.add(name)
  if missing:
    raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}")
  unused = sorted(set(tensors) - used - set(rules.embedding_aliases) - set(rules.ignored)
                  - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
  if unused:
    raise ValueError(f"checkpoint has {len(unused)} tensor(s) the config does not use, e.g. {unused[:5]}: check "
                     "num_layers, num_decoder_layers and feed_forward_proj in config.json")
  return params


def _their_tensors(model, rules: Layout) -> dict[str, np.ndarray]:
  """Every parameter of `model` under its name in `rules`, in their orientation, and the embedding's aliases."""
  tensors = {}
  for path, variable in _flat_params(model).items():
    name, (to_theirs, _) = their_name(rules, path)
    tensors[name] = np.ascontiguousarray(to_theirs(np.asarray(variable.get_value())))
  if rules.write_aliases:
    shared = tensors[their_name(rules, "shared.embedding")[0]]
    tensors.update({alias: shared for alias in rules.embedding_aliases})
  return tensors


def tensors_from_params(config: ModelConfig, model, layout: str) -> dict[str, np.ndarray]:
  """Checkpoint tensors (their names, their [out, in] orientation) of our model's parameters."""
  tensors = _their_tensors(model, _LAYOUTS[layout])
  if layout == "fat5" and config.tie_word_embeddings:  # FAT5 cannot tie: the head gets its own (rescaled) copy
    shared = tensors["shared.weight"]
    tensors["lm_head.weight"] = (shared.astype(np.float32) * np.float32(config.d_model ** -0.5)).astype(shared.dtype)
  return tensors


def _abstract_params(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  return {path: v.get_value() for path, v in _flat_params(abstract_parameters(config)).items()}


def _build(config: ModelConfig, params: dict[str, np.ndarray], seed: int) -> T5:
  """A T5 holding `params` (by flat path), built without drawing random weights."""
  param_state = abstract_parameters(config)
  for path, variable in _flat_params(param_state).items():
    variable.set_value(jax.numpy.asarray(params[path]))
  return from_parameters(config, param_state, seed)


def from_hf(path: str, *, seed: int = 0, **config_overrides) -> tuple[ModelConfig, T5]:
  """(config, model) of a local Hugging Face T5 / T5 v1.1 / FLAN-T5 / mT5 or FAT5 checkpoint directory.

  The layout is recognized from config.json and the tensor names. Computes in float32 (as Hugging Face does) unless
  `config_overrides` (any ModelConfig field) say otherwise; `seed` only seeds dropout.
  """
  config_json, tensors = read_checkpoint(path)
  layout = detect_layout(config_json, tensors)
  tied = _checkpoint_tied(_with_embedding(tensors, _LAYOUTS[layout]))
  config = model_config_from_json(config_json, layout=layout, tied=tied, **config_overrides)
  expected = _abstract_params(config)
  params = params_from_tensors(config, config_json, tensors, expected, layout)
  return config, _build(config, params, seed)


def load_params(model: T5, path: str):
  """Replaces `model`'s parameters, in place, by those of the checkpoint at `path` (its config must match)."""
  config_json, tensors = read_checkpoint(path)
  variables = _flat_params(model)
  expected = {p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype) for p, v in variables.items()}
  params = params_from_tensors(model.config, config_json, tensors, expected, detect_layout(config_json, tensors))
  for p, variable in variables.items():
    variable.set_value(jax.numpy.asarray(params[p]))


def to_hf(config: ModelConfig, model: T5 | EncoderWithHead, out_dir: str, *, layout: str = "hf",
          tokenizer: Tokenizer | None = None, labels: Sequence[str] | None = None):
  """Writes config.json and model.safetensors that transformers (layout 'hf', `T5ForConditionalGeneration`) or FAT5
  (layout 'fat5', `FlashT5ForConditionalGeneration`, with its modeling code) loads with no missing or unexpected keys,
  and with `tokenizer` the files `AutoTokenizer.from_pretrained(out_dir)` needs to encode and decode as it does. A
  fine-tuned encoder head is written as its HEAD_CLASSES entry says (with HEAD_FILE where the class lacks the head), its
  outputs named by `labels` (default `LABEL_{i}`). Every file is world-readable. Raises ValueError when the layout
  cannot express the model (e.g. ALiBi for Hugging Face)."""
  if isinstance(model, EncoderWithHead):
    config_json, files = _head_export(config, model, layout, labels)
  else:
    config_json, files = hf_config_dict(config, layout), {MODEL_FILE: tensors_from_params(config, model, layout)}
  os.makedirs(out_dir, exist_ok=True)
  written = [os.path.join(out_dir, "config.json")]
  with open(written[0], "w") as f:
    json.dump(config_json, f, indent=2, sort_keys=True)
  for name, tensors in files.items():
    written.append(os.path.join(out_dir, name))
    _write_safetensors(written[-1], tensors)
  if tokenizer is not None:
    written += write_tokenizer(tokenizer, out_dir)
  for path in written:  # safetensors writes 0600; an export is meant to be shared
    os.chmod(path, 0o644)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuned encoder heads


@dataclasses.dataclass(frozen=True)
class HeadClass:
  """The PyTorch class that a fine-tuned encoder head exports to in one layout.

  dense: the name of the head's dense layer there (`{dense}.weight` [outputs, d_model] and `{dense}.bias`).
  computes_head: whether the class computes our head. If not, it is the encoder alone, and the dense layer is
  written to HEAD_FILE beside it.
  prefix: before the encoder's names (T5ForTokenClassification holds a T5EncoderModel as `transformer`).
  auto_class: the transformers Auto class that FAT5's auto_map gives a head class (FAT5 layout only).
  """
  architecture: str
  dense: str
  computes_head: bool
  prefix: str = ""
  auto_class: str | None = None


HEAD_CLASSES = {
    "hf": {
        # T5ForSequenceClassification runs the decoder and reads its last EOS state; nothing pools the encoder.
        "classification": HeadClass("T5EncoderModel", "classifier", computes_head=False),
        "token_classification": HeadClass("T5ForTokenClassification", "classifier", computes_head=True,
                                          prefix="transformer."),
        # T5ForQuestionAnswering runs the decoder and puts its qa_outputs on the decoder's output.
        "question_answering": HeadClass("T5EncoderModel", "qa_outputs", computes_head=False),
    },
    "fat5": {
        # FlashT5ForSequenceClassification reads the last EOS state through dense, tanh and out_proj layers.
        "classification": HeadClass("FlashT5EncoderModel", "classifier", computes_head=False),
        "token_classification": HeadClass("FlashT5ForTokenClassification", "classifier", computes_head=True,
                                          auto_class="AutoModelForTokenClassification"),
        "question_answering": HeadClass("FlashT5ForQuestionAnswering", "qa_outputs", computes_head=True,
                                        auto_class="AutoModelForQuestionAnswering"),
    },
}
_FAT5_HEADS_MODULE = "custom_heads_flash_t5"  # where FAT5 keeps its encoder-head classes
# What the head computes from the encoder's last hidden state, recorded in config.json for whoever loads the export.
HEAD_LOGITS = {
    "classification": "{dense}(x / sqrt(mean(x**2) + layer_norm_epsilon)), x = the last hidden state averaged over "
                      "the tokens where attention_mask is 1",
    "token_classification": "{dense}(last hidden state), per token",
    "question_answering": "{dense}(last hidden state), per token: [..., 0] start logits, [..., 1] end logits",
}


def _head_layout(layout: str, target: HeadClass) -> Layout:
  """`layout`'s rules under `target.prefix`, and the head's dense layer; the encoder's embedding alias only."""
  base = _LAYOUTS[layout]
  rules = tuple((ours, target.prefix + theirs, codec) for ours, theirs, codec in base.rules)
  rules += (("head_kernel", f"{target.dense}.weight", TRANSPOSE), ("head_bias", f"{target.dense}.bias", SAME))
  return dataclasses.replace(base, name=f"{layout} {target.architecture}", rules=rules,
                             embedding_aliases=(f"{target.prefix}encoder.embed_tokens.weight",))


def _head_export(config: ModelConfig, model: EncoderWithHead, layout: str,
                 labels: Sequence[str] | None) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
  """(config.json, {file name: tensors}) of a fine-tuned encoder head in `layout`."""
  config_json = hf_config_dict(config, layout)
  target = HEAD_CLASSES[layout][model.head_type]
  tensors = _their_tensors(model, _head_layout(layout, target))
  head_names = (f"{target.dense}.weight", f"{target.dense}.bias")
  files = {MODEL_FILE: tensors} if target.computes_head else {
      MODEL_FILE: {k: v for k, v in tensors.items() if k not in head_names},
      HEAD_FILE: {k: tensors[k] for k in head_names}}
  outputs = tensors[head_names[1]].shape[0]
  if labels is None or len(labels) != outputs:  # question answering's two outputs are start and end, not labels
    labels = [f"LABEL_{i}" for i in range(outputs)]
  config_json.update(  # classifier_dropout 0: our heads have no dropout of their own
      architectures=[target.architecture], is_encoder_decoder=False, use_cache=False, classifier_dropout=0.0,
      id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
      encoder_head={"type": model.head_type, "weights": MODEL_FILE if target.computes_head else HEAD_FILE,
                    "logits": HEAD_LOGITS[model.head_type].format(dense=target.dense)})
  if layout == "fat5":  # the encoder for AutoModel, the head's class for its Auto class
    config_json["auto_map"] = {"AutoModel": FAT5_AUTO_MAP["AutoModel"]}
    if target.computes_head:
      config_json["auto_map"][target.auto_class] = f"{_FAT5_HEADS_MODULE}.{target.architecture}"
  return config_json, files


def head_to_hf(config: ModelConfig, model: EncoderWithHead, out_dir: str, *, tokenizer: Tokenizer | None = None,
               labels: Sequence[str] | None = None) -> dict[str, str]:
  """Writes a fine-tuned encoder head in every layout, to `{out_dir}/{layout}`, once all of them can express it;
  returns {directory: class}."""
  for layout in LAYOUTS:
    _check_exportable(config, layout)
  written = {}
  for layout in LAYOUTS:
    written[os.path.join(out_dir, layout)] = HEAD_CLASSES[layout][model.head_type].architecture
    to_hf(config, model, os.path.join(out_dir, layout), layout=layout, tokenizer=tokenizer, labels=labels)
  return written


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer files


def write_tokenizer(tokenizer: Tokenizer, out_dir: str) -> list[str]:
  """Writes spiece.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns their paths.

  transformers 5's T5Tokenizer turns any spiece.model into a Unigram model without byte fallback, which splits a
  BPE vocabulary differently and maps unseen characters to <unk>. tokenizer.json, loaded as it is by
  `PreTrainedTokenizerFast` in transformers 4 and 5, reproduces sentencepiece instead; spiece.model stays for
  sentencepiece users and for `import_hf`.
  """
  from sentencepiece import sentencepiece_model_pb2  # the normalizer and piece types are only in the proto

  with open(tokenizer.path, "rb") as f:
    model_bytes = f.read()
  proto = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
  pieces, trainer = proto.pieces, proto.trainer_spec
  specials = {"eos_token": pieces[trainer.eos_id].piece, "pad_token": pieces[trainer.pad_id].piece,
              "unk_token": pieces[trainer.unk_id].piece,
              "additional_special_tokens": [f"<extra_id_{i}>" for i in range(tokenizer.num_sentinels)]}
  # extra_ids lets T5Tokenizer.from_pretrained(out_dir), asked for by name, read spiece.model with our sentinels.
  tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "extra_ids": tokenizer.num_sentinels, **specials}
  files = {"spiece.model": model_bytes,
           "tokenizer.json": json.dumps(tokenizer_json(proto, tokenizer.num_sentinels), ensure_ascii=False),
           "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
           "special_tokens_map.json": json.dumps(specials, indent=2)}
  paths = []
  for name, content in files.items():
    paths.append(os.path.join(out_dir, name))
    with open(paths[-1], "wb") as f:
      f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
  return paths


def tokenizer_json(proto, num_sentinels: int) -> dict:
  """The `tokenizers` serialization of a sentencepiece ModelProto followed by `num_sentinels` `<extra_id_N>`
  sentinels, counting down from the top id as in fat5_jax.data.tokenizer.

  Follows the model's settings as sentencepiece applies them: its normalization (character map, extra spaces, a
  dummy prefix on each stretch of text between sentinels), user-defined pieces (the UL2 prefixes) kept whole, BPE
  merges ranked by piece score, byte fallback. The decoder drops the space that starts the text after a sentinel,
  pad or eos, as our decode (sentencepiece on each stretch between them) does.
  """
  from sentencepiece import sentencepiece_model_pb2

  piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
  pieces, spec, trainer = proto.pieces, proto.normalizer_spec, proto.trainer_spec
  user_defined = [p.piece for p in pieces if p.type == piece_type.USER_DEFINED]
  if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
    # Sentencepiece merges the pair whose result scores highest: rank every split of a piece by the piece's score.
    rank = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == piece_type.NORMAL}
    merges = sorted((rank[piece], piece[:k], piece[k:]) for piece in rank for k in range(1, len(piece))
                    if piece[:k] in rank and piece[k:] in rank)
    # No merge builds a user-defined piece: ignore_merges takes a word (isolated below) that is a piece as it is.
    model = {"type": "BPE", "dropout": None, "unk_token": trainer.unk_piece, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": trainer.byte_fallback,
             "ignore_merges": bool(user_defined), "vocab": {p.piece: i for i, p in enumerate(pieces)},
             "merges": [[left, right] for _, left, right in merges]}
  elif trainer.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
    model = {"type": "Unigram", "unk_id": trainer.unk_id, "byte_fallback": trainer.byte_fallback,
             "vocab": [[p.piece, p.score] for p in pieces]}
  else:
    raise ValueError(f"sentencepiece model type {trainer.model_type} has no tokenizers equivalent: use bpe or unigram")

  normalizers = []
  if spec.precompiled_charsmap:
    normalizers.append({"type": "Precompiled",
                        "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode("ascii")})
  if spec.remove_extra_whitespaces:
    normalizers += [_replace(r"\A +| +\z", "", regex=True), _replace(" {2,}", " ", regex=True)]
  if spec.escape_whitespaces:
    normalizers.append(_replace(" ", "▁"))
  pre_tokenizers = []
  if spec.add_dummy_prefix:
    # Metaspace skips the dummy prefix when the text already starts with "▁"; sentencepiece does not.
    normalizers.append(_replace(r"\A▁", "▁▁", regex=True))
    pre_tokenizers.append({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False})
  if user_defined:
    pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
    pre_tokenizers.append({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False})

  eos = pieces[trainer.eos_id].piece
  specials = [(i, pieces[i].piece) for i in sorted({trainer.pad_id, trainer.eos_id, trainer.unk_id})]
  specials += [(len(pieces) + num_sentinels - 1 - n, f"<extra_id_{n}>") for n in reversed(range(num_sentinels))]
  # Sentencepiece decodes <unk> as its unk_surface (" ⁇ "), not as the piece.
  decoders = [_replace("▁", " "), _replace(pieces[trainer.unk_id].piece, trainer.unk_surface)]
  if trainer.byte_fallback:
    decoders.append({"type": "ByteFallback"})
  decoders.append({"type": "Fuse"})
  if spec.add_dummy_prefix:
    digits = len(str(num_sentinels - 1))  # a lookbehind needs fixed-length alternatives
    after_special = "|".join([re.escape(pieces[trainer.pad_id].piece), re.escape(eos)]
                             + [rf"<extra_id_\d{{{k}}}>" for k in range(1, digits + 1)])
    decoders += [{"type": "Strip", "content": " ", "start": 1, "stop": 0},
                 _replace(f"(?<={after_special}) ", "", regex=True)]
  sequence = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}
  eos_token = {"SpecialToken": {"id": eos, "type_id": 0}}
  return {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": True} for i, content in specials],
      "normalizer": {"type": "Sequence", "normalizers": normalizers},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
      # T5's: eos after each sequence.
      "post_processor": {"type": "TemplateProcessing", "single": [sequence[0], eos_token],
                         "pair": [sequence[0], eos_token, sequence[1], eos_token],
                         "special_tokens": {eos: {"id": eos, "ids": [trainer.eos_id], "tokens": [eos]}}},
      "decoder": {"type": "Sequence", "decoders": decoders},
      "model": model,
  }


def _replace(pattern: str, content: str, regex: bool = False) -> dict:
  return {"type": "Replace", "pattern": {"Regex" if regex else "String": pattern}, "content": content}
