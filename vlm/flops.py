"""Analytic FLOP counts of the model families' training steps (for MFU in ``vlm.callbacks.Throughput``).

Conventions, the same as ``vlm.models.flava.flava_flops_per_sample``: 2 FLOPs per multiply-add of every matrix
product (linear layers, convolutions, attention scores and weighted sums, attention squares counted in full);
norms, softmax, embeddings lookups and losses are left out. A training step costs 3 x the forward of what trains
(forward, gradient of the input, gradient of the weights), 2 x the forward of the linear layers of a frozen part
that gradients pass through (no weight gradients; its attention still costs 3 x, having two inputs that need
gradients), and 1 x the forward of a frozen part that runs without autograd (a frozen vision tower). ``tests/test_flops.py`` checks each count against torch's ``FlopCounterMode`` on a real step.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always there in practice
        return ()
    return (Conv1D,)


def matmul_weights(module: nn.Module, skip: Iterable[type] = ()) -> int:
    """Multiply-adds per token of ``module``'s linear layers (nn.Linear and GPT-2's Conv1D), ``skip`` types left out."""
    skip = tuple(skip)
    linear = (nn.Linear, *_conv1d_type())
    total = 0
    stack = [module]
    while stack:
        m = stack.pop()
        if skip and isinstance(m, skip):
            continue
        if isinstance(m, linear):
            total += int(m.weight.numel())
        stack.extend(m.children())
    return total


def attention_flops(queries: int, keys: int, inner: int) -> float:
    """Scores and weighted sum of one attention layer: 2 x 2 x queries x keys x inner."""
    return 4.0 * queries * keys * inner


def conv_stem_flops(patch_embed: nn.Module, image_size: int) -> float:
    """A ViT patch embedding (one strided convolution or a ``ConvStem``) on a square image."""
    total, side = 0.0, image_size
    for conv in (m for m in patch_embed.modules() if isinstance(m, nn.Conv2d)):
        side = (side + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        total += 2.0 * side * side * conv.weight.numel()
    return total


def vit_forward_flops(vit: nn.Module, image_size: int) -> float:
    """Forward FLOPs of a timm ViT on one square image: patch embedding + blocks over all tokens."""
    patch = vit.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    n = (image_size // patch) ** 2 + int(getattr(vit, "num_prefix_tokens", 1))
    d = int(vit.embed_dim)
    total = conv_stem_flops(vit.patch_embed, image_size)
    for block in vit.blocks:
        total += 2.0 * n * matmul_weights(block) + attention_flops(n, n, d)
    return total


def t5_forward_flops(cfg, enc_len: int, dec_len: int, vocab: int) -> float:
    """Forward FLOPs of a T5-family encoder-decoder over ``enc_len`` / ``dec_len`` tokens, LM head included."""
    d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    ff_mats = 3 if getattr(cfg, "is_gated_act", False) else 2
    s, t = enc_len, dec_len
    enc = cfg.num_layers * (2.0 * s * 4 * d * inner + attention_flops(s, s, inner) + 2.0 * ff_mats * s * d * ff)
    dec_self = 2.0 * t * 4 * d * inner + attention_flops(t, t, inner)
    dec_cross = 2.0 * t * 2 * d * inner + 2.0 * s * 2 * d * inner + attention_flops(t, s, inner)
    dec = cfg.num_decoder_layers * (dec_self + dec_cross + 2.0 * ff_mats * t * d * ff)
    return enc + dec + 2.0 * t * d * vocab


def causal_lm_forward_flops(lm: nn.Module, layers: int, hidden: int, tokens: int,
                            skip: Iterable[type] = ()) -> float:
    """Forward FLOPs of a decoder-only LM over ``tokens`` (every linear layer, head included, plus attention)."""
    return 2.0 * tokens * matmul_weights(lm, skip) + layers * attention_flops(tokens, tokens, hidden)


__all__ = ["matmul_weights", "attention_flops", "conv_stem_flops", "vit_forward_flops", "t5_forward_flops",
           "causal_lm_forward_flops"]
