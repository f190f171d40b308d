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


def span_metrics(predicted: Sequence[tuple[int, int]], gold: Sequence[tuple[int, int] | None]) -> dict[str, float]:
  """exact_match and F1 of inclusive (start, end) token spans, per example then averaged: the overlap of the
  positions, as SQuAD's F1 overlaps words. A span ending before it starts is empty; a gold span of None (an answer
  the model could not see, cut off the input) scores 0."""
  exact, f1 = [], []
  for (p_start, p_end), gold_span in zip(predicted, gold, strict=True):
    if gold_span is None:
      exact.append(False)
      f1.append(0.0)
      continue
    g_start, g_end = gold_span
    exact.append(p_start == g_start and p_end == g_end)
    overlap = max(0, min(p_end, g_end) - max(p_start, g_start) + 1)
    p_size, g_size = max(0, p_end - p_start + 1), max(0, g_end - g_start + 1)
    f1.append(0.0 if overlap == 0 else 2 * overlap / (p_size + g_size))
  return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, allowed: np.ndarray) -> tuple[int, int]:
  """The (start, end) of highest start + end logit with start <= end, both where `allowed` ([S] bools, e.g. the
  row's real tokens): a span the model can mean, unlike two independent argmaxes."""
  scores = np.where(allowed[:, None] & allowed[None, :], start_logits[:, None] + end_logits[None, :], -np.inf)
  scores = np.where(np.triu(np.ones_like(scores, bool)), scores, -np.inf)
  start, end = np.unravel_index(np.argmax(scores), scores.shape)
  return int(start), int(end)


# The validation metric that picks the best checkpoint, by task kind: macro-F1 for tags, since one tag (O) usually
# holds most tokens and always answering it scores a high accuracy.
SELECTION_METRIC = {"classification": "accuracy", "generation": "rouge_l", "token_classification": "macro_f1",
                    "question_answering": "f1"}
