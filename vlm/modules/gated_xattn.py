"""Flamingo's GATED XATTN-DENSE block: tanh-gated cross-attention to visual latents, then a gated MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm.errors import VLMConfigError
from vlm.modules.attention import Attention, FeedForward
from vlm.modules.media import media_attention_mask


class GatedCrossAttentionBlock(nn.Module):
    """``y = x + tanh(attn_gate) * xattn(x, media); out = y + tanh(ff_gate) * ff(y)``.

    ``forward(x [B, T, dim], media [B, M, L, media_dim], media_index) -> [B, T, dim]``. ``media_index`` is
    a LongTensor ``[B, T]`` (see :func:`vlm.modules.media.media_index_from_ids`): the 0-based image each
    text token is conditioned on, -1 before the first ``<image>``; ``[B, 1]`` or ``[B]`` applies one index
    to every token (cached generation, where new tokens follow the last image). ``only_immediate``: a
    token attends to the L latents of image ``media_index`` only; otherwise to all images ``<=`` it. A
    token with no image to attend to (index -1, or an index past the last image with ``only_immediate``)
    gets an exactly zero cross-attention update; the feed-forward part still applies to it.
    ``attn_gate`` and ``ff_gate`` (shape ``[1]``) start at 0, so a fresh block returns ``x`` unchanged.
    """

    def __init__(
        self,
        dim: int,
        media_dim: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int | float = 4,
        only_immediate: bool = True,
    ) -> None:
        super().__init__()
        self.only_immediate = only_immediate
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, context_dim=media_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, media: Tensor, media_index: Tensor) -> Tensor:
        if media.dim() != 4:
            raise VLMConfigError(f"media must be [B, M, L, media_dim], got {tuple(media.shape)}.")
        b, t = x.shape[:2]
        m, n = media.shape[1:3]
        if media_index.dim() == 2 and media_index.shape[1] not in (1, t):
            raise VLMConfigError(
                f"media_index has {media_index.shape[1]} columns but x has {t} tokens (or pass [B, 1] / [B])."
            )
        mask = media_attention_mask(media_index.to(x.device), m, n, self.only_immediate)
        x = x + self.attn_gate.tanh() * self.attn(x, media.reshape(b, m * n, media.shape[-1]), mask)
        return x + self.ff_gate.tanh() * self.ff(x)
