"""Masked image modelling: codebook-id classification (BEiT/FLAVA) or normalised-pixel regression (MAE)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vlm.errors import VLMConfigError
from vlm.objectives.base import Objective, ObjectiveOutput, StepCache
from vlm.objectives.heads import PredictionHead
from vlm.objectives.mlm import IGNORE_INDEX, classify_masked, head_kwargs, model_dims, static_shapes

TARGETS = ("auto", "codebook", "pixels")


def resolve_image_target(target: str, dims: Mapping[str, Any], objective: str) -> str:
    """``codebook`` or ``pixels``: ``auto`` picks the codebook when the model has an image tokenizer."""
    if target not in TARGETS:
        raise VLMConfigError(f"Objective '{objective}': target={target!r}; use one of {TARGETS}.")
    codebook = dims.get("codebook_size")
    if target == "auto":
        return "codebook" if codebook else "pixels"
    if target == "codebook" and not codebook:
        raise VLMConfigError(
            f"Objective '{objective}': target='codebook' but model.dims['codebook_size'] is {codebook!r} "
            "(the model has no image tokenizer). Use target='pixels' or 'auto', or give the model a codebook."
        )
    return target


def image_out_size(target: str, dims: Mapping[str, Any], objective: str) -> int:
    """Output size of an image prediction head for ``target`` (resolved)."""
    if target == "codebook":
        return int(dims["codebook_size"])
    if not dims.get("patch_dim"):
        raise VLMConfigError(f"Objective '{objective}': pixel targets need model.dims['patch_dim'] (P*P*C).")
    return int(dims["patch_dim"])


def codebook_labels(model: nn.Module, batch: Mapping[str, Any], cache: StepCache, objective: str) -> Tensor:
    """Codebook ids ``[B,N]``: the batch's ``mim_labels`` if given (as HF FLAVA), else the model's tokenizer."""
    labels = batch.get("mim_labels")
    if labels is None and callable(getattr(model, "image_targets", None)):
        labels = model.image_targets(batch, cache)
    if labels is None:
        raise VLMConfigError(
            f"Objective '{objective}' predicts codebook ids, but the batch has no 'mim_labels' and "
            f"{type(model).__name__}.image_targets gave none. Use target='pixels' or give the model an image tokenizer."
        )
    return labels.reshape(labels.shape[0], -1).long()


def normalize_patches(pixels: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch standardisation of MAE (unbiased variance, as MAE's ``target.var(dim=-1)``)."""
    mean = pixels.mean(dim=-1, keepdim=True)
    var = pixels.var(dim=-1, keepdim=True)
    return (pixels - mean) / (var + eps).sqrt()


def regress_masked(head: nn.Module, hidden: Tensor, targets: Tensor, keep: Tensor, dense: bool | None = None) -> Tensor:
    """Mean squared error of ``head`` on the patches ``keep[B,N]``: mean over kept patches and pixel values.

    Sparse (eager: the head runs on kept patches only) or dense (every patch, weighted by ``keep``; fixed
    shapes for ``torch.compile``), as :func:`vlm.objectives.mlm.classify_masked`. No kept patch: a zero.
    """
    keep = keep.to(torch.bool)
    count = keep.sum().clamp(min=1) * targets.shape[-1]
    if static_shapes(dense):
        err = (head(hidden).float() - targets.float()).square().sum(-1)
        return (err * keep).sum() / count
    pred = head(hidden[keep]).float()
    return F.mse_loss(pred, targets[keep].float(), reduction="sum") / count


def patch_prediction(
    head: nn.Module,
    patches: Tensor,
    keep: Tensor,
    target: str,
    model: nn.Module,
    batch: Mapping[str, Any],
    cache: StepCache,
    objective: str,
    norm_pix: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and metric of predicting the masked patches ``keep[B,N]`` from ``patches[B,N,D]``.

    ``keep`` already holds the masked positions of the rows that take part (MMM drops negative pairs).
    """
    if target == "codebook":
        labels = codebook_labels(model, batch, cache, objective).to(patches.device)
        # HF FLAVA sets mim_labels to -100 outside bool_masked_pos, then keeps labels != -100.
        keep = keep & labels.ne(IGNORE_INDEX)
        loss, accuracy = classify_masked(head, patches, labels, keep)
        return loss, {"accuracy": accuracy}
    pixels = model.patch_pixels(batch, cache).detach()
    targets = normalize_patches(pixels.float()) if norm_pix else pixels
    loss = regress_masked(head, patches, targets, keep)
    return loss, {"mse": loss.detach()}


class MaskedImageModeling(Objective):
    """MIM: predict masked image patches (codebook ids or normalised pixels) from the image encoder's masked pass.

    Args:
        target: ``codebook`` (classify image-tokenizer ids, BEiT/FLAVA), ``pixels`` (regress per-patch
            pixels, MAE) or ``auto`` (codebook when ``model.dims["codebook_size"]`` is set, else pixels).
        norm_pix: standardise each target patch by its own mean and variance (MAE's ``norm_pix_loss``).

    HF FLAVA parity ("Unimodal MIM Loss"): the CLS is dropped by taking the *last* ``N`` positions of the
    image encoder's output, labels count only where ``bool_masked_pos`` is True and the label is not -100,
    the loss is the mean cross-entropy over those patches of the whole batch, and every row counts.
    """

    name: ClassVar[str] = "mim"
    requires_fields: ClassVar[tuple[str, ...]] = ("pixel_values",)
    requires_capabilities: ClassVar[tuple[str, ...]] = ("image_masking", "image_hidden")

    def __init__(self, target: str = "auto", norm_pix: bool = True) -> None:
        super().__init__()
        if target not in TARGETS:
            raise VLMConfigError(f"Objective '{self.name}': target={target!r}; use one of {TARGETS}.")
        self.target, self.norm_pix = target, norm_pix
        self.resolved_target: str | None = None if target == "auto" else target
        self._set_capabilities()
        self.head: PredictionHead | None = None

    def _set_capabilities(self) -> None:
        extra = {"codebook": ("image_targets",), "pixels": ("patch_pixels",), None: ()}[self.resolved_target]
        self.requires_capabilities = type(self).requires_capabilities + extra

    def build(self, model: nn.Module) -> None:
        """Create the head ``image_hidden -> codebook_size`` (codebook) or ``-> patch_dim`` (pixels)."""
        dims = model_dims(model, self.name, "image_hidden")
        self.resolved_target = resolve_image_target(self.target, dims, self.name)
        self._set_capabilities()
        out = image_out_size(self.resolved_target, dims, self.name)
        self.head = PredictionHead(int(dims["image_hidden"]), out, **head_kwargs(dims))

    def forward(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> ObjectiveOutput:
        """Masked-patch loss; metrics: accuracy (codebook) or mse (pixels)."""
        if self.head is None or self.resolved_target is None:
            raise VLMConfigError(f"Objective '{self.name}' was not built: call build(model) first.")
        mask = model.image_masking(batch, cache).bool()
        hidden = model.image_hidden(batch, cache, masked=True)
        patches = hidden[:, hidden.shape[1] - mask.shape[1]:]
        loss, metrics = patch_prediction(
            self.head, patches, mask, self.resolved_target, model, batch, cache, self.name, self.norm_pix
        )
        return ObjectiveOutput(loss, metrics)

    def prepare(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> None:
        """Draw the step's patch mask before the (possibly compiled) loss computation."""
        model.image_masking(batch, cache)


__all__ = [
    "MaskedImageModeling", "codebook_labels", "normalize_patches", "patch_prediction", "regress_masked",
    "resolve_image_target",
]
