"""Flamingo (Alayrac et al., 2022): a frozen vision encoder, a Perceiver Resampler, and GATED XATTN-DENSE
blocks inserted before every N-th block of a frozen causal language model.

Two layers, as every model family here:

* :class:`FlamingoCore`, a plain ``nn.Module`` built from a :class:`FlamingoConfig` (named sizes in ``SIZES``).
  It composes a timm vision tower (patch features), a :class:`~vlm.modules.PerceiverResampler`, and any
  Hugging Face ``AutoModelForCausalLM``. The LM is wrapped by composition: each chosen decoder block is put
  inside a :class:`FlamingoLayer` that runs a :class:`~vlm.modules.GatedCrossAttentionBlock` first and then the
  untouched block. The visual tokens travel as one keyword argument of the LM call (``vlm_media``), which
  transformers hands to every decoder block, so no layer keeps conditioning state between calls: activation
  checkpointing, FSDP and cached generation see plain functions of their inputs.
* :class:`Flamingo`, the thin LightningModule on :class:`~vlm.models.base.VLMModule`: the ``lm_logits``
  capability for the shared captioning objective, ``generate`` / ``score`` for inference, few-shot
  evaluation streams and ``predict_step``.

``<image>`` and ``<|endofchunk|>`` are added to the tokenizer; only their embedding rows (and output rows)
train, through :class:`~vlm.modules.ExtendedEmbedding`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vlm.checkpoint import keep_plain_hparams
from vlm.encoders.lm import LMConfig, base_vocab_size, build_lm, decoder_layers, hidden_size
from vlm.encoders.vision import VisionTowerConfig, build_vision_tower
from vlm.errors import MissingBatchField, VLMConfigError
from vlm.models.base import VLMModule
from vlm.models.sizes import sized_fields
from vlm.modules import (
    ExtendedEmbedding,
    ExtendedLMHead,
    GatedCrossAttentionBlock,
    PerceiverResampler,
    media_index_from_ids,
)
from vlm.objectives.base import Objective, StepCache
from vlm.objectives.captioning import IGNORE_INDEX, flamingo_labels, shift_for_causal_lm

#: Flamingo's default streams: interleaved documents and image-text pairs, both the captioning LM loss.
DEFAULT_STREAMS: dict[str, dict[str, float]] = {"interleaved": {"caption": 1.0}, "pairs": {"caption": 1.0}}

#: named sizes. ``tiny``: CPU tests and the demo (the LM comes from the config: random init or a local dir);
#: ``base``: the benchmark's ViT-L/14 + OPT-1.3B shape (random weights unless ``pretrained`` is given).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": {"model": "vit_tiny_patch16_224",
                   "kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}},
        "lm": {"config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256,
                          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
        "num_latents": 8, "resampler_depth": 2, "resampler_heads": 2, "resampler_dim_head": 32,
        "cross_attn_every": 1, "xattn_heads": 4, "xattn_dim_head": 32,
    },
    "base": {
        "vision": {"model": "vit_large_patch14_clip_224"},
        "lm": {"config": {"model_type": "opt", "hidden_size": 2048, "num_hidden_layers": 24,
                          "num_attention_heads": 32, "ffn_dim": 8192, "max_position_embeddings": 2048,
                          "vocab_size": 50272, "word_embed_proj_dim": 2048, "dropout": 0.0}},
        "num_latents": 64, "resampler_depth": 6, "resampler_heads": 8, "resampler_dim_head": 64,
        "cross_attn_every": 1, "xattn_heads": 8, "xattn_dim_head": 64,
    },
}


@dataclass
class FlamingoConfig:
    """Everything that shapes a :class:`FlamingoCore`.

    Args:
        vision: ``VisionTowerConfig`` fields (any timm model; frozen by default).
        lm: ``LMConfig`` fields: ``pretrained`` (hub name or local dir) or ``config`` (random init; its
            ``vocab_size`` defaults to the tokenizer's size before ``<image>``/``<|endofchunk|>`` are added).
        tokenizer: 'synthetic', 'minilm', a local directory or a hub name; must match the LM's vocabulary.
        num_latents, resampler_depth, resampler_heads, resampler_dim_head: the Perceiver Resampler.
        max_num_media: media-position embeddings in the resampler (None: none, as OpenFlamingo).
        max_num_frames: frame embeddings for video (None: none).
        cross_attn_every: a gated cross-attention block before every N-th LM block (1 = every block).
        xattn_heads, xattn_dim_head, ff_mult: the gated cross-attention blocks.
        only_attend_immediate: each text token sees only the latents of the latest preceding ``<image>``
            (the paper's default); False: of every preceding image.
        freeze_lm: keep the LM's own weights frozen (only the new token rows train).
    """

    vision: dict = field(default_factory=dict)
    lm: dict = field(default_factory=dict)
    tokenizer: str = "synthetic"
    num_latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    max_num_media: int | None = None
    max_num_frames: int | None = None
    cross_attn_every: int = 1
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    ff_mult: int = 4
    only_attend_immediate: bool = True
    freeze_lm: bool = True

    @classmethod
    def named(cls, size: str | None, overrides: Mapping[str, Any] | None = None) -> FlamingoConfig:
        """The config of a named size with ``overrides`` laid over it (nested dicts merge key by key)."""
        base = sized_fields("Flamingo", SIZES, (f.name for f in dataclasses.fields(cls)), size, overrides)
        cfg = cls(**base)
        if cfg.cross_attn_every < 1:
            raise VLMConfigError(f"cross_attn_every={cfg.cross_attn_every}: use 1 or more.")
        return cfg


class MediaConditioning:
    """The visual tokens of one LM call and which image each text token is conditioned on.

    ``features``: ``[B, M, L, D]`` resampled latents; ``index``: ``[B, T]`` image index per text token (-1 =
    none). In cached generation a call sees only the new tokens: they come after the whole prompt, so they
    take the index of the prompt's last token (generated tokens are never ``<image>``).
    """

    __slots__ = ("features", "index")

    def __init__(self, features: Tensor, index: Tensor) -> None:
        self.features, self.index = features, index

    def index_for(self, length: int) -> Tensor:
        return self.index if self.index.shape[1] == length else self.index[:, -1:]

    def repeat_interleave(self, n: int) -> MediaConditioning:
        return MediaConditioning(self.features.repeat_interleave(n, 0), self.index.repeat_interleave(n, 0))


class FlamingoLayer(nn.Module):
    """A frozen LM decoder block with a gated cross-attention block in front of it (composition, no state)."""

    def __init__(self, xattn: GatedCrossAttentionBlock, decoder_layer: nn.Module) -> None:
        super().__init__()
        self.xattn = xattn
        self.decoder_layer = decoder_layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the LM reads from its blocks (e.g. ``attention_type``)
            return getattr(self._modules["decoder_layer"], name)

    def forward(self, hidden_states: Tensor, *args: Any, vlm_media: MediaConditioning | None = None, **kwargs: Any):
        if vlm_media is not None:
            index = vlm_media.index_for(hidden_states.shape[1])
            hidden_states = self.xattn(hidden_states, vlm_media.features.to(hidden_states.dtype), index)
        return self.decoder_layer(hidden_states, *args, **kwargs)


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class FlamingoCore(nn.Module):
    """Vision tower → Perceiver Resampler → gated cross-attention inside a frozen causal LM."""

    def __init__(self, cfg: FlamingoConfig, tokenizer: Any = None) -> None:
        super().__init__()
        from vlm.data.tokenizers import FLAMINGO_SPECIAL_TOKENS, add_special_tokens, load_tokenizer

        self.cfg = cfg
        tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        base_tokens = len(tok) - sum(t in tok.get_vocab() for t in FLAMINGO_SPECIAL_TOKENS)
        lm_cfg = LMConfig.from_any(cfg.lm)
        specials = ("bos_token_id", "eos_token_id", "pad_token_id")
        if lm_cfg.config is not None:  # a config's own special ids (GPT-2's 50256) mean nothing in another vocabulary
            lm_cfg.config = {**{k: getattr(tok, k) for k in specials}, **lm_cfg.config}
        self.lm = build_lm(lm_cfg, vocab_size=base_tokens)
        if lm_cfg.config is not None:
            for name in specials:
                setattr(self.lm.generation_config, name, getattr(self.lm.config.get_text_config(), name, None))
        if cfg.freeze_lm:
            _freeze(self.lm)
        add_special_tokens(tok, list(FLAMINGO_SPECIAL_TOKENS))
        self.tokenizer = tok
        self.image_token_id = int(tok.convert_tokens_to_ids(FLAMINGO_SPECIAL_TOKENS[0]))
        self.end_of_chunk_token_id = int(tok.convert_tokens_to_ids(FLAMINGO_SPECIAL_TOKENS[1]))
        self._extend_vocabulary(len(tok), min(self.image_token_id, self.end_of_chunk_token_id))

        self.vision = build_vision_tower(VisionTowerConfig(**cfg.vision) if isinstance(cfg.vision, Mapping)
                                         else cfg.vision)
        dim, vdim = hidden_size(self.lm), self.vision.hidden_size
        self.resampler = PerceiverResampler(
            vdim, depth=cfg.resampler_depth, heads=cfg.resampler_heads, dim_head=cfg.resampler_dim_head,
            num_latents=cfg.num_latents, max_num_media=cfg.max_num_media, max_num_frames=cfg.max_num_frames,
            ff_mult=cfg.ff_mult,
        )
        layers = decoder_layers(self.lm)
        self.xattn_layer_ids = [i for i in range(len(layers)) if (i + 1) % cfg.cross_attn_every == 0]
        for i in self.xattn_layer_ids:
            block = GatedCrossAttentionBlock(dim, vdim, heads=cfg.xattn_heads, dim_head=cfg.xattn_dim_head,
                                             ff_mult=cfg.ff_mult, only_immediate=cfg.only_attend_immediate)
            layers[i] = FlamingoLayer(block, layers[i])

    # ------------------------------------------------------------------ vocabulary
    def _extend_vocabulary(self, vocab: int, first_new: int) -> None:
        """Give the ids ``first_new .. vocab-1`` trainable rows in the input embedding and the output head."""
        emb = self.lm.get_input_embeddings()
        rows = base_vocab_size(self.lm)
        if first_new > rows:
            raise VLMConfigError(
                f"The tokenizer {self.cfg.tokenizer!r} has {first_new} tokens before <image>/<|endofchunk|> but "
                f"the LM's embedding table has only {rows} rows: they do not belong together. Use the LM's own "
                "tokenizer (or set lm.config.vocab_size to the tokenizer's size)."
            )
        head = self.lm.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        if first_new < rows:  # a padded table: drop the unused rows so the new ids follow the old ones directly
            weight = nn.Parameter(emb.weight.detach()[:first_new].clone(), requires_grad=False)
            emb = nn.Embedding(first_new, weight.shape[1], padding_idx=getattr(emb, "padding_idx", None)
                               if (getattr(emb, "padding_idx", None) or 0) < first_new else None)
            emb.weight = weight
            if head is not None:
                new_head = nn.Linear(weight.shape[1], first_new, bias=head.bias is not None)
                new_head.weight = weight if tied else nn.Parameter(head.weight.detach()[:first_new].clone(),
                                                                   requires_grad=False)
                if head.bias is not None:
                    new_head.bias = nn.Parameter(head.bias.detach()[:first_new].clone(), requires_grad=False)
                head = new_head
        extended = ExtendedEmbedding(emb, vocab - first_new)
        self.lm.set_input_embeddings(extended)
        if head is not None:
            extra = extended.extra if tied else nn.Parameter(
                head.weight.detach().mean(0, keepdim=True).repeat(vocab - first_new, 1))
            self.lm.set_output_embeddings(ExtendedLMHead(head, extra))
        self.lm.config.get_text_config().vocab_size = vocab
        self.vocab_size = vocab
        if not self.cfg.freeze_lm:  # the LM trains: its own rows (and head) train with it
            for p in (*extended.base.parameters(), *(head.parameters() if head is not None else ())):
                p.requires_grad_(True)

    # ------------------------------------------------------------------ forward
    @property
    def hidden_size(self) -> int:
        return hidden_size(self.lm)

    def encode_media(self, pixel_values: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """``pixel_values`` ``[B,M,3,H,W]`` (images) or ``[B,M,F,3,H,W]`` (video frames) -> latents ``[B,M,L,D]``.

        Only the slots that ``image_mask`` ``[B,M]`` marks as real go through the vision tower; empty slots
        get zero features.
        """
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[:, None]
        if pixel_values.dim() == 5:
            pixel_values = pixel_values[:, :, None]
        if pixel_values.dim() != 6:
            raise VLMConfigError(
                f"pixel_values must be [B,M,3,H,W] or [B,M,F,3,H,W], got {tuple(pixel_values.shape)}.")
        b, m, f = pixel_values.shape[:3]
        flat = pixel_values.flatten(0, 2)
        if image_mask is not None and not bool(image_mask.all()):
            keep = image_mask.reshape(b * m, 1).expand(b * m, f).reshape(-1)
            feats = self.vision(flat[keep])
            full = feats.new_zeros(b * m * f, *feats.shape[1:])
            full[keep] = feats
            feats = full
        else:
            feats = self.vision(flat)
        feats = feats.reshape(b, m, f, *feats.shape[1:])
        return self.resampler(feats)

    def conditioning(self, input_ids: Tensor, media: Tensor) -> MediaConditioning:
        return MediaConditioning(media, media_index_from_ids(input_ids, self.image_token_id))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_mask: Tensor | None = None, media: Tensor | None = None, **lm_kwargs: Any):
        """The LM's output (``.logits [B,T,V]``) for text conditioned on the images (or given ``media``)."""
        if media is None and pixel_values is not None:
            media = self.encode_media(pixel_values, image_mask)
        cond = self.conditioning(input_ids, media) if media is not None else None
        # No KV cache unless asked: a full forward needs none, and a cache built here breaks recomputation
        # under activation checkpointing (FSDP preset, ``gradient_checkpointing``): the recomputed block appends
        # its keys a second time and attention then sees twice the length of its mask.
        lm_kwargs.setdefault("use_cache", False)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, vlm_media=cond, **lm_kwargs)

    @contextlib.contextmanager
    def media_for_every_call(self, cond: MediaConditioning) -> Iterator[None]:
        """Hand ``cond`` to every :class:`FlamingoLayer` call inside the block (prefill and each decoding step).

        For transformers' ``generate``, which refuses keyword arguments its model does not declare. The hooks
        live only as long as the block: nothing stays on the layers afterwards.
        """

        def add(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "vlm_media": cond}

        handles = [m.register_forward_pre_hook(add, with_kwargs=True) for m in self.modules()
                   if isinstance(m, FlamingoLayer)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def cast_frozen_(self, dtype: torch.dtype) -> int:
        """Store every frozen weight matrix and table (vision tower, the LM's own weights; ``dim >= 2``) in ``dtype``.

        Under bf16 autocast a frozen fp32 weight is cast to bf16 at every use, and each cast copy a matmul needs
        for the backward pass is kept until then (for the LM's 1.3B weights at base size, 2.4 GiB beside the
        6 GiB of fp32 weights); stored in bf16 the weight is its own copy. Norm scales and biases (1-D, a tiny
        share) stay as they are: CPU autocast runs layer norms with the parameters' own dtype and refuses a mix.
        Trainable parameters are untouched. Returns the bytes saved.
        """
        saved = 0
        for p in self.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dim() >= 2 and p.dtype != dtype:
                before = p.numel() * p.element_size()
                p.data = p.data.to(dtype)
                saved += before - p.numel() * p.element_size()
        return saved

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The parameters that train (resampler, gated cross-attention, new token rows): what a release ships."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def train(self, mode: bool = True) -> FlamingoCore:
        super().train(mode)
        if self.cfg.freeze_lm and mode:  # a frozen LM keeps its eval behaviour (no dropout) while the rest trains
            self.lm.eval()
        return self


FROZEN_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def default_objectives() -> dict[str, Objective]:
    from vlm.objectives.captioning import CaptioningLM

    return {"caption": CaptioningLM()}


class Flamingo(VLMModule):
    """Flamingo as a LightningModule: the captioning LM loss on interleaved documents and pairs.

    Args:
        size: a named size of ``SIZES`` ('tiny', 'base') or null; the other arguments override it.
        vision, lm, tokenizer, ...: :class:`FlamingoConfig` fields (``config`` collects any other field).
        config: further :class:`FlamingoConfig` fields, e.g. ``{only_attend_immediate: false}``.
        pretrained: an OpenFlamingo checkpoint (local file) or a checkpoint of this model's trainable
            parameters, loaded after building (``vlm.convert.open_flamingo``).
        generation: default ``generate`` arguments (``max_new_tokens``, ``num_beams``, ...).
        frozen_dtype: how the frozen weights are stored. ``auto``: bf16 when the trainer runs ``bf16-mixed`` or
            ``bf16-true`` (autocast computes with bf16 copies of them anyway), unless the strategy is FSDP (one
            dtype per flat parameter; its ``MixedPrecision`` does this) or a ``FreezeSchedule`` may unfreeze
            them later; ``bfloat16`` / ``float32``: always that.
        objectives, streams: default ``{"caption": CaptioningLM()}`` on streams ``interleaved`` and ``pairs``.
        **kwargs: the optimiser and run settings of :class:`~vlm.models.base.VLMModule` (``lr``,
            ``weight_decay``, ``warmup_steps``, ``lr_schedule``, ``seed``, ...).
    """

    def __init__(
        self,
        size: str | None = "tiny",
        vision: dict | None = None,
        lm: dict | None = None,
        tokenizer: str | None = None,
        num_latents: int | None = None,
        cross_attn_every: int | None = None,
        config: dict | None = None,
        pretrained: str | None = None,
        generation: dict | None = None,
        frozen_dtype: str = "auto",
        objectives: Mapping[str, Objective] | None = None,
        streams: Mapping[str, Mapping[str, float]] | None = None,
        **kwargs: Any,
    ) -> None:
        if frozen_dtype not in FROZEN_DTYPES:
            raise VLMConfigError(f"frozen_dtype={frozen_dtype!r}: use one of {list(FROZEN_DTYPES)}.")
        super().__init__(
            objectives=default_objectives() if objectives is None else objectives,
            streams=DEFAULT_STREAMS if streams is None else streams,
            **kwargs,
        )
        self.save_hyperparameters()
        keep_plain_hparams(self)
        overrides = dict(config or {})
        for k, v in (("vision", vision), ("lm", lm), ("tokenizer", tokenizer), ("num_latents", num_latents),
                     ("cross_attn_every", cross_attn_every)):
            if v is not None:
                overrides[k] = v
        self.config = FlamingoConfig.named(size, overrides)
        self.core = FlamingoCore(self.config)
        self.generation = {"max_new_tokens": 20, "num_beams": 1, **(generation or {})}
        self.frozen_dtype = frozen_dtype
        if pretrained is not None:
            from vlm.convert.open_flamingo import load_flamingo_weights

            load_flamingo_weights(self.core, pretrained)
        self.dims = {"vocab_size": self.core.vocab_size, "text_hidden": self.core.hidden_size}
        self.attach_objectives()

    # ------------------------------------------------------------------ precision
    def frozen_storage_dtype(self, precision: str, strategy: Any = None, callbacks: list | None = None) -> torch.dtype:
        """The dtype ``frozen_dtype`` picks for the frozen weights under ``precision`` (see the class doc)."""
        if self.frozen_dtype != "auto":
            return FROZEN_DTYPES[self.frozen_dtype]
        from vlm.callbacks.freeze import FreezeSchedule

        bf16 = str(precision).startswith("bf16")
        fsdp = type(strategy).__name__ in ("FSDPStrategy", "ModelParallelStrategy")
        scheduled = any(isinstance(c, FreezeSchedule) for c in callbacks or ())
        return torch.bfloat16 if bf16 and not fsdp and not scheduled else torch.float32

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        if trainer is not None:
            dtype = self.frozen_storage_dtype(trainer.precision, trainer.strategy, trainer.callbacks)
            if dtype != torch.float32 and not str(trainer.precision).startswith("bf16"):
                raise VLMConfigError(
                    f"Flamingo frozen_dtype={self.frozen_dtype!r} stores frozen weights in bf16, which needs bf16 "
                    f"compute; the trainer runs precision={trainer.precision!r}. Set trainer.precision: bf16-mixed, "
                    f"or frozen_dtype: auto / float32."
                )
            self.core.cast_frozen_(dtype)
        super().setup(stage)

    # ------------------------------------------------------------------ helpers
    @property
    def tokenizer(self):
        return self.core.tokenizer

    @staticmethod
    def _field(batch: Mapping[str, Any], name: str, what: str) -> Any:
        if batch.get(name) is None:
            raise MissingBatchField(
                f"Flamingo needs batch field '{name}' for {what}, but stream '{batch.get('stream')}' carries "
                f"{sorted(batch)}. Give it a transform that yields it (vlm.data.transforms.InterleavedTransform)."
            )
        return batch[name]

    def labels_of(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's ``labels``, or Flamingo's rule applied to its ``input_ids``."""
        if batch.get("labels") is not None:
            return batch["labels"]
        return flamingo_labels(batch["input_ids"], image_token_id=self.core.image_token_id,
                               end_of_chunk_token_id=self.core.end_of_chunk_token_id,
                               pad_token_id=self.tokenizer.pad_token_id)

    def check_inputs(self, streams: Mapping[str, Any]) -> None:
        """Before training: each stream's tokenizer agrees with the model's on ``<image>``/``<|endofchunk|>``
        and fits the LM's table, and its text fits the LM's positions."""
        positions = getattr(self.core.lm.config.get_text_config(), "max_position_embeddings", None)
        for key, stream in streams.items():
            transform = getattr(stream, "transform", None)
            if transform is None or getattr(transform, "tokenizer_source", None) is None:
                continue
            where = f"data.{key}.transform"
            tok = transform.tokenizer
            if len(tok) > self.core.vocab_size:
                raise VLMConfigError(
                    f"{where}.tokenizer={transform.tokenizer_source!r} has {len(tok)} tokens but the model's "
                    f"vocabulary has {self.core.vocab_size}: use the model's tokenizer ({self.config.tokenizer!r}).")
            for name, want in (("<image>", self.core.image_token_id),
                               ("<|endofchunk|>", self.core.end_of_chunk_token_id)):
                got = tok.convert_tokens_to_ids(name)
                if got != want:
                    raise VLMConfigError(
                        f"{where}.tokenizer={transform.tokenizer_source!r} gives {name} id {got} but the model "
                        f"uses {want}: use the model's tokenizer ({self.config.tokenizer!r}).")
            length = getattr(transform, "max_length", None)
            if length is not None and positions is not None and int(length) > int(positions):
                raise VLMConfigError(
                    f"{where}.max_length={length} is longer than the LM's {positions} positions; lower it.")

    # ------------------------------------------------------------------ capability
    def flops_per_sample(self, batch: Mapping[str, Any]) -> float | None:
        """Training FLOPs per sample (``vlm.flops`` conventions): the frozen vision tower's forward per real image
        (no autograd), the resampler and the gated cross-attention blocks forward + backward (3x), and the LM's
        forward + input gradients (2x frozen; 3x when it trains). None for a tower other than a timm ViT."""
        from vlm.flops import attention_flops, causal_lm_forward_flops, matmul_weights, vit_forward_flops

        core = self.core
        ids, pixels = batch.get("input_ids"), batch.get("pixel_values")
        vit = core.vision.model
        if not isinstance(ids, Tensor) or not isinstance(pixels, Tensor) or not hasattr(vit, "blocks"):
            return None
        b, t = (int(x) for x in ids.shape)
        media = int(pixels.shape[1])
        frames = int(pixels.shape[2]) if pixels.dim() == 6 else 1
        mask = batch.get("image_mask")
        real = float(mask.float().sum()) / b if isinstance(mask, Tensor) else float(media)
        size = int(pixels.shape[-1])
        patches = core.vision.num_tokens(size)
        vision = (1.0 if core.vision.frozen else 3.0) * real * frames * vit_forward_flops(vit, size)
        lat = core.resampler.num_latents
        tokens = frames * patches
        resampler = 0.0
        for layer in core.resampler.layers:
            a = layer.attn
            resampler += (2.0 * (tokens + lat) * a.to_kv.weight.numel()
                          + 2.0 * lat * (a.to_q.weight.numel() + a.to_out.weight.numel() + matmul_weights(layer.ff))
                          + attention_flops(lat, tokens + lat, a.heads * a.dim_head))
        resampler *= media
        xattn = 0.0
        context = media * lat
        for block in (m for m in core.lm.modules() if isinstance(m, GatedCrossAttentionBlock)):
            a = block.attn
            xattn += (2.0 * t * (a.to_q.weight.numel() + a.to_out.weight.numel() + matmul_weights(block.ff))
                      + 2.0 * context * a.to_kv.weight.numel() + attention_flops(t, context, a.heads * a.dim_head))
        layers = len(decoder_layers(core.lm))
        lm = causal_lm_forward_flops(core.lm, layers, core.hidden_size, t, skip=(GatedCrossAttentionBlock,))
        attention = layers * attention_flops(t, t, core.hidden_size)
        # a frozen linear layer's backward is its input gradient only (1x); attention has no weights, and its
        # backward takes the gradients of both of its inputs (2x), frozen LM or not
        linear_passes = 2.0 if self.config.freeze_lm else 3.0
        return vision + 3.0 * (resampler + xattn) + linear_passes * (lm - attention) + 3.0 * attention

    def lm_logits(self, batch: Mapping[str, Any], cache: StepCache) -> tuple[Tensor, Tensor]:
        """Logits and labels aligned for the captioning objective (position t predicts token t+1)."""

        def compute():
            input_ids = self._field(batch, "input_ids", "the captioning LM loss")
            pixel_values = self._field(batch, "pixel_values", "the captioning LM loss")
            out = self.core(input_ids, batch.get("attention_mask"), pixel_values, batch.get("image_mask"))
            return shift_for_causal_lm(out.logits, self.labels_of(batch))

        return cache.get_or("lm_logits", compute)

    # ------------------------------------------------------------------ inference
    def generate_batch(self, batch: Mapping[str, Any]) -> Tensor:
        return self.generate(self._field(batch, "pixel_values", "generation"),
                             self._field(batch, "input_ids", "generation"), batch.get("attention_mask"),
                             batch.get("image_mask"))

    def stop_token_ids(self) -> set[int]:
        tok = self.tokenizer
        return {self.core.end_of_chunk_token_id, tok.eos_token_id, tok.pad_token_id} - {None}

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                 image_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Continue left-padded prompts (``<image>`` anywhere) with the KV cache; returns the new tokens only.

        Decoding stops at ``<|endofchunk|>`` or the tokenizer's eos. ``kwargs`` go to transformers'
        ``generate`` over the model's ``generation`` defaults.
        """
        if attention_mask is not None and input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise VLMConfigError("generate needs left-padded prompts (padding_side='left'): the last column "
                                 "of attention_mask has padding.")
        args = {**self.generation, **kwargs}
        media = self.core.encode_media(pixel_values, image_mask)
        cond = self.core.conditioning(input_ids, media)
        beams, returns = int(args.get("num_beams", 1) or 1), int(args.get("num_return_sequences", 1) or 1)
        expand = beams if beams > 1 else returns  # how transformers expands the batch before decoding
        if expand > 1:
            cond = cond.repeat_interleave(expand)
        tok = self.tokenizer
        eos = [self.core.end_of_chunk_token_id] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        args.setdefault("eos_token_id", eos)
        args.setdefault("pad_token_id", tok.pad_token_id)
        args.setdefault("do_sample", False)
        with self.core.media_for_every_call(cond):
            out = self.core.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **args)
        return out[:, input_ids.shape[1]:]

    @torch.no_grad()
    def score(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor,
              image_mask: Tensor | None = None) -> Tensor:
        """Summed log-likelihood ``[B]`` of the tokens that ``target_mask`` marks (e.g. candidate answers)."""
        out = self.core(input_ids, attention_mask, pixel_values, image_mask)
        logits, targets = shift_for_causal_lm(out.logits.float(), input_ids.masked_fill(~target_mask.bool(),
                                                                                        IGNORE_INDEX))
        logp = torch.log_softmax(logits, -1)
        keep = targets != IGNORE_INDEX
        picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return (picked * keep).sum(1)
