"""VQA v2 accuracy with the answer normalisation of the official VQA evaluation."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from vlm.errors import VLMConfigError

# Characters the official evaluation removes (next to a space, or anywhere once the answer holds a digit
# grouping comma) or turns into a space (elsewhere). Apostrophes, colons and periods are not among them.
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its period)
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
_NUMBERS["none"] = "0"
# Apostrophe-less spellings to the contracted form; words that are also ordinary words ("its", "ill",
# "wed", "well", "were", "lets") stay as they are.
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't couldn't couldn't've didn't doesn't don't hadn't hasn't haven't he'd he's "
    "how'd how's i'd've i'm i've isn't it'd it'll mightn't might've mustn't must've needn't o'clock "
    "shan't she'd she's shouldn't should've that's there's they'd they'll they're they've wasn't weren't "
    "we've what's what're when's where'd where's who'd who's who've why's won't wouldn't would've y'all "
    "you'd you'll you're you've").split()}


def normalize_answer(answer: str) -> str:
    """Answer text as the official VQA evaluation compares it.

    Whitespace collapsed; punctuation removed or turned into spaces; periods that do not start a decimal
    part removed; lower-cased; articles dropped; number words zero..ten (and "none") to digits; apostrophe-less
    contractions ("dont") to their contracted form ("don't"). ``"Two"`` -> ``"2"``, ``"a dog."`` -> ``"dog"``.
    """
    text = " ".join(answer.split())
    drop_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if drop_all or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _accuracy(pred: str, answers: Sequence[str]) -> float:
    gts = [normalize_answer(a) for a in answers]
    if len(gts) < 4:
        return float(pred in gts)
    matches = sum(g == pred for g in gts)
    # leave each human answer out in turn: min(#matching among the others / 3, 1), averaged
    return sum(min((matches - (g == pred)) / 3.0, 1.0) for g in gts) / len(gts)


def _check_answers(answers: Sequence[str], who: str) -> None:
    if isinstance(answers, str) or len(answers) == 0:
        raise VLMConfigError(f"{who}: every question needs a non-empty list of ground-truth answers.")


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers of its question, in [0, 1].

    With 4 or more answers (VQA v2 has 10): the mean over leaving each answer out of
    min(#remaining answers equal to the prediction / 3, 1), all after :func:`normalize_answer`; with 10
    answers this is the official metric (0, 1, 2, 3, >=4 matches give 0, 0.3, 0.6, 0.9, 1). With 1 to 3 answers
    (a single synthetic answer, say) there are too few voters for that rule: 1 if the prediction equals any
    of them after normalisation, else 0.
    """
    _check_answers(answers, "vqa_accuracy")
    return _accuracy(normalize_answer(pred), answers)


class VQAAccuracy(Metric):
    """Mean :func:`vqa_accuracy` over all questions seen: ``update(preds, answers)``, ``compute() -> tensor``.

    ``preds[i]`` is the answer generated for question i, ``answers[i]`` its list of human answers.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        """Add a batch of predicted answers and, per question, its ground-truth answers."""
        if isinstance(preds, str) or len(preds) != len(answers):
            raise VLMConfigError(
                f"VQAAccuracy.update needs a list of predictions and one answer list per prediction, got "
                f"{type(preds).__name__} of {len(preds)} and {len(answers)} answer lists."
            )
        for a in answers:
            _check_answers(a, "VQAAccuracy.update")
        self.total += sum(_accuracy(normalize_answer(p), a) for p, a in zip(preds, answers))
        self.count += len(preds)

    def compute(self) -> Tensor:
        """Accuracy in [0, 1] (a fraction, not a percentage)."""
        if int(self.count) == 0:
            raise VLMConfigError("VQAAccuracy.compute called before any update: no questions seen.")
        return self.total / self.count
