"""Masking generators shared by every objective: BERT-style token masking, BEiT block masks, MAE patch masks.

All take an optional CPU ``torch.Generator`` (the model's per-step ``cache.generator``) so that masks are
reproducible and rank-distinct; random numbers are drawn on the CPU and moved to the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from vlm.errors import VLMConfigError

IGNORE_INDEX = -100


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator).to(device)


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    prob: float = 0.15,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
    attention_mask: Tensor | None = None,
    word_starts: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: select ``prob`` of eligible tokens (or words); of those 80% [MASK], 10% random, 10% kept.

    Special ids, the mask id and padding (``attention_mask == 0``) are never selected, and random
    replacements are never special ids. With ``word_starts`` (bool[B, L], True at each word's first
    sub-token) selection is per word and covers all of its sub-tokens. Every row with an eligible token gets
    at least one target. Returns ``(masked_ids, labels)`` with ``labels = -100`` where nothing is predicted.
    """
    if input_ids.dim() != 2:
        raise VLMConfigError(f"mask_tokens expects input_ids of shape [B, L], got {tuple(input_ids.shape)}.")
    if not 0.0 <= prob <= 1.0 or mask_ratio < 0 or random_ratio < 0 or mask_ratio + random_ratio > 1.0 + 1e-9:
        raise VLMConfigError(
            f"mask_tokens: need 0 <= prob <= 1 and mask_ratio + random_ratio <= 1 (both >= 0), got prob={prob}, "
            f"mask_ratio={mask_ratio}, random_ratio={random_ratio}."
        )
    device, shape = input_ids.device, tuple(input_ids.shape)
    special = torch.tensor(sorted({int(s) for s in special_ids} | {int(mask_token_id)}), dtype=input_ids.dtype)
    eligible = ~torch.isin(input_ids, special.to(device))
    if attention_mask is not None:
        eligible &= attention_mask.to(device).bool()

    # Draw everything up front in a fixed order so a seed fixes the whole result.
    u_select = _rand(shape, generator, device)
    u_fallback = _rand(shape, generator, device)
    u_action = _rand(shape, generator, device)
    allowed = torch.arange(vocab_size, dtype=input_ids.dtype)
    allowed = allowed[~torch.isin(allowed, special)]
    if random_ratio > 0 and allowed.numel() == 0:
        raise VLMConfigError("mask_tokens: every vocabulary id is special, so there is no random replacement token.")
    pick = torch.randint(0, max(1, allowed.numel()), shape, generator=generator)

    if word_starts is None:
        selected = (u_select < prob) & eligible
    else:
        if word_starts.shape != input_ids.shape:
            raise VLMConfigError(
                f"mask_tokens: word_starts has shape {tuple(word_starts.shape)}, input_ids {shape}; they must match."
            )
        starts = word_starts.to(device).bool()
        word_idx = starts.long().cumsum(1) - 1  # -1 before the first word start
        # Give every sub-token the draw of its word's first sub-token.
        per_word = torch.full((shape[0], shape[1] + 1), 2.0, device=device)
        per_word.scatter_(1, torch.where(starts, word_idx, shape[1]), u_select)
        token_u = torch.where(word_idx >= 0, per_word.gather(1, word_idx.clamp(min=0)), u_select)
        selected = (token_u < prob) & eligible

    # At least one target per row that has something to mask: a random eligible token (and its word).
    # (Computed for every row and applied where needed: no data-dependent branch, no device sync.)
    needs = eligible.any(1) & ~selected.any(1)
    chosen = torch.where(eligible, u_fallback, -1.0).argmax(1, keepdim=True)
    extra = torch.zeros_like(selected).scatter_(1, chosen, True)
    if word_starts is not None:
        chosen_word = word_idx.gather(1, chosen)
        extra |= (word_idx == chosen_word) & (chosen_word >= 0) & eligible
    selected |= extra & needs[:, None]

    to_mask = selected & (u_action < mask_ratio)
    to_random = selected & (u_action >= mask_ratio) & (u_action < mask_ratio + random_ratio)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    if allowed.numel():
        masked = torch.where(to_random, allowed[pick].to(device), masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


class _Uniforms:
    """Uniform floats from a torch.Generator, drawn in blocks (per-draw tensor calls would dominate)."""

    def __init__(self, generator: torch.Generator | None, block: int = 512) -> None:
        self.generator, self.block, self.buf, self.pos = generator, block, [], 0

    def __call__(self) -> float:
        if self.pos == len(self.buf):
            self.buf, self.pos = torch.rand(self.block, generator=self.generator, dtype=torch.float64).tolist(), 0
        self.pos += 1
        return self.buf[self.pos - 1]


Box = tuple[int, int, int, int]  # (top, left, height, width) in patches


def _block_mask_row(
    h_grid: int, w_grid: int, target: int, lo: int, hi: int, min_aspect: float, max_aspect: float, uniform: _Uniforms
) -> tuple[np.ndarray, list[Box]]:
    mask = np.zeros((h_grid, w_grid), dtype=bool)
    boxes: list[Box] = []
    count = 0
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)

    def try_place(area_lo: float, area_hi: float, min_area: int) -> int:
        nonlocal count
        remaining = target - count
        # Rounding h and w may leave [area_lo, area_hi]; such draws are rejected, not stretched.
        area = area_lo + (area_hi - area_lo) * uniform()
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform())
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        u_top, u_left = uniform(), uniform()
        if not (1 <= h <= h_grid and 1 <= w <= w_grid and min_area <= h * w <= area_hi):
            return 0
        if not min_aspect - 1e-9 <= h / w <= max_aspect + 1e-9:
            return 0
        top, left = int(u_top * (h_grid - h + 1)), int(u_left * (w_grid - w + 1))
        delta = h * w - int(mask[top: top + h, left: left + w].sum())
        if 0 < delta <= remaining:
            mask[top: top + h, left: left + w] = True
            boxes.append((top, left, h, w))
            count += delta
            return delta
        return 0

    # BEiT's phase: rectangles of lo..hi patches, each adding no more than what is still to mask.
    while count < target and target - count >= lo:
        if not any(try_place(lo, min(hi, target - count), lo) for _ in range(10)):
            break
    # Top-up so every row masks exactly `target`: smaller rectangles (aspect still within limits), and a
    # single patch when none fits, which always does (aspect 1).
    while count < target:
        if any(try_place(1, target - count, 1) for _ in range(10)):
            continue
        free = np.flatnonzero(~mask.reshape(-1))
        cell = int(free[min(int(uniform() * len(free)), len(free) - 1)])
        top, left = divmod(cell, w_grid)
        mask[top, left] = True
        boxes.append((top, left, 1, 1))
        count += 1
    return mask, boxes


