"""FAT5-fr-small pretrained on long rows: 8,192 encoder tokens on one H200 (docs/training.md, "Long context").

small_fr's architecture and optimizer; each row is one chunk of the corpus read as a stream (docs/data.md, "Long
rows"), 8,192 encoder / 2,048 decoder tokens, 8 rows x 4 accumulation steps.
"""

from configs import small_fr


def get_config():
  config = small_fr.get_config()
  config.workdir = "runs/small_fr_long"
  # The decoder bounds every denoiser's chunk: at 512 it fills 17 % of an 8,192-token encoder with FAT5's mixture,
  # at 2,048 56 % (89 % of the decoder), for 21 % more FLOPs per row (10.0 against 8.3 TFLOP). Stream chunks have
  # their denoiser's full raw length, whose targets (1,465 to 2,048 tokens) all fall in one bucket.
  config.data.update(encoder_length=8192, decoder_length=2048, decoder_length_buckets=(2048,), stream=True,
                     pack=False)
  # 32 rows of 8,192 encoder positions per optimizer step: small_fr's 128 x 4 rows of 512 (262,144 positions), so
  # its learning rate and schedule carry over.
  config.train.update(batch_size=8, grad_accum_steps=4, remat="none")
  # remat: this config's 8 rows of 8,192 + 2,048 take 27.5 GiB without remat on the H200 (0.915 s per step of 4 x 8
  # full rows, 35.4% MFU); remat=block takes 8 rows of 8,192 + 512 in 4.8 GiB instead of 23.5 for 22% more time per
  # step (benchmarks/README.md, "Rematerialization"), and 32 rows in one micro-batch under block ran 23% slower than
  # 4 accumulated micro-batches of 8 without it (1.055 against 0.860 s at 8,192 + 512).
  return config
