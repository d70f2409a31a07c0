"""A frozen vocabulary plus a few trainable new rows (e.g. ``<image>``, ``<|endofchunk|>``), for input and output.

Only the new rows are Parameters that train, so optimiser state and gradients cover ``num_new`` rows, not
the whole vocabulary; an output head can share the input's new rows to keep the embeddings tied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _mean_rows(weight: Tensor, num_new: int) -> Tensor:
    return weight.detach().mean(dim=0, keepdim=True).expand(num_new, -1).clone()


class ExtendedEmbedding(nn.Module):
    """``base`` (frozen) for ids ``< base.num_embeddings``, the trainable ``extra [num_new, D]`` for the rest.

    ``forward(ids [...]) -> [..., D]`` for any leading shape. ``extra`` starts at the mean of the base rows.
    ``weight`` is ``cat(base.weight, extra)``, a read-only convenience built on each access.
    """

    def __init__(self, base: nn.Embedding, num_new: int) -> None:
        super().__init__()
        if num_new < 0:
            raise ValueError(f"num_new must be >= 0, got {num_new}.")
        self.base = base
        base.weight.requires_grad_(False)
        self.extra = nn.Parameter(_mean_rows(base.weight, num_new))

    @property
    def num_base(self) -> int:
        return self.base.num_embeddings

    @property
    def num_new(self) -> int:
        return self.extra.shape[0]

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.num_new

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> Tensor:
        return torch.cat((self.base.weight, self.extra), dim=0)

    def forward(self, ids: Tensor) -> Tensor:
        is_new = ids >= self.num_base
        out = self.base(ids.masked_fill(is_new, 0))
        if self.num_new == 0:
            return out
        new = F.embedding((ids - self.num_base).clamp(min=0), self.extra)
        # in the trainable rows' dtype: a base table stored in bf16 (frozen, see Flamingo's frozen_dtype) must not
        # turn the LM's residual stream into bf16
        return torch.where(is_new.unsqueeze(-1), new, out.to(new.dtype))


class ExtendedLMHead(nn.Module):
    """Logits over the extended vocabulary: ``cat(base(h), h @ extra.T)``; ``base`` is frozen, ``extra`` trains.

    Pass the :class:`ExtendedEmbedding`'s ``extra`` when the language model ties its input and output
    embeddings (the head then shares that Parameter), or :meth:`with_new_rows` for an untied head. The new
    rows have no bias.
    """

    def __init__(self, base: nn.Linear, extra: nn.Parameter) -> None:
        super().__init__()
        if extra.dim() != 2 or extra.shape[1] != base.in_features:
            raise ValueError(f"extra must be [num_new, {base.in_features}], got {tuple(extra.shape)}.")
        self.base = base
        base.requires_grad_(False)
        self.extra = extra

    @classmethod
    def with_new_rows(cls, base: nn.Linear, num_new: int) -> ExtendedLMHead:
        """An untied head whose ``num_new`` new rows start at the mean of the base rows."""
        return cls(base, nn.Parameter(_mean_rows(base.weight, num_new)))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features + self.extra.shape[0]

    @property
    def weight(self) -> Tensor:
        return torch.cat((self.base.weight, self.extra), dim=0)

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat((self.base(h), F.linear(h, self.extra.to(h.dtype))), dim=-1)


def sincos_2d(num_patches: int, dim: int) -> Tensor:
    """``[P, dim]`` sine-cosine position table of a square grid of ``P`` patches (row-major); a 1-D table when
    ``P`` is not a square. A quarter of the channels each: sin(y), cos(y), sin(x), cos(x) over geometric
    frequencies; the channels left over are 0."""
    side = int(round(num_patches ** 0.5))
    idx = torch.arange(num_patches, dtype=torch.float64)
    y, x = (idx // side, idx % side) if side * side == num_patches else (idx, idx)
    q = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(q, dtype=torch.float64) / max(1, q)))
    table = torch.zeros(num_patches, dim, dtype=torch.float64)
    for k, pos in enumerate((y, y, x, x)):
        angle = pos[:, None] * freq[None]
        table[:, k * q:(k + 1) * q] = torch.sin(angle) if k % 2 == 0 else torch.cos(angle)
    return table.float()
