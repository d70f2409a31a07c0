"""Tower factories: timm ViTs and text encoders from a config (random init) or pretrained weights."""

from vlm.encoders.text import FlavaTextEncoder, HFTextEncoder, TextConfig, build_text_encoder, check_vocab
from vlm.encoders.vision import ImageCodebook, VisionConfig, ViTEncoder, build_codebook, build_vit, patchify

__all__ = [
    "FlavaTextEncoder", "HFTextEncoder", "TextConfig", "build_text_encoder", "check_vocab",
    "ImageCodebook", "VisionConfig", "ViTEncoder", "build_codebook", "build_vit", "patchify",
]
