"""CIDEr-D against pycocoevalcap's CiderScorer (the COCO caption evaluation's code), BLEU against torchmetrics.

The DDP test starts this file twice as a script (``RANK=r python tests/metrics/test_captioning.py OUT``); each
rank scores its share of one caption set and writes what ``compute`` returned.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import run_ranks
from vlm.errors import VLMConfigError
from vlm.metrics import BLEU, CIDEr, cider, cider_d_scores, tokenize_caption

WORDS = ["a", "the", "dog", "cat", "man", "woman", "on", "in", "grass", "street", "red", "ball", "sits",
         "runs", "with", "of", "two", "small", "table", "plate", "pizza", "café"]
PUNCT = ["", "", "", ".", ",", "!", "'s", "-"]


def random_caption(rng: random.Random, max_len: int = 12, min_len: int = 1) -> str:
    words = []
    for _ in range(rng.randint(min_len, max_len)):
        word = rng.choice(WORDS)
        words.append((word.capitalize() if rng.random() < 0.1 else word) + rng.choice(PUNCT))
    return " ".join(words)


def random_set(seed: int, images: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Raw captions: some empty predictions, 1 to 6 references per image, mixed case and punctuation."""
    rng = random.Random(seed)
    images = images or rng.randint(1, 12)
    preds = [random_caption(rng, min_len=0) for _ in range(images)]
    refs = [[random_caption(rng) for _ in range(rng.randint(1, 6))] for _ in range(images)]
    # half of the predictions share most words with a reference, so that the scores are not all near zero
    for i in range(0, images, 2):
        ref = refs[i][0].split()
        preds[i] = " ".join(ref[: rng.randint(1, len(ref))] + [rng.choice(WORDS)] * rng.randint(0, 2))
    return preds, refs


def coco_cider(preds: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for pred, rs in zip(preds, refs):
        scorer += (" ".join(tokenize_caption(pred)), [" ".join(tokenize_caption(r)) for r in rs])
    mean, scores = scorer.compute_score()
    return float(mean), [float(s) for s in scores]


def test_tokenisation_lowercases_and_drops_punctuation():
    assert tokenize_caption("A Dog's ball,  on the GRASS.") == ["a", "dog", "s", "ball", "on", "the", "grass"]
    assert tokenize_caption("snake_case--x!?") == ["snake", "case", "x"]
    assert tokenize_caption("Café au lait") == ["café", "au", "lait"]
    assert tokenize_caption("...") == []


def test_cider_matches_pycocoevalcap_on_random_sets():
    pytest.importorskip("pycocoevalcap.cider.cider_scorer")
    worst = 0.0
    nonzero = 0
    for seed in range(300):
        preds, refs = random_set(seed)
        ref_mean, ref_scores = coco_cider(preds, refs)
        scores = cider_d_scores([tokenize_caption(p) for p in preds],
                                [[tokenize_caption(r) for r in rs] for rs in refs])
        assert scores == pytest.approx(ref_scores, abs=1e-6, rel=0), seed
        assert cider(preds, refs) == pytest.approx(ref_mean, abs=1e-6, rel=0), seed
        worst = max(worst, max(abs(a - b) for a, b in zip(scores, ref_scores)))
        nonzero += ref_mean > 0.1
    assert worst < 1e-9
    assert nonzero > 200  # the comparison is not between two columns of zeros


def test_cider_hand_checked_cases():
    # one image: every n-gram is in every document, idf = 0, so the score is 0 however good the caption
    assert cider(["a dog runs"], [["a dog runs"]]) == 0.0
    # two images, captions equal to their single reference and disjoint across images: cosine 1 at every order
    assert cider(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]]) == pytest.approx(10.0)
    # by the formula: idf = log 2 for every n-gram (each in one image of two); "x y" vs "x y z" has unigram
    # cosine 2/sqrt(6), bigram cosine 1/sqrt(2), no trigrams or 4-grams, and a length gap of 1 word
    got = cider_d_scores([["x", "y"], ["q"]], [[["x", "y", "z"]], [["q"]]])
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / (2 * 6.0**2))
    assert got == pytest.approx([expected, 10 * 1 / 4], abs=1e-12)
    # clipping: repeating a matching word does not raise the score
    assert cider(["dog dog dog", "q"], [["dog"], ["q"]]) < cider(["dog", "q"], [["dog"], ["q"]])


