"""Training FLOPs of one row, the figure behind the MFU we report.

Counted as matmul work only (embedding lookups, norms and softmax are noise at these sizes): 6 x parameters x tokens
for each dense layer (forward 2, backward 4), with cross-attention's key/value projections run over the encoder
tokens, plus attention's two S_q x S_k products per layer (3 x 4 S_q S_k heads d_kv: forward and backward), halved
for causal self-attention. For small_fr (512/512) this is 447.75 GFLOP per row.
"""

from __future__ import annotations

from fat5_jax.config import ModelConfig


def training_flops_per_row(config: ModelConfig, encoder_length: int, decoder_length: int) -> float:
  d, inner = config.d_model, config.num_heads * config.d_kv
  ff = (3 if config.feed_forward_proj.startswith("gated-") else 2) * d * config.d_ff
  attention_proj = 4 * d * inner
  encoder_matmul = config.num_layers * (attention_proj + ff) * encoder_length
  decoder_matmul = config.num_decoder_layers * (
      (attention_proj + ff + 2 * d * inner) * decoder_length  # self-attention, feed-forward, cross q and o
      + 2 * d * inner * encoder_length)  # cross k and v over the encoder
  lm_head = d * config.vocab_size * decoder_length
  products = lambda sq, sk: 3 * 4 * sq * sk * inner
  attention = (config.num_layers * products(encoder_length, encoder_length)
               + config.num_decoder_layers * (products(decoder_length, decoder_length) / 2
                                              + products(decoder_length, encoder_length)))
  return 6.0 * (encoder_matmul + decoder_matmul + lm_head) + attention
