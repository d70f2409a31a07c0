"""Retrieval recall and zero-shot classification against brute-force numpy computations."""

import numpy as np
import pytest
import torch

from vlm.errors import VLMConfigError
from vlm.metrics import RetrievalRecall, zero_shot_accuracy, zero_shot_classifier


def brute_force(images, texts, ids, ks):
    """Loop-and-sort reference: unique images by first occurrence, cosine similarity, top-k membership."""
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    uniq, img_rows = [], []
    for i, pid in enumerate(ids):
        if pid not in uniq:
            uniq.append(pid)
            img_rows.append(images[i])
    img_rows = np.stack(img_rows)
    out = {}
    for k in ks:
        hits = 0
        for t in range(len(texts)):
            order = np.argsort(-(img_rows @ texts[t]))
            hits += uniq.index(ids[t]) in order[:k]
        out[f"t2i_R@{k}"] = hits / len(texts)
    for k in ks:
        hits = 0
        for j, pid in enumerate(uniq):
            order = np.argsort(-(texts @ img_rows[j]))
            hits += any(ids[t] == pid for t in order[:k])
        out[f"i2t_R@{k}"] = hits / len(uniq)
    return out


def test_recall_matches_brute_force_with_duplicate_images_over_batches():
    rng = np.random.default_rng(0)
    n_img, caps, e = 30, 3, 8
    base = rng.standard_normal((n_img, e))
    ids = np.repeat(np.arange(n_img) * 7 + 3, caps)  # 3 captions per image, non-contiguous ids
    images = np.repeat(base, caps, axis=0)
    texts = images + 1.2 * rng.standard_normal(images.shape)  # noisy captions: recall strictly between 0 and 1
    perm = rng.permutation(len(ids))
    images, texts, ids = images[perm], texts[perm], ids[perm]
    ks = (1, 5, 10)
    metric = RetrievalRecall(ks=ks, chunk_size=7)  # small chunks exercise the chunked path
    for s in range(0, len(ids), 16):
        metric.update(torch.tensor(images[s: s + 16] * 2.5), torch.tensor(texts[s: s + 16]),
                      torch.tensor(ids[s: s + 16]))
    got = metric.compute()
    want = brute_force(images, texts, list(ids), ks)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value), key
    assert 0 < want["t2i_R@1"] < 1 and 0 < want["i2t_R@1"] < 1


def test_recall_errors():
    with pytest.raises(VLMConfigError, match="before any update"), pytest.warns(UserWarning):
        RetrievalRecall().compute()
    with pytest.raises(VLMConfigError, match="pair_ids"):
        RetrievalRecall().update(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2))


def test_zero_shot_classifier_and_accuracy():
    rng = np.random.default_rng(1)
    vocab = {}

    def encode_text(prompts):
        # a deterministic fake text tower: one random vector per prompt string
        return torch.tensor(np.stack([vocab.setdefault(p, rng.standard_normal(6) * (1 + len(p)))
                                      for p in prompts]))

    classes, templates = ["cat", "dog", "car", "tree"], ["a photo of a {}.", "a drawing of a {}.", lambda c: c]
    clf = zero_shot_classifier(encode_text, classes, templates)
    for c, name in enumerate(classes):
        prompts = [f"a photo of a {name}.", f"a drawing of a {name}.", name]
        vecs = [vocab[p] / np.linalg.norm(vocab[p]) for p in prompts]
        mean = np.mean(vecs, axis=0)
        np.testing.assert_allclose(clf[c].numpy(), mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)

    images = rng.standard_normal((50, 6))
    targets = rng.integers(0, 4, 50)
    got = zero_shot_accuracy(torch.tensor(images), clf, torch.tensor(targets), ks=(1, 2))
    scores = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ clf.numpy().T
    for k in (1, 2):
        topk = np.argsort(-scores, axis=1)[:, :k]
        want = np.mean([targets[i] in topk[i] for i in range(50)])
        assert got[f"top{k}"].item() == pytest.approx(want)


def test_collapsed_embeddings_score_zero_not_one():
    """Every similarity tied: no query can claim its match ranks first."""
    from vlm.metrics.retrieval import RetrievalRecall, zero_shot_accuracy

    metric = RetrievalRecall(ks=(1,))
    same = torch.ones(6, 4)
    metric.update(same, same, torch.arange(6))
    out = metric.compute()
    assert float(out["t2i_R@1"]) == 0.0 and float(out["i2t_R@1"]) == 0.0
    acc = zero_shot_accuracy(torch.ones(5, 4), torch.ones(3, 4), torch.zeros(5, dtype=torch.long))
    assert float(acc["top1"]) == 0.0
