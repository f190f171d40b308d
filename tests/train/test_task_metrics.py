"""Fine-tuning metrics against values computed by hand."""

import numpy as np
import pytest

from fat5_jax import task_metrics


def test_classification_accuracy_and_macro_f1():
  # gold 0 0 1 2, predicted 0 1 1 NO_LABEL: class 0 P=1 R=1/2 F1=2/3; class 1 P=1/2 R=1 F1=2/3; class 2 F1=0;
  # class 3 never seen: 0. Macro over 4 classes: (2/3 + 2/3) / 4 = 1/3.
  got = task_metrics.classification_metrics([0, 1, 1, task_metrics.NO_LABEL], [0, 0, 1, 2], num_labels=4)
  assert got["accuracy"] == pytest.approx(0.5)
  assert got["macro_f1"] == pytest.approx(1 / 3)


def test_generation_exact_match_rouge_l_and_chrf():
  got = task_metrics.generation_metrics(["actrice française", "Chanteur"], [" actrice française", "chanteuse"])
  assert got["exact_match"] == pytest.approx(0.5)
  # Example 1 identical (1.0); example 2: "chanteur" vs "chanteuse" share no word (0.0).
  assert got["rouge_l"] == pytest.approx(0.5)
  assert 0.0 < got["chrf"] < 1.0


def test_rouge_l_keeps_accented_words():
  # LCS of "écrivain écossais né" and "écrivain né à Paris" is "écrivain né": P = 2/3, R = 2/4, F = 4/7.
  got = task_metrics.generation_metrics(["écrivain écossais né"], ["écrivain né à Paris"])
  assert got["rouge_l"] == pytest.approx(4 / 7)


def test_chrf_of_identical_texts_is_one():
  assert task_metrics.generation_metrics(["même texte"], ["même texte"])["chrf"] == pytest.approx(1.0)


def test_span_exact_match_and_f1():
  # (2, 4) vs (3, 5): overlap 2, sizes 3 and 3, F1 2/3; (1, 1) exact; (5, 4) is empty: 0.
  got = task_metrics.span_metrics([(2, 4), (1, 1), (5, 4)], [(3, 5), (1, 1), (4, 6)])
  assert got["exact_match"] == pytest.approx(1 / 3)
  assert got["f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_span_of_an_answer_cut_off_the_input_is_wrong():
  got = task_metrics.span_metrics([(1, 2), (3, 3)], [(1, 2), None])
  assert got == {"exact_match": 0.5, "f1": 0.5}


def test_best_span_starts_before_it_ends_within_the_allowed_tokens():
  start = np.array([0.0, 1.0, 5.0, 9.0])
  end = np.array([0.0, 4.0, 1.0, 8.0])
  # Independent argmaxes give (3, 3) with 17; (3, 3) stays best while position 3 is allowed.
  assert task_metrics.best_span(start, end, np.array([True] * 4)) == (3, 3)
  # Without position 3: start 2 with end 1 (9) would end before it starts; the best span is (2, 2), 6 > 1 + 4.
  assert task_metrics.best_span(start, end, np.array([True, True, True, False])) == (2, 2)
  assert task_metrics.best_span(start, np.array([0.0, 9.0, 0.0, 0.0]), np.array([True, True, True, False])) == (1, 1)
