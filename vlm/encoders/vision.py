"""Image towers: a timm ViT with FLAVA's mask token, and image tokenizers (codebooks) for MIM targets.

The ViT is timm's ``VisionTransformer``/``Block`` (fused SDPA attention, pre-norm); this file only adds what
FLAVA needs on top: a learnable ``mask_token`` that replaces masked patch embeddings *before* position
embeddings are added, the last block's output before the final norm (FLAVA fuses that), and loading from
sizes, a timm architecture name, a local checkpoint or a hub name.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from vlm import hub
from vlm.encoders.grid_tags import SYNTHETIC
from vlm.errors import VLMConfigError
from vlm.modules.embedding import sincos_2d

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
    #: ``patch``: one linear projection per patch (ViT). ``conv``: stride-2 3x3 convolutions down to the same
    #: patch grid (Xiao et al. 2021, "Early convolutions help transformers see better"); for towers trained from
    #: scratch on little data, where a linear patch embedding learns shape slowly. Random-init towers only.
    stem: str = "patch"
    #: ``learned``: timm's learned table, initialised N(0, 0.02). ``sincos``: the same learned table initialised with
    #: 2-D sine-cosine positions (MAE), as strong as the patch features from the first step (random-init towers).
    pos_embed: str = "learned"
    timm_name: str | None = None  #: build this timm architecture instead (size fields other than image_size ignored)
    #: local checkpoint file/dir, a timm/hub model name with pretrained weights, or ``'synthetic'``: this tower
    #: pretrained once on the synthetic world's grid tags and cached (:mod:`vlm.encoders.grid_tags`)
    pretrained: str | None = None

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


class ConvStem(nn.Sequential):
    """Patch embedding as ``log2(patch)`` stride-2 3x3 convolutions (GELU between) and a 1x1 projection.

    Maps ``[B,C,H,W]`` to ``[B,hidden,H/patch,W/patch]``, the grid of a ``patch x patch`` linear embedding, so it
    drops into timm's ``PatchEmbed.proj``. Widths double towards ``hidden / 2`` (at least 16 channels).
    """

    def __init__(self, in_chans: int, hidden: int, patch: int) -> None:
        n = int(patch).bit_length() - 1
        if patch < 2 or 2 ** n != patch:
            raise VLMConfigError(f"vision.stem='conv' needs a power-of-two patch_size >= 2, got {patch}.")
        widths = [max(16, hidden // 2 ** (n - i)) for i in range(n)]
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GELU()]
            c = w
        layers.append(nn.Conv2d(c, hidden, 1))
        super().__init__(*layers)
        self.in_channels, self.out_channels = int(in_chans), int(hidden)  # as the Conv2d it replaces
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Variance-preserving init: He-normal (fan in) 3x3 convolutions, a 1/sqrt(fan in) 1x1 projection, zero biases.

        PyTorch's default conv init shrinks the signal about 1/sqrt(3) per layer (and GELU halves it): the stem's
        output then varies across images about 40x less than a linear patch embedding's, below the 0.02 position
        table, so every image looks alike to the tower (tiny PaLI's held-out VQA: 0.305 with the default init,
        0.50-0.54 with this one).
        """
        convs = [m for m in self if isinstance(m, nn.Conv2d)]
        for conv in convs[:-1]:
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        last = convs[-1]
        nn.init.normal_(last.weight, std=last.in_channels ** -0.5)
        for conv in convs:
            nn.init.zeros_(conv.bias)


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


def _synthetic_vit(cfg: VisionConfig) -> Path:
    """The cached weights of ``cfg``'s ViT pretrained on the synthetic world's grid tags (CLS token left out)."""
    from dataclasses import asdict, replace

    from vlm.encoders import grid_tags

    plain = replace(cfg, pretrained=None)
    built: dict[str, ViTEncoder] = {}

    def build() -> nn.Module:
        built["enc"] = build_vit(plain)
        return built["enc"].vit

    def train(vit: nn.Module) -> dict[str, float]:
        enc, prefix = built["enc"], int(getattr(vit, "num_prefix_tokens", 1))
        return grid_tags.pretrain_on_grid_tags(lambda x: grid_tags.patch_features(enc(x), prefix),
                                               list(vit.parameters()), enc.hidden_size, plain.image_size,
                                               **grid_tags.recipe_arguments())

    return grid_tags.cached_tower({"kind": "vit", **asdict(plain), **grid_tags.DEFAULTS}, build, train)


