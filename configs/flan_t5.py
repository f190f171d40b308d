"""FLAN-T5 architectures (vocab 32128, GEGLU, untied head) for continued pretraining from imported weights.

`configs/flan_t5_{small,base,large,xl}.py` each pick one size. Import the weights before training:
  python main.py --config=configs/flan_t5_base.py --mode=import_hf --hf_dir=DIR
The data section expects T5's own tokenizer: --config.data.tokenizer_path=DIR/spiece.model.
"""

from fat5_jax.config import DEFAULT_DENOISERS, to_config_dict

# From the published config.json of google/flan-t5-{size}.
SIZES = {
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    "xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
}


def get_config(size: str = "base"):
  """One of SIZES; also usable directly: --config=configs/flan_t5.py:large."""
  config = to_config_dict()
  config.workdir = f"runs/flan_t5_{size}"
  config.model.update(
      vocab_size=32128, feed_forward_proj="gated-gelu", position_encoding_type="t5",
      relative_attention_num_buckets=32, relative_attention_max_distance=128, tie_word_embeddings=False,
      param_dtype="float32", dtype="bfloat16", **SIZES[size])
  # T5's spiece.model has no [R]/[S]/[X] pieces: the same UL2 mixture without prefix tokens.
  config.data.update(tokenizer_vocab_size=32100, num_sentinels=100,
                     denoisers=tuple((mu, r, spans, "") for mu, r, spans, _ in DEFAULT_DENOISERS))
  config.train.update(learning_rate=1e-3, warmup_steps=1000)
  return config
