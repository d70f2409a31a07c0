"""ExtendedEmbedding / ExtendedLMHead equal a plain Embedding / Linear over cat(base, extra); only new rows train."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm.modules import ExtendedEmbedding, ExtendedLMHead

V, NEW, D = 11, 3, 8


def make(tied=True):
    emb = ExtendedEmbedding(nn.Embedding(V, D), NEW)
    head = ExtendedLMHead(nn.Linear(D, V), emb.extra) if tied else ExtendedLMHead.with_new_rows(nn.Linear(D, V), NEW)
    with torch.no_grad():  # leave the mean-of-rows start so that a row mix-up shows
        emb.extra.add_(torch.randn_like(emb.extra))
        if not tied:
            head.extra.add_(torch.randn_like(head.extra))
    return emb, head


def test_init_and_shapes():
    base = nn.Embedding(V, D)
    emb = ExtendedEmbedding(base, NEW)
    assert emb.num_embeddings == V + NEW and emb.embedding_dim == D and emb.num_new == NEW
    assert not base.weight.requires_grad and emb.extra.requires_grad
    assert torch.allclose(emb.extra, base.weight.mean(0, keepdim=True).expand(NEW, D))
    assert torch.equal(emb.weight, torch.cat((base.weight, emb.extra)))
    assert [n for n, p in emb.named_parameters() if p.requires_grad] == ["extra"]
    head = ExtendedLMHead.with_new_rows(nn.Linear(D, V), NEW)
    assert head.out_features == V + NEW and head.in_features == D
    assert torch.allclose(head.extra, head.base.weight.mean(0, keepdim=True).expand(NEW, D))
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ["extra"]


@pytest.mark.parametrize("shape", [(7,), (2, 5), (2, 3, 4)])
def test_embedding_forward_and_gradients(shape):
    emb, _ = make()
    ids = torch.randint(0, V + NEW, shape)
    ids.view(-1)[:2] = torch.tensor([V - 1, V])  # both sides of the boundary
    ref = nn.Embedding(V + NEW, D)
    with torch.no_grad():
        ref.weight.copy_(emb.weight)
    out = emb(ids)
    assert out.shape == (*shape, D)
    assert torch.equal(out, ref(ids))
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (ref(ids) * grad_out).sum().backward()
    assert emb.base.weight.grad is None
    torch.testing.assert_close(emb.extra.grad, ref.weight.grad[V:])


@pytest.mark.parametrize("tied", [True, False])
def test_head_forward_and_gradients(tied):
    emb, head = make(tied)
    assert (head.extra is emb.extra) == tied
    h = torch.randn(2, 5, D, requires_grad=True)
    logits = head(h)
    full_w = torch.cat((head.base.weight, head.extra)).detach().requires_grad_(True)
    full_b = torch.cat((head.base.bias, torch.zeros(NEW))).detach()
    ref = F.linear(h, full_w, full_b)
    assert logits.shape == (2, 5, V + NEW)
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(head.weight, full_w)
    g = torch.randn_like(logits)
    (logits * g).sum().backward()
    (ref * g).sum().backward()
    assert head.base.weight.grad is None and head.base.bias.grad is None
    torch.testing.assert_close(head.extra.grad, full_w.grad[V:])


def test_tied_embedding_and_head_share_one_parameter():
    """An LM whose output head is its input embedding stays tied, new rows included."""
    base_emb, base_head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
    base_head.weight = base_emb.weight
    emb = ExtendedEmbedding(base_emb, NEW)
    head = ExtendedLMHead(base_head, emb.extra)
    with torch.no_grad():
        emb.extra.add_(torch.randn_like(emb.extra))
    model = nn.ModuleDict(dict(emb=emb, head=head))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is emb.extra
    ids = torch.tensor([[1, V, V + 2, 4]])
    full = emb.weight.detach().requires_grad_(True)
    loss = F.cross_entropy(head(emb(ids)).flatten(0, 1), ids.flatten())
    ref = F.cross_entropy(F.linear(F.embedding(ids, full), full).flatten(0, 1), ids.flatten())
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(emb.extra.grad, full.grad[V:])
    assert base_emb.weight.grad is None
    with torch.no_grad():
        emb.extra.add_(1.0)
    assert torch.equal(head.weight, emb.weight)


def test_head_rejects_wrong_width():
    with pytest.raises(ValueError, match="extra"):
        ExtendedLMHead(nn.Linear(D, V), nn.Parameter(torch.zeros(NEW, D + 1)))
