"""Image towers: a timm ViT with FLAVA's mask token, and image tokenizers (codebooks) for MIM targets.

The ViT is timm's ``VisionTransformer``/``Block`` (fused SDPA attention, pre-norm); this file only adds what
FLAVA needs on top: a learnable ``mask_token`` that replaces masked patch embeddings *before* position
embeddings are added, the last block's output before the final norm (FLAVA fuses that), and loading from
sizes, a timm architecture name, a local checkpoint or a hub name.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from vlm import hub
from vlm.errors import VLMConfigError

# FLAVA's image processor normalises with CLIP's statistics; the codebook wants [0, 1] pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT_NAMES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


@dataclass
class VisionConfig:
    """Sizes and source of a ViT image tower (plain types, so it can live in YAML)."""

    image_size: int = 224  #: input side in pixels (other sizes work by interpolating position embeddings)
    patch_size: int = 16  #: patch side in pixels
    hidden: int = 768  #: width
    layers: int = 12  #: number of transformer blocks
    heads: int = 12  #: attention heads
    mlp_ratio: float = 4.0  #: MLP width / hidden
    layer_norm_eps: float = 1e-12  #: LayerNorm eps (FLAVA: 1e-12; timm's ViTs: 1e-6)
    qkv_bias: bool = True  #: bias on the fused qkv projection
    dropout: float = 0.0  #: dropout after attention/MLP projections and on the embeddings
    attn_dropout: float = 0.0  #: dropout on attention probabilities
    drop_path: float = 0.0  #: stochastic depth rate
    in_chans: int = 3  #: image channels
    timm_name: str | None = None  #: build this timm architecture instead (size fields other than image_size ignored)
    pretrained: str | None = None  #: local checkpoint file/dir, or a timm/hub model name with pretrained weights

    @classmethod
    def from_any(cls, cfg: Any) -> VisionConfig:
        """Accept a VisionConfig, a dict (YAML) or None (defaults); unknown keys are one clear error."""
        return _dataclass_from(cls, cfg, "vision")


def _dataclass_from(cls, cfg: Any, what: str):
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    if not isinstance(cfg, dict):
        raise VLMConfigError(f"The {what} tower config must be a mapping, got {type(cfg).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise VLMConfigError(f"Unknown key(s) {unknown} in the {what} tower config; known keys: {sorted(known)}.")
    return cls(**coerce_numbers(cfg, {f.name: f.type for f in fields(cls)}, what))


_NUMBER_TYPES = {"int": int, "float": float, "bool": bool, int: int, float: float, bool: bool}


def coerce_numbers(cfg: dict, types: dict[str, Any], what: str) -> dict:
    """``cfg`` with int/float/bool fields given as strings (``--model.init_args.vision.image_size=96`` reaches an
    untyped dict as ``'96'``) converted; a value that is not such a number is one clear error naming the key."""
    import yaml

    out = dict(cfg)
    for key, value in cfg.items():
        want = _NUMBER_TYPES.get(types.get(key))
        if want is None or value is None:
            continue
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        ok = isinstance(value, bool) if want is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            and (want is float or float(value).is_integer()))
        if not ok:
            raise VLMConfigError(f"{what}.{key}={cfg[key]!r}: expected {'an integer' if want is int else want.__name__}.")
        out[key] = want(value)
    return out


def load_state_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a safetensors file, a torch file (``weights_only=True``) or a dir holding one."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in CHECKPOINT_NAMES if (path / n).exists()]
        if not found:
            raise VLMConfigError(
                f"No checkpoint in directory {str(path)!r}: expected one of {list(CHECKPOINT_NAMES)}."
            )
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    # Training checkpoints wrap the weights; a bare state dict is the common case.
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise VLMConfigError(f"Checkpoint {str(path)!r} does not hold a state dict (got {type(state).__name__}).")
    return state


class ViTEncoder(nn.Module):
    """FLAVA's image encoder: timm ViT (pre-norm, CLS, final norm) + a learnable mask token for masked patches."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer) or vit.cls_token is None or vit.pos_embed is None:
            raise VLMConfigError(
                f"The image tower must be a timm VisionTransformer with a class token and learned position "
                f"embeddings; got {type(vit).__name__}. Pick a ViT architecture (e.g. 'vit_base_patch16_224')."
            )
        if getattr(vit, "reg_token", None) is not None or vit.no_embed_class:
            raise VLMConfigError("ViTs with register tokens or no_embed_class are not supported as FLAVA image towers.")
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.grad_checkpointing = False

    # sizes ------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def layer_norm_eps(self) -> float:
        return float(getattr(self.vit.norm, "eps", 1e-6))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    # forward ----------------------------------------------------------------------------------------
    def forward(
        self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None, return_pre_norm: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``pixel_values[B,C,H,W]`` -> hidden ``[B,1+N,D]`` (after the final norm, CLS first).

        ``bool_masked_pos[B,N]`` (True = masked) swaps those patch embeddings for ``mask_token``.
        With ``return_pre_norm`` also returns the last block's output before the final norm.
        """
        vit = self.vit
        x = vit.patch_embed(pixel_values)  # [B, h, w, D]: dynamic_img_size keeps the grid for resampling
        if bool_masked_pos is not None:
            b, h, w, _ = x.shape
            m = bool_masked_pos.reshape(b, h, w, 1).to(torch.bool)
            x = torch.where(m, self.mask_token.to(x.dtype).reshape(1, 1, 1, -1), x)
        x = vit._pos_embed(x)  # CLS + (interpolated) position embeddings, as timm does it
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        for blk in vit.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        out = vit.norm(x)
        return (out, x) if return_pre_norm else out


def _timm_kwargs(cfg: VisionConfig) -> dict[str, Any]:
    # no classifier; dynamic_img_size keeps the patch grid so position embeddings interpolate for other sizes
    return dict(num_classes=0, global_pool="token", dynamic_img_size=True)


def build_vit(cfg: VisionConfig | dict | None = None) -> ViTEncoder:
    """Build the image tower: random init from sizes, a timm architecture, or pretrained weights."""
    import timm
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    cfg = VisionConfig.from_any(cfg)
    src = cfg.pretrained
    if src is not None and not hub.is_local(src):
        # A hub name: timm resolves it (e.g. 'vit_base_patch16_224.augreg_in21k' or 'hf-hub:org/name').
        vit = hub.call_hub(
            lambda s: timm.create_model(s, pretrained=True, img_size=cfg.image_size, **_timm_kwargs(cfg)),
            src, "Image tower weights",
        )
        return ViTEncoder(vit)
    if cfg.timm_name:
        vit = timm.create_model(cfg.timm_name, pretrained=False, img_size=cfg.image_size, **_timm_kwargs(cfg))
    else:
        if cfg.hidden % cfg.heads:
            raise VLMConfigError(f"vision.hidden={cfg.hidden} must be a multiple of vision.heads={cfg.heads}.")
        if cfg.image_size % cfg.patch_size:
            raise VLMConfigError(f"vision.image_size={cfg.image_size} must be a multiple of patch_size={cfg.patch_size}.")
        vit = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.hidden,
            depth=cfg.layers, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
            norm_layer=functools.partial(nn.LayerNorm, eps=cfg.layer_norm_eps), act_layer=nn.GELU,
            proj_drop_rate=cfg.dropout, pos_drop_rate=cfg.dropout, attn_drop_rate=cfg.attn_dropout,
            drop_path_rate=cfg.drop_path, **_timm_kwargs(cfg),
        )
    enc = ViTEncoder(vit)
    if src is not None:
        state = load_state_file(src)
        mask_token = state.pop("mask_token", None)
        # Our own saved towers carry the 'vit.' prefix; timm checkpoints do not.
        if any(k.startswith("vit.") for k in state):
            state = {k[4:]: v for k, v in state.items() if k.startswith("vit.")}
        state = checkpoint_filter_fn(state, vit)  # timm's own remapping (pos-embed resize, npz layouts)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise VLMConfigError(
                f"Image checkpoint {src!r} does not fit the configured ViT: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}. Set vision.timm_name/sizes to the checkpoint's architecture."
            )
        if mask_token is not None:
            enc.mask_token.data.copy_(mask_token.reshape_as(enc.mask_token))
    return enc


# ------------------------------------------------------------------------------------------------ codebooks
class ImageCodebook(nn.Module):
    """A frozen image tokenizer (FLAVA's DALL-E-style ``FlavaImageCodebook``) giving MIM target ids per patch.

    ``forward(pixel_values)`` takes the *model's* normalised pixels, maps them to the codebook's input
    (de-normalise, resize to ``grid * 8``, DALL-E's ``map_pixels``) and returns ``LongTensor[B, grid*grid]``.
    ``encode_codebook_pixels`` takes pixels already prepared for the codebook (HF's ``codebook_pixel_values``).
    """

    def __init__(
        self,
        codebook: nn.Module,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
        eps: float = 0.1,
    ) -> None:
        super().__init__()
        self.codebook = codebook.eval().requires_grad_(False)
        self.vocab_size = int(codebook.config.vocab_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.eps = eps  # DALL-E's logit-laplace epsilon (HF's codebook pixel mapping uses 0.1)

    def train(self, mode: bool = True) -> ImageCodebook:  # the tokenizer is never trained
        return super().train(False)

    @torch.no_grad()
    def encode_codebook_pixels(self, codebook_pixels: Tensor) -> Tensor:
        """Codebook ids ``[B, h*w]`` of pixels already mapped for the codebook."""
        logits = self.codebook.blocks(codebook_pixels.to(next(self.codebook.parameters()).dtype))
        return logits.argmax(1).flatten(1)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor, grid: tuple[int, int]) -> Tensor:
        """Codebook ids ``[B, grid_h*grid_w]`` of the model's normalised ``pixel_values``."""
        x = pixel_values.float() * self.std + self.mean
        size = (grid[0] * 8, grid[1] * 8)  # the codebook downsamples by 8 (three 2x pools)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(0, 1) * (1 - 2 * self.eps) + self.eps
        return self.encode_codebook_pixels(x)


def build_codebook(source: Any) -> ImageCodebook | None:
    """An image tokenizer from a ``FlavaImageCodebook`` object, a hub name / local dir, a config dict, or None."""
    if source is None or isinstance(source, ImageCodebook):
        return source
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

    if isinstance(source, FlavaImageCodebook):
        return ImageCodebook(source)
    if isinstance(source, FlavaImageCodebookConfig):
        return ImageCodebook(FlavaImageCodebook(source))
    if isinstance(source, dict):  # random init from sizes (tests, ablations)
        return ImageCodebook(FlavaImageCodebook(FlavaImageCodebookConfig(**source)))
    if isinstance(source, (str, os.PathLike)):
        model = hub.call_hub(FlavaImageCodebook.from_pretrained, str(source), "Image codebook")
        return ImageCodebook(model)
    raise VLMConfigError(
        f"image_codebook must be a FlavaImageCodebook, a hub name or local dir, a config dict, or None; "
        f"got {type(source).__name__}."
    )


def patchify(pixel_values: Tensor, patch_size: int) -> Tensor:
    """``[B,C,H,W]`` -> per-patch pixels ``[B, N, P*P*C]`` (row-major patches, (p, q, c) inside a patch, as MAE)."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


__all__ = [
    "VisionConfig", "ViTEncoder", "build_vit", "ImageCodebook", "build_codebook", "patchify", "load_state_file",
    "CLIP_MEAN", "CLIP_STD",
]
