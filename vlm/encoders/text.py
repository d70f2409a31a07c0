"""Text towers: FLAVA's pre-norm transformer (timm blocks on SDPA) or any Hugging Face encoder (BERT-style).

Both kinds share one call, ``forward(input_ids, attention_mask, token_type_ids=None) -> hidden[B,L,D]``, so a
FLAVA model can start its text tower from random weights or from a pretrained BERT-style checkpoint such as
MiniLM (FLAVA's paper initialises the unimodal towers from pretrained unimodal models).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlm import hub
from vlm.encoders.vision import _dataclass_from
from vlm.errors import VLMConfigError

KINDS = ("flava", "hf")


@dataclass
class TextConfig:
    """Sizes and source of a text tower (plain types, so it can live in YAML)."""

    kind: str = "flava"  #: "flava" (pre-norm, random init) or "hf" (Hugging Face AutoModel encoder)
    vocab_size: int = 30522  #: vocabulary size (must equal the tokenizer's)
    hidden: int = 768  #: width
    layers: int = 12  #: number of transformer blocks
    heads: int = 12  #: attention heads
    mlp_ratio: float = 4.0  #: MLP width / hidden
    max_positions: int = 512  #: longest sequence (learned position embeddings)
    type_vocab_size: int = 2  #: token-type (segment) vocabulary
    pad_token_id: int = 0  #: padding id (its embedding row gets no gradient)
    layer_norm_eps: float = 1e-12  #: LayerNorm eps
    qkv_bias: bool = True  #: bias on the fused qkv projection
    dropout: float = 0.0  #: dropout on embeddings and after attention/MLP projections
    attn_dropout: float = 0.0  #: dropout on attention probabilities
    pretrained: str | None = None  #: kind "hf": hub name or local dir of pretrained weights
    hf_config: dict | None = None  #: kind "hf" without weights: AutoConfig kwargs (needs "model_type")

    @classmethod
    def from_any(cls, cfg: Any) -> TextConfig:
        """Accept a TextConfig, a dict (YAML) or None (defaults); unknown keys are one clear error."""
        cfg = _dataclass_from(cls, cfg, "text")
        if cfg.kind not in KINDS:
            raise VLMConfigError(f"text.kind={cfg.kind!r}: use one of {KINDS}.")
        return cfg


class TextEmbeddings(nn.Module):
    """Word + position + token-type embeddings followed by LayerNorm and dropout (BERT/FLAVA)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.word_embeddings.weight[cfg.pad_token_id].zero_()

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise VLMConfigError(
                f"Text of {length} tokens is longer than the text tower's {self.position_embeddings.num_embeddings} "
                "positions; truncate in the tokenizer (max_length) or raise text.max_positions."
            )
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:length]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


def attention_bias(attention_mask: Tensor | None, prefix: int = 0) -> Tensor | None:
    """Key-padding mask for SDPA: ``[B,1,1,prefix+L]`` bool, True = attend; ``prefix`` always-visible tokens first."""
    if attention_mask is None:
        return None
    keep = attention_mask.to(torch.bool)
    if prefix:
        keep = torch.cat([keep.new_ones(keep.shape[0], prefix), keep], dim=1)
    return keep[:, None, None, :]


