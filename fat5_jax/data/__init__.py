"""The input side of pretraining: corpus -> sentencepiece tokenizer -> UL2 denoisers -> packed, bucketed batches;
and of fine-tuning: tasks -> unpacked batches (`tasks.batches`).

Knows tokens and arrays, never the model. See docs/data.md.
"""

from fat5_jax.data.inspection import inspect_data
from fat5_jax.data.packing import BATCH_KEYS, padding_fractions
from fat5_jax.data.pipeline import make_eval_batches, make_train_iterator, train_rows
from fat5_jax.data.tasks import Task, load_task, majority_baseline
from fat5_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["BATCH_KEYS", "Task", "Tokenizer", "inspect_data", "load_task", "load_tokenizer", "majority_baseline",
           "make_eval_batches", "make_train_iterator", "padding_fractions", "train_rows"]
