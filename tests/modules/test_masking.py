"""Masking generators: rates, exclusions, whole words, block geometry, determinism (brute-force checks)."""

import math

import pytest
import torch

from vlm.errors import VLMConfigError
from vlm.modules.masking import block_mask, block_mask_with_boxes, mask_tokens, random_patch_mask

PAD, CLS, SEP, MASK = 0, 101, 102, 103
SPECIAL = (PAD, CLS, SEP, MASK)
VOCAB = 30000


def batch(b=64, length=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (b, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (b,), generator=g)
    attn = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[attn == 0] = PAD
    return ids, attn


def within(observed, expected_p, n, sigmas=5.0):
    """|observed fraction - p| within `sigmas` binomial standard deviations for n trials."""
    return abs(observed - expected_p) <= sigmas * math.sqrt(expected_p * (1 - expected_p) / n)


def test_rates_exclusions_and_80_10_10_split():
    ids, attn = batch()
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                                 attention_mask=attn, generator=g)
    eligible = (attn == 1) & ~torch.isin(ids, torch.tensor(SPECIAL))
    selected = labels != -100
    assert not selected[~eligible].any()
    assert torch.equal(masked[~selected], ids[~selected])
    assert torch.equal(labels[selected], ids[selected])
    n_el, n_sel = int(eligible.sum()), int(selected.sum())
    assert within(n_sel / n_el, 0.15, n_el)
    as_mask = int((masked[selected] == MASK).sum())
    changed = (masked != ids) & (masked != MASK) & selected
    kept = int((masked[selected] == ids[selected]).sum())
    assert within(as_mask / n_sel, 0.8, n_sel)
    # a random replacement equal to the original (prob 1/V) counts as "kept": negligible at V=30000
    assert within(int(changed.sum()) / n_sel, 0.1, n_sel)
    assert within(kept / n_sel, 0.1, n_sel)
    assert not torch.isin(masked[changed], torch.tensor(SPECIAL)).any()
    assert int(masked[changed].max()) < VOCAB


def test_random_replacements_never_special_even_with_small_vocab():
    ids = torch.randint(4, 10, (200, 30))
    masked, labels = mask_tokens(ids, mask_token_id=3, vocab_size=10, special_ids=(0, 1, 2), prob=0.5,
                                 mask_ratio=0.0, random_ratio=1.0, generator=torch.Generator().manual_seed(3))
    sel = labels != -100
    assert sel.any()
    assert int(masked[sel].min()) >= 4 and int(masked[sel].max()) <= 9


def test_every_row_with_eligible_tokens_gets_a_target():
    ids, attn = batch(b=32, length=16)
    ids[5, 1:] = PAD
    attn[5, 1:] = 0  # row 5: only [CLS], nothing to mask
    _, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, prob=0.0,
                            attention_mask=attn, generator=torch.Generator().manual_seed(0))
    counts = (labels != -100).sum(1)
    assert counts[5] == 0
    assert torch.all(counts[torch.arange(32) != 5] == 1)


@pytest.mark.parametrize("prob", [0.0, 0.3])
def test_whole_word_masking_covers_all_subtokens(prob):
    ids, attn = batch(b=40, length=48, seed=4)
    g = torch.Generator().manual_seed(9)
    word_starts = torch.rand(ids.shape, generator=g) < 0.4
    word_starts[:, 0] = True
    word_starts[ids == SEP] = True
    word_starts[ids == PAD] = True
    _, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, prob=prob,
                            attention_mask=attn, word_starts=word_starts, generator=g)
    eligible = (attn == 1) & ~torch.isin(ids, torch.tensor(SPECIAL))
    sel = labels != -100
    n_words = n_chosen = 0
    for b in range(ids.shape[0]):
        starts = word_starts[b].nonzero().flatten().tolist() + [ids.shape[1]]
        for s, e in zip(starts[:-1], starts[1:]):
            toks = [i for i in range(s, e) if eligible[b, i]]
            if not toks:
                continue
            picked = {bool(sel[b, i]) for i in toks}
            assert len(picked) == 1, f"row {b}: word {s}:{e} partially masked"
            n_words += 1
            n_chosen += picked.pop()
        assert sel[b].any()
    if prob > 0:
        assert within(n_chosen / n_words, prob, n_words)


def test_mask_tokens_deterministic_per_seed():
    ids, attn = batch(b=8, length=32)
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, attention_mask=attn)
    a = mask_tokens(ids, generator=torch.Generator().manual_seed(5), **kw)
    b = mask_tokens(ids, generator=torch.Generator().manual_seed(5), **kw)
    c = mask_tokens(ids, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_tokens_bad_arguments():
    ids, _ = batch(b=2, length=8)
    with pytest.raises(VLMConfigError, match="mask_ratio"):
        mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, mask_ratio=0.95)
    with pytest.raises(VLMConfigError, match=r"\[B, L\]"):
        mask_tokens(ids[0], mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)


@pytest.mark.parametrize("grid,ratio,min_patches", [((14, 14), 0.4, 16), ((4, 4), 0.4, 16), ((7, 10), 0.5, 8)])
def test_block_mask_is_exact_union_of_valid_rectangles(grid, ratio, min_patches):
    h, w = grid
    n = h * w
    target = round(ratio * n)
    lo = min(min_patches, target)
    mask, boxes = block_mask_with_boxes(32, grid, ratio=ratio, min_patches=min_patches,
                                        generator=torch.Generator().manual_seed(0))
    assert mask.shape == (32, n) and mask.dtype == torch.bool
    assert torch.all(mask.sum(1) == target)
    big_patches = 0
    for row, row_boxes in zip(mask, boxes):
        union = torch.zeros(h, w, dtype=torch.bool)
        seen_small = False
        for top, left, bh, bw in row_boxes:
            assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
            assert 0.3 - 1e-9 <= bh / bw <= 1 / 0.3 + 1e-9
            assert bh * bw <= target
            if bh * bw < lo:
                seen_small = True  # top-up boxes come only after the BEiT-sized ones
            else:
                assert not seen_small
                big_patches += int((~union[top: top + bh, left: left + bw]).sum())
            union[top: top + bh, left: left + bw] = True
        assert torch.equal(union.flatten(), row)
    # the top-up only finishes rows: most masked patches come from rectangles of at least `lo` patches
    assert big_patches >= 0.7 * 32 * target


def test_block_mask_respects_max_patches_and_determinism():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    _, boxes = block_mask_with_boxes(16, (14, 14), ratio=0.4, min_patches=4, max_patches=12, generator=g(1))
    assert all(bh * bw <= 12 for row in boxes for _, _, bh, bw in row)
    assert torch.equal(block_mask(4, (14, 14), generator=g(2)), block_mask(4, (14, 14), generator=g(2)))
    assert not torch.equal(block_mask(4, (14, 14), generator=g(2)), block_mask(4, (14, 14), generator=g(3)))
    with pytest.raises(VLMConfigError, match="aspect"):
        block_mask(1, (4, 4), min_aspect=2.0)


def test_random_patch_mask_exact_and_uniform():
    m = random_patch_mask(400, 49, ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert torch.all(m.sum(1) == round(0.75 * 49))
    freq = m.float().mean(0)
    p = round(0.75 * 49) / 49
    sd = math.sqrt(p * (1 - p) / 400)
    assert torch.all((freq - p).abs() <= 5 * sd)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(random_patch_mask(3, 10, generator=g()), random_patch_mask(3, 10, generator=g()))