class PreNormStack(nn.Module):
    """A stack of timm pre-norm ``Block``s (SDPA attention with a padding mask) and a final LayerNorm."""

    def __init__(self, hidden: int, layers: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-12,
                 qkv_bias: bool = True, dropout: float = 0.0, attn_dropout: float = 0.0) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        if hidden % heads:
            raise VLMConfigError(f"hidden={hidden} must be a multiple of heads={heads}.")
        norm = functools.partial(nn.LayerNorm, eps=eps)
        self.blocks = nn.ModuleList(
            Block(hidden, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=dropout, attn_drop=attn_dropout,
                  act_layer=nn.GELU, norm_layer=norm)
            for _ in range(layers)
        )
        self.norm = norm(hidden)
        self.grad_checkpointing = False
        self.apply(_init_linear)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (final-norm output, last block output before the norm)."""
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, attn_mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask=attn_mask)
        return self.norm(x), x


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class FlavaTextEncoder(nn.Module):
    """FLAVA's text encoder: embeddings (+LayerNorm), pre-norm transformer blocks, final LayerNorm."""

    kind = "flava"

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = PreNormStack(cfg.hidden, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps,
                                    cfg.qkv_bias, cfg.dropout, cfg.attn_dropout)

    hidden_size = property(lambda self: self.cfg.hidden)
    vocab_size = property(lambda self: self.cfg.vocab_size)
    max_positions = property(lambda self: self.cfg.max_positions)  #: longest text the position table covers
    layer_norm_eps = property(lambda self: self.cfg.layer_norm_eps)
    hidden_act = "gelu"

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.encoder.grad_checkpointing = enable

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                return_pre_norm: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``input_ids[B,L]`` -> hidden ``[B,L,D]``; with ``return_pre_norm`` also the last block's pre-norm output."""
        x = self.embeddings(input_ids, token_type_ids)
        out, pre = self.encoder(x, attention_bias(attention_mask))
        return (out, pre) if return_pre_norm else out


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder (``AutoModel``, e.g. BERT/MiniLM, post-norm) behind the text-tower call."""

    kind = "hf"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    hidden_size = property(lambda self: int(self.config.hidden_size))
    vocab_size = property(lambda self: int(self.model.get_input_embeddings().num_embeddings))
    #: longest text the position table covers (None: the model has no absolute position table)
    max_positions = property(lambda self: getattr(self.config, "max_position_embeddings", None))
    layer_norm_eps = property(lambda self: float(getattr(self.config, "layer_norm_eps", 1e-12)))
    hidden_act = property(lambda self: str(getattr(self.config, "hidden_act", "gelu")))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass (transformers' gradient checkpointing)."""
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                return_pre_norm: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``input_ids[B,L]`` -> last hidden state ``[B,L,D]`` (post-norm models have no separate pre-norm state)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs, return_dict=True).last_hidden_state
        return (out, out) if return_pre_norm else out


def _hf_model(cfg: TextConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    # A BERT pooler would be an unused parameter (no gradient -> DDP complains); ask for none where supported.
    def load(fn, *args, **kwargs):
        try:
            return fn(*args, add_pooling_layer=False, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)

    if cfg.pretrained:
        return hub.call_hub(
            lambda s: load(AutoModel.from_pretrained, s, trust_remote_code=False, attn_implementation="sdpa"),
            cfg.pretrained, "Text tower weights",
        )
    if not cfg.hf_config or "model_type" not in cfg.hf_config:
        raise VLMConfigError(
            "text.kind='hf' needs text.pretrained (hub name or local dir) or text.hf_config with a 'model_type' "
            "(e.g. {model_type: bert, hidden_size: 384, ...}) for a random init."
        )
    kwargs = dict(cfg.hf_config)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config._attn_implementation = "sdpa"
    return load(AutoModel.from_config, config)


def build_text_encoder(cfg: TextConfig | dict | None = None, vocab_size: int | None = None) -> nn.Module:
    """Build the text tower from ``cfg``; if ``vocab_size`` (the tokenizer's) is given it must match the model's."""
    cfg = TextConfig.from_any(cfg)
    enc = FlavaTextEncoder(cfg) if cfg.kind == "flava" else HFTextEncoder(_hf_model(cfg))
    if vocab_size is not None:
        check_vocab(enc, vocab_size)
    return enc


def check_vocab(encoder: nn.Module, tokenizer_or_size: Any) -> None:
    """One clear error when a tokenizer's vocabulary and the text tower's embedding table differ in size."""
    size = tokenizer_or_size if isinstance(tokenizer_or_size, int) else len(tokenizer_or_size)
    if int(size) != int(encoder.vocab_size):
        raise VLMConfigError(
            f"The tokenizer has {size} tokens but the text tower's embedding table has {encoder.vocab_size} rows. "
            f"Set text.vocab_size: {size} in the model config (or use the tokenizer the pretrained tower was "
            "trained with)."
        )


__all__ = [
    "TextConfig", "FlavaTextEncoder", "HFTextEncoder", "PreNormStack", "TextEmbeddings", "attention_bias",
    "build_text_encoder", "check_vocab",
]
