"""FLAVA's held-out evaluators (vlm.evaluation), outside the model: retrieval recall and zero-shot top-1 against
float64 computations written out by hand on a small fixture."""

import pytest
import torch
from torch import nn

from vlm.errors import VLMConfigError
from vlm.evaluation import RetrievalEvaluator, ZeroShotEvaluator

E = 6


class LookupDualEncoder(nn.Module):
    """A dual encoder whose embeddings are rows of fixed tables (pixel_values / input_ids carry the row index);
    ``log`` records what an evaluator logs."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        super().__init__()
        self.images, self.texts = images, texts
        self.device = torch.device("cpu")
        self.logged: dict[str, float] = {}

    def encode_image(self, pixel_values):
        return self.images[pixel_values[:, 0, 0, 0].long()].float()

    def encode_text(self, input_ids, attention_mask=None):
        return self.texts[input_ids[:, 0]].float()

    def log(self, key, value, **kwargs):
        self.logged[key] = float(value)


def pairs_batch(rows, pair_ids, stream="pairs"):
    rows = torch.tensor(rows)
    return {"stream": stream, "pixel_values": rows.float()[:, None, None, None].expand(-1, 3, 2, 2),
            "input_ids": rows[:, None], "pair_id": torch.tensor(pair_ids)}


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_retrieval_recall_equals_a_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    # 7 (image, caption) rows; pairs 2 and 4 have two captions of one image each (rows 2, 3 and 5, 6)
    pair_ids = [0, 1, 2, 2, 3, 4, 4]
    images = torch.randn(7, E, generator=g, dtype=torch.float64)
    images[3] = images[2]  # a pair id shows one image
    images[6] = images[5]
    texts = images + 1.5 * torch.randn(7, E, generator=g, dtype=torch.float64)  # noisy captions of their images
    model = LookupDualEncoder(images, texts)
    ev = RetrievalEvaluator(ks=(1, 2))
    ev.reset()
    ev.update(model, "val", pairs_batch([0, 1, 2], pair_ids[:3]))
    ev.update(model, "val", pairs_batch([3, 4, 5, 6], pair_ids[3:]))
    ev.update(model, "val", {"stream": "images", "pixel_values": torch.zeros(2, 3, 2, 2)})  # no pairs: ignored
    ev.log(model, "val")

    # by hand: one image per pair id (its first row); a query is retrieved at k when fewer than k wrong
    # candidates score at least as high as its best right one (ties count against it)
    firsts = {pid: row for row, pid in reversed(list(enumerate(pair_ids)))}
    unique = sorted(firsts)
    expected = {}
    for k in (1, 2):
        hits = 0
        for t, pid in enumerate(pair_ids):
            true = cos(texts[t], images[firsts[pid]])
            hits += sum(cos(texts[t], images[firsts[o]]) >= true for o in unique if o != pid) < k
        expected[f"val/retrieval/t2i_R@{k}"] = hits / len(pair_ids)
        hits = 0
        for pid in unique:
            best = max(cos(images[firsts[pid]], texts[t]) for t, q in enumerate(pair_ids) if q == pid)
            hits += sum(cos(images[firsts[pid]], texts[t]) >= best for t, q in enumerate(pair_ids) if q != pid) < k
        expected[f"val/retrieval/i2t_R@{k}"] = hits / len(unique)
    assert model.logged.keys() == expected.keys()
    for key, value in expected.items():
        assert model.logged[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < expected["val/retrieval/t2i_R@1"] < 1  # the fixture is neither solved nor hopeless

    # the next epoch starts empty; two streams are ranked apart and named
    ev.reset()
    model.logged.clear()
    ev.update(model, "test", pairs_batch([0, 1], [0, 1], stream="a"))
    ev.update(model, "test", pairs_batch([4, 5], [4, 5], stream="b"))
    ev.log(model, "test")
    assert {"test/retrieval/t2i_R@1/a", "test/retrieval/t2i_R@1/b"} <= set(model.logged)


class WordTokenizer:
    """Prompt ids: [class id] of the one class word in the prompt (a stand-in for a real tokenizer)."""

    model_max_length = 8

    def __init__(self, names):
        self.names = names

    def __call__(self, texts, **kwargs):
        ids = [[next(i for i, n in enumerate(self.names) if n in t)] for t in texts]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)}


def test_zero_shot_top1_equals_a_float64_hand_computation():
    g = torch.Generator().manual_seed(1)
    names = ["circle", "square", "star"]
    class_emb = torch.randn(3, E, generator=g, dtype=torch.float64)
    images = torch.randn(8, E, generator=g, dtype=torch.float64)
    model = LookupDualEncoder(images, class_emb)
    ev = ZeroShotEvaluator(names, ["a {}", "the {} here"], WordTokenizer(names))
    targets = [0, 1, 2, -1, 2, 1, 0, 0]  # -1: no class, left out
    ev.reset()
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        batch = pairs_batch(rows, rows, stream="images")
        ev.update(model, "val", dict(batch, class_index=torch.tensor([targets[r] for r in rows])))
    ev.log(model, "val")
    # by hand: both templates give a class the same embedding, so its class vector is that embedding
    right = [max(range(3), key=lambda c: cos(images[i], class_emb[c])) == t for i, t in enumerate(targets) if t >= 0]
    assert model.logged == {"val/zeroshot/top1": pytest.approx(sum(right) / len(right), abs=1e-6)}
    assert 0 < sum(right) < len(right)


def test_zero_shot_needs_names_and_a_tokenizer():
    with pytest.raises(VLMConfigError, match="tokenizer"):
        ZeroShotEvaluator(["circle"], ["a {}"], tokenizer=None)
    with pytest.raises(VLMConfigError, match="class name"):
        ZeroShotEvaluator([], ["a {}"], tokenizer=object())


def test_flava_lists_its_evaluators_and_the_base_runs_them_under_test():
    """``vlm test`` scores FLAVA's held-out pairs too (``test/...``), through the base module's evaluator hook."""
    import lightning as L

    from tests.models.test_flava import make_batch, tiny_kwargs
    from vlm.metrics.retrieval import RetrievalRecall
    from vlm.models.flava import FLAVA

    with pytest.raises(VLMConfigError, match="needs the model's `tokenizer`"):
        FLAVA(**tiny_kwargs(tokenizer=None))
    model = FLAVA(**tiny_kwargs(zeroshot_class_names=["circle", "square"]))
    assert [type(e) for e in model.evaluators()] == [RetrievalEvaluator, ZeroShotEvaluator]
    pairs = dict(make_batch("pairs"), pair_id=torch.tensor([0, 1, 2, 3]), class_index=torch.tensor([0, 1, -1, 1]))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    loader = torch.utils.data.DataLoader([pairs], batch_size=None, collate_fn=lambda x: x)
    metrics = trainer.test(model, loader, verbose=False)[0]
    assert {"test/pairs/loss", "test/zeroshot/top1", "test/retrieval/i2t_R@10"} <= set(metrics)
    ref = RetrievalRecall()
    ref.update(model.encode_image(pairs["pixel_values"]),
               model.encode_text(pairs["input_ids"], pairs["attention_mask"]), pairs["pair_id"])
    assert metrics["test/retrieval/t2i_R@1"] == pytest.approx(float(ref.compute()["t2i_R@1"]))
