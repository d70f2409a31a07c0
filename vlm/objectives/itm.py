"""Image-text matching: classify whether an image and a text belong together, from the multimodal CLS."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vlm.errors import VLMConfigError
from vlm.objectives.base import Objective, ObjectiveOutput, StepCache, generator_of
from vlm.objectives.heads import ITMHead
from vlm.objectives.mlm import model_dims

NEGATIVE_MODES = ("batch", "shuffle", "hard")


def anchor_rows(batch_size: int, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` row indices: whole random permutations of the batch, as many as needed, cut to ``count``."""
    if count <= 0 or batch_size <= 0:
        return torch.zeros(0, dtype=torch.long)
    rounds = math.ceil(count / batch_size)
    return torch.cat([torch.randperm(batch_size, generator=generator) for _ in range(rounds)])[:count]


def sample_excluding(scores: Tensor, invalid: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One column per row of ``scores[K,B]``, drawn with probability ∝ softmax(scores) over the valid columns.

    Returns ``(index[K], ok[K])``; ``ok`` is False for rows without any valid column (their index is meaningless).
    """
    scores, invalid = scores.detach().float().cpu(), invalid.cpu()
    ok = ~invalid.all(dim=1)
    logits = scores.masked_fill(invalid, float("-inf"))
    # rows without a valid column get a dummy uniform distribution and are dropped by the caller via ``ok``
    logits = torch.where(ok[:, None], logits, torch.zeros_like(logits))
    probs = torch.softmax(logits, dim=1)
    if probs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long), ok
    return torch.multinomial(probs, 1, generator=generator).squeeze(1), ok


def same_pair(batch: Mapping[str, Any], batch_size: int) -> Tensor:
    """``[B,B]`` True where image i and text j match: the diagonal, and equal ``pair_id`` when the batch has one."""
    match = torch.eye(batch_size, dtype=torch.bool)
    pair_id = batch.get("pair_id")
    if isinstance(pair_id, Tensor):
        pid = pair_id.reshape(-1).cpu()
        match |= pid[:, None] == pid[None, :]
    return match


class ImageTextMatching(Objective):
    """ITM: binary match/mismatch of (image, text) pairs with ``ITMHead`` on the multimodal CLS.

    Args:
        negatives: where mismatched pairs come from. ``batch``: the data placed them in the batch and
            ``itm_labels`` says which rows match (FLAVA/HF). ``shuffle``: every row is a positive; image i is
            paired with the text of another row (random derangements from ``cache.generator``). ``hard``:
            ALBEF-style, a negative text for an image (and a negative image for a text) is drawn with
            probability ∝ softmax(similarity / hard_temperature) of the contrastive embeddings, never the
            matching one.
        negative_ratio: ``shuffle``/``hard``: ``round(negative_ratio * B)`` negatives per batch of B rows (in
            ``hard`` half image-anchored, half text-anchored; 2.0 is ALBEF's one of each per row).
        use_masked: classify the masked multimodal pass (FLAVA: ``# NOTE: ITM uses masked version``), so that
            ITM shares the pass with MMM.
        hard_temperature: temperature of the sampling softmax in ``hard`` mode.

    HF FLAVA parity (``FlavaForPreTraining.forward``, "ITM Loss"): logits of every row, matched or not, from
    ``itm_head(multimodal_masked_embeddings)`` (pooler on token 0), mean cross-entropy against ``itm_labels``.
    Negatives made here (``shuffle``/``hard``) exist only inside this objective: they never reach GC or MMM.
    """

    name: ClassVar[str] = "itm"
    requires_fields: ClassVar[tuple[str, ...]] = ("pixel_values", "input_ids")
    requires_capabilities: ClassVar[tuple[str, ...]] = ("multimodal_hidden",)

    def __init__(
        self,
        negatives: str = "batch",
        negative_ratio: float = 1.0,
        use_masked: bool = True,
        hard_temperature: float = 0.07,
    ) -> None:
        super().__init__()
        if negatives not in NEGATIVE_MODES:
            raise VLMConfigError(f"Objective '{self.name}': negatives={negatives!r}; use one of {NEGATIVE_MODES}.")
        if negative_ratio < 0:
            raise VLMConfigError(f"Objective '{self.name}': negative_ratio={negative_ratio} must be >= 0.")
        if hard_temperature <= 0:
            raise VLMConfigError(f"Objective '{self.name}': hard_temperature={hard_temperature} must be > 0.")
        self.negatives, self.negative_ratio = negatives, float(negative_ratio)
        self.use_masked, self.hard_temperature = bool(use_masked), float(hard_temperature)
        caps = type(self).requires_capabilities
        if negatives == "batch":
            self.requires_fields = type(self).requires_fields + ("itm_labels",)
        else:
            caps = caps + ("fuse",)
            if negatives == "hard":
                caps = caps + ("contrastive_embeddings",)
        self.requires_capabilities = caps
        self.head: ITMHead | None = None

    def build(self, model: nn.Module) -> None:
        """Create the head on the multimodal hidden size."""
        dims = model_dims(model, self.name, "multimodal_hidden")
        self.head = ITMHead(int(dims["multimodal_hidden"]))

    # ------------------------------------------------------------------ negatives
    def num_negatives(self, batch_size: int) -> int:
        """How many negatives ``shuffle``/``hard`` build for a batch of ``batch_size`` rows."""
        return int(round(self.negative_ratio * batch_size)) if batch_size > 1 else 0

    @torch.compiler.disable  # host-side sampling (CPU generator): eager even inside a compiled step
    def negative_pairs(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> tuple[Tensor, Tensor]:
        """``(image_index[K], text_index[K])`` of the mismatched pairs built in-batch (CPU tensors)."""
        batch_size = int(batch["input_ids"].shape[0])
        generator = generator_of(model, cache)
        count = self.num_negatives(batch_size)
        empty = torch.zeros(0, dtype=torch.long)
        if count == 0 or self.negatives == "batch":
            return empty, empty
        match = same_pair(batch, batch_size)
        if self.negatives == "shuffle":
            return self._shuffled(batch_size, count, match, generator)
        return self._hard(model, batch, cache, count, match, generator)

    @staticmethod
    def _shuffled(batch_size: int, count: int, match: Tensor, generator) -> tuple[Tensor, Tensor]:
        # A random cyclic shift of a random permutation is a derangement: text p[j+s] != image p[j].
        images, texts = [], []
        for _ in range(math.ceil(count / batch_size)):
            perm = torch.randperm(batch_size, generator=generator)
            shift = int(torch.randint(1, batch_size, (1,), generator=generator))
            images.append(perm)
            texts.append(perm.roll(-shift))
        image_idx, text_idx = torch.cat(images)[:count], torch.cat(texts)[:count]
        # Captions sharing a pair_id are not negatives of each other: redraw those uniformly among the others.
        clash = match[image_idx, text_idx]
        if bool(clash.any()):
            redraw, ok = sample_excluding(torch.zeros(int(clash.sum()), batch_size), match[image_idx[clash]], generator)
            text_idx = text_idx.clone()
            text_idx[clash] = redraw
            keep = torch.ones_like(clash)
            keep[clash] = ok
            image_idx, text_idx = image_idx[keep], text_idx[keep]
        return image_idx, text_idx

    def _hard(self, model, batch, cache, count, match, generator) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            image_emb, text_emb = model.contrastive_embeddings(batch, cache)
            sim = (image_emb.float() @ text_emb.float().T) / self.hard_temperature
        batch_size = sim.shape[0]
        by_image = anchor_rows(batch_size, math.ceil(count / 2), generator)
        by_text = anchor_rows(batch_size, count // 2, generator)
        texts, ok_i = sample_excluding(sim[by_image], match[by_image], generator)
        images, ok_t = sample_excluding(sim.T[by_text], match.T[by_text], generator)
        image_idx = torch.cat([by_image[ok_i], images[ok_t]])
        text_idx = torch.cat([texts[ok_i], by_text[ok_t]])
        return image_idx, text_idx

    def _negatives(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> tuple[Tensor, Tensor]:
        def compute():
            device = batch["input_ids"].device
            if self.negatives == "batch":  # the data placed them: nothing to draw (and nothing for a tracer to skip)
                empty = torch.zeros(0, dtype=torch.long, device=device)
                return empty, empty
            image_idx, text_idx = self.negative_pairs(model, batch, cache)
            return image_idx.to(device, non_blocking=True), text_idx.to(device, non_blocking=True)

        return cache.get_or(("itm_negatives", self.negatives, self.negative_ratio), compute)

    def prepare(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> None:
        """Draw the in-batch (``shuffle``) negatives before the (possibly compiled) loss computation.

        ``hard`` negatives need this step's embeddings, so they are drawn in ``forward``.
        """
        if self.negatives == "shuffle":
            self._negatives(model, batch, cache)

    # ------------------------------------------------------------------ loss
    def forward(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> ObjectiveOutput:
        """Mean cross-entropy of match (1) / mismatch (0); metrics: accuracy, per-class accuracy, rates."""
        if self.head is None:
            raise VLMConfigError(f"Objective '{self.name}' was not built: call build(model) first.")
        image_idx, text_idx = self._negatives(model, batch, cache)
        fused = model.multimodal_hidden(batch, cache, masked=self.use_masked)
        device = fused.device
        itm_labels = batch.get("itm_labels")
        if itm_labels is not None:
            labels = itm_labels.reshape(-1).long().to(device)
        elif self.negatives == "batch":
            raise VLMConfigError(f"Objective '{self.name}' with negatives='batch' needs 'itm_labels' in the batch.")
        else:
            labels = torch.ones(fused.shape[0], dtype=torch.long, device=device)
        cls = fused[:, :1]
        if image_idx.numel():
            image_idx, text_idx = image_idx.to(device), text_idx.to(device)
            negative = model.fuse(batch, cache, image_idx, text_idx, masked=self.use_masked)
            cls = torch.cat([cls, negative[:, :1].to(cls.dtype)])
            labels = torch.cat([labels, labels.new_zeros(image_idx.numel())])
        logits = self.head(cls).float()
        loss = F.cross_entropy(logits, labels)
        return ObjectiveOutput(loss, self._metrics(logits.detach(), labels))

    @staticmethod
    def _metrics(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        # Every key is always present (0 when a class is absent): DDP's sync of logged values needs equal keys.
        pred = logits.argmax(-1)
        correct = (pred == labels).float()
        pos, neg = labels.eq(1), labels.eq(0)

        def mean_over(sel: Tensor) -> Tensor:
            return (correct * sel).sum() / sel.sum().clamp(min=1)

        return {
            "accuracy": correct.mean(),
            "pos_accuracy": mean_over(pos),  # true positive rate
            "neg_accuracy": mean_over(neg),  # true negative rate
            "pred_pos_rate": pred.eq(1).float().mean(),  # share of examples predicted as matching
            "neg_fraction": neg.float().mean(),  # share of negatives among the examples
        }


__all__ = ["ImageTextMatching", "anchor_rows", "sample_excluding", "same_pair"]
