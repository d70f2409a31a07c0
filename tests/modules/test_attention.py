"""Attention and FeedForward against float64 computations written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlm.modules import Attention, FeedForward

B, TQ, TK, DIM, CDIM, HEADS, DH = 2, 5, 7, 16, 12, 4, 6


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and p.shape[0] in (DIM, CDIM) else 0.0))
    return module


def layer_norm(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)


@torch.no_grad()
def reference(attn, x, context=None, mask=None):
    """Per-(batch, head, query) softmax over the allowed keys, float64; no allowed key -> zero output."""
    x = x.double()
    xn = layer_norm(x, attn.norm)
    ctx = xn if context is None else context.double()
    if context is not None and attn.norm_context is not None:
        ctx = layer_norm(ctx, attn.norm_context)
    lin = lambda t, m: F.linear(t, m.weight.double(), None if m.bias is None else m.bias.double())  # noqa: E731
    q, kv = lin(xn, attn.to_q), lin(ctx, attn.to_kv)
    inner = HEADS * DH
    k, v = kv[..., :inner], kv[..., inner:]
    out = torch.zeros(x.shape[0], x.shape[1], inner, dtype=torch.float64)
    full = None if mask is None else mask.expand(x.shape[0], HEADS, x.shape[1], ctx.shape[1])
    for b in range(x.shape[0]):
        for h in range(HEADS):
            sl = slice(h * DH, (h + 1) * DH)
            for i in range(x.shape[1]):
                keys = [j for j in range(ctx.shape[1]) if full is None or bool(full[b, h, i, j])]
                if not keys:
                    continue
                scores = [float(q[b, i, sl] @ k[b, j, sl]) / math.sqrt(DH) for j in keys]
                top = max(scores)
                w = [math.exp(s - top) for s in scores]
                total = sum(w)
                out[b, i, sl] = sum((wj / total) * v[b, j, sl] for wj, j in zip(w, keys))
    return F.linear(out, attn.to_out.weight.double())


def test_parameter_layout():
    attn = Attention(DIM, heads=HEADS, dim_head=DH, context_dim=CDIM)
    assert attn.to_q.weight.shape == (HEADS * DH, DIM) and attn.to_q.bias is None
    assert attn.to_kv.weight.shape == (2 * HEADS * DH, CDIM) and attn.to_kv.bias is None
    assert attn.to_out.weight.shape == (DIM, HEADS * DH) and attn.to_out.bias is None
    assert attn.norm_context is None
    assert set(dict(attn.named_parameters())) == {
        "norm.weight", "norm.bias", "to_q.weight", "to_kv.weight", "to_out.weight"
    }


def test_self_attention_matches_manual():
    attn = randomise(Attention(DIM, heads=HEADS, dim_head=DH))
    x = torch.randn(B, TQ, DIM)
    torch.testing.assert_close(attn(x).double(), reference(attn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_head", [False, True])
def test_masked_cross_attention_matches_manual(per_head):
    attn = randomise(Attention(DIM, heads=HEADS, dim_head=DH, context_dim=CDIM, qkv_bias=True, norm_context=True))
    x, ctx = torch.randn(B, TQ, DIM), torch.randn(B, TK, CDIM)
    mask = torch.rand(B, HEADS if per_head else 1, TQ, TK) < 0.5
    mask[0, :, 1] = False  # a query that may attend to nothing
    mask[1, :, 2] = True
    out = attn(x, ctx, mask)
    torch.testing.assert_close(out.double(), reference(attn, x, ctx, mask), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, 1], torch.zeros(DIM))
    assert torch.isfinite(out).all()


def test_fully_masked_rows_have_finite_gradients():
    attn = randomise(Attention(DIM, heads=HEADS, dim_head=DH, context_dim=CDIM))
    x, ctx = torch.randn(B, TQ, DIM, requires_grad=True), torch.randn(B, TK, CDIM)
    mask = torch.zeros(B, 1, TQ, TK, dtype=torch.bool)
    mask[:, :, :2, :3] = True
    attn(x, ctx, mask).square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(attn.to_kv.weight.grad).all()


def test_feedforward_layout_and_value():
    ff = randomise(FeedForward(DIM, mult=3))
    assert ff.proj_in.weight.shape == (3 * DIM, DIM) and ff.proj_in.bias is None
    assert ff.proj_out.weight.shape == (DIM, 3 * DIM) and ff.proj_out.bias is None
    x = torch.randn(B, TQ, DIM)
    hidden = F.linear(layer_norm(x.double(), ff.norm), ff.proj_in.weight.double())
    expected = F.linear(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))), ff.proj_out.weight.double())
    torch.testing.assert_close(ff(x).double(), expected, atol=1e-5, rtol=1e-5)
