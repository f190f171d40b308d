"""FLAN-T5-base architecture (vocab 32128, GEGLU, untied) for continued pretraining from imported weights.

Import the weights first: python main.py --config=configs/flan_t5_base.py --mode=import_hf --hf_dir=DIR
"""

from fat5_jax.config import to_config_dict


def get_config():
  config = to_config_dict()
  config.workdir = "runs/flan_t5_base"
  config.model.update(
      vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12,
      feed_forward_proj="gated-gelu", position_encoding_type="t5", relative_attention_num_buckets=32,
      relative_attention_max_distance=128, tie_word_embeddings=False, param_dtype="float32", dtype="bfloat16")
  config.data.update(tokenizer_vocab_size=32100, num_sentinels=100)
  config.train.update(learning_rate=1e-3, warmup_steps=1000)
  return config