def test_metric_in_three_chunks_equals_one_update_and_the_function():
    preds, refs = random_set(1234, images=40)
    whole = CIDEr()
    whole.update(preds, refs)
    chunked = CIDEr()
    for lo, hi in [(0, 5), (5, 31), (31, 40)]:
        chunked.update(preds[lo:hi], refs[lo:hi])
    # per-chunk idf would differ: the score of the first chunk alone is not the score of the set
    first = CIDEr()
    first.update(preds[:5], refs[:5])
    assert abs(first.compute().item() - whole.compute().item()) > 1e-3
    assert chunked.compute().item() == whole.compute().item()
    assert whole.compute().item() == pytest.approx(cider(preds, refs), rel=1e-6)
    assert whole.compute().dtype == torch.float32 and whole.compute().ndim == 0


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_state_roundtrips_text_and_resets():
    metric = CIDEr()
    metric.update(["Un café, s'il vous plaît!", ""], [["un café"], ["x", "Y z."]])
    preds, refs = metric.samples()
    assert preds == [["un", "café", "s", "il", "vous", "plaît"], []]
    assert refs == [[["un", "café"]], [["x"], ["y", "z"]]]
    assert all(t.dtype == torch.uint8 for t in metric.text_bytes)
    metric.reset()
    with pytest.raises(VLMConfigError):
        metric.compute()


def test_bad_inputs_are_rejected():
    with pytest.raises(VLMConfigError):
        CIDEr().update(["a"], [["a"], ["b"]])
    with pytest.raises(VLMConfigError):
        CIDEr().update(["a"], [[]])
    with pytest.raises(VLMConfigError):
        cider("a dog", [["a dog"]])
    with pytest.raises(VLMConfigError):
        CIDEr(n=0)


def test_bleu_is_torchmetrics_bleu_on_the_same_tokens():
    from torchmetrics.functional.text import bleu_score

    preds, refs = random_set(7, images=20)
    metric = BLEU(n_gram=2)
    metric.update(preds[:8], refs[:8])
    metric.update(preds[8:], refs[8:])
    expected = bleu_score([" ".join(tokenize_caption(p)) for p in preds],
                          [[" ".join(tokenize_caption(r)) for r in rs] for rs in refs], n_gram=2)
    assert metric.compute().item() == pytest.approx(expected.item(), abs=1e-7)
    assert expected.item() > 0.05
    same = BLEU()
    same.update(["A dog, on the grass!"], [["a dog on the grass"]])
    assert same.compute().item() == pytest.approx(1.0)


DDP_SPLIT = (0, 7, 11)  # rank 0 scores images 0..6, rank 1 images 7..10 (uneven shares)


def run_rank(out: Path) -> None:
    import os

    import torch.distributed as dist

    from vlm.metrics import VQAAccuracy

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    preds, refs = random_set(99, images=DDP_SPLIT[-1])
    preds[DDP_SPLIT[1]] = "un café très chaud"  # multi-byte text crosses the gather too
    lo, hi = DDP_SPLIT[rank], DDP_SPLIT[rank + 1]
    metrics = {"cider": CIDEr(), "bleu": BLEU(), "vqa": VQAAccuracy()}
    mid = (lo + hi) // 2
    for a, b in [(lo, mid), (mid, hi)]:
        metrics["cider"].update(preds[a:b], refs[a:b])
        metrics["bleu"].update(preds[a:b], refs[a:b])
        metrics["vqa"].update(preds[a:b], refs[a:b])
    values = {name: m.compute().item() for name, m in metrics.items()}
    values["local_images"] = len(metrics["cider"].samples()[0])  # compute leaves the local state in place
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(values))
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_compute_the_single_process_value(tmp_path):
    run_ranks(__file__, tmp_path, timeout=120)
    preds, refs = random_set(99, images=DDP_SPLIT[-1])
    preds[DDP_SPLIT[1]] = "un café très chaud"
    from vlm.metrics import VQAAccuracy

    single = {"cider": CIDEr(), "bleu": BLEU(), "vqa": VQAAccuracy()}
    for m in single.values():
        m.update(preds, refs)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["cider"] == pytest.approx(single["cider"].compute().item(), rel=1e-6)
        assert got["bleu"] == pytest.approx(single["bleu"].compute().item(), rel=1e-6)
        assert got["vqa"] == pytest.approx(single["vqa"].compute().item(), rel=1e-6)
        assert got["local_images"] == DDP_SPLIT[rank + 1] - DDP_SPLIT[rank]


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
