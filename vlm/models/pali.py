"""PaLI (Chen et al., 2022): a ViT whose patch features, projected to the LM's width, are prepended to the
embedded text prompt of an encoder-decoder language model (mT5 in the paper, any seq2seq LM here).

Two layers, as every model family here:

* :class:`PaLICore`, a plain ``nn.Module`` built from a :class:`PaLIConfig` (named sizes in ``SIZES``): a timm
  vision tower (patch features, frozen by default), a linear projection, and any Hugging Face
  ``AutoModelForSeq2SeqLM``. :meth:`PaLICore.encode` builds the encoder input ``[image tokens; prompt
  embeddings]`` and its mask, shared by the forward pass and generation.
* :class:`PaLI`, the thin LightningModule on :class:`~vlm.models.base.VLMModule`: the ``lm_logits`` capability
  for the shared captioning objective (decoder targets in ``labels``), ``generate`` for inference, and through
  the base ``predict_step`` and prompt-stream evaluation (VQA accuracy, CIDEr) for :class:`PaLIPrompts`.

The 1024 location tokens ``<loc0000>`` .. ``<loc1023>`` and then T5's 100 span-corruption sentinels
``<extra_id_0>`` .. ``<extra_id_99>`` (where the tokenizer lacks them) are added to the tokenizer; PaLI trains the
whole LM, so its embedding table (and output head) is resized to the tokenizer where it is too small. A batch
without ``pixel_values`` (the text-only span-corruption stream) is encoded as text alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vlm.checkpoint import keep_plain_hparams
from vlm.data.collate import trim_padding
from vlm.data.pali_tasks import SENTINEL_TOKENS
from vlm.data.tokenizers import (
    LOC_TOKENS_ALIAS,
    NUM_LOC_BINS,
    add_special_tokens,
    load_tokenizer,
    parse_loc_string,
)
from vlm.data.transforms import PrefixLMTransform, skips_bad_samples
from vlm.encoders.lm import LMConfig, base_vocab_size, build_lm, hidden_size
from vlm.encoders.vision import VisionTowerConfig, build_vision_tower
from vlm.errors import MissingBatchField, VLMConfigError
from vlm.models.base import VLMModule
from vlm.models.sizes import sized_fields
from vlm.modules.embedding import sincos_2d
from vlm.objectives.base import Objective, StepCache

#: the training streams of the PaLI mixture in ``conf/pali/tiny.yaml`` (one ``PrefixLMTransform`` task each, and
#: ``text_span``: span corruption on text alone), all trained with the captioning LM loss on the decoder targets.
PALI_STREAMS: tuple[str, ...] = ("alt_text", "captions_multilingual", "ocr", "vqa", "vqg", "object_qa", "detection",
                                 "text_span")
DEFAULT_STREAMS: dict[str, dict[str, float]] = {name: {"caption": 1.0} for name in PALI_STREAMS}

#: named sizes. ``tiny``: CPU tests and the demo (random init); ``base``: ViT-B/16 + a T5-base-shaped
#: encoder-decoder (random weights unless ``pretrained`` is given).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": {"model": "vit_tiny_patch16_224",
                   "kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}},
        "lm": {"kind": "seq2seq",
               "config": {"model_type": "t5", "d_model": 128, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2,
                          "num_heads": 4, "d_kv": 32, "dropout_rate": 0.0}},
    },
    "base": {
        "vision": {"model": "vit_base_patch16_224"},
        "lm": {"kind": "seq2seq",
               "config": {"model_type": "t5", "d_model": 768, "d_ff": 3072, "num_layers": 12,
                          "num_decoder_layers": 12, "num_heads": 12, "d_kv": 64, "vocab_size": 32128}},
    },
}


@dataclass
class PaLIConfig:
    """Everything that shapes a :class:`PaLICore`.

    Args:
        vision: ``VisionTowerConfig`` fields (any timm model giving patch features).
        lm: ``LMConfig`` fields with ``kind: seq2seq``: ``pretrained`` (hub name or local dir) or ``config``
            (random init; its ``vocab_size`` defaults to the tokenizer's size, location tokens included).
        tokenizer: 'synthetic', 'minilm', a local directory or a hub name; the 1024 location tokens and the 100
            sentinels are added (in that order; tokens it already has keep their ids).
        freeze_vision: keep the vision tower frozen (no gradients, eval mode, no autograd through it); it decides
            the tower's ``frozen`` whatever ``vision.frozen`` says.
        image_pos_embed: add a fixed 2-D sine-cosine table (unit amplitude) to the projected image tokens. A
            randomly initialised ViT's position embeddings are too small to survive its layer norms, so without
            it the LM cannot tell where a patch is ("what shape is at the top left?"); a pretrained ViT has its own.
    """

    vision: dict = field(default_factory=dict)
    lm: dict = field(default_factory=dict)
    tokenizer: str = "synthetic"
    freeze_vision: bool = True
    image_pos_embed: bool = False

    @classmethod
    def named(cls, size: str | None, overrides: Mapping[str, Any] | None = None) -> PaLIConfig:
        """The config of a named size with ``overrides`` laid over it (nested dicts merge key by key)."""
        base = sized_fields("PaLI", SIZES, (f.name for f in dataclasses.fields(cls)), size, overrides)
        lm = dict(base.get("lm") or {})
        lm.setdefault("kind", "seq2seq")
        if lm["kind"] != "seq2seq":
            raise VLMConfigError(
                f"PaLI's language model is an encoder-decoder: lm.kind={lm['kind']!r}, use 'seq2seq' (T5, mT5, BART).")
        base["lm"] = lm
        return cls(**base)


class PaLICore(nn.Module):
    """Vision tower -> linear projection -> image tokens in front of the prompt -> encoder-decoder LM."""

    def __init__(self, cfg: PaLIConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        added = tok.get_added_vocab()
        locs = [i for t, i in added.items() if t.startswith("<loc") and t.endswith(">") and len(t) == 9]
        # tokens this class adds (a tokenizer built like the transforms' may have them already) are not the base's
        ours = locs + [i for t, i in added.items() if t in SENTINEL_TOKENS and locs and i > min(locs)]
        base_tokens = len(tok) - len(ours)
        add_special_tokens(tok, [LOC_TOKENS_ALIAS])
        add_special_tokens(tok, list(SENTINEL_TOKENS))  # after the location tokens: their ids stay as without
        self.tokenizer = tok
        self.loc_token_ids = tok.convert_tokens_to_ids(["<loc0000>", f"<loc{NUM_LOC_BINS - 1:04d}>"])
        self.sentinel_token_ids = tok.convert_tokens_to_ids([SENTINEL_TOKENS[0], SENTINEL_TOKENS[-1]])

        lm_cfg = LMConfig.from_any(dict(cfg.lm))
        specials = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                    "decoder_start_token_id": tok.pad_token_id}
        if lm_cfg.config is not None:  # a config's own special ids mean nothing in another vocabulary
            lm_cfg.config = {**specials, **lm_cfg.config}
            if lm_cfg.config.get("vocab_size") is None:  # random init: one row per token, location tokens included
                lm_cfg.config["vocab_size"] = len(tok)
        self.lm = build_lm(lm_cfg)
        if lm_cfg.config is not None:
            for name in specials:
                setattr(self.lm.generation_config, name, getattr(self.lm.config, name, None))
        self._fit_vocabulary(len(tok), base_tokens)

        vision = VisionTowerConfig.from_any(dict(cfg.vision) if isinstance(cfg.vision, Mapping) else cfg.vision)
        vision.frozen = bool(cfg.freeze_vision)
        self.vision = build_vision_tower(vision)
        self.proj = nn.Linear(self.vision.hidden_size, hidden_size(self.lm))
        # The image tokens' sin-cos table for the tower's own image size, built once and moved with the module (a
        # table rebuilt on the CPU at every forward was a host-to-device copy per step on a GPU); not saved.
        table = torch.zeros(0, 0)
        if cfg.image_pos_embed and self.image_size is not None:
            table = sincos_2d(self.vision.num_tokens(self.image_size), self.hidden_size)
        self.register_buffer("image_pos_table", table, persistent=False)

    def _fit_vocabulary(self, vocab: int, base_tokens: int) -> None:
        """Resize the LM's tables to the tokenizer when the location tokens do not fit the existing rows."""
        rows = base_vocab_size(self.lm)
        if base_tokens > rows:
            raise VLMConfigError(
                f"The tokenizer {self.cfg.tokenizer!r} has {base_tokens} tokens before the location tokens but the "
                f"LM's embedding table has only {rows} rows: they do not belong together. Use the LM's own tokenizer "
                "(or leave lm.config.vocab_size out so the tokenizer sets it)."
            )
        if vocab > rows:
            self.lm.resize_token_embeddings(vocab)
        self.vocab_size = base_vocab_size(self.lm)

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.lm)

    @property
    def image_size(self) -> int | None:
        """The image side the tower takes (None: any size, e.g. conv nets or ViTs with ``dynamic_img_size``)."""
        patch_embed = getattr(self.vision.model, "patch_embed", None)
        if patch_embed is None:
            return None
        if getattr(patch_embed, "dynamic_img_size", False) or not getattr(patch_embed, "strict_img_size", True):
            return None
        size = getattr(patch_embed, "img_size", None)
        return int(size[-1]) if isinstance(size, (tuple, list)) else int(self.vision.image_size)

    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        """``pixel_values`` ``[B,3,H,W]`` -> projected patch features ``[B,P,d_model]``."""
        if pixel_values.dim() == 5 and pixel_values.shape[1] == 1:
            pixel_values = pixel_values[:, 0]
        if pixel_values.dim() != 4:
            raise VLMConfigError(f"PaLI takes one image per sample: pixel_values [B,3,H,W], got "
                                 f"{tuple(pixel_values.shape)}.")
        feats = self.vision(pixel_values)
        tokens = self.proj(feats.to(self.proj.weight.dtype))
        if self.cfg.image_pos_embed:
            table = self.image_pos_table
            if table.shape != tokens.shape[1:]:  # another image size than the tower's own (dynamic-size towers)
                table = sincos_2d(tokens.shape[1], tokens.shape[2]).to(tokens.device)
            tokens = tokens + table.to(tokens.dtype)
        return tokens

    def encode(self, pixel_values: Tensor | None, input_ids: Tensor,
               attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The encoder's input: ``cat([image tokens, prompt embeddings])`` ``[B,P+T,D]`` and its mask ``[B,P+T]``;
        without ``pixel_values`` (text-only samples) the prompt embeddings ``[B,T,D]`` alone."""
        text = self.lm.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is None:
            return text, attention_mask
        images = self.image_tokens(pixel_values)
        mask = torch.cat([attention_mask.new_ones(images.shape[:2]), attention_mask], 1)
        return torch.cat([images.to(text.dtype), text], 1), mask

    def forward(self, pixel_values: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None, **lm_kwargs: Any):
        """The seq2seq LM's output (``.logits [B,T,V]`` over the decoder positions).

        ``pixel_values=None``: a text-only batch (no image tokens). With ``labels`` (-100 = no target) and no ``decoder_input_ids`` the decoder reads the labels shifted right
        (the LM's own rule); no loss is computed here, the objectives do that.
        """
        embeds, mask = self.encode(pixel_values, input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise VLMConfigError("PaLICore.forward needs labels or decoder_input_ids for the decoder.")
            decoder_input_ids = self.lm.prepare_decoder_input_ids_from_labels(labels=labels)
        lm_kwargs.setdefault("use_cache", False)  # no decoder cache in a full pass (activation checkpointing)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                       decoder_attention_mask=decoder_attention_mask, **lm_kwargs)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The parameters that train (projection and LM unless frozen by hand)."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}


def parse_detections(text: Any) -> list[tuple[list[float], str]]:
    """``'<loc..>x4 label ; ...'`` -> ``[(box_xyxy normalised at bin centres, label), ...]``; never raises.

    Parts without four location tokens are dropped; anything that is not such a string gives ``[]``.
    """
    if not isinstance(text, str):
        return []
    try:
        return [(list(box), label) for box, label in parse_loc_string(text)]
    except Exception:  # noqa: BLE001 - model output is arbitrary text
        return []


class PaLIPrompts(PrefixLMTransform):
    """:class:`~vlm.data.transforms.PrefixLMTransform` for evaluation and prediction: the same prompt, plus the
    references (``answers``), ``task`` ('vqa' or 'captioning') and ``key`` that prompt-stream evaluation reads.

    ``task`` is 'vqa' or 'caption' (one task, one language: deterministic prompts).
    """

    def __init__(self, tokenizer: str = "synthetic", task: str = "vqa", lang: str = "en", max_length: int = 32,
                 target_max_length: int = 32, image_size: int = 64, **kwargs: Any) -> None:
        if task not in ("vqa", "caption") or lang == "all":
            raise VLMConfigError(f"PaLIPrompts: task={task!r}, lang={lang!r}; use task 'vqa' or 'caption' and one "
                                 "language.")
        super().__init__(tokenizer=tokenizer, task=task, lang=lang, max_length=max_length,
                         target_max_length=target_max_length, image_size=image_size, train=False, **kwargs)

    @skips_bad_samples
    def __call__(self, sample: dict[str, Any] | None) -> dict[str, Any] | None:
        from vlm.data.fewshot import references

        out = super().__call__(sample)
        if out is None:
            return None
        task = "vqa" if self.tasks[0] == "vqa" else "captioning"
        if task == "vqa" and not (sample.get("answers") or sample.get("answer")):
            refs = [out["target_text"]]  # the question was drawn from the sample's pool
        else:
            refs = references(task, sample, self.lang)
        out.update(answers=refs, task=task, key=str(sample.get("key")))
        return out


def default_objectives() -> dict[str, Objective]:
    from vlm.objectives.captioning import CaptioningLM

    return {"caption": CaptioningLM()}


class PaLI(VLMModule):
    """PaLI as a LightningModule: the captioning LM loss on the decoder targets of every task stream.

    Args:
        size: a named size of ``SIZES`` ('tiny', 'base') or null; the other arguments override it.
        vision, lm, tokenizer, freeze_vision, image_pos_embed: :class:`PaLIConfig` fields.
        config: further :class:`PaLIConfig` fields.
        generation: default ``generate`` arguments (``max_new_tokens``, ``num_beams``, ...).
        trim_padding: drop the prompt and target columns that are padding in every row of a batch before the
            forward (``prepare_batch``, ``vlm.data.collate.trim_padding``; same losses, less work on short
            answers). Default: on, except under ``compile``, whose graphs want the transforms' fixed shapes.
        objectives, streams: default ``{"caption": CaptioningLM()}`` on the streams of ``PALI_STREAMS``.
        **kwargs: the optimiser and run settings of :class:`~vlm.models.base.VLMModule` (``lr``,
            ``weight_decay``, ``warmup_steps``, ``lr_schedule``, ``seed``, ...).
    """

    def __init__(
        self,
        size: str | None = "tiny",
        vision: dict | None = None,
        lm: dict | None = None,
        tokenizer: str | None = None,
        freeze_vision: bool | None = None,
        image_pos_embed: bool | None = None,
        config: dict | None = None,
        generation: dict | None = None,
        trim_padding: bool | None = None,
        objectives: Mapping[str, Objective] | None = None,
        streams: Mapping[str, Mapping[str, float]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            objectives=default_objectives() if objectives is None else objectives,
            streams=DEFAULT_STREAMS if streams is None else streams,
            **kwargs,
        )
        self.save_hyperparameters()
        keep_plain_hparams(self)
        overrides = dict(config or {})
        for k, v in (("vision", vision), ("lm", lm), ("tokenizer", tokenizer), ("freeze_vision", freeze_vision),
                     ("image_pos_embed", image_pos_embed)):
            if v is not None:
                overrides[k] = v
        self.config = PaLIConfig.named(size, overrides)
        self.core = PaLICore(self.config)
        self.generation = {"max_new_tokens": 20, "num_beams": 1, **(generation or {})}
        self.trim_padding = self.compile_scope == "none" if trim_padding is None else bool(trim_padding)
        self.dims = {"vocab_size": self.core.vocab_size, "text_hidden": self.core.hidden_size}
        self.attach_objectives()

    # ------------------------------------------------------------------ helpers
    @property
    def tokenizer(self):
        return self.core.tokenizer

    @staticmethod
    def _field(batch: Mapping[str, Any], name: str, what: str) -> Any:
        if batch.get(name) is None:
            raise MissingBatchField(
                f"PaLI needs batch field '{name}' for {what}, but stream '{batch.get('stream')}' carries "
                f"{sorted(batch)}. Give it a transform that yields it (vlm.data.transforms.PrefixLMTransform)."
            )
        return batch[name]

    def check_inputs(self, streams: Mapping[str, Any]) -> None:
        """Before training: each stream's tokenizer is the model's (same size, same location-token ids) and its
        images have the size the vision tower takes."""
        for key, stream in streams.items():
            transform = getattr(stream, "transform", None)
            if transform is None:
                continue
            where = f"data.{key}.transform"
            if getattr(transform, "tokenizer_source", None) is not None:
                tok = transform.tokenizer
                want = self.core.loc_token_ids
                got = tok.convert_tokens_to_ids(["<loc0000>", f"<loc{NUM_LOC_BINS - 1:04d}>"])
                sentinels = tok.convert_tokens_to_ids([SENTINEL_TOKENS[0], SENTINEL_TOKENS[-1]])
                if SENTINEL_TOKENS[0] in tok.get_vocab() and list(sentinels) != list(self.core.sentinel_token_ids):
                    got = [*got, *sentinels]  # a transform that uses sentinels must number them as the model does
                    want = [*want, *self.core.sentinel_token_ids]
                if len(tok) > self.core.vocab_size or list(got) != list(want):
                    raise VLMConfigError(
                        f"{where}.tokenizer={transform.tokenizer_source!r} ({len(tok)} tokens, <loc0000> id {got[0]}) "
                        f"does not match the model's vocabulary ({self.core.vocab_size} rows, <loc0000> id {want[0]}): "
                        f"use the model's tokenizer ({self.config.tokenizer!r})."
                    )
            size = getattr(getattr(transform, "image", None), "image_size", None)
            if size is not None and self.core.image_size is not None and int(size) != self.core.image_size:
                raise VLMConfigError(
                    f"{where}.image_size={size} but the vision tower takes {self.core.image_size}px images: set the "
                    f"transform's image_size to {self.core.image_size} (or the tower's vision.kwargs.img_size)."
                )

    def prepare_batch(self, batch: Any) -> Any:
        """The batch as the steps see it: padding columns trimmed (``trim_padding``). ``MultiStreamDataModule`` calls
        it after the batch reached the device; a hand-written loop calls it before ``training_step``."""
        if self.trim_padding and isinstance(batch, dict):
            return trim_padding(batch)
        return batch

    # ------------------------------------------------------------------ capability
    def lm_logits(self, batch: Mapping[str, Any], cache: StepCache) -> tuple[Tensor, Tensor]:
        """Decoder logits ``[B,T,V]`` and the target ``labels`` ``[B,T]`` as they are (position t predicts label t)."""

        def compute():
            labels = self._field(batch, "labels", "the captioning LM loss")
            out = self.core(batch.get("pixel_values"), self._field(batch, "input_ids", "the captioning LM loss"), batch.get("attention_mask"),
                            labels=labels, decoder_attention_mask=batch.get("decoder_attention_mask"))
            return out.logits, labels

        return cache.get_or("lm_logits", compute)

    # ------------------------------------------------------------------ inference
    def generate_batch(self, batch: Mapping[str, Any]) -> Tensor:
        return self.generate(batch.get("pixel_values"), self._field(batch, "input_ids", "generation"), batch.get("attention_mask"))

    def stop_token_ids(self) -> set[int]:
        tok = self.tokenizer
        return {tok.eos_token_id, tok.pad_token_id} - {None}

    @torch.no_grad()
    def generate(self, pixel_values: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None,
                 **kwargs: Any) -> Tensor:
        """Decode answers for image + prompt with the KV cache; returns the generated tokens only (no start token).

        Prompts may be padded on either side (the encoder masks padding). ``kwargs`` go to transformers'
        ``generate`` over the model's ``generation`` defaults (greedy unless ``num_beams`` or sampling is set).
        """
        args = {**self.generation, **kwargs}
        tok = self.tokenizer
        args.setdefault("eos_token_id", tok.eos_token_id)
        args.setdefault("pad_token_id", tok.pad_token_id)
        args.setdefault("decoder_start_token_id", self.core.lm.generation_config.decoder_start_token_id
                        if self.core.lm.generation_config.decoder_start_token_id is not None else tok.pad_token_id)
        args.setdefault("do_sample", False)
        embeds, mask = self.core.encode(pixel_values, input_ids, attention_mask)
        out = self.core.lm.generate(inputs_embeds=embeds, attention_mask=mask, **args)
        return out[:, 1:]

    def flops_per_sample(self, batch: Mapping[str, Any]) -> float | None:
        """Training FLOPs per sample (``vlm.flops`` conventions): the projection and the LM forward + backward
        (3x) over image + prompt encoder tokens and the target's decoder tokens, plus the ViT's forward (1x when
        frozen, 3x when it trains). None for an LM other than the T5 family or a tower other than a timm ViT."""
        from vlm.flops import t5_forward_flops, vit_forward_flops

        core, cfg = self.core, self.core.lm.config
        if not all(hasattr(cfg, a) for a in ("d_model", "num_heads", "d_kv", "d_ff", "num_layers", "num_decoder_layers")):
            return None
        ids = batch.get("input_ids")
        target = batch.get("labels") if batch.get("labels") is not None else batch.get("decoder_input_ids")
        if not isinstance(ids, Tensor) or not isinstance(target, Tensor):
            return None
        pixels, patches, image = batch.get("pixel_values"), 0, 0.0
        if isinstance(pixels, Tensor):
            vit = core.vision.model
            if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
                return None
            size = int(pixels.shape[-1])
            patches = core.vision.num_tokens(size)
            vision_passes = 1.0 if core.vision.frozen else 3.0
            image = vision_passes * vit_forward_flops(vit, size) + 3.0 * 2.0 * patches * core.proj.weight.numel()
        lm = t5_forward_flops(cfg, patches + int(ids.shape[1]), int(target.shape[1]), int(core.vocab_size))
        return image + 3.0 * lm

    def detect(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
               **kwargs: Any) -> list[list[tuple[list[float], str]]]:
        """Generate for detection prompts and parse each output into ``(box_xyxy, label)`` pairs."""
        return [parse_detections(t) for t in self.decode(self.generate(pixel_values, input_ids, attention_mask,
                                                                       **kwargs))]


__all__ = ["PaLI", "PaLIConfig", "PaLICore", "PaLIPrompts", "SIZES", "PALI_STREAMS", "parse_detections"]
