"""Contrastive objectives against open_clip's losses and float64 hand computations (single process)."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from vlm.errors import VLMConfigError
from vlm.objectives.base import StepCache
from vlm.objectives.contrastive import GlobalContrastive, SigmoidContrastive


class FeatureModel(torch.nn.Module):
    """Stands in for a model: serves fixed embeddings and, optionally, which rows match."""

    def __init__(self, image, text, positive=None):
        super().__init__()
        self.image, self.text = image, text
        if positive is not None:
            self.positive_rows = lambda batch, cache: positive

    def contrastive_embeddings(self, batch, cache):
        return self.image, self.text


def features(b=8, e=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, e, generator=g, dtype=dtype), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(b, e, generator=g, dtype=dtype), dim=-1).requires_grad_(True)
    return img, txt


def run(obj, img, txt, positive=None):
    return obj(FeatureModel(img, txt, positive), {}, StepCache())


@pytest.mark.parametrize("local_loss", [False, True])
def test_gc_equals_open_clip_loss_and_gradients(local_loss):
    img, txt = features(dtype=torch.float64)
    obj = GlobalContrastive(local_loss=local_loss).double()
    out = run(obj, img, txt)
    out.loss.backward()
    ours = (img.grad.clone(), txt.grad.clone(), obj.logit_scale.grad.clone().reshape(()))

    img2, txt2 = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    ref = ClipLoss(local_loss=local_loss)(img2, txt2, log_scale.exp())
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(ours[0], img2.grad)
    torch.testing.assert_close(ours[1], txt2.grad)
    torch.testing.assert_close(ours[2], log_scale.grad)


def test_gc_metrics_against_brute_force():
    img, txt = features(b=12, e=4)
    obj = GlobalContrastive(init_temperature=0.05)
    out = run(obj, img, txt)
    sim = (img @ txt.T).detach()
    i2t = sum(int(sim[i].argmax() == i) for i in range(12)) / 12
    t2i = sum(int(sim[:, j].argmax() == j) for j in range(12)) / 12
    assert out.metrics["i2t_accuracy"].item() == pytest.approx(i2t)
    assert out.metrics["t2i_accuracy"].item() == pytest.approx(t2i)
    assert out.metrics["temperature"].item() == pytest.approx(0.05, rel=1e-5)
    assert out.metrics["logit_scale"].item() == pytest.approx(math.log(20.0), rel=1e-6)


def test_temperature_clamp_applies_to_imported_values():
    img, txt = features()
    obj = GlobalContrastive()
    with torch.no_grad():
        obj.logit_scale.fill_(10.0)  # e.g. loaded from a checkpoint trained without the cap
    out_high = run(obj, img, txt)
    assert obj.logit_scale.item() == pytest.approx(math.log(100.0))
    assert out_high.metrics["temperature"].item() == pytest.approx(0.01, rel=1e-5)
    ref = ClipLoss()(img.detach(), txt.detach(), torch.tensor(100.0))
    torch.testing.assert_close(out_high.loss.detach(), ref)
    with torch.no_grad():
        obj.logit_scale.fill_(-3.0)
    run(obj, img, txt)
    assert obj.logit_scale.item() == 0.0


def test_fixed_temperature_is_not_trained():
    obj = GlobalContrastive(init_temperature=0.1, learnable_temperature=False)
    assert not obj.logit_scale.requires_grad
    img, txt = features()
    run(obj, img, txt).loss.backward()
    assert obj.logit_scale.grad is None and img.grad is not None


@pytest.mark.parametrize("cls", [lambda: GlobalContrastive(mismatched_as_candidates=False), SigmoidContrastive])
def test_positive_rows_equals_loss_on_filtered_rows(cls):
    """Dropping mismatched rows entirely (SigLIP; GC with mismatched_as_candidates=False)."""
    img, txt = features(b=10, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    obj = cls().double()
    out = run(obj, img, txt, positive=keep)
    out.loss.backward()
    img2 = img.detach()[keep].clone().requires_grad_()
    txt2 = txt.detach()[keep].clone().requires_grad_()
    ref = run(cls().double(), img2, txt2)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(img.grad[keep], img2.grad)
    assert torch.all(img.grad[~keep] == 0) and torch.all(txt.grad[~keep] == 0)


@pytest.mark.parametrize("cls", [GlobalContrastive, SigmoidContrastive])
def test_no_positive_rows_gives_connected_zero(cls):
    img, txt = features(b=4)
    obj = cls()
    out = run(obj, img, txt, positive=torch.zeros(4, dtype=torch.bool))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.all(img.grad == 0) and obj.logit_scale.grad is not None


@pytest.mark.parametrize("chunk_size", [0, 3, 100])
def test_siglip_equals_open_clip_loss_and_gradients(chunk_size):
    img, txt = features(b=10, dtype=torch.float64)
    obj = SigmoidContrastive(chunk_size=chunk_size).double()
    with torch.no_grad():  # move away from the init so the test is not specific to it
        obj.logit_scale.fill_(1.7)
        obj.logit_bias.fill_(-2.5)
    out = run(obj, img, txt)
    out.loss.backward()
    img2, txt2 = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    ls = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    lb = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)
    ref = SigLipLoss()(img2, txt2, ls.exp(), lb)
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(img.grad, img2.grad)
    torch.testing.assert_close(txt.grad, txt2.grad)
    torch.testing.assert_close(obj.logit_scale.grad.reshape(()), ls.grad)
    torch.testing.assert_close(obj.logit_bias.grad.reshape(()), lb.grad)


def test_siglip_init_and_metrics():
    obj = SigmoidContrastive()
    assert obj.logit_scale.item() == pytest.approx(math.log(10.0))
    assert obj.logit_bias.item() == -10.0
    img, txt = features(b=6)
    out = run(obj, img, txt)
    assert out.metrics["temperature"].item() == pytest.approx(0.1, rel=1e-5)
    assert out.metrics["logit_bias"].item() == -10.0
    sim = (img @ txt.T).detach()
    assert out.metrics["i2t_accuracy"].item() == pytest.approx(sum(int(sim[i].argmax() == i) for i in range(6)) / 6)


def test_bad_configs_and_shapes_give_clear_errors():
    with pytest.raises(VLMConfigError, match="gather_with_grad"):
        GlobalContrastive(local_loss=True, gather_with_grad=False)
    with pytest.raises(VLMConfigError, match="dist_impl"):
        SigmoidContrastive(dist_impl="allreduce")
    img, _ = features(b=4, e=8)
    _, txt = features(b=4, e=6)
    with pytest.raises(VLMConfigError, match="equal shape"):
        run(GlobalContrastive(), img, txt)


def test_mismatched_rows_stay_as_candidates_but_not_queries():
    """FLAVA's convention, against a float64 hand computation: queries are the matching rows, candidates all rows."""
    from vlm.objectives.contrastive import GlobalContrastive

    g = torch.Generator().manual_seed(5)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    keep = torch.tensor([True, False, True, True, False, True])
    gc = GlobalContrastive().double()
    out = gc.loss_from_features(img, txt, keep)
    scale = math.exp(math.log(1 / 0.07))
    logits = scale * img @ txt.T
    rows = keep.nonzero().squeeze(1)
    expect = 0.0
    for r in rows.tolist():
        i2t = -torch.log_softmax(logits[r], 0)[r]
        t2i = -torch.log_softmax(logits[:, r], 0)[r]
        expect += (i2t + t2i) / 2
    expect /= len(rows)
    torch.testing.assert_close(out.loss, expect)
    # all rows kept is plain InfoNCE; dropping the mismatched rows entirely differs
    dropped = GlobalContrastive(mismatched_as_candidates=False).double()
    plain = gc.loss_from_features(img[keep], txt[keep])
    assert not torch.isclose(out.loss, plain.loss)
    torch.testing.assert_close(gc.loss_from_features(img, txt, torch.ones(6, dtype=torch.bool)).loss,
                               gc.loss_from_features(img, txt).loss)
    assert dropped.mismatched_as_candidates is False


