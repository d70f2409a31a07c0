"""VQA accuracy against the official definition worked out by hand, and the answer normalisation."""

from __future__ import annotations

import random

import pytest

from vlm.errors import VLMConfigError
from vlm.metrics import VQAAccuracy, normalize_answer, vqa_accuracy


def leave_one_out(matches: int, total: int = 10) -> float:
    """Official VQA accuracy with ``matches`` of ``total`` human answers equal to the prediction.

    Leaving out a matching answer leaves matches - 1 votes, leaving out another one leaves matches.
    """
    return (matches * min((matches - 1) / 3, 1) + (total - matches) * min(matches / 3, 1)) / total


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_answers_follow_the_leave_one_out_rule(matches, expected):
    answers = ["2"] * matches + ["3", "4", "many", "5", "6", "7", "8", "9", "10", "11"][: 10 - matches]
    assert leave_one_out(matches) == pytest.approx(expected)
    assert vqa_accuracy("2", answers) == pytest.approx(leave_one_out(matches), abs=1e-12)
    random.Random(matches).shuffle(answers)  # order does not matter
    assert vqa_accuracy("two", answers) == pytest.approx(expected, abs=1e-12)


def test_few_answers_need_an_exact_match_after_normalisation():
    assert vqa_accuracy("A dog.", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("yes", ["no", "Yes"]) == 1.0


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"),
    ("a dog.", "dog"),
    ("The  Red\tCar", "red car"),
    ("dont", "don't"),
    ("don't", "don't"),
    ("isnt it", "isn't it"),
    ("none", "0"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("yes!", "yes"),
    ("black-and-white", "black and white"),
    ("black - white", "black white"),
    ("t-shirt", "t shirt"),
    ("its", "its"),
    ("An apple?", "apple"),
])
def test_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_metric_is_the_mean_of_the_function_over_batches():
    rng = random.Random(0)
    vocab = ["yes", "no", "2", "two", "red", "a red", "dog", "dogs", "the dog."]
    preds, answers = [], []
    for q in range(50):
        answers.append([rng.choice(vocab) for _ in range(10 if q % 3 else 1)])
        preds.append(rng.choice(vocab))
    metric = VQAAccuracy()
    metric.update(preds[:17], answers[:17])
    metric.update(preds[17:], answers[17:])
    expected = sum(vqa_accuracy(p, a) for p, a in zip(preds, answers)) / len(preds)
    assert 0 < expected < 1
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)
    assert metric.count.item() == 50


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_bad_inputs_are_rejected():
    with pytest.raises(VLMConfigError):
        vqa_accuracy("yes", [])
    with pytest.raises(VLMConfigError):
        vqa_accuracy("yes", "yes")
    with pytest.raises(VLMConfigError):
        VQAAccuracy().update(["yes", "no"], [["yes"]])
    with pytest.raises(VLMConfigError):
        VQAAccuracy().compute()