def block_mask_with_boxes(
    batch_size: int,
    grid: tuple[int, int],
    *,
    ratio: float = 0.4,
    min_patches: int = 16,
    max_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[list[Box]]]:
    """:func:`block_mask` plus, per row, the rectangles ``(top, left, height, width)`` whose union it is."""
    h_grid, w_grid = int(grid[0]), int(grid[1])
    n = h_grid * w_grid
    if h_grid < 1 or w_grid < 1 or not 0.0 <= ratio <= 1.0:
        raise VLMConfigError(f"block_mask: need a positive grid and 0 <= ratio <= 1, got grid={grid}, ratio={ratio}.")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if not 0 < min_aspect <= 1.0 <= max_aspect:
        raise VLMConfigError(
            f"block_mask: need 0 < min_aspect <= 1 <= max_aspect, got min_aspect={min_aspect}, max_aspect={max_aspect}."
        )
    target = min(n, int(round(ratio * n)))
    # Tiny grids (4x4 at 40% = 6 patches) cannot hold a 16-patch block: the size limits shrink to the target.
    lo = max(1, min(int(min_patches), target))
    hi = max(lo, target if max_patches is None else min(int(max_patches), target))
    uniform = _Uniforms(generator)
    rows, boxes = [], []
    for _ in range(batch_size):
        m, b = _block_mask_row(h_grid, w_grid, target, lo, hi, min_aspect, max_aspect, uniform)
        rows.append(m.reshape(-1))
        boxes.append(b)
    mask = torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, n), dtype=torch.bool)
    return mask, boxes


def block_mask(
    batch_size: int,
    grid: tuple[int, int],
    *,
    ratio: float = 0.4,
    min_patches: int = 16,
    max_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """BEiT block-wise mask bool[B, H*W] with exactly ``round(ratio * H * W)`` patches masked per row.

    Rectangles of ``min_patches..max_patches`` patches (default: up to the target) with height/width in
    ``[min_aspect, max_aspect]`` (default ``1/min_aspect``) are placed at random, each adding no more than
    the patches still to mask, as in BEiT. Unlike BEiT, which may stop short, the last few patches are
    topped up with smaller rectangles of the same aspect range (down to single patches) so the count is
    exact. Both size limits are clamped to the target on tiny grids.
    """
    return block_mask_with_boxes(
        batch_size, grid, ratio=ratio, min_patches=min_patches, max_patches=max_patches,
        min_aspect=min_aspect, max_aspect=max_aspect, generator=generator,
    )[0]


def random_patch_mask(
    batch_size: int, num_patches: int, *, ratio: float = 0.75, generator: torch.Generator | None = None
) -> Tensor:
    """MAE-style uniform random mask bool[B, N] with exactly ``round(ratio * N)`` patches masked per row."""
    if not 0.0 <= ratio <= 1.0:
        raise VLMConfigError(f"random_patch_mask: ratio must be in [0, 1], got {ratio}.")
    k = int(round(ratio * num_patches))
    noise = torch.rand((batch_size, num_patches), generator=generator)
    idx = noise.argsort(1)[:, :k]
    return torch.zeros((batch_size, num_patches), dtype=torch.bool).scatter_(1, idx, True)
