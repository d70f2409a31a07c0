"""Masked multimodal modelling (FLAVA): predict masked patches and masked tokens from the multimodal encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlm.errors import VLMConfigError
from vlm.objectives.base import Objective, ObjectiveOutput, StepCache
from vlm.objectives.heads import PredictionHead
from vlm.objectives.mim import TARGETS, image_out_size, patch_prediction, resolve_image_target
from vlm.objectives.mlm import IGNORE_INDEX, classify_masked, head_kwargs, model_dims


def matched_rows(model: nn.Module, batch: Mapping[str, Any], cache: StepCache, batch_size: int) -> Tensor:
    """Rows whose image and text match: ``model.positive_rows`` if provided, else ``itm_labels != 0``, else all.

    As HF FLAVA (``pos_mask = pos_pairs | ~pos_pairs.any()``), a batch without any matching row keeps
    every row rather than none.
    """
    if callable(getattr(model, "positive_rows", None)):
        rows = model.positive_rows(batch, cache)
    elif batch.get("itm_labels") is not None:
        rows = batch["itm_labels"].reshape(-1).ne(0)
    else:
        return torch.ones(batch_size, dtype=torch.bool)
    rows = rows.reshape(-1).bool()
    return rows | ~rows.any()


class MaskedMultimodalModeling(Objective):
    """MMM: masked image patches and masked text tokens, both predicted from the fused (multimodal) sequence.

    Args:
        text_weight: weight of the masked-token loss (HF ``mmm_text_weight``).
        image_weight: weight of the masked-patch loss (HF ``mmm_image_weight``).
        target: image targets, ``auto`` | ``codebook`` | ``pixels`` (see :class:`MaskedImageModeling`).
        norm_pix: standardise pixel targets per patch (pixels only).

    HF FLAVA parity (``FlavaForPreTraining.forward``, "ITM Loss" / "MMM Image Loss" / "MMM Text Loss"):
    only matched rows count (``itm_labels != 0``, or all rows when none match); the image part is
    ``multimodal[:, 2 : 2 + N]``, i.e. both the multimodal CLS and the image CLS are skipped, which is the
    last ``N`` positions of ``split_multimodal``'s image part; the text part is the last ``L`` positions
    (text CLS included, its label is -100); each loss is the mean cross-entropy over all kept tokens.
    """

    name: ClassVar[str] = "mmm"
    requires_fields: ClassVar[tuple[str, ...]] = ("pixel_values", "input_ids")
    requires_capabilities: ClassVar[tuple[str, ...]] = (
        "text_masking", "image_masking", "multimodal_hidden", "split_multimodal",
    )

    def __init__(
        self, text_weight: float = 1.0, image_weight: float = 1.0, target: str = "auto", norm_pix: bool = True
    ) -> None:
        super().__init__()
        if target not in TARGETS:
            raise VLMConfigError(f"Objective '{self.name}': target={target!r}; use one of {TARGETS}.")
        self.text_weight, self.image_weight = float(text_weight), float(image_weight)
        self.target, self.norm_pix = target, norm_pix
        self.resolved_target: str | None = None if target == "auto" else target
        self._set_capabilities()
        self.image_head: PredictionHead | None = None
        self.text_head: PredictionHead | None = None

    def _set_capabilities(self) -> None:
        extra = {"codebook": ("image_targets",), "pixels": ("patch_pixels",), None: ()}[self.resolved_target]
        self.requires_capabilities = type(self).requires_capabilities + extra

    def build(self, model: nn.Module) -> None:
        """Create ``image_head`` (multimodal -> codebook_size or patch_dim) and ``text_head`` (-> vocab_size)."""
        dims = model_dims(model, self.name, "multimodal_hidden", "vocab_size")
        self.resolved_target = resolve_image_target(self.target, dims, self.name)
        self._set_capabilities()
        hidden, kw = int(dims["multimodal_hidden"]), head_kwargs(dims)
        self.image_head = PredictionHead(hidden, image_out_size(self.resolved_target, dims, self.name), **kw)
        self.text_head = PredictionHead(hidden, int(dims["vocab_size"]), **kw)

    def forward(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> ObjectiveOutput:
        """``text_weight * mmm_text + image_weight * mmm_image``; metrics per part."""
        if self.image_head is None or self.text_head is None or self.resolved_target is None:
            raise VLMConfigError(f"Objective '{self.name}' was not built: call build(model) first.")
        _, mlm_labels = model.text_masking(batch, cache)
        mask = model.image_masking(batch, cache).bool()
        hidden = model.multimodal_hidden(batch, cache, masked=True)
        image_part, text_part = model.split_multimodal(hidden)
        rows = matched_rows(model, batch, cache, hidden.shape[0]).to(hidden.device)

        # Filtering rows and tokens with one [B,T] mask keeps HF's order (rows first, then tokens, row-major)
        # without copying the hidden states of the kept rows.
        patches = image_part[:, image_part.shape[1] - mask.shape[1]:]
        image_loss, image_metrics = patch_prediction(
            self.image_head, patches, mask & rows[:, None], self.resolved_target, model, batch, cache,
            self.name, self.norm_pix,
        )
        tokens = text_part[:, text_part.shape[1] - mlm_labels.shape[1]:]
        text_keep = mlm_labels.ne(IGNORE_INDEX) & rows[:, None]
        text_loss, text_accuracy = classify_masked(self.text_head, tokens, mlm_labels, text_keep)

        loss = self.text_weight * text_loss + self.image_weight * image_loss
        metrics = {"text_loss": text_loss.detach(), "image_loss": image_loss.detach(), "text_accuracy": text_accuracy}
        metrics.update({f"image_{k}": v for k, v in image_metrics.items()})
        return ObjectiveOutput(loss, metrics)

    def prepare(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> None:
        """Draw the step's text and patch masks before the (possibly compiled) loss computation."""
        model.text_masking(batch, cache)
        model.image_masking(batch, cache)


__all__ = ["MaskedMultimodalModeling", "matched_rows"]
