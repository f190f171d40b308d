"""Generated text for a file of inputs, from a checkpoint of a seq2seq run of ours."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fat5_jax import checkpoint
from fat5_jax import model as model_lib
from fat5_jax.config import Config
from fat5_jax.data import tokenizer as tokenizer_lib
from fat5_jax.generate import generate

_SHORTEST_BUCKET = 8


def read_inputs(path: str) -> list[str]:
  """The inputs of `path`: JSON Lines (a name ending in .jsonl or .json) with a "text" field, otherwise one input per
  line. Blank lines are skipped."""
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  if not path.endswith((".jsonl", ".json")):
    return lines
  texts = []
  for number, line in enumerate(lines, 1):
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise ValueError(f"{path}: record {number} has no string field 'text': {line[:200]}")
    texts.append(record["text"])
  return texts


def _bucket(length: int, longest: int) -> int:
  """Input lengths are padded to powers of two (capped at `longest`): a few compilations, little padding."""
  return min(longest, max(_SHORTEST_BUCKET, 1 << (length - 1).bit_length()))


def predict(config: Config, input_path: str, output_path: str, *, batch_size: int = 32,
            max_input_length: int | None = None, max_length: int | None = None, seed: int = 0,
            **generation_options) -> int:
  """Writes `output_path`, JSON Lines of {"input": text, "output": generated text} in the order of the inputs, and
  returns how many. Called by `python main.py --config=CFG --mode=predict --input=FILE --output=FILE`, or directly.

  The model is a checkpoint of `config.workdir` (pretrained, imported or a seq2seq fine-tuning; the best step of a
  finished fine-tuning, else the newest: `checkpoint.restore_params`), and the tokenizer the one recorded there. Each
  input (see `read_inputs`) is encoded as in training, pieces then EOS, truncated to `max_input_length` tokens (default
  data.encoder_length); at most `max_length` tokens are generated (default data.decoder_length), in batches of
  `batch_size` inputs of similar lengths. `generation_options` are those of `fat5_jax.generate.generate` (num_beams,
  length_penalty, early_stopping, do_sample, temperature, top_k, top_p); sampling draws from PRNG key `seed`. The file
  is written beside its destination, then renamed: an interrupted run leaves no partial output. One process.
  """
  if "num_return_sequences" in generation_options:
    raise ValueError("predict writes one output per input: num_return_sequences is not an option")
  tokenizer = tokenizer_lib.recorded_tokenizer(config.data, config.workdir)
  if tokenizer is None:
    raise SystemExit(f"{config.workdir} has no tokenizer ({tokenizer_lib.model_path(config.workdir)}): its weights' "
                     "ids cannot be read or written as text")
  # On one device, whatever mesh the run trained on: generation batches are small.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                 nnx.to_pure_dict(model_lib.abstract_parameters(config.model)))
  step, params = checkpoint.restore_params(config, abstract_params)
  model = model_lib.from_parameters(config.model, params)

  texts = read_inputs(input_path)
  longest = max_input_length or config.data.encoder_length
  eos = config.model.eos_token_id
  encoded = [ids[:longest - 1] + [eos] for ids in tokenizer.encode_batch(texts)] if texts else []
  outputs = [""] * len(texts)
  order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
  key = jax.random.key(seed)
  for number, start in enumerate(range(0, len(order), batch_size)):
    rows = order[start:start + batch_size]
    width = _bucket(max(len(encoded[i]) for i in rows), longest)
    # Full batches only (one shape per length bucket): missing rows are a lone EOS, their outputs dropped.
    ids = np.full((batch_size, width), config.model.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for row in range(batch_size):
      tokens = encoded[rows[row]] if row < len(rows) else [eos]
      ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    generated = np.asarray(generate(model, jnp.asarray(ids), jnp.asarray(mask),
                                    max_length=max_length or config.data.decoder_length,
                                    rng=jax.random.fold_in(key, number), **generation_options))
    for row, i in enumerate(rows):
      outputs[i] = tokenizer.decode_generated(generated[row])

  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  partial = f"{output_path}.partial"
  try:
    with open(partial, "w", encoding="utf-8") as f:
      for text, output in zip(texts, outputs):
        f.write(json.dumps({"input": text, "output": output}, ensure_ascii=False) + "\n")
    os.replace(partial, output_path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  print(f"wrote {len(texts)} predictions of step {step} to {output_path}")
  return len(texts)
