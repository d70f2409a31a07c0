"""Image-text matching: loss against float64 references, and the negatives of each mode."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tests.objectives.fake_model import FakeVLM, make_batch
from vlm.errors import MissingBatchField, MissingCapability, VLMConfigError
from vlm.objectives.base import StepCache
from vlm.objectives.heads import ITMHead
from vlm.objectives.itm import ImageTextMatching, sample_excluding


def itm64(head: ITMHead, cls: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, float]]:
    """tanh pooler + classifier on the CLS states, mean cross-entropy and metrics, in float64."""
    d = lambda t: t.detach().double()  # noqa: E731
    pooled = torch.tanh(d(cls) @ d(head.pooler.weight).T + d(head.pooler.bias))
    logits = pooled @ d(head.classifier.weight).T + d(head.classifier.bias)
    logp = torch.log_softmax(logits, -1)
    loss = -logp[torch.arange(len(labels)), labels].mean()
    pred = logits.argmax(-1)
    pos, neg = labels == 1, labels == 0
    metrics = {
        "accuracy": float((pred == labels).double().mean()),
        "pos_accuracy": float((pred[pos] == 1).double().mean()) if pos.any() else 0.0,
        "neg_accuracy": float((pred[neg] == 0).double().mean()) if neg.any() else 0.0,
        "pred_pos_rate": float((pred == 1).double().mean()),
        "neg_fraction": float(neg.double().mean()),
    }
    return float(loss), metrics


def cache_with_seed(seed: int) -> StepCache:
    cache = StepCache()
    cache.generator = torch.Generator().manual_seed(seed)
    return cache


def built(obj, model):
    obj.build(model)
    return obj


def test_itm_head_matches_hf_flava_itm_head():
    from transformers.models.flava.configuration_flava import FlavaConfig
    from transformers.models.flava.modeling_flava import FlavaITMHead

    hf = FlavaITMHead(FlavaConfig(hidden_size=6, projection_dim=6))
    ours = ITMHead(6)
    ours.load_state_dict({
        "pooler.weight": hf.pooler.dense.weight, "pooler.bias": hf.pooler.dense.bias,
        "classifier.weight": hf.seq_relationship.weight, "classifier.bias": hf.seq_relationship.bias,
    })
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(ours(x), hf(x))


@pytest.mark.parametrize("use_masked", [True, False])
def test_batch_mode_matches_reference_on_all_rows(use_masked):
    model = FakeVLM()
    obj = built(ImageTextMatching(negatives="batch", use_masked=use_masked), model)
    batch = make_batch(batch_size=5, model=model, itm_labels=[1, 0, 1, 1, 0])
    cache = StepCache()
    out = obj(model, batch, cache)
    cls = model.multimodal_hidden(batch, cache, masked=use_masked)[:, 0]
    loss, metrics = itm64(obj.head, cls, batch["itm_labels"])
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    for k, v in metrics.items():
        assert out.metrics[k].item() == pytest.approx(v), k
    assert model.calls["multimodal_hidden"] == 1 and ("multimodal_hidden", use_masked) in cache
    assert model.calls["fuse"] == 1  # only the pass of the batch's own pairs


def test_batch_mode_needs_itm_labels():
    obj = ImageTextMatching(negatives="batch")
    with pytest.raises(MissingBatchField, match="itm_labels"):
        obj.check_batch(make_batch(), "pairs")


def test_shuffle_negatives_are_derangements_never_the_matching_text():
    model = FakeVLM()
    obj = built(ImageTextMatching(negatives="shuffle"), model)
    batch = make_batch(batch_size=6, model=model)
    for seed in range(20):
        img, txt = obj.negative_pairs(model, batch, cache_with_seed(seed))
        assert len(img) == 6 and not bool((img == txt).any())
        assert sorted(img.tolist()) == list(range(6)) and sorted(txt.tolist()) == list(range(6))


@pytest.mark.parametrize("ratio, expected", [(0.0, 0), (0.5, 3), (1.0, 6), (2.0, 12), (2.5, 15)])
@pytest.mark.parametrize("mode", ["shuffle", "hard"])
def test_negative_ratio_sets_the_count(mode, ratio, expected):
    model = FakeVLM()
    obj = built(ImageTextMatching(negatives=mode, negative_ratio=ratio), model)
    batch = make_batch(batch_size=6, model=model)
    img, txt = obj.negative_pairs(model, batch, cache_with_seed(0))
    assert len(img) == len(txt) == expected
    assert not bool((img == txt).any())
    out = obj(model, batch, cache_with_seed(0))
    assert out.metrics["neg_fraction"].item() == pytest.approx(expected / (6 + expected))


def test_shuffle_respects_pair_id():
    model = FakeVLM()
    obj = built(ImageTextMatching(negatives="shuffle", negative_ratio=2.0), model)
    batch = make_batch(batch_size=6, model=model)
    batch["pair_id"] = torch.tensor([0, 0, 1, 1, 2, 2])  # two captions per image
    for seed in range(20):
        img, txt = obj.negative_pairs(model, batch, cache_with_seed(seed))
        assert len(img) == 12
        assert not bool((batch["pair_id"][img] == batch["pair_id"][txt]).any())


@pytest.mark.parametrize("mode", ["shuffle", "hard"])
def test_in_batch_modes_match_reference(mode):
    model = FakeVLM()
    obj = built(ImageTextMatching(negatives=mode, negative_ratio=1.5), model)
    batch = make_batch(batch_size=4, model=model)  # masks precomputed: the generator only draws negatives
    cache = cache_with_seed(7)
    out = obj(model, batch, cache)
    img, txt = obj.negative_pairs(model, batch, cache_with_seed(7))
    assert len(img) == 6
    pos = model.multimodal_hidden(batch, cache, masked=True)[:, 0]
    neg = model._fuse(
        model.image_hidden(batch, cache, masked=True)[img],
        model.text_hidden(batch, cache, masked=True)[txt],
        batch["attention_mask"][txt],
    )[:, 0]
    labels = torch.tensor([1] * 4 + [0] * 6)
    loss, metrics = itm64(obj.head, torch.cat([pos, neg]), labels)
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    for k, v in metrics.items():
        assert out.metrics[k].item() == pytest.approx(v), k


def test_shuffle_gradients_and_batch_itm_labels_kept():
    model = FakeVLM()
    obj = built(ImageTextMatching(negatives="shuffle"), model)
    batch = make_batch(batch_size=4, model=model, itm_labels=[1, 1, 0, 1])
    out = obj(model, batch, cache_with_seed(1))
    assert out.metrics["neg_fraction"].item() == pytest.approx(5 / 8)  # 1 from the data + 4 built here
    out.loss.backward()
    for name in ("token_embed.weight", "patch_embed.weight", "mm_mix.weight", "image_to_mm.weight"):
        assert model.get_parameter(name).grad is not None, name
    assert all(p.grad is not None for p in obj.head.parameters())
    assert model.image_proj.weight.grad is None  # ITM does not touch the contrastive projections


class SimilarityModel(FakeVLM):
    """Contrastive embeddings fixed so that image i is most similar to text ``partner[i]`` (besides its own)."""

    def __init__(self, partner: list[int], **kw) -> None:
        super().__init__(**kw)
        n = len(partner)
        self.partner = partner
        img = torch.eye(n)
        txt = torch.eye(n)
        txt[partner] += 0.9 * torch.eye(n)  # text partner[i] points mostly at image i, keeping its own direction
        self.fixed = (F.normalize(img, dim=-1), F.normalize(txt, dim=-1))

    def contrastive_embeddings(self, batch, cache):
        self.calls["contrastive_embeddings"] += 1
        return self.fixed


def test_hard_negatives_prefer_similar_pairs_and_never_the_match():
    partner = [2, 3, 0, 1, 5, 4]
    model = SimilarityModel(partner)
    obj = built(ImageTextMatching(negatives="hard", negative_ratio=2.0, hard_temperature=0.05), model)
    batch = make_batch(batch_size=6, model=model)
    image_anchored = text_anchored = hits_i = hits_t = 0
    for seed in range(30):
        img, txt = obj.negative_pairs(model, batch, cache_with_seed(seed))
        assert len(img) == 12 and not bool((img == txt).any())
        # ALBEF layout: the first half are hard texts for image anchors, the second hard images for text anchors
        for i, t in zip(img[:6].tolist(), txt[:6].tolist()):
            image_anchored += 1
            hits_i += t == partner[i]
        for i, t in zip(img[6:].tolist(), txt[6:].tolist()):
            text_anchored += 1
            hits_t += t == partner[i]
    assert hits_i / image_anchored > 0.9 and hits_t / text_anchored > 0.9


def test_hard_negatives_exclude_same_pair_id_and_take_no_gradient():
    model = FakeVLM()
    obj = built(ImageTextMatching(negatives="hard", negative_ratio=2.0), model)
    batch = make_batch(batch_size=4, model=model)
    batch["pair_id"] = torch.tensor([5, 5, 6, 6])
    img, txt = obj.negative_pairs(model, batch, cache_with_seed(3))
    assert not bool((batch["pair_id"][img] == batch["pair_id"][txt]).any())
    obj(model, batch, cache_with_seed(3)).loss.backward()
    assert model.image_proj.weight.grad is None and model.text_proj.weight.grad is None


def test_sample_excluding_follows_the_masked_softmax():
    scores = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.5, 0.0, 0.0]])
    invalid = torch.tensor([[True, False, False, False], [False, False, True, True]])
    g = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.zeros(2, 4)
    idx, ok = sample_excluding(scores.repeat_interleave(draws, 0), invalid.repeat_interleave(draws, 0), g)
    assert bool(ok.all())
    for row in range(2):
        counts[row] = torch.bincount(idx[row * draws : (row + 1) * draws], minlength=4).double() / draws
    s = scores.double()
    expected = torch.exp(s).masked_fill(invalid, 0.0)
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(counts.double(), expected, atol=0.015, rtol=0)


@pytest.mark.parametrize("mode", ["shuffle", "hard"])
def test_no_possible_negative_gives_finite_loss(mode):
    model = FakeVLM()
    obj = built(ImageTextMatching(negatives=mode), model)
    one = make_batch(batch_size=1, model=model)
    out = obj(model, one, cache_with_seed(0))
    assert torch.isfinite(out.loss) and out.metrics["neg_fraction"].item() == 0.0
    same = make_batch(batch_size=3, model=model)
    same["pair_id"] = torch.tensor([4, 4, 4])  # every text matches every image: nothing to sample
    assert len(obj.negative_pairs(model, same, cache_with_seed(0))[0]) == 0
    assert torch.isfinite(obj(model, same, cache_with_seed(0)).loss)


def test_mode_capabilities_and_bad_args():
    assert ImageTextMatching(negatives="batch").missing_capabilities(FakeVLM(drop=("fuse",))) == []
    model = FakeVLM(drop=("contrastive_embeddings",))
    ImageTextMatching(negatives="shuffle").check_model(model, "pairs")
    with pytest.raises(MissingCapability, match=r"'itm'.*stream 'pairs'.*contrastive_embeddings"):
        ImageTextMatching(negatives="hard").check_model(model, "pairs")
    with pytest.raises(MissingCapability, match="fuse"):
        ImageTextMatching(negatives="shuffle").check_model(FakeVLM(drop=("fuse",)), "pairs")
    with pytest.raises(MissingBatchField, match="pixel_values"):
        batch = make_batch(itm_labels=[1, 1, 1, 1])
        del batch["pixel_values"]
        ImageTextMatching().check_batch(batch, "pairs")
    with pytest.raises(VLMConfigError, match="negatives"):
        ImageTextMatching(negatives="random")
    with pytest.raises(VLMConfigError, match="negative_ratio"):
        ImageTextMatching(negative_ratio=-1)
