"""Layers shared by the models: attention, Flamingo's Perceiver Resampler and gated cross-attention,
media masks, extended (partly trainable) embeddings, 2-D sine-cosine position tables, and the masking generators (:mod:`vlm.modules.masking`)."""

from vlm.modules.attention import Attention, FeedForward
from vlm.modules.embedding import ExtendedEmbedding, ExtendedLMHead, sincos_2d
from vlm.modules.gated_xattn import GatedCrossAttentionBlock
from vlm.modules.media import media_attention_mask, media_index_from_ids
from vlm.modules.perceiver import PerceiverAttention, PerceiverResampler

__all__ = [
    "Attention",
    "ExtendedEmbedding",
    "ExtendedLMHead",
    "FeedForward",
    "GatedCrossAttentionBlock",
    "PerceiverAttention",
    "PerceiverResampler",
    "media_attention_mask",
    "media_index_from_ids",
    "sincos_2d",
]
