"""FAT5-fr-small: the architecture and pretraining recipe of CATIE's FAT5 small French model (GPU config).

146,832,896 parameters; UL2 on 512 encoder / 512 decoder tokens; 128 rows x 4 accumulation steps; all-bf16
parameters with Kahan-compensated AdamWScale.
"""

from fat5_jax.config import to_config_dict


def get_config():
  config = to_config_dict()
  config.workdir = "runs/small_fr"
  config.model.update(
      vocab_size=32768, d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=12, num_decoder_layers=12,
      feed_forward_proj="gated-gelu", position_encoding_type="t5", relative_attention_num_buckets=32,
      relative_attention_max_distance=128, attention_scale=1.0, tie_word_embeddings=False,
      param_dtype="bfloat16", dtype="bfloat16", attention_impl="flash", kernel_backend="auto")
  config.data.update(encoder_length=512, decoder_length=512, decoder_length_buckets=(128, 256, 512),
                     tokenizer_vocab_size=32768)
  config.train.update(batch_size=128, grad_accum_steps=4, learning_rate=5e-3, warmup_steps=20_000, z_loss=1e-4,
                      kahan=True, schedule="cosine")
  return config