def build_vit(cfg: VisionConfig | dict | None = None) -> ViTEncoder:
    """Build the image tower: random init from sizes, a timm architecture, or pretrained weights."""
    import timm
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    cfg = VisionConfig.from_any(cfg)
    src = cfg.pretrained
    if src == SYNTHETIC:  # trained once on the synthetic world's grid tags, then cached (vlm.encoders.grid_tags)
        src = str(_synthetic_vit(cfg))
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
    if cfg.stem == "conv":
        if cfg.timm_name:
            raise VLMConfigError("vision.stem='conv' builds its own tower from the size fields; drop vision.timm_name "
                                 "or use stem='patch'.")
        vit.patch_embed.proj = ConvStem(cfg.in_chans, cfg.hidden, cfg.patch_size)
    elif cfg.stem != "patch":
        raise VLMConfigError(f"vision.stem={cfg.stem!r}; use 'patch' (linear patch embedding) or 'conv' (convolutional stem).")
    if cfg.pos_embed == "sincos":
        grid = vit.patch_embed.grid_size
        if grid[0] != grid[1]:
            raise VLMConfigError(f"vision.pos_embed='sincos' needs a square patch grid, got {tuple(grid)}.")
        with torch.no_grad():
            vit.pos_embed.zero_()  # the class token's row stays 0
            vit.pos_embed[0, -grid[0] * grid[1]:] = sincos_2d(grid[0] * grid[1], vit.embed_dim)
    elif cfg.pos_embed != "learned":
        raise VLMConfigError(f"vision.pos_embed={cfg.pos_embed!r}; use 'learned' (N(0, 0.02) init) or 'sincos'.")
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

# ------------------------------------------------------------------------------------------------ vision towers
VISION_FEATURES = ("patches", "tokens")