class NegativesModel(FeatureModel):
    """FeatureModel that also serves hard-negative caption embeddings ``[B,K,E]``."""

    def __init__(self, image, text, negatives, positive=None):
        super().__init__(image, text, positive)
        self.negatives = negatives

    def negative_text_embeddings(self, batch, cache):
        return self.negatives


def _negclip_by_hand(img, txt, neg, valid, scale, queries=None):
    """float64 NegCLIP: image i scores every text and every valid hard negative; text->image plain InfoNCE."""
    b, k, _ = neg.shape
    flat, ok = neg.reshape(b * k, -1), valid.reshape(-1)
    rows = range(b) if queries is None else queries
    total = 0.0
    for i in rows:
        cands = [scale * (img[i] @ txt[j]) for j in range(b)]
        cands += [scale * (img[i] @ flat[c]) for c in range(b * k) if ok[c]]
        i2t = torch.logsumexp(torch.stack(cands), 0) - cands[i]
        col = torch.stack([scale * (img[j] @ txt[i]) for j in range(b)])
        t2i = torch.logsumexp(col, 0) - col[i]
        total = total + (i2t + t2i) / 2
    return total / len(rows)


@pytest.mark.parametrize("local_loss", [False, True])
def test_gc_with_hard_negatives_equals_hand_computation(local_loss):
    img, txt = features(b=6, e=8, dtype=torch.float64, seed=3)
    g = torch.Generator().manual_seed(4)
    neg = F.normalize(torch.randn(6, 2, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    valid = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    batch = {"negative_input_ids": torch.zeros(6, 2, 4, dtype=torch.long), "negative_mask": valid}
    obj = GlobalContrastive(local_loss=local_loss).double()
    out = obj(NegativesModel(img, txt, neg), batch, StepCache())
    out.loss.backward()
    img2, txt2, neg2 = (x.detach().clone().requires_grad_() for x in (img, txt, neg))
    ref = _negclip_by_hand(img2, txt2, neg2, valid, 1 / 0.07)
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(img.grad, img2.grad)
    torch.testing.assert_close(txt.grad, txt2.grad)
    torch.testing.assert_close(neg.grad, neg2.grad)
    assert torch.all(neg.grad[~valid] == 0)
    # more candidates for image queries only: the loss rises above plain InfoNCE
    plain = run(GlobalContrastive().double(), img.detach(), txt.detach()).loss
    assert out.loss > plain
    sims = (img * txt).sum(-1, keepdim=True).detach()
    beats = ((sims > (img[:, None] * neg).sum(-1).detach()) & valid).sum() / valid.sum()
    assert out.metrics["hard_negative_accuracy"].item() == pytest.approx(beats.item())
    # every negative masked out is plain InfoNCE
    none = {**batch, "negative_mask": torch.zeros(6, 2, dtype=torch.bool)}
    torch.testing.assert_close(obj(NegativesModel(img, txt, neg), none, StepCache()).loss, plain)


def test_gc_hard_negatives_with_mismatched_rows():
    img, txt = features(b=5, e=8, dtype=torch.float64, seed=1)
    neg = F.normalize(torch.randn(5, 1, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64), dim=-1)
    keep = torch.tensor([True, False, True, True, True])
    valid = torch.ones(5, 1, dtype=torch.bool)
    batch = {"negative_input_ids": torch.zeros(5, 1, 3, dtype=torch.long), "negative_mask": valid}
    scale = 1 / 0.07
    out = GlobalContrastive().double()(NegativesModel(img, txt, neg, keep), batch, StepCache())
    torch.testing.assert_close(out.loss, _negclip_by_hand(img, txt, neg, valid, scale, queries=[0, 2, 3, 4]))
    dropped = GlobalContrastive(mismatched_as_candidates=False).double()
    out = dropped(NegativesModel(img, txt, neg, keep), batch, StepCache())
    torch.testing.assert_close(out.loss, _negclip_by_hand(img[keep], txt[keep], neg[keep], valid[keep], scale))


def test_gc_without_negatives_field_ignores_the_capability_and_needs_it_with_the_field():
    img, txt = features(b=4, dtype=torch.float64)
    neg = torch.zeros(4, 1, 16, dtype=torch.float64)
    obj = GlobalContrastive().double()
    torch.testing.assert_close(obj(NegativesModel(img, txt, neg), {}, StepCache()).loss, run(obj, img, txt).loss)
    assert "hard_negative_accuracy" not in run(obj, img, txt).metrics
    with pytest.raises(VLMConfigError, match="negative_text_embeddings"):
        obj(FeatureModel(img, txt), {"negative_input_ids": torch.zeros(4, 1, 3)}, StepCache())


@pytest.mark.parametrize("cls", [GlobalContrastive, SigmoidContrastive])
def test_scalar_parameters_are_vectors_and_load_from_0dim_checkpoints(cls):
    """FSDP refuses 0-dim parameters; checkpoints of open_clip, HF FLAVA and older runs hold them 0-dim."""
    obj = cls()
    names = cls.SCALAR_PARAMETERS
    assert all(getattr(obj, n).shape == (1,) for n in names)
    obj.load_state_dict({n: torch.tensor(0.5 + i) for i, n in enumerate(names)})
    assert [getattr(obj, n).item() for n in names] == [0.5 + i for i in range(len(names))]
    img, txt = features(b=4)
    out = run(obj, img, txt)
    assert out.metrics["logit_scale"].shape == () and out.metrics["temperature"].shape == ()
    assert out.metrics["temperature"].item() == pytest.approx(math.exp(-0.5))
