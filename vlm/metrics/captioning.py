"""Caption metrics: CIDEr-D (as in the COCO caption evaluation) and corpus BLEU, with one shared tokenisation.

Tokenisation (:func:`tokenize_caption`): lower-case, every character that is neither a letter, a digit nor
whitespace (underscore included) becomes a space, then split on whitespace. ``"A dog's ball."`` gives
``["a", "dog", "s", "ball"]``. This stands in for the PTB tokenizer (a Java program) that the COCO evaluation
runs first; scores are comparable with other tools only when they tokenise the same way.

Distributed use: torchmetrics syncs list states by concatenating and all-gathering tensors; a list of Python
strings with ``dist_reduce_fx="cat"`` makes a distributed ``compute`` fail (torchmetrics 1.9: ``'str' object has
no attribute 'numel'``), and ``.to(device)`` is applied to every entry of a list state. So :class:`CIDEr` keeps
the tokenised captions as UTF-8 bytes in ``uint8`` tensors plus one length per caption, all ``"cat"`` states
that torchmetrics gathers itself, and decodes them in ``compute``. CIDEr's idf comes from the references of
the whole evaluated set, so ``compute`` scores everything seen on every rank at once.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.text import BLEUScore
from torchmetrics.utilities import dim_zero_cat

from vlm.errors import VLMConfigError

_NON_WORD = re.compile(r"[^\w\s]|_")


def tokenize_caption(text: str) -> list[str]:
    """Lower-case, punctuation to spaces, split on whitespace."""
    return _NON_WORD.sub(" ", text.lower()).split()


def _check_pairs(preds: Sequence[str], refs: Sequence[Sequence[str]], who: str) -> None:
    if isinstance(preds, str) or any(isinstance(r, str) for r in refs):
        raise VLMConfigError(f"{who}: preds must be a list of strings and refs a list of lists of strings.")
    if len(preds) != len(refs):
        raise VLMConfigError(f"{who}: got {len(preds)} predictions but {len(refs)} reference lists.")
    if any(len(r) == 0 for r in refs):
        raise VLMConfigError(f"{who}: every prediction needs at least one reference caption.")


def _ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i: i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d_scores(
    preds: Sequence[list[str]], refs: Sequence[Sequence[list[str]]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D of already tokenised captions; the idf comes from ``refs`` (the whole evaluated set).

    For each n-gram order k the candidate and every reference become tf-idf vectors
    (count * (log #images - log max(1, #images whose references contain the n-gram))); the candidate's
    weights are clipped by the reference's, the dot product is divided by both norms and multiplied by
    exp(-(len_cand - len_ref)^2 / (2 sigma^2)). The score is 10 * mean over k of the mean over references.
    """
    cand_counts = [_ngram_counts(list(p), n) for p in preds]
    ref_counts = [[_ngram_counts(list(r), n) for r in rs] for rs in refs]
    doc_freq: Counter = Counter()
    for rs in ref_counts:
        doc_freq.update(set().union(*rs))
    log_images = math.log(len(refs)) if refs else 0.0

    def tfidf(counts: Counter) -> tuple[list[dict], list[float]]:
        vec: list[dict] = [{} for _ in range(n)]
        sq = [0.0] * n
        for gram, count in counts.items():
            weight = count * (log_images - math.log(max(1.0, doc_freq[gram])))
            vec[len(gram) - 1][gram] = weight
            sq[len(gram) - 1] += weight * weight
        return vec, [math.sqrt(s) for s in sq]

    scores = []
    for pred, cand, rs, r_counts in zip(preds, cand_counts, refs, ref_counts):
        c_vec, c_norm = tfidf(cand)
        per_order = [0.0] * n
        for ref, counts in zip(rs, r_counts):
            r_vec, r_norm = tfidf(counts)
            penalty = math.exp(-((len(pred) - len(ref)) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, w in c_vec[k].items())
                if c_norm[k] > 0 and r_norm[k] > 0:
                    dot /= c_norm[k] * r_norm[k]
                per_order[k] += dot * penalty
        scores.append(10.0 * sum(per_order) / n / len(rs))
    return scores


def cider(preds: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean over images of :func:`cider_d_scores` after :func:`tokenize_caption`."""
    _check_pairs(preds, refs, "cider")
    if not preds:
        raise VLMConfigError("cider: nothing to score.")
    scores = cider_d_scores([tokenize_caption(p) for p in preds],
                            [[tokenize_caption(r) for r in rs] for rs in refs], n=n, sigma=sigma)
    return sum(scores) / len(scores)


def _encode(texts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    blobs = [t.encode("utf-8") for t in texts]
    data = bytearray(b"".join(blobs))
    flat = torch.frombuffer(data, dtype=torch.uint8).clone() if data else torch.empty(0, dtype=torch.uint8)
    return flat.to(device), torch.tensor([len(b) for b in blobs], dtype=torch.long, device=device)


def _decode(flat: Tensor, lengths: Tensor) -> list[str]:
    data = flat.cpu().numpy().tobytes()
    out, pos = [], 0
    for size in lengths.cpu().tolist():
        out.append(data[pos: pos + size].decode("utf-8"))
        pos += size
    return out


class CIDEr(Metric):
    """CIDEr-D over everything seen (all batches, all ranks): ``update(preds, refs)``, ``compute() -> tensor``.

    ``preds`` is one caption per image, ``refs`` the list of reference captions of each image. Captions are
    tokenised with :func:`tokenize_caption` on update. The idf is computed from all references at ``compute``
    time, so the score of a set does not depend on how it was split into batches or ranks (padding duplicates
    added by a ``DistributedSampler`` do count). States are ``uint8``/``long`` tensor lists (see the module
    docstring); every rank must have seen at least one update before a distributed ``compute``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 4, sigma: float = 6.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if n < 1 or sigma <= 0:
            raise VLMConfigError(f"CIDEr: n must be >= 1 and sigma > 0, got n={n}, sigma={sigma}.")
        self.n, self.sigma = int(n), float(sigma)
        # Per update: the tokenised texts (each prediction followed by its references) as UTF-8 bytes,
        # the byte length of every text, and the number of references of every prediction.
        self.add_state("text_bytes", default=[], dist_reduce_fx="cat")
        self.add_state("text_lengths", default=[], dist_reduce_fx="cat")
        self.add_state("num_refs", default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
        """Add a batch: ``preds[i]`` is the caption generated for image i, ``refs[i]`` its references."""
        _check_pairs(preds, refs, "CIDEr.update")
        texts = []
        for pred, rs in zip(preds, refs):
            texts.append(" ".join(tokenize_caption(pred)))
            texts.extend(" ".join(tokenize_caption(r)) for r in rs)
        flat, lengths = _encode(texts, self.device)
        self.text_bytes.append(flat)
        self.text_lengths.append(lengths)
        self.num_refs.append(torch.tensor([len(rs) for rs in refs], dtype=torch.long, device=self.device))

    def samples(self) -> tuple[list[list[str]], list[list[list[str]]]]:
        """The tokenised predictions and references held (on this rank unless called inside a sync)."""
        if isinstance(self.num_refs, list) and not self.num_refs:
            return [], []
        texts = _decode(dim_zero_cat(self.text_bytes), dim_zero_cat(self.text_lengths))
        preds, refs, pos = [], [], 0
        for count in dim_zero_cat(self.num_refs).cpu().tolist():
            preds.append(texts[pos].split())
            refs.append([t.split() for t in texts[pos + 1: pos + 1 + count]])
            pos += 1 + count
        return preds, refs

    def compute(self) -> Tensor:
        """Mean CIDEr-D over all images (float32, on the metric's device)."""
        preds, refs = self.samples()
        if not preds:
            raise VLMConfigError("CIDEr.compute called before any update: nothing to score.")
        scores = cider_d_scores(preds, refs, n=self.n, sigma=self.sigma)
        return torch.tensor(sum(scores) / len(scores), dtype=torch.float32, device=self.device)


class BLEU(BLEUScore):
    """torchmetrics' corpus ``BLEUScore`` on captions tokenised with :func:`tokenize_caption`.

    ``update(preds, refs)`` with one caption per image and a list of references per image; all keyword
    arguments (``n_gram``, ``smooth``, ``weights``, ...) are ``BLEUScore``'s. States are sums, so it syncs
    across ranks as torchmetrics does.
    """

    def update(self, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:  # type: ignore[override]
        _check_pairs(preds, refs, "BLEU.update")
        super().update([" ".join(tokenize_caption(p)) for p in preds],
                       [[" ".join(tokenize_caption(r)) for r in rs] for rs in refs])
