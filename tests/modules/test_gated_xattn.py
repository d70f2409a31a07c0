"""Gated cross-attention and the media masks, against float64 softmax loops written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlm.errors import VLMConfigError
from vlm.modules import GatedCrossAttentionBlock, media_attention_mask, media_index_from_ids

B, T, DIM, MDIM, M, L, HEADS, DH = 3, 9, 16, 12, 3, 4, 2, 8
IMG = 7


def ids_with_images():
    ids = torch.randint(10, 50, (B, T))
    ids[0, [0, 3, 6]] = IMG  # image first, three images
    ids[1, [2, 5]] = IMG  # two tokens before the first image
    # row 2 has no image at all
    return ids


def randomised_block(only_immediate):
    block = GatedCrossAttentionBlock(DIM, MDIM, heads=HEADS, dim_head=DH, ff_mult=2, only_immediate=only_immediate)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return block


def allowed(index, j, only_immediate):
    return j == index if only_immediate else 0 <= j <= index


@torch.no_grad()
def reference(block, x, media, media_index):
    """float64: per token, softmax over the latents of the allowed images, one head at a time."""
    x, media = x.double(), media.double()
    p = {k: v.double() for k, v in block.state_dict().items()}
    xn = F.layer_norm(x, (DIM,), p["attn.norm.weight"], p["attn.norm.bias"])
    q = xn @ p["attn.to_q.weight"].T
    kv = media @ p["attn.to_kv.weight"].T  # [B, M, L, 2 * inner]
    inner = HEADS * DH
    update = torch.zeros(B, x.shape[1], inner, dtype=torch.float64)
    for b in range(B):
        for t in range(x.shape[1]):
            keys = [(j, n) for j in range(M) for n in range(L) if allowed(int(media_index[b, t]), j, block.only_immediate)]
            for h in range(HEADS):
                sl = slice(h * DH, (h + 1) * DH)
                if not keys:
                    continue
                scores = [float(q[b, t, sl] @ kv[b, j, n, sl]) / math.sqrt(DH) for j, n in keys]
                top = max(scores)
                w = [math.exp(s - top) for s in scores]
                update[b, t, sl] = sum(wi / sum(w) * kv[b, j, n, inner:][sl] for wi, (j, n) in zip(w, keys))
    y = x + torch.tanh(p["attn_gate"]) * (update @ p["attn.to_out.weight"].T)
    hidden = F.layer_norm(y, (DIM,), p["ff.norm.weight"], p["ff.norm.bias"]) @ p["ff.proj_in.weight"].T
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return y + torch.tanh(p["ff_gate"]) * (hidden @ p["ff.proj_out.weight"].T)


def test_media_index_from_ids():
    ids = torch.tensor([[1, IMG, 2, 3, IMG, IMG, 4], [IMG, 2, 2, 2, 2, 2, 2]])
    expected = torch.tensor([[-1, 0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 0, 0]])
    assert torch.equal(media_index_from_ids(ids, IMG), expected)
    assert media_index_from_ids(ids, IMG).dtype == torch.long


@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_attention_mask_by_brute_force(only_immediate):
    index = torch.tensor([[-1, 0, 1, 2, 3], [0, 0, 2, -1, 1]])
    mask = media_attention_mask(index, M, L, only_immediate)
    assert mask.shape == (2, 1, 5, M * L) and mask.dtype == torch.bool
    for b in range(2):
        for t in range(5):
            for key in range(M * L):
                assert bool(mask[b, 0, t, key]) == allowed(int(index[b, t]), key // L, only_immediate)
    assert media_attention_mask(index[:, :1], M, L, only_immediate).shape == (2, 1, 1, M * L)
    assert torch.equal(media_attention_mask(index[:, 0], M, L, only_immediate), mask[:, :, :1])


def test_identity_at_initialisation():
    block = GatedCrossAttentionBlock(DIM, MDIM, heads=HEADS, dim_head=DH)
    assert block.attn_gate.shape == (1,) and block.ff_gate.shape == (1,)
    assert torch.equal(block.attn_gate.detach(), torch.zeros(1)) and torch.equal(block.ff_gate.detach(), torch.zeros(1))
    x, media = torch.randn(B, T, DIM), torch.randn(B, M, L, MDIM)
    ids = ids_with_images()
    assert torch.equal(block(x, media, media_index_from_ids(ids, IMG)), x)
    assert torch.equal(block(x, media, torch.full((B, 1), 1)), x)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_matches_float64_reference(only_immediate):
    block = randomised_block(only_immediate).double()
    x, media = torch.randn(B, T, DIM, dtype=torch.float64), torch.randn(B, M, L, MDIM, dtype=torch.float64)
    index = media_index_from_ids(ids_with_images(), IMG)
    torch.testing.assert_close(block(x, media, index), reference(block, x, media, index), atol=1e-10, rtol=1e-10)
    block32 = block.float()
    torch.testing.assert_close(
        block32(x.float(), media.float(), index).double(), reference(block32, x, media, index), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("only_immediate", [True, False])
def test_no_update_before_the_first_image(only_immediate):
    block = randomised_block(only_immediate)
    with torch.no_grad():
        block.ff_gate.zero_()
    x, media = torch.randn(B, T, DIM, requires_grad=True), torch.randn(B, M, L, MDIM)
    index = media_index_from_ids(ids_with_images(), IMG)
    out = block(x, media, index)
    before = index < 0
    assert before.any() and (~before).any()
    assert torch.equal(out[before], x[before])
    assert not torch.isclose(out[~before], x[~before]).all(-1).any()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(block.attn.to_kv.weight.grad).all()


def test_immediate_index_past_the_last_image_gets_no_update():
    block = randomised_block(True)
    with torch.no_grad():
        block.ff_gate.zero_()
    x, media = torch.randn(B, T, DIM), torch.randn(B, M, L, MDIM)
    assert torch.equal(block(x, media, torch.full((B, T), M)), x)


@pytest.mark.parametrize("only_immediate", [True, False])
@pytest.mark.parametrize("shape", ["b1", "b"])
def test_broadcast_media_index(only_immediate, shape):
    block = randomised_block(only_immediate)
    x, media = torch.randn(B, T, DIM), torch.randn(B, M, L, MDIM)
    last = torch.tensor([2, 1, -1])
    full = block(x, media, last[:, None].expand(B, T))
    short = block(x, media, last[:, None] if shape == "b1" else last)
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(short.double(), reference(block, x, media, last[:, None].expand(B, T)), atol=1e-5, rtol=1e-5)


def test_media_index_length_must_match():
    block = randomised_block(True)
    with pytest.raises(VLMConfigError, match="columns"):
        block(torch.randn(B, T, DIM), torch.randn(B, M, L, MDIM), torch.zeros(B, T - 1, dtype=torch.long))