@dataclass
class VisionTowerConfig:
    """Any timm image model as a (usually frozen) feature extractor for the decoder models (Flamingo, PaLI)."""

    model: str = "vit_tiny_patch16_224"  #: timm architecture name
    #: False: random init; True: timm's default weights for ``model`` (hub); a local .safetensors/.bin/.pth file or a
    #: directory holding one (timm layout, or a saved VisionTower's ``model.``-prefixed state); ``'synthetic'``: this
    #: architecture pretrained once on the synthetic world's grid tags and cached (:mod:`vlm.encoders.grid_tags`);
    #: any other string is a timm hub name (``'vit_base_patch16_224.augreg_in21k'``, ``'hf-hub:org/name'``) that
    #: replaces ``model``
    pretrained: str | bool = False
    image_size: int | None = None  #: input side in pixels (None: the architecture's default)
    frozen: bool = True  #: no trainable parameters, always in eval mode, forward without autograd
    kwargs: dict = field(default_factory=dict)  #: extra ``timm.create_model`` kwargs (depth, embed_dim, reg_tokens, ...)
    feature: str = "patches"  #: "patches": one vector per patch/cell; "tokens": ViTs keep their class/register tokens
    #: "patch": the model's own patch embedding; "conv": a ViT's linear patch embedding replaced by
    #: :class:`ConvStem` (same grid), for random-init towers trained from scratch (not with ``pretrained``)
    stem: str = "patch"

    @classmethod
    def from_any(cls, cfg: Any) -> VisionTowerConfig:
        """Accept a VisionTowerConfig, a dict (YAML) or None (defaults); unknown keys are one clear error."""
        if cfg is None:
            out = cls()
        elif isinstance(cfg, cls):
            out = cfg
        elif isinstance(cfg, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise VLMConfigError(f"Unknown key(s) {unknown} in the vision tower config; known keys: {sorted(known)}.")
            types = {f.name: f.type for f in fields(cls)} | {"image_size": "int"}
            values = coerce_numbers(cfg, types, "vision_tower")
            if isinstance(values.get("pretrained"), str) and values["pretrained"].lower() in ("", "false", "none", "null", "true"):
                values["pretrained"] = values["pretrained"].lower() == "true"
            out = cls(**values)
        else:
            raise VLMConfigError(f"The vision tower config must be a mapping, got {type(cfg).__name__}.")
        out.validate()
        return out

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise VLMConfigError(f"vision_tower.model must be a timm model name, got {self.model!r}.")
        if self.feature not in VISION_FEATURES:
            raise VLMConfigError(f"vision_tower.feature={self.feature!r}: expected one of {list(VISION_FEATURES)}.")
        if not isinstance(self.kwargs, dict):
            raise VLMConfigError(f"vision_tower.kwargs must be a mapping of timm.create_model arguments, got {self.kwargs!r}.")
        if self.pretrained is None:
            self.pretrained = False
        if self.stem not in ("patch", "conv"):
            raise VLMConfigError(f"vision_tower.stem={self.stem!r}; use 'patch' (the model's own) or 'conv' (ConvStem).")
        if self.stem == "conv" and self.pretrained is not False and not (
                self.pretrained == SYNTHETIC
                or (isinstance(self.pretrained, (str, os.PathLike)) and hub.is_local(self.pretrained))):
            raise VLMConfigError("vision_tower.stem='conv' replaces a ViT's patch embedding, so its weights can only "
                                 "come from a tower trained with that stem (pretrained: synthetic, or a local file "
                                 "saved from one); hub weights have a linear one (set stem: patch, or pretrained: false).")
        if not isinstance(self.pretrained, (bool, str, os.PathLike)):
            raise VLMConfigError(
                f"vision_tower.pretrained must be false, true, a local weights file/dir or a hub name; got {self.pretrained!r}."
            )


class VisionTower(nn.Module):
    """A timm image model giving per-patch features ``[N, P, D]`` (never a pooled vector).

    ViT-like models (``num_prefix_tokens``): ``forward_features`` (after the final norm) without the class/register
    tokens; conv nets: the last feature map flattened row-major to ``[N, h*w, C]``. When ``frozen`` the parameters do
    not require grad, ``.train()`` keeps the tower in eval mode, and forward runs without autograd as long as no
    parameter requires grad (unfreeze parameters by hand to fine-tune part of a frozen tower).
    """

    def __init__(self, model: nn.Module, frozen: bool = True, feature: str = "patches", image_size: int | None = None):
        super().__init__()
        if feature not in VISION_FEATURES:
            raise VLMConfigError(f"feature={feature!r}: expected one of {list(VISION_FEATURES)}.")
        if not hasattr(model, "forward_features"):
            raise VLMConfigError(f"{type(model).__name__} has no forward_features; give a timm image model.")
        self.model = model
        self.frozen = bool(frozen)
        self.feature = feature
        default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        self.image_size = int(image_size or default[-1])
        self._token_counts: dict[int, int] = {}
        if self.frozen:
            self.model.requires_grad_(False)
            self.train(False)

    @property
    def hidden_size(self) -> int:
        """Width ``D`` of the features (timm ``num_features``)."""
        return int(self.model.num_features)

    @property
    def num_prefix_tokens(self) -> int:
        """Class/register tokens before the patches (0 for conv nets)."""
        return int(getattr(self.model, "num_prefix_tokens", 0) or 0)

    def num_tokens(self, image_size: int | None = None) -> int:
        """Number of feature vectors ``P`` per square image of side ``image_size`` (default: the tower's)."""
        size = int(image_size or self.image_size)
        if size not in self._token_counts:
            patch_embed = getattr(self.model, "patch_embed", None)
            if hasattr(self.model, "num_prefix_tokens") and hasattr(patch_embed, "dynamic_feat_size"):
                h, w = patch_embed.dynamic_feat_size((size, size))
                extra = self.num_prefix_tokens if self.feature == "tokens" else 0
                self._token_counts[size] = int(h) * int(w) + extra
            else:  # conv nets: padding/striding rules vary, so measure once
                param = next(self.model.parameters())
                chans = int(getattr(self.model, "pretrained_cfg", {}).get("input_size", (3,))[0])
                was_training = self.model.training
                self.model.train(False)  # no BatchNorm statistics from a probe
                try:
                    with torch.no_grad():
                        out = self(torch.zeros(1, chans, size, size, device=param.device, dtype=param.dtype))
                finally:
                    self.model.train(was_training)
                self._token_counts[size] = int(out.shape[1])
        return self._token_counts[size]

    def train(self, mode: bool = True) -> VisionTower:
        return super().train(False if self.frozen else mode)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in the backward pass where the timm model supports it."""
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``pixel_values[N, 3, H, W]`` -> features ``[N, P, D]``."""
        if any(p.requires_grad for p in self.model.parameters()):
            return self._features(pixel_values)
        with torch.no_grad():
            return self._features(pixel_values)

    def _features(self, pixel_values: Tensor) -> Tensor:
        param = next(self.model.parameters(), None)
        if param is not None and pixel_values.is_floating_point() and pixel_values.dtype != param.dtype:
            pixel_values = pixel_values.to(param.dtype)
        x = self.model.forward_features(pixel_values)
        if isinstance(x, (list, tuple)):
            x = x[-1]
        if x.ndim == 4:  # a feature map
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                return x.flatten(1, 2)
            return x.flatten(2).transpose(1, 2)
        if x.ndim != 3:
            raise VLMConfigError(f"{type(self.model).__name__}.forward_features gave shape {tuple(x.shape)}; "
                                 "expected a [N, C, h, w] map or [N, L, D] tokens.")
        if self.feature == "patches" and self.num_prefix_tokens:
            x = x[:, self.num_prefix_tokens:]
        return x


def _load_tower_weights(model: nn.Module, path: str) -> None:
    import sys

    state = load_state_file(path)
    own = model.state_dict()
    if state and not any(k in own for k in state) and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # a saved VisionTower
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own remapping for its architecture (pos-embed resize, old layouts)
        state = filter_fn(state, model)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in state.items() if k in own or not k.startswith(heads)}  # the tower has no classifier
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VLMConfigError(
            f"Vision tower weights {path!r} do not fit timm model {type(model).__name__}: missing {list(missing)[:8]}, "
            f"unexpected {list(unexpected)[:8]}. Set vision_tower.model/kwargs to the checkpoint's architecture."
        )


