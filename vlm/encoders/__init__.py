"""Tower factories: timm ViTs/vision towers, text encoders and language models from a config or pretrained weights."""

from vlm.encoders.lm import (
    LMConfig,
    base_vocab_size,
    build_lm,
    check_tokenizer,
    decoder_layers,
    hidden_size,
    layer_kwargs,
)
from vlm.encoders.text import FlavaTextEncoder, HFTextEncoder, TextConfig, build_text_encoder, check_vocab
from vlm.encoders.vision import (
    ImageCodebook,
    VisionConfig,
    VisionTower,
    VisionTowerConfig,
    ViTEncoder,
    build_codebook,
    build_vision_tower,
    build_vit,
    patchify,
)

__all__ = [
    "FlavaTextEncoder", "HFTextEncoder", "TextConfig", "build_text_encoder", "check_vocab",
    "ImageCodebook", "VisionConfig", "ViTEncoder", "build_codebook", "build_vit", "patchify",
    "VisionTower", "VisionTowerConfig", "build_vision_tower",
    "LMConfig", "build_lm", "decoder_layers", "hidden_size", "base_vocab_size", "check_tokenizer", "layer_kwargs",
]
