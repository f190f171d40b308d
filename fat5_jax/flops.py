"""Training FLOPs of one row and the peak FLOP/s of the chips we know: the two figures behind the MFU we report.

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


# Dense (no sparsity) bf16 tensor-core peak per device, keyed by the exact `device_kind` CUDA reports: boards of
# one family differ (H100 PCIe runs at 3/4 of the SXM peak), so a substring match would mix them.
# Sources: NVIDIA's H100 datasheet (SXM 1,979 / PCIe 1,513 TFLOP/s with sparsity), H200 datasheet (SXM 1,979 with
# sparsity; the lent H200, 1,980 MHz, is the SXM board), A100 datasheet (312 for every A100 board).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
}


def peak_flops(device) -> float | None:
  """The dense bf16 peak of `device`, or None for a chip not in PEAK_FLOPS (then no MFU is reported)."""
  return PEAK_FLOPS.get(getattr(device, "device_kind", ""))
