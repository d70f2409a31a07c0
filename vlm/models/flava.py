"""FLAVA (Singh et al., 2022): image encoder + text encoder + multimodal encoder, trained by pluggable objectives.

Two layers, as every model family here:

* :class:`FLAVACore`, a plain ``nn.Module`` built from a :class:`FLAVAConfig` (named sizes in ``SIZES``): the
  three towers (timm ViT, text encoder, fusion encoder), the projections into the fusion encoder and into the
  contrastive space, and the optional image tokenizer (MIM/MMM targets). Its helpers (``image_pass``,
  ``text_pass``, ``fuse``, ``encode_image``, ``encode_text``) are plain functions of their inputs.
* :class:`FLAVA`, the thin LightningModule on :class:`~vlm.models.base.VLMModule`: masking and the capability
  methods the objectives (GC, ITM, MMM, MIM, MLM in ``vlm.objectives``) ask for. Every capability memoises in
  the step's ``StepCache``, so objectives that share an input share one pass: on a pair batch with
  GC + ITM + MMM the image and text towers run once unmasked (GC) and once masked (ITM/MMM), and the
  multimodal encoder runs once. Zero-shot retrieval and classification of held-out batches are evaluators
  (``vlm.evaluation``) that the base module runs beside the losses.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vlm.checkpoint import keep_plain_hparams
from vlm.encoders.text import PreNormStack, TextConfig, attention_bias, build_text_encoder, check_vocab
from vlm.encoders.vision import VisionConfig, build_codebook, build_vit, coerce_numbers, patchify
from vlm.errors import MissingBatchField, VLMConfigError
from vlm.evaluation import RetrievalEvaluator, ZeroShotEvaluator
from vlm.models.base import VLMModule
from vlm.models.sizes import sized_fields
from vlm.objectives.base import Objective, StepCache, generator_of

#: FLAVA's default streams and objectives: pairs train GC + ITM + MMM, images MIM, text MLM.
DEFAULT_STREAMS: dict[str, dict[str, float]] = {
    "pairs": {"gc": 1.0, "itm": 1.0, "mmm": 1.0},
    "images": {"mim": 1.0},
    "text": {"mlm": 1.0},
}
#: BERT uncased WordPiece ids of [PAD], [UNK], [CLS], [SEP], [MASK] (FLAVA's tokenizer)
BERT_SPECIAL_IDS = (0, 100, 101, 102, 103)
FUSION_INPUTS = ("last_layer", "final")
#: the core's parts, which sat at the top of the LightningModule (and of its checkpoints) before ``core``
CORE_PARTS = ("image_encoder", "text_encoder", "multimodal_encoder", "image_to_mm_projection",
              "text_to_mm_projection", "image_projection", "text_projection", "image_codebook")

#: named sizes. ``tiny``: CPU tests and the demo (three 2-layer towers of width 128, 64 px images, 8 px patches);
#: ``base``: the paper's (ViT-B/16 image and text towers, a 6-layer fusion encoder, BERT's 30522-token vocabulary),
#: also what an empty config gives. Random init; ``pretrained`` keys or ``image_codebook`` bring weights.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": {"image_size": 64, "patch_size": 8, "hidden": 128, "layers": 2, "heads": 4, "mlp_ratio": 4.0,
                   "layer_norm_eps": 1e-12},
        "text": {"kind": "flava", "vocab_size": 30522, "hidden": 128, "layers": 2, "heads": 4, "max_positions": 64},
        "multimodal": {"hidden": 128, "layers": 2, "heads": 4},
        "projection_dim": 128,
    },
    "base": {
        "vision": {"image_size": 224, "patch_size": 16, "hidden": 768, "layers": 12, "heads": 12, "mlp_ratio": 4.0,
                   "layer_norm_eps": 1e-12},
        "text": {"kind": "flava", "vocab_size": 30522, "hidden": 768, "layers": 12, "heads": 12,
                 "max_positions": 512},
        "multimodal": {"hidden": 768, "layers": 6, "heads": 12},
        "projection_dim": 768,
    },
}


def default_objectives() -> dict[str, Objective]:
    """FLAVA's five objectives with the paper's settings."""
    from vlm.objectives.contrastive import GlobalContrastive
    from vlm.objectives.itm import ImageTextMatching
    from vlm.objectives.mim import MaskedImageModeling
    from vlm.objectives.mlm import MaskedLanguageModeling
    from vlm.objectives.mmm import MaskedMultimodalModeling

    return {
        "gc": GlobalContrastive(),
        "itm": ImageTextMatching(negatives="shuffle"),
        "mmm": MaskedMultimodalModeling(),
        "mim": MaskedImageModeling(),
        "mlm": MaskedLanguageModeling(),
    }


class MultimodalEncoder(nn.Module):
    """FLAVA's fusion encoder: its own CLS token + pre-norm blocks over [image tokens; text tokens] + final norm."""

    def __init__(self, hidden: int = 768, layers: int = 6, heads: int = 12, mlp_ratio: float = 4.0,
                 layer_norm_eps: float = 1e-12, qkv_bias: bool = True, dropout: float = 0.0,
                 attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden_size = hidden
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.encoder = PreNormStack(hidden, layers, heads, mlp_ratio, layer_norm_eps, qkv_bias, dropout, attn_dropout)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.encoder.grad_checkpointing = enable

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``tokens[B,S,D]``, ``attention_mask[B,S]`` (1 = real) -> ``[B,1+S,D]``, multimodal CLS first."""
        x = torch.cat([self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        out, _ = self.encoder(x, attention_bias(attention_mask, prefix=1))
        return out


def _plain_fields(value: Any) -> Any:
    """A tower config given as a dataclass (``VisionConfig``, ``TextConfig``) as its dict of fields."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


@dataclass
class FLAVAConfig:
    """Everything that shapes a :class:`FLAVACore`.

    Args:
        vision: image tower, ``VisionConfig`` fields (``image_size``, ``patch_size``, ``hidden``, ``layers``,
            ``heads``, ``mlp_ratio``, ``timm_name``, ``pretrained``, ...); missing keys take its defaults.
        text: text tower, ``TextConfig`` fields (``kind`` flava|hf, ``vocab_size``, ``hidden``, ``layers``,
            ``heads``, ``max_positions``, ``pretrained``, ``hf_config``, ...).
        multimodal: fusion encoder, ``MultimodalEncoder`` arguments (``hidden``, ``layers``, ``heads``,
            ``mlp_ratio``, ``layer_norm_eps``, ...).
        projection_dim: size of the contrastive embeddings.
        image_codebook: MIM/MMM image tokenizer: hub name or local dir of a ``FlavaImageCodebook``, a codebook config
            dict (random init), or None (pixel targets unless batches carry ``mim_labels``).
        codebook_size: image-vocabulary size of the heads when no codebook is loaded but batches carry mim_labels.
        fusion_input: what the fusion encoder reads from each tower: ``last_layer`` (the last block before the
            final norm, as FLAVA/HF) or ``final`` (the normed output).
    """

    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    multimodal: dict = field(default_factory=dict)
    projection_dim: int = 768
    image_codebook: str | dict | None = None
    codebook_size: int | None = None
    fusion_input: str = "last_layer"

    @classmethod
    def named(cls, size: str | None, overrides: Mapping[str, Any] | None = None) -> FLAVAConfig:
        """The config of a named size (``SIZES``; None: the defaults) with ``overrides`` laid over it (tower
        dicts merge key by key)."""
        overrides = {k: _plain_fields(v) for k, v in (overrides or {}).items()}
        base = sized_fields("FLAVA", SIZES, (f.name for f in dataclasses.fields(cls)), size, overrides)
        cfg = cls(**base)
        if cfg.fusion_input not in FUSION_INPUTS:
            raise VLMConfigError(f"fusion_input={cfg.fusion_input!r}: use one of {FUSION_INPUTS}.")
        return cfg


class FLAVACore(nn.Module):
    """FLAVA's towers, projections and image tokenizer, with the passes the objectives are built from.

    ``eager=True`` on a helper calls a tower's uncompiled ``_call_impl`` (what ``nn.Module.compile`` wraps): the
    same weights and results with nothing to compile, for evaluation when the towers are compiled for training.
    """

    def __init__(self, cfg: FLAVAConfig | None = None, image_codebook: Any = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else FLAVAConfig()
        if cfg.fusion_input not in FUSION_INPUTS:
            raise VLMConfigError(f"fusion_input={cfg.fusion_input!r}: use one of {FUSION_INPUTS}.")
        self.cfg = cfg
        mm_params = inspect.signature(MultimodalEncoder).parameters
        unknown = sorted(set(cfg.multimodal or {}) - set(mm_params))
        if unknown:
            raise VLMConfigError(f"Unknown key(s) {unknown} in the multimodal config; known keys: {sorted(mm_params)}.")
        mcfg = dict(hidden=768, layers=6, heads=12, mlp_ratio=4.0, layer_norm_eps=1e-12)
        mcfg.update(coerce_numbers(dict(cfg.multimodal or {}), {k: p.annotation for k, p in mm_params.items()},
                                   "multimodal"))

        # built in this order so that one seed gives the weights FLAVA had before the core existed
        self.image_encoder = build_vit(VisionConfig.from_any(dict(_plain_fields(cfg.vision) or {})))
        self.text_encoder = build_text_encoder(TextConfig.from_any(dict(_plain_fields(cfg.text) or {})))
        self.multimodal_encoder = MultimodalEncoder(**mcfg)
        image_hidden, text_hidden = self.image_encoder.hidden_size, self.text_encoder.hidden_size
        mm_hidden = self.multimodal_encoder.hidden_size
        self.image_to_mm_projection = nn.Linear(image_hidden, mm_hidden)
        self.text_to_mm_projection = nn.Linear(text_hidden, mm_hidden)
        self.image_projection = nn.Linear(image_hidden, int(cfg.projection_dim))
        self.text_projection = nn.Linear(text_hidden, int(cfg.projection_dim))
        for lin in (self.image_to_mm_projection, self.text_to_mm_projection, self.image_projection,
                    self.text_projection):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.image_codebook = build_codebook(image_codebook if image_codebook is not None else cfg.image_codebook)

        codebook = self.image_codebook.vocab_size if self.image_codebook is not None else cfg.codebook_size
        p = self.image_encoder.patch_size
        #: sizes the objectives' heads are built from
        self.dims: dict[str, Any] = {
            "text_hidden": text_hidden,
            "image_hidden": image_hidden,
            "multimodal_hidden": mm_hidden,
            "vocab_size": self.text_encoder.vocab_size,
            "codebook_size": int(codebook) if codebook else None,
            "patch_dim": p * p * int(self.image_encoder.vit.patch_embed.proj.in_channels),
            "layer_norm_eps": float(mcfg["layer_norm_eps"]),
            "hidden_act": "gelu",
        }

    def towers(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(image, text, multimodal) encoders: the units that compile and checkpoint activations."""
        return self.image_encoder, self.text_encoder, self.multimodal_encoder

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every tower's blocks in the backward pass instead of storing their activations."""
        for tower in self.towers():
            tower.set_grad_checkpointing(enable)

    @staticmethod
    def _call(tower: nn.Module, eager: bool):
        return tower._call_impl if eager else tower

    # ------------------------------------------------------------------ unimodal passes
    def image_pass(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None,
                   eager: bool = False) -> tuple[Tensor, Tensor]:
        """(output ``[B,1+N,D]`` after the final norm, CLS first; last block's output before it); masked patches
        (``bool_masked_pos[B,N]``, True = masked) replaced by the mask token."""
        return self._call(self.image_encoder, eager)(pixel_values, bool_masked_pos, return_pre_norm=True)

    def text_pass(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                  token_type_ids: Tensor | None = None, eager: bool = False) -> tuple[Tensor, Tensor]:
        """(output ``[B,L,D]`` after the final norm; last block's output before it)."""
        return self._call(self.text_encoder, eager)(input_ids, attention_mask, token_type_ids, return_pre_norm=True)

    def fusion_state(self, output: Tensor, pre_norm: Tensor) -> Tensor:
        """What the fusion encoder reads of a tower pass (``fusion_input``)."""
        return pre_norm if self.cfg.fusion_input == "last_layer" else output

    # ------------------------------------------------------------------ fusion
    def fuse(self, image_state: Tensor, text_state: Tensor, text_attention_mask: Tensor | None = None,
             eager: bool = False) -> Tensor:
        """Multimodal hidden ``[B,1+Ni+L,D]`` (multimodal CLS, image tokens, text tokens) of the towers' states."""
        tokens = torch.cat([self.image_to_mm_projection(image_state), self.text_to_mm_projection(text_state)], dim=1)
        mask = None
        if text_attention_mask is not None:
            mask = torch.cat([text_attention_mask.new_ones(image_state.shape[:2]), text_attention_mask], dim=1)
        return self._call(self.multimodal_encoder, eager)(tokens, mask)

    @staticmethod
    def split_multimodal(hidden: Tensor, num_image_tokens: int) -> tuple[Tensor, Tensor]:
        """(image part ``[B,Ni,D]`` with the image CLS first, text part ``[B,L,D]``) of a fused output."""
        return hidden[:, 1:1 + num_image_tokens], hidden[:, 1 + num_image_tokens:]

    # ------------------------------------------------------------------ contrastive
    def image_embedding(self, image_hidden: Tensor) -> Tensor:
        """L2-normalised contrastive embedding from the image encoder's CLS."""
        return F.normalize(self.image_projection(image_hidden[:, 0]), dim=-1)

    def text_embedding(self, text_hidden: Tensor) -> Tensor:
        """L2-normalised contrastive embedding from the text encoder's first ([CLS]) token."""
        return F.normalize(self.text_projection(text_hidden[:, 0]), dim=-1)

    def encode_image(self, pixel_values: Tensor, eager: bool = False) -> Tensor:
        """Contrastive image embeddings ``[B,E]``."""
        return self.image_embedding(self._call(self.image_encoder, eager)(pixel_values))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, eager: bool = False) -> Tensor:
        """Contrastive text embeddings ``[B,E]``."""
        return self.text_embedding(self._call(self.text_encoder, eager)(input_ids, attention_mask))

    def forward(self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None) -> dict[str, Tensor]:
        """Unmasked passes of whatever is given: ``image_hidden``/``image_embedding`` for images,
        ``text_hidden``/``text_embedding`` for text and, with both, ``multimodal_hidden`` (as transformers'
        ``FlavaModel``: ``image_embeddings``, ``text_embeddings``, ``multimodal_embeddings``)."""
        out: dict[str, Tensor] = {}
        if pixel_values is not None:
            image, image_pre = self.image_pass(pixel_values)
            out.update(image_hidden=image, image_embedding=self.image_embedding(image))
        if input_ids is not None:
            text, text_pre = self.text_pass(input_ids, attention_mask, token_type_ids)
            out.update(text_hidden=text, text_embedding=self.text_embedding(text))
        if pixel_values is not None and input_ids is not None:
            out["multimodal_hidden"] = self.fuse(self.fusion_state(image, image_pre),
                                                 self.fusion_state(text, text_pre), attention_mask)
        return out


def _core_property(name: str) -> property:
    return property(lambda self: getattr(self.core, name), doc=f"``core.{name}``")


def _legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Checkpoints written before the core existed hold its parts at the top level: move them under ``core.``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        top = key[len(prefix):].split(".", 1)[0]
        if top in CORE_PARTS:
            state_dict[f"{prefix}core.{key[len(prefix):]}"] = state_dict.pop(key)


class FLAVA(VLMModule):
    """FLAVA as a LightningModule: a :class:`FLAVACore` + masking; losses come from the configured objectives.

    Args:
        size: a named size of ``SIZES`` ('tiny', 'base') or null (the defaults, which are 'base'); the
            architecture arguments below override it.
        vision, text, multimodal, projection_dim, image_codebook, codebook_size, fusion_input:
            :class:`FLAVAConfig` fields (tower dicts merge key by key over the size's).
        config: further :class:`FLAVAConfig` fields (a dict or a ``FLAVAConfig``), under the arguments above.
        pretrained_text: hub name or local dir of a Hugging Face encoder to start the text tower from (sets
            ``text.kind: hf`` and ``text.pretrained``).
        pretrained_image: checkpoint file/dir or timm/hub name to start the image tower from (``vision.pretrained``).
        image_codebook: also a ``FlavaImageCodebook`` object (kept out of the hyperparameters).
        objectives: named objectives (default: FLAVA's gc, itm, mmm, mim, mlm).
        streams: objectives and weights per data stream (default: pairs -> gc+itm+mmm, images -> mim, text -> mlm).
        mask_token_id: id of [MASK] in the tokenizer (text masking on the fly).
        special_token_ids: ids that are never masked ([PAD], [CLS], [SEP], ...).
        text_mask_prob: share of text tokens picked for MLM/MMM.
        image_mask_ratio: share of patches masked by block masking (MIM/MMM).
        image_mask_min_patches: smallest block of the block masking.
        contrastive_from_masked: compute GC embeddings from the masked passes (saves the two unmasked tower
            passes when GC shares a step with ITM/MMM; FLAVA uses unmasked passes).
        tokenizer_vocab_size: the tokenizer's size, checked against the text tower (one clear error if they differ).
        activation_checkpointing: recompute tower blocks in backward (memory for compute).
        zeroshot_class_names: class names for zero-shot classification of held-out batches with ``class_index``.
        zeroshot_templates: prompt templates with ``{}`` for the class name.
        tokenizer: hub name or local dir of the tokenizer that encodes zero-shot prompts (checked against the
            text tower at construction).
        **kwargs: the optimiser and run settings of :class:`~vlm.models.base.VLMModule` (``lr``,
            ``weight_decay``, ``betas``, ``warmup_steps``, ``lr_schedule``, ``min_lr_ratio``, ``seed``,
            ``max_nonfinite_steps``, and ``compile``: ``true``/``"towers"`` compiles the three towers for
            training steps (evaluation runs them eagerly, see ``_eager``), ``"step"`` the whole loss
            computation of a training step; ``compile_options``: ``torch.compile`` arguments for either scope).

    Held-out batches are scored by ``evaluators()`` beside the losses: retrieval R@1/5/10 of batches with
    ``pair_id`` (``val/retrieval/t2i_R@1``, ...) and zero-shot top-1 of batches with ``class_index``
    (``val/zeroshot/top1``), over every rank's rows.
    """

    def __init__(
        self,
        size: str | None = "base",
        vision: dict | None = None,
        text: dict | None = None,
        multimodal: dict | None = None,
        projection_dim: int | None = None,
        image_codebook: Any = None,
        codebook_size: int | None = None,
        fusion_input: str | None = None,
        config: dict | None = None,
        objectives: Mapping[str, Objective] | None = None,
        streams: Mapping[str, Mapping[str, float]] | None = None,
        pretrained_text: str | None = None,
        pretrained_image: str | None = None,
        mask_token_id: int = 103,
        special_token_ids: Sequence[int] = BERT_SPECIAL_IDS,
        text_mask_prob: float = 0.15,
        image_mask_ratio: float = 0.4,
        image_mask_min_patches: int = 16,
        contrastive_from_masked: bool = False,
        tokenizer_vocab_size: int | None = None,
        activation_checkpointing: bool = False,
        zeroshot_class_names: Sequence[str] | None = None,
        zeroshot_templates: Sequence[str] | None = None,
        tokenizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            objectives=default_objectives() if objectives is None else objectives,
            streams=DEFAULT_STREAMS if streams is None else streams,
            **kwargs,
        )
        # objectives stay in hparams when they are config (LightningCLI), so a checkpoint rebuilds their heads;
        # objects (built in Python) are left out, so checkpoints load with torch.load(weights_only=True)
        codebook_object = not isinstance(image_codebook, (str, dict, type(None)))
        self.save_hyperparameters(ignore=["image_codebook"] if codebook_object else [])
        keep_plain_hparams(self)

        overrides = dict(_plain_fields(config) or {})
        for k, v in (("vision", vision), ("text", text), ("multimodal", multimodal),
                     ("projection_dim", projection_dim), ("codebook_size", codebook_size),
                     ("fusion_input", fusion_input), ("image_codebook", None if codebook_object else image_codebook)):
            if v is not None:
                overrides[k] = v
        if pretrained_image is not None:
            overrides["vision"] = {**(_plain_fields(overrides.get("vision")) or {}), "pretrained": pretrained_image}
        if pretrained_text is not None:
            overrides["text"] = {**(_plain_fields(overrides.get("text")) or {}), "kind": "hf",
                                 "pretrained": pretrained_text}
        self.config = FLAVAConfig.named(size, overrides)
        self.core = FLAVACore(self.config, image_codebook=image_codebook if codebook_object else None)
        if tokenizer_vocab_size is not None:
            check_vocab(self.core.text_encoder, tokenizer_vocab_size)
        self.register_load_state_dict_pre_hook(_legacy_keys)
        self.dims = dict(self.core.dims)

        self.mask_token_id = int(mask_token_id)
        self.special_token_ids = tuple(int(i) for i in special_token_ids)
        self.text_mask_prob, self.image_mask_ratio = float(text_mask_prob), float(image_mask_ratio)
        self.image_mask_min_patches = int(image_mask_min_patches)
        self.contrastive_from_masked = bool(contrastive_from_masked)
        self._vocab_checked = False
        # image tokens of the latest fusion, for ``split_multimodal`` (the objectives' capability takes the
        # fused output only)
        self._mm_image_tokens = 1 + self.core.image_encoder.num_patches

        self.tokenizer_source = tokenizer
        self._tokenizer = None
        if tokenizer is not None:  # a vocabulary that doesn't match the text tower fails here, not mid-run
            from vlm.data.tokenizers import load_tokenizer

            # "minilm" (FLAVA's uncased WordPiece, shipped offline), a local dir or a hub name
            self._tokenizer = load_tokenizer(tokenizer)
            check_vocab(self.core.text_encoder, self._tokenizer)
        # what zero-shot classification scores (also read by checks of evaluation streams' class lists)
        self.zeroshot_class_names = list(zeroshot_class_names) if zeroshot_class_names else None
        self.zeroshot_templates = list(zeroshot_templates) if zeroshot_templates else ["a photo of a {}."]
        self._evaluators: list = [RetrievalEvaluator()]
        if self.zeroshot_class_names:
            if self._tokenizer is None:
                raise VLMConfigError(
                    "Zero-shot classification needs the model's `tokenizer` (hub name or local dir) to encode "
                    "the class prompts; set model.init_args.tokenizer or drop zeroshot_class_names."
                )
            self._evaluators.append(ZeroShotEvaluator(self.zeroshot_class_names, self.zeroshot_templates,
                                                      self._tokenizer))

        if activation_checkpointing:
            self.core.set_grad_checkpointing(True)
        if self.compile_scope == "towers":
            for tower in self.core.towers():
                tower.compile(**self.compile_options)  # in place: parameter names (and checkpoints) stay unchanged
                # (training steps only: see ``_eager``)
        self.attach_objectives()

    # the core's parts under their old names (``model.image_encoder`` ...), read-only
    image_encoder = _core_property("image_encoder")
    text_encoder = _core_property("text_encoder")
    multimodal_encoder = _core_property("multimodal_encoder")
    image_to_mm_projection = _core_property("image_to_mm_projection")
    text_to_mm_projection = _core_property("text_to_mm_projection")
    image_projection = _core_property("image_projection")
    text_projection = _core_property("text_projection")
    image_codebook = _core_property("image_codebook")

    @property
    def fusion_input(self) -> str:
        return self.config.fusion_input

    def evaluators(self) -> list:
        """Retrieval over held-out pairs, and zero-shot classification when class names are configured."""
        return self._evaluators

    # ============================================================== helpers
    @staticmethod
    def _field(batch: Mapping[str, Any], name: str, what: str) -> Any:
        if batch.get(name) is None:
            raise MissingBatchField(
                f"FLAVA needs batch field '{name}' for {what}, but the batch carries {sorted(batch)}. "
                f"Give stream '{batch.get('stream')}' a dataset/collate that yields it, or remove the objective."
            )
        return batch[name]

    def check_inputs(self, streams: Mapping[str, Any]) -> None:
        """Before training: every stream's transform fits the towers (patch grid, position table, vocabulary)."""
        patch, vocab = self.image_encoder.patch_size, self.text_encoder.vocab_size
        positions = getattr(self.text_encoder, "max_positions", None)
        for key, stream in streams.items():
            transform = getattr(stream, "transform", None)
            if transform is None:
                continue
            where = f"data.init_args.{key}.init_args.transform.init_args"
            size = getattr(getattr(transform, "image", None), "image_size", None)
            if size is not None and int(size) % patch:
                raise VLMConfigError(
                    f"{where}.image_size={size} is not a multiple of the image tower's patch size {patch}: the "
                    f"images would not split into whole patches. Use a multiple of {patch} (the model's "
                    f"vision.image_size is {self.image_encoder.grid_size[0] * patch})."
                )
            length = getattr(transform, "max_length", None)
            if length is not None and positions is not None and int(length) > int(positions):
                raise VLMConfigError(
                    f"{where}.max_length={length} is longer than the text tower's {positions} positions "
                    f"(model.init_args.text.max_positions). Lower max_length to {positions} or less, or raise "
                    "text.max_positions."
                )
            if getattr(transform, "tokenizer_source", None) is not None:
                size = len(transform.tokenizer)
                if size > vocab:
                    raise VLMConfigError(
                        f"{where}.tokenizer={transform.tokenizer_source!r} has {size} tokens (special tokens "
                        f"included) but the text tower's embedding table has {vocab} rows: ids beyond it would "
                        f"fail mid-run. Set model.init_args.text.vocab_size: {size}, or use the model's tokenizer."
                    )

    def _check_vocab_once(self, input_ids: Tensor) -> None:
        # One host sync on the first batch only: an id beyond the table would be an opaque CUDA assert later.
        if self._vocab_checked:
            return
        self._vocab_checked = True
        top = int(input_ids.max()) if input_ids.numel() else 0
        if top >= self.text_encoder.vocab_size:
            check_vocab(self.text_encoder, top + 1)

    def prepare_step(self, batch: Mapping[str, Any], cache: StepCache, active) -> None:
        """Eager part of a step: the one-time vocabulary check, then the objectives' masks and negatives."""
        if isinstance(batch.get("input_ids"), Tensor):
            self._check_vocab_once(batch["input_ids"])
        super().prepare_step(batch, cache, active)

    def _compiled_towers_now(self) -> bool:
        # grad mode and train mode checked again: encode_image/encode_text run outside compute_losses
        return (self.compile_scope == "towers" and self._compile_this_step and self.training
                and torch.is_grad_enabled())

    def _eager(self) -> bool:
        """Whether the towers run eagerly now: always, except in training steps under ``compile: towers``.

        Every distinct call signature of a compiled tower is one more compilation (grad mode, ``None`` or a
        mask tensor, ``return_pre_norm``, new shapes each guard the graph): sanity validation, the unmasked and
        masked passes, ``encode_text`` on zero-shot prompts and a partial last validation batch once compiled
        the towers 16 times in a short fit (8 before the first optimizer step on an H200). So the compiled
        towers serve training steps only (``VLMModule.compiles``: grad on, train mode, the stream's batch
        size), always with one signature per tower (``_image_pass`` hands an all-False mask to unmasked
        passes: ``torch.where`` keeps every embedding exactly; ``return_pre_norm`` always), and evaluation and
        inference (validation, ``encode_image``/``encode_text``, prompts) run the same modules' uncompiled
        ``_call_impl`` (``FLAVACore``'s ``eager``): the same weights and results, nothing to compile.
        """
        return self.compile_scope == "towers" and not self._compiled_towers_now()

    # ============================================================== masking
    def text_masking(self, batch: Mapping[str, Any], cache: StepCache) -> tuple[Tensor, Tensor]:
        """(input_ids_masked, mlm_labels): the batch's own if given, else BERT masking seeded by the step."""
        def compute():
            ids = self._field(batch, "input_ids", "text masking")
            if batch.get("input_ids_masked") is not None:
                masked = batch["input_ids_masked"]
                labels = batch.get("mlm_labels")
                if labels is None:
                    labels = torch.where(masked != ids, ids, torch.full_like(ids, -100))
                return masked, labels
            from vlm.modules.masking import mask_tokens

            masked, labels = mask_tokens(
                ids, mask_token_id=self.mask_token_id, vocab_size=self.text_encoder.vocab_size,
                special_ids=self.special_token_ids, prob=self.text_mask_prob,
                attention_mask=batch.get("attention_mask"), generator=generator_of(self, cache),
            )
            return masked.to(ids.device), labels.to(ids.device)

        return cache.get_or("text_masking", compute)

    def image_masking(self, batch: Mapping[str, Any], cache: StepCache) -> Tensor:
        """bool[B,N] masked patches: the batch's ``bool_masked_pos`` if given, else block masking."""
        def compute():
            pixels = self._field(batch, "pixel_values", "image masking")
            if batch.get("bool_masked_pos") is not None:
                return batch["bool_masked_pos"].reshape(pixels.shape[0], -1).to(torch.bool)
            from vlm.modules.masking import block_mask

            p = self.image_encoder.patch_size
            grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
            mask = block_mask(
                pixels.shape[0], grid, ratio=self.image_mask_ratio,
                min_patches=min(self.image_mask_min_patches, max(1, grid[0] * grid[1] // 4)),
                generator=generator_of(self, cache),
            )
            return mask.to(pixels.device)

        return cache.get_or("image_masking", compute)

    # ============================================================== unimodal towers
    def _image_pass(self, batch, cache, masked: bool) -> tuple[Tensor, Tensor]:
        def compute():
            pixels = self._field(batch, "pixel_values", "the image encoder")
            mask = self.image_masking(batch, cache) if masked else None
            if mask is None and self._compiled_towers_now():  # one signature for the compiled tower (see _eager)
                p = self.image_encoder.patch_size
                mask = torch.zeros(pixels.shape[0], (pixels.shape[-2] // p) * (pixels.shape[-1] // p),
                                   dtype=torch.bool, device=pixels.device)
            return self.core.image_pass(pixels, mask, eager=self._eager())

        return cache.get_or(("image_pass", bool(masked)), compute)

    def _text_pass(self, batch, cache, masked: bool) -> tuple[Tensor, Tensor]:
        def compute():
            ids = self.text_masking(batch, cache)[0] if masked else self._field(batch, "input_ids", "the text encoder")
            self._check_vocab_once(ids)
            return self.core.text_pass(ids, batch.get("attention_mask"), batch.get("token_type_ids"),
                                       eager=self._eager())

        return cache.get_or(("text_pass", bool(masked)), compute)

    def image_hidden(self, batch: Mapping[str, Any], cache: StepCache, masked: bool = False) -> Tensor:
        """Image encoder output ``[B,1+N,D]`` (CLS first), on masked patches if ``masked``."""
        return self._image_pass(batch, cache, masked)[0]

    def text_hidden(self, batch: Mapping[str, Any], cache: StepCache, masked: bool = False) -> Tensor:
        """Text encoder output ``[B,L,D]``, on the masked ids if ``masked``."""
        return self._text_pass(batch, cache, masked)[0]

    def image_targets(self, batch: Mapping[str, Any], cache: StepCache) -> Tensor | None:
        """Codebook ids ``[B,N]``: the batch's ``mim_labels``, else the image tokenizer's, else None."""
        def compute():
            if batch.get("mim_labels") is not None:
                return batch["mim_labels"].reshape(batch["mim_labels"].shape[0], -1)
            if self.image_codebook is None:
                return None
            if batch.get("codebook_pixel_values") is not None:
                return self.image_codebook.encode_codebook_pixels(batch["codebook_pixel_values"])
            pixels = self._field(batch, "pixel_values", "image tokenizer targets")
            p = self.image_encoder.patch_size
            return self.image_codebook(pixels, (pixels.shape[-2] // p, pixels.shape[-1] // p))

        return cache.get_or("image_targets", compute)

    def patch_pixels(self, batch: Mapping[str, Any], cache: StepCache) -> Tensor:
        """Per-patch pixels ``[B,N,P*P*C]`` (MAE-style targets)."""
        return cache.get_or("patch_pixels", lambda: patchify(
            self._field(batch, "pixel_values", "pixel targets"), self.image_encoder.patch_size))

    # ============================================================== fusion
    def _fuse(self, image_state: Tensor, text_state: Tensor, text_attention_mask: Tensor | None) -> Tensor:
        self._mm_image_tokens = int(image_state.shape[1])
        return self.core.fuse(image_state, text_state, text_attention_mask, eager=self._eager())

    def _fusion_inputs(self, batch, cache, masked: bool) -> tuple[Tensor, Tensor]:
        """What FLAVA fuses: each tower's last layer before its final norm (``last_layer``) or its output."""
        return (self.core.fusion_state(*self._image_pass(batch, cache, masked)),
                self.core.fusion_state(*self._text_pass(batch, cache, masked)))

    def fuse(self, batch: Mapping[str, Any], cache: StepCache, image_index: Tensor, text_index: Tensor,
             masked: bool = True) -> Tensor:
        """Multimodal hidden ``[K,1+Ni+L,D]`` of (image row i, text row j) pairings of this batch, e.g. ITM negatives.

        The tower passes of the step are reused: only the fusion encoder runs on the new pairings.
        """
        image_state, text_state = self._fusion_inputs(batch, cache, masked)
        mask = batch.get("attention_mask")
        return self._fuse(image_state[image_index], text_state[text_index],
                          None if mask is None else mask.to(text_state.device)[text_index])

    def multimodal_hidden(self, batch: Mapping[str, Any], cache: StepCache, masked: bool = True) -> Tensor:
        """Fused output ``[B,1+Ni+L,D]`` of the batch's pairs (multimodal CLS, image tokens, text tokens)."""
        def compute():
            return self._fuse(*self._fusion_inputs(batch, cache, masked), batch.get("attention_mask"))

        return cache.get_or(("multimodal_hidden", bool(masked)), compute)

    def split_multimodal(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(image part ``[B,1+N,D]`` with the image CLS first, text part ``[B,L,D]``) of a fused output."""
        return self.core.split_multimodal(hidden, self._mm_image_tokens)

    def positive_rows(self, batch: Mapping[str, Any], cache: StepCache) -> Tensor:
        """bool[B]: rows whose image and text match (``itm_labels != 0``; all rows if none or no labels)."""
        def compute():
            labels = batch.get("itm_labels")
            if labels is None:
                size = self.batch_size_of(batch)
                device = batch["pixel_values"].device if "pixel_values" in batch else None
                return torch.ones(size, dtype=torch.bool, device=device)
            pos = labels.reshape(-1).ne(0)
            return pos | ~pos.any()  # as HF FLAVA: a batch without any match keeps every row

        return cache.get_or("positive_rows", compute)

    # ============================================================== contrastive
    def image_embedding(self, image_hidden: Tensor) -> Tensor:
        """L2-normalised contrastive embedding from the image encoder's CLS."""
        return self.core.image_embedding(image_hidden)

    def text_embedding(self, text_hidden: Tensor) -> Tensor:
        """L2-normalised contrastive embedding from the text encoder's first ([CLS]) token."""
        return self.core.text_embedding(text_hidden)

    def contrastive_embeddings(self, batch: Mapping[str, Any], cache: StepCache) -> tuple[Tensor, Tensor]:
        """(image_emb, text_emb) ``[B,E]``, L2-normalised, from the unmasked passes (see ``contrastive_from_masked``)."""
        def compute():
            masked = self.contrastive_from_masked
            return (self.image_embedding(self.image_hidden(batch, cache, masked=masked)),
                    self.text_embedding(self.text_hidden(batch, cache, masked=masked)))

        return cache.get_or("contrastive_embeddings", compute)

    def negative_text_embeddings(self, batch: Mapping[str, Any], cache: StepCache) -> Tensor:
        """Contrastive embeddings ``[B,K,E]`` (L2-normalised) of the batch's hard-negative captions.

        One unmasked text-tower pass over ``negative_input_ids`` ``[B,K,L]`` (NegCLIP-style negatives, see
        ``ImageTextTransform(hard_negatives=K)``); GC scores them as extra text candidates.
        """
        def compute():
            ids = self._field(batch, "negative_input_ids", "hard-negative captions")
            mask = batch.get("negative_attention_mask")
            b, k = ids.shape[:2]
            out = self.core.text_pass(ids.reshape(b * k, -1), None if mask is None else mask.reshape(b * k, -1),
                                      eager=self._eager())[0]
            return self.text_embedding(out).reshape(b, k, -1)

        return cache.get_or("negative_text_embeddings", compute)

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Contrastive image embeddings ``[B,E]`` (inference)."""
        return self.core.encode_image(pixel_values, eager=self._eager())

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Contrastive text embeddings ``[B,E]`` (inference)."""
        return self.core.encode_text(input_ids, attention_mask, eager=self._eager())

    # ============================================================== throughput
    def flops_per_sample(self, batch: Mapping[str, Any]) -> float | None:
        """Training FLOPs per sample of ``batch`` (``flava_flops_per_sample``) over the tower passes its stream's
        active objectives run, each (tower, masked) pass once as the step cache shares them: pairs with
        GC + ITM + MMM -> image 2, text 2, multimodal 1 + ITM's fused negatives per row; images with MIM -> image 1;
        text with MLM -> text 1. Hard ITM's no-grad embedding passes count as training passes. None when an
        objective needs none of the capabilities counted here.
        """
        image, text, fused, negatives = set(), set(), set(), 0.0
        size = self.batch_size_of(batch)
        for _, obj, _ in self.active_objectives(batch.get("stream")):
            caps = set(obj.requires_capabilities)
            if not caps & {"contrastive_embeddings", "multimodal_hidden", "image_hidden", "text_hidden"}:
                return None
            if "contrastive_embeddings" in caps:
                image.add(self.contrastive_from_masked)
                text.add(self.contrastive_from_masked)
            if "multimodal_hidden" in caps:
                masked = bool(getattr(obj, "use_masked", True))
                image.add(masked)
                text.add(masked)
                fused.add(masked)
                if "fuse" in caps and callable(getattr(obj, "num_negatives", None)) and size:
                    negatives += obj.num_negatives(size) / size
            if "image_hidden" in caps:
                image.add(True)
            if "text_hidden" in caps:
                text.add(True)
        ids, pixels = batch.get("input_ids"), batch.get("pixel_values")
        passes = {"image": len(image), "text": len(text), "multimodal": len(fused) + negatives}
        return flava_flops_per_sample(self, int(ids.shape[1]) if isinstance(ids, Tensor) else 0,
                                      int(pixels.shape[-1]) if isinstance(pixels, Tensor) else None, passes)


def flava_flops_per_sample(model: FLAVA | FLAVACore, text_len: int, image_size: int | None = None,
                           passes: Mapping[str, int] | None = None) -> float:
    """Analytic training FLOPs per sample (forward + backward = 3x forward) of the tower passes in ``passes``.

    Per transformer layer on ``n`` tokens of width ``d`` and MLP ``m``: matmuls ``2n(4d^2 + 2dm)`` and attention
    ``4n^2 d`` (scores and weighted sum). ``passes`` counts passes per tower (default: GC+ITM+MMM, i.e. image 2,
    text 2, multimodal 1). Heads and embeddings are left out (small next to the towers).
    """
    passes = dict(passes or {"image": 2, "text": 2, "multimodal": 1})
    vit = model.image_encoder.vit
    img = image_size or int(vit.patch_embed.img_size[0])
    n_img = 1 + (img // model.image_encoder.patch_size) ** 2

    def tower(n: int, d: int, m: int, layers: int) -> float:
        return layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)

    def stack_dims(blocks) -> tuple[int, int, int]:
        b = blocks[0]
        return len(blocks), b.mlp.fc1.in_features, b.mlp.fc1.out_features

    li, di, mi = stack_dims(vit.blocks)
    image = tower(n_img, di, mi, li) + 2 * n_img * di * 3 * model.image_encoder.patch_size ** 2
    te = model.text_encoder
    if hasattr(te, "encoder") and isinstance(te.encoder, PreNormStack):
        lt, dt, mt = stack_dims(te.encoder.blocks)
    else:
        c = te.config
        lt, dt, mt = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    text = tower(text_len, dt, mt, lt)
    lm, dm, mm = stack_dims(model.multimodal_encoder.encoder.blocks)
    n_mm = 1 + n_img + text_len
    multi = tower(n_mm, dm, mm, lm) + 2 * (n_img * di + text_len * dt) * dm
    fwd = passes.get("image", 0) * image + passes.get("text", 0) * text + passes.get("multimodal", 0) * multi
    return 3.0 * fwd


__all__ = ["FLAVA", "FLAVAConfig", "FLAVACore", "MultimodalEncoder", "SIZES", "DEFAULT_STREAMS", "default_objectives",
           "flava_flops_per_sample"]
