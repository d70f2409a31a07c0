"""Pre-norm multi-head attention and feed-forward blocks shared by the Flamingo-style layers.

Parameter names follow OpenFlamingo's ``MaskedCrossAttention`` / ``PerceiverAttention`` (``norm``, ``to_q``,
``to_kv``, ``to_out``) so that importing its weights is a rename (see :mod:`vlm.convert.open_flamingo`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention with a LayerNorm on the query input; self-attention when no context is given.

    ``forward(x [B, Tq, dim], context [B, Tk, context_dim] | None, mask | None) -> [B, Tq, dim]``.
    ``mask`` is boolean, broadcastable to ``[B, heads, Tq, Tk]``, True where a query may attend to a key.
    A query row whose mask allows no key at all gets an exactly zero output (no NaN from an empty softmax).
    With ``norm_context`` the context gets its own LayerNorm (``norm_context``) before the key/value
    projection. The query is always normed; in self-attention the normed ``x`` is also the key/value input.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        norm_context: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if norm_context else None
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, t: Tensor) -> Tensor:  # [..., T, h*d] -> [..., h, T, d]
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(-3, -2)

    def attend(self, q_in: Tensor, kv_in: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention of already-normed queries ``q_in [..., Tq, dim]`` over ``kv_in [..., Tk, context_dim]``."""
        q = self._split(self.to_q(q_in))
        k, v = (self._split(t) for t in self.to_kv(kv_in).chunk(2, dim=-1))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = mask.to(torch.bool)
            has_key = mask.any(dim=-1, keepdim=True)
            # Rows with no allowed key attend everywhere (a finite softmax) and are zeroed afterwards.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key)
            out = out.masked_fill(~has_key, 0.0)
        return self.to_out(out.transpose(-3, -2).flatten(-2))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = self.norm(x)
        if context is None:
            context = x
        elif self.norm_context is not None:
            context = self.norm_context(context)
        return self.attend(x, context, mask)


class FeedForward(nn.Module):
    """Pre-norm MLP: ``LayerNorm -> Linear(dim, dim * mult) -> GELU -> Linear(dim * mult, dim)``, no biases."""

    def __init__(self, dim: int, mult: int | float = 4) -> None:
        super().__init__()
        hidden = int(dim * mult)
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.proj_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_out(self.act(self.proj_in(self.norm(x))))
