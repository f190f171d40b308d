"""Task metrics of fine-tuning, computed by the libraries that define them: accuracy and macro-F1 (scikit-learn),
ROUGE-L (Google's `rouge-score`) and chrF (`sacrebleu`); span exact match and F1 over token positions. Every value
is in [0, 1] (chrF too, sacrebleu's score / 100). The libraries are imported on first use: pretraining, and a GPU
image that lacks them, never need them."""

from __future__ import annotations

import functools
import re
from typing import Sequence

import numpy as np

NO_LABEL = -1  # a seq2seq prediction that is none of the labels: wrong for every metric


def classification_metrics(predicted: Sequence[int], gold: Sequence[int], num_labels: int) -> dict[str, float]:
  """accuracy and macro-F1 over the `num_labels` classes (a class absent from both scores 0, as in scikit-learn
  with zero_division=0)."""
  from sklearn import metrics as sk_metrics

  predicted, gold = np.asarray(predicted), np.asarray(gold)
  return {"accuracy": float(sk_metrics.accuracy_score(gold, predicted)),
          "macro_f1": float(sk_metrics.f1_score(gold, predicted, labels=list(range(num_labels)), average="macro",
                                                zero_division=0))}


class _WordTokenizer:
  """rouge-score's default tokenizer keeps only [a-z0-9], which erases every accented French word: words here are
  Unicode \\w runs, lower-cased."""

  def tokenize(self, text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@functools.cache
def _rouge_l():
  from rouge_score import rouge_scorer

  return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """exact_match (after stripping surrounding spaces), rouge_l (mean F-measure per example) and corpus chrF."""
  if len(predictions) != len(references) or not predictions:
    raise ValueError(f"generation_metrics: {len(predictions)} predictions for {len(references)} references")
  import sacrebleu

  exact = np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)])
  rouge = np.mean([_rouge_l().score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])
  chrf = sacrebleu.corpus_chrf(list(predictions), [list(references)]).score / 100.0
  return {"exact_match": float(exact), "rouge_l": float(rouge), "chrf": float(chrf)}


def span_metrics(predicted: Sequence[tuple[int, int]], gold: Sequence[tuple[int, int]]) -> dict[str, float]:
  """exact_match and F1 of inclusive (start, end) token spans, per example then averaged: the overlap of the
  positions, as SQuAD's F1 overlaps words. A span ending before it starts is empty."""
  exact, f1 = [], []
  for (p_start, p_end), (g_start, g_end) in zip(predicted, gold, strict=True):
    exact.append(p_start == g_start and p_end == g_end)
    overlap = max(0, min(p_end, g_end) - max(p_start, g_start) + 1)
    p_size, g_size = max(0, p_end - p_start + 1), max(0, g_end - g_start + 1)
    f1.append(0.0 if overlap == 0 else 2 * overlap / (p_size + g_size))
  return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}


# The validation metric that picks the best checkpoint, by what the task predicts.
SELECTION_METRIC = {"labels": "accuracy", "text": "rouge_l", "spans": "f1"}
