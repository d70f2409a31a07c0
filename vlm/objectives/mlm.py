"""Masked language modelling (BERT; FLAVA's unimodal MLM on the text encoder)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vlm.errors import VLMConfigError
from vlm.objectives.base import Objective, ObjectiveOutput, StepCache, masked_accuracy
from vlm.objectives.heads import PredictionHead

IGNORE_INDEX = -100


def model_dims(model: nn.Module, objective: str, *keys: str) -> dict[str, Any]:
    """``model.dims`` restricted to ``keys``, with one clear error when the model does not give them."""
    dims = getattr(model, "dims", None)
    if not isinstance(dims, Mapping):
        raise VLMConfigError(
            f"Objective '{objective}' sizes its head from `model.dims`, but {type(model).__name__} has no `dims` dict."
        )
    missing = [k for k in keys if k not in dims]
    if missing:
        raise VLMConfigError(
            f"Objective '{objective}' needs model.dims keys {missing}; {type(model).__name__}.dims has {sorted(dims)}."
        )
    return dict(dims)


def head_kwargs(dims: Mapping[str, Any]) -> dict[str, Any]:
    """LayerNorm eps and activation of prediction heads, from the model's dims (BERT defaults otherwise)."""
    return {"eps": float(dims.get("layer_norm_eps", 1e-12)), "act": str(dims.get("hidden_act", "gelu"))}


def static_shapes(dense: bool | None) -> bool:
    """Whether masked heads run on every position (``dense``); ``None`` means: while ``torch.compile`` traces."""
    return torch.compiler.is_compiling() if dense is None else bool(dense)


def classify_masked(
    head: nn.Module, hidden: Tensor, labels: Tensor, keep: Tensor, dense: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy of ``head`` on the positions ``keep[B,T]`` of ``hidden[B,T,D]``.

    The mean is over all kept tokens of the batch (as HF FLAVA's ``cross_entropy`` on the filtered tokens);
    with no kept token the loss is a graph-connected zero, not NaN. Two exact ways to get it, never a
    ``.item()``:

    - sparse (eager): the head runs on the kept positions only (the vocabulary projection over every token
      is the cost of masked modelling); boolean indexing costs one device->host sync for the count.
    - dense (``dense=True``, and by default while ``torch.compile`` traces): the head runs on every position
      and the cross-entropy is weighted by ``keep``: fixed shapes, no sync, so a whole training step can be
      one graph (and a CUDA graph) at the price of the head's FLOPs on unmasked positions.
    """
    keep = keep.to(torch.bool)
    count = keep.sum().clamp(min=1)
    if static_shapes(dense):
        logits = head(hidden).float()
        target = torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))
        loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        logits = head(hidden[keep]).float()
        target = labels[keep]
        loss = F.cross_entropy(logits, target, reduction="sum")
    return loss / count, masked_accuracy(logits.detach(), target, IGNORE_INDEX)


class MaskedLanguageModeling(Objective):
    """MLM: predict the original ids of masked text tokens from the text encoder's masked pass.

    HF FLAVA parity (``FlavaForPreTraining.forward``, "Unimodal MLM Loss"): hidden states are aligned to the
    labels by taking the *last* ``L`` positions, the loss is the mean cross-entropy over all tokens whose label
    is not -100 in the whole batch, and every row counts (unimodal MLM is not filtered by ``itm_labels``).
    HF computes unimodal MLM only for batches without images; which objectives run on which stream is the
    model config's choice here.
    """

    name: ClassVar[str] = "mlm"
    requires_fields: ClassVar[tuple[str, ...]] = ("input_ids",)
    requires_capabilities: ClassVar[tuple[str, ...]] = ("text_masking", "text_hidden")

    def __init__(self) -> None:
        super().__init__()
        self.head: PredictionHead | None = None

    def build(self, model: nn.Module) -> None:
        """Create the prediction head ``text_hidden -> vocab_size``."""
        dims = model_dims(model, self.name, "text_hidden", "vocab_size")
        self.head = PredictionHead(int(dims["text_hidden"]), int(dims["vocab_size"]), **head_kwargs(dims))

    def forward(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> ObjectiveOutput:
        """Masked-token cross-entropy; metrics: accuracy."""
        if self.head is None:
            raise VLMConfigError(f"Objective '{self.name}' was not built: call build(model) first.")
        _, labels = model.text_masking(batch, cache)
        hidden = model.text_hidden(batch, cache, masked=True)
        hidden = hidden[:, hidden.shape[1] - labels.shape[1]:]
        loss, accuracy = classify_masked(self.head, hidden, labels, labels.ne(IGNORE_INDEX))
        return ObjectiveOutput(loss, {"accuracy": accuracy})

    def prepare(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> None:
        """Draw the step's text mask before the (possibly compiled) loss computation."""
        model.text_masking(batch, cache)


__all__ = ["MaskedLanguageModeling", "classify_masked", "static_shapes", "model_dims", "head_kwargs", "IGNORE_INDEX"]
