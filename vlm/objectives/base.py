"""The small interface every objective shares.

An objective is an ``nn.Module`` (it may own a head). It states which batch fields and which model
capabilities it needs; the model's step calls it with ``(model, batch, cache)`` and it returns its loss
plus metrics worth logging. Capabilities are plain methods on the model (see ``CAPABILITIES``); the
``StepCache`` makes sure two objectives asking for the same thing in one step share one computation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlm.errors import MissingBatchField, MissingCapability

# What a model may expose to objectives. Every method takes ``(batch, cache, ...)`` and memoises its
# result in ``cache`` so that objectives sharing an input cost one forward pass.
CAPABILITIES: dict[str, str] = {
    # --- masking (shared by MLM/MIM/MMM/ITM so they see the same masks in one step)
    "text_masking": "(batch, cache) -> (input_ids_masked LongTensor[B,L], mlm_labels LongTensor[B,L], -100 = no target)",
    "image_masking": "(batch, cache) -> bool_masked_pos BoolTensor[B,N] over image patches (True = masked)",
    # --- unimodal encoders
    "text_hidden": "(batch, cache, masked: bool) -> FloatTensor[B,L,D] text encoder output",
    "image_hidden": "(batch, cache, masked: bool) -> FloatTensor[B,1+N,D] image encoder output, CLS first",
    "image_targets": "(batch, cache) -> LongTensor[B,N] codebook ids, or None when the model has no image tokenizer",
    "patch_pixels": "(batch, cache) -> FloatTensor[B,N,P*P*C] per-patch pixels (MAE-style targets)",
    # --- multimodal fusion
    "multimodal_hidden": "(batch, cache, masked: bool) -> FloatTensor[B,1+Ni+Lt,D] fused output, multimodal CLS first",
    "split_multimodal": "(hidden) -> (image part FloatTensor[B,Ni,D], text part FloatTensor[B,Lt,D])",
    "fuse": "(batch, cache, image_index LongTensor[K], text_index LongTensor[K], masked: bool) -> multimodal hidden "
            "[K,1+Ni+Lt,D] of image row i paired with text row j of this batch (ITM negatives); the model picks "
            "its own fusion inputs and reuses the step's tower passes",
    "positive_rows": "(batch, cache) -> BoolTensor[B]: rows whose image and text match (GC/MMM train on these only)",
    # --- contrastive alignment
    "contrastive_embeddings": "(batch, cache) -> (image_emb FloatTensor[B,E], text_emb FloatTensor[B,E]), L2-normalised",
    "negative_text_embeddings": "(batch, cache) -> FloatTensor[B,K,E], L2-normalised embeddings of the batch's "
                                "hard-negative captions (negative_input_ids [B,K,L]); GC uses it only when that "
                                "field is present",
    # --- language modelling (Flamingo, PaLI)
    "lm_logits": "(batch, cache) -> (logits FloatTensor[B,T,V], labels LongTensor[B,T] aligned with logits, -100 = ignore)",
}


@dataclass
class ObjectiveOutput:
    """What an objective returns: the (unweighted) loss and scalar metrics worth logging."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class StepCache(dict):
    """Per-step memo shared by all objectives of one batch."""

    def get_or(self, key: Any, compute: Callable[[], Any]) -> Any:
        """Return ``self[key]``, computing and storing it on first use."""
        if key not in self:
            self[key] = compute()
        return self[key]


class Objective(nn.Module):
    """Base class of all objectives. Subclasses set ``name``, ``requires_fields``, ``requires_capabilities``."""

    name: ClassVar[str] = "objective"
    #: batch keys that must be present (alternatives are written ``"a|b"``: one of them must be present)
    requires_fields: ClassVar[tuple[str, ...]] = ()
    #: model methods (see ``CAPABILITIES``) this objective calls
    requires_capabilities: ClassVar[tuple[str, ...]] = ()

    def build(self, model: nn.Module) -> None:
        """Create heads sized from the model (``model.dims`` etc.). Called once by the model's constructor."""

    def prepare(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> None:
        """Host-side work of the step, run before ``forward``: draw masks and negatives (CPU generators, NumPy)
        through the model's memoised capabilities so that ``forward`` is pure tensor work, which
        ``torch.compile`` can take whole. Default: nothing."""

    def forward(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> ObjectiveOutput:
        raise NotImplementedError

    # ------------------------------------------------------------------ checks
    def missing_capabilities(self, model: nn.Module) -> list[str]:
        return [c for c in self.requires_capabilities if not callable(getattr(model, c, None))]

    def missing_fields(self, fields: set[str] | Mapping[str, Any]) -> list[str]:
        present = set(fields)
        return [f for f in self.requires_fields if not any(alt in present for alt in f.split("|"))]

    def check_model(self, model: nn.Module, stream: str, key: str | None = None) -> None:
        """Raise one clear error if ``model`` lacks a capability this objective needs."""
        miss = self.missing_capabilities(model)
        if miss:
            raise MissingCapability(
                f"Objective '{key or self.name}' ({type(self).__name__}) on stream '{stream}' needs model "
                f"capabilities {miss}, which {type(model).__name__} does not provide. Remove the objective "
                f"from stream '{stream}' in the model config, or use a model that provides them."
            )

    def check_batch(self, batch: Mapping[str, Any], stream: str, key: str | None = None) -> None:
        """Raise one clear error if ``batch`` lacks a field this objective needs."""
        miss = self.missing_fields(batch)
        if miss:
            raise MissingBatchField(
                f"Objective '{key or self.name}' ({type(self).__name__}) on stream '{stream}' needs batch "
                f"field(s) {miss}, but the stream's batches carry {sorted(k for k in batch)}. Give stream "
                f"'{stream}' a dataset/collate that yields them, or remove the objective from that stream."
            )


def generator_of(model: nn.Module, cache: StepCache) -> torch.Generator | None:
    """The step's random generator: the cache's, else the model's ``step_rng`` (a compiled step's cache has none)."""
    gen = getattr(cache, "generator", None)
    return gen if gen is not None else getattr(model, "step_rng", None)


def masked_accuracy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Accuracy of argmax(logits) over positions whose label is not ``ignore_index``; 0 if none."""
    keep = labels != ignore_index
    hits = (logits.argmax(-1) == labels) & keep
    return hits.sum() / keep.sum().clamp(min=1)
