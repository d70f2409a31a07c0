"""Flamingo's Perceiver Resampler: a fixed number of learned latents summarise each image's (or video's) tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm.errors import VLMConfigError
from vlm.modules.attention import Attention, FeedForward


class PerceiverAttention(Attention):
    """Latents attend to ``cat(media, latents)``; media and latents each have their own LayerNorm.

    ``norm`` is the latents' LayerNorm, ``norm_context`` the media's (Flamingo paper, Appendix A.1.1).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__(dim, heads=heads, dim_head=dim_head, norm_context=True)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:  # type: ignore[override]
        """``x [N, P, dim]`` media tokens, ``latents [N, n, dim]`` -> update of the latents ``[N, n, dim]``."""
        latents = self.norm(latents)
        return self.attend(latents, torch.cat((self.norm_context(x), latents), dim=-2))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int | float) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, heads=heads, dim_head=dim_head)
        self.ff = FeedForward(dim, mult=ff_mult)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        latents = latents + self.attn(x, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Map each media's visual tokens to ``num_latents`` tokens.

    ``forward(x)`` takes ``[B, M, F, P, D]`` (M media per sample, F frames per media, P tokens per frame) or
    ``[B, M, P, D]`` (one frame) and returns ``[B, M, num_latents, D]``. With ``max_num_frames`` a learned
    embedding per frame index (``frame_embs [max_num_frames, D]``) is added to that frame's tokens; with
    ``max_num_media`` a learned embedding per media position (``media_embs [max_num_media, D]``) is added to
    all of that media's tokens. Each of the ``depth`` layers updates the latents (``latents [num_latents, D]``,
    shared by every media) with attention over ``cat(media tokens, latents)`` and a feed-forward block, both
    residual; a final LayerNorm (``norm``) follows.
    """

    def __init__(
        self,
        dim: int,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        num_latents: int = 64,
        max_num_media: int | None = None,
        max_num_frames: int | None = None,
        ff_mult: int | float = 4,
    ) -> None:
        super().__init__()
        self.dim, self.num_latents = dim, num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.media_embs = nn.Parameter(torch.randn(max_num_media, dim)) if max_num_media else None
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, dim_head, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(2)
        if x.dim() != 5 or x.shape[-1] != self.dim:
            raise VLMConfigError(
                f"PerceiverResampler expects [B, M, F, P, {self.dim}] or [B, M, P, {self.dim}], got {tuple(x.shape)}."
            )
        b, m, f, p, d = x.shape
        if self.frame_embs is not None:
            if f > self.frame_embs.shape[0]:
                raise VLMConfigError(f"PerceiverResampler: {f} frames but max_num_frames={self.frame_embs.shape[0]}.")
            x = x + self.frame_embs[:f, None, :]
        x = x.reshape(b, m, f * p, d)
        if self.media_embs is not None:
            if m > self.media_embs.shape[0]:
                raise VLMConfigError(f"PerceiverResampler: {m} media but max_num_media={self.media_embs.shape[0]}.")
            x = x + self.media_embs[:m, None, :]
        x = x.reshape(b * m, f * p, d)
        latents = self.latents.expand(b * m, -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents).reshape(b, m, self.num_latents, d)