def _synthetic_tower(cfg: VisionTowerConfig, kwargs: dict[str, Any], random_init) -> Path:
    """The cached weights of ``cfg``'s architecture pretrained on the synthetic world's grid tags."""
    from vlm.encoders import grid_tags

    def train(model: nn.Module) -> dict[str, float]:
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # the size the ViT was built for
        size = int(size[-1]) if isinstance(size, (tuple, list)) else cfg.image_size
        tower = VisionTower(model, frozen=False, feature="patches", image_size=size)
        return grid_tags.pretrain_on_grid_tags(lambda x: grid_tags.patch_features(tower(x)), list(model.parameters()),
                                               tower.hidden_size, tower.image_size, **grid_tags.recipe_arguments())

    key = {"kind": "vision_tower", "model": cfg.model, "kwargs": kwargs, "stem": cfg.stem, **grid_tags.DEFAULTS}
    return grid_tags.cached_tower(key, random_init, train)


def build_vision_tower(cfg: VisionTowerConfig | dict | None = None) -> VisionTower:
    """Build a :class:`VisionTower`: random init (global torch seed), local weights, or a hub name via timm."""
    import timm

    cfg = VisionTowerConfig.from_any(cfg)
    kwargs: dict[str, Any] = {"num_classes": 0, **cfg.kwargs}
    if cfg.image_size is not None:
        kwargs.setdefault("img_size", cfg.image_size)

    def create(name: str, pretrained: bool) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as err:
            if "img_size" in str(err) and "img_size" not in cfg.kwargs:  # conv nets take any size without it
                kwargs.pop("img_size")
                return timm.create_model(name, pretrained=pretrained, **kwargs)
            raise VLMConfigError(f"timm could not build {name!r} with kwargs {kwargs}: {err}") from err
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise VLMConfigError(f"vision_tower.model={name!r} is not a timm model ({err}).") from err
            raise

    def conv_stem(model: nn.Module) -> nn.Module:
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride:
            raise VLMConfigError(f"vision_tower.stem='conv' needs a ViT with a linear patch embedding; "
                                 f"{cfg.model!r} has none.")
        model.patch_embed.proj = ConvStem(proj.in_channels, proj.out_channels, int(proj.kernel_size[0]))
        return model

    def random_init() -> nn.Module:
        model = create(cfg.model, False)
        return conv_stem(model) if cfg.stem == "conv" else model

    src = cfg.pretrained
    if src is False:
        model = random_init()
    elif src == SYNTHETIC:  # trained once on the synthetic world's grid tags, then cached (vlm.encoders.grid_tags)
        path = _synthetic_tower(cfg, kwargs, random_init)
        model = random_init()
        _load_tower_weights(model, str(path))
    elif src is True or not hub.is_local(src):
        name = cfg.model if src is True else str(src)
        model = hub.call_hub(lambda s: create(s, True), name, "Vision tower weights")
    else:
        model = create(cfg.model, False)
        if cfg.stem == "conv":  # a tower saved with the conv stem: its keys are the stem's
            conv_stem(model)
        _load_tower_weights(model, os.path.expanduser(str(src)))
    return VisionTower(model, frozen=cfg.frozen, feature=cfg.feature, image_size=cfg.image_size)


__all__ = [
    "VisionConfig", "ConvStem", "ViTEncoder", "build_vit", "ImageCodebook", "build_codebook", "patchify", "load_state_file",
    "CLIP_MEAN", "CLIP_STD", "VisionTowerConfig", "VisionTower", "build_vision_tower",
]
