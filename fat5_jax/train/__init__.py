"""Training: the Trainer (state, jitted steps), the loop of `main.py`, fine-tuning (`finetune`), and multi-host
agreement (`distributed`)."""

from fat5_jax.train import finetune  # the module; the mode is finetune.finetune(config)
from fat5_jax.train.loop import evaluate_latest, train
from fat5_jax.train.trainer import Trainer
