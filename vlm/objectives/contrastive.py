"""Image-text contrastive objectives: global contrastive InfoNCE (CLIP/FLAVA "gc") and sigmoid (SigLIP).

Both read L2-normalised embeddings from ``model.contrastive_embeddings`` and, when the model offers
``positive_rows``, keep only rows whose image and text match. Across ranks they compute exactly the
single-process loss over the concatenated global batch, in the DDP sense: each rank returns its share and
DDP's gradient *average* equals the gradient of the global-batch loss (see ``vlm.objectives.distributed``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlm.errors import VLMConfigError
from vlm.objectives.base import Objective, ObjectiveOutput, StepCache
from vlm.objectives.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_features,
    gather_sizes,
    get_rank,
    get_world_size,
    ring_shift_with_grad,
    scale_grad,
)

#: CLIP/FLAVA cap on the logit scale: a temperature below 1/100 makes training unstable.
MAX_LOGIT_SCALE = math.log(100.0)


def _embeddings(
    model: nn.Module, batch: Mapping[str, Any], cache: StepCache, who: str, filter_rows: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(image, text, keep): ``keep`` is the model's ``positive_rows`` (None when every row matches).

    With ``filter_rows`` the mismatched rows are dropped here (keep is then None).
    """
    image, text = model.contrastive_embeddings(batch, cache)
    if image.dim() != 2 or text.dim() != 2 or image.shape != text.shape:
        raise VLMConfigError(
            f"{who}: model.contrastive_embeddings must return two [B, E] tensors of equal shape, got "
            f"{tuple(image.shape)} and {tuple(text.shape)}. Project both towers to the same embedding size."
        )
    keep = None
    if callable(getattr(model, "positive_rows", None)):
        keep = model.positive_rows(batch, cache)
        if keep.shape != (image.shape[0],):
            raise VLMConfigError(
                f"{who}: model.positive_rows must return a bool[B] with B={image.shape[0]}, got shape {tuple(keep.shape)}."
            )
        keep = keep.to(device=image.device, dtype=torch.bool)
        if filter_rows:
            image, text, keep = image[keep], text[keep], None
    return image, text, keep


def _disconnected_zero(*tensors: Tensor) -> Tensor:
    # Zero that still reaches every input: DDP wants a gradient (zero) for every parameter used.
    return sum(t.sum() * 0.0 for t in tensors)


class _LearnableScale(Objective):
    """Shared temperature handling: ``logit_scale`` is log(1/temperature), clamped to [0, max_logit_scale]."""

    def __init__(self, init_logit_scale: float, learnable_temperature: bool, max_logit_scale: float) -> None:
        super().__init__()
        if not 0.0 <= init_logit_scale <= max_logit_scale:
            raise VLMConfigError(
                f"{type(self).__name__}: initial logit scale {init_logit_scale:.3f} (= log(1/temperature)) is outside "
                f"[0, {max_logit_scale:.3f}]; choose a temperature in [{math.exp(-max_logit_scale):.3g}, 1]."
            )
        self.max_logit_scale = float(max_logit_scale)
        # One element, not a 0-dim tensor: FSDP refuses scalar parameters ("FSDP doesn't support scalar
        # parameters"). ``scale()`` and the metrics hand out 0-dim values; 0-dim checkpoints (HF FLAVA, open_clip,
        # earlier vlm runs) load through ``_load_from_state_dict``.
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)), requires_grad=learnable_temperature)

    #: parameters kept as one-element vectors (FSDP) that checkpoints may hold as 0-dim scalars
    SCALAR_PARAMETERS = ("logit_scale",)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in self.SCALAR_PARAMETERS:
            key = prefix + name
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def clamp_scale_(self) -> None:
        """Clamp the parameter in place, so that imported values obey the same cap."""
        # On ``.data``: under FSDP (use_orig_params) the parameter is a view of a flat parameter that other views
        # (the towers' weights) share, and an in-place change through the parameter itself bumps the version
        # those views carry for autograd ("a view ... has been modified inplace" in the next layer's backward).
        self.logit_scale.data.clamp_(0.0, self.max_logit_scale)

    def prepare(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> None:
        """Clamp eagerly before the step: a compiled step then mutates no parameter (CUDA graphs need that)."""
        self.clamp_scale_()

    def scale(self) -> Tensor:
        """exp(logit_scale), the parameter clamped to [0, max_logit_scale] (in place too, outside torch.compile)."""
        if torch.compiler.is_compiling():  # ``prepare`` clamped it already; stay functional inside the graph
            return self.logit_scale.clamp(0.0, self.max_logit_scale).exp().reshape(())
        self.clamp_scale_()
        return self.logit_scale.exp().reshape(())

    @staticmethod
    def _empty_output(image: Tensor, text: Tensor, metrics: dict[str, Tensor], *params: Tensor) -> ObjectiveOutput:
        """No row on any rank: a zero loss that still reaches every input, with zero accuracies."""
        zero = image.new_zeros(())
        return ObjectiveOutput(_disconnected_zero(image, text, *params),
                               {"i2t_accuracy": zero, "t2i_accuracy": zero, **metrics})

    def _scale_metrics(self, scale: Tensor) -> dict[str, Tensor]:
        s = scale.detach()
        return {"temperature": 1.0 / s, "logit_scale": self.logit_scale.detach().clone().reshape(())}


class GlobalContrastive(_LearnableScale):
    """Symmetric InfoNCE between image and text embeddings over the (gathered) global batch.

    Args:
        init_temperature: initial softmax temperature (``logit_scale = log(1/init_temperature)``).
        learnable_temperature: train ``logit_scale`` (else it stays fixed).
        gather_with_grad: all-gather features with gradients (exact gradients; the default).
        local_loss: each rank scores only its own rows against all gathered rows (memory linear in the
            global batch instead of quadratic); needs ``gather_with_grad``.
        max_logit_scale: upper clamp of ``logit_scale`` (log 100 as in CLIP/FLAVA).
        mismatched_as_candidates: when the batch holds mismatched (ITM negative) rows, FLAVA's convention:
            they are not queries, but their images/texts stay in the batch as extra candidates. ``False``
            drops them entirely. Either way a batch without negatives is plain InfoNCE.
    """

    name = "gc"
    requires_capabilities = ("contrastive_embeddings",)

    def __init__(
        self,
        init_temperature: float = 0.07,
        learnable_temperature: bool = True,
        gather_with_grad: bool = True,
        local_loss: bool = False,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        mismatched_as_candidates: bool = True,
    ) -> None:
        if init_temperature <= 0:
            raise VLMConfigError(f"GlobalContrastive: init_temperature must be > 0, got {init_temperature}.")
        self.mismatched_as_candidates = mismatched_as_candidates
        super().__init__(math.log(1.0 / init_temperature), learnable_temperature, max_logit_scale)
        if local_loss and not gather_with_grad:
            raise VLMConfigError(
                "GlobalContrastive: local_loss=True needs gather_with_grad=True; with a detached gather each rank "
                "misses the gradient its features receive in the other ranks' losses. Set gather_with_grad: true."
            )
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def forward(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> ObjectiveOutput:
        image, text, keep = _embeddings(model, batch, cache, "GlobalContrastive",
                                        filter_rows=not self.mismatched_as_candidates)
        negatives = negative_mask = None
        if batch.get("negative_input_ids") is not None:
            negatives, negative_mask = self._negatives(model, batch, cache, image)
        return self.loss_from_features(image, text, keep, negatives, negative_mask)

    def _negatives(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache,
                   image: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's hard-negative caption embeddings ``[B,K,E]`` and their validity mask ``bool[B,K]``."""
        if not callable(getattr(model, "negative_text_embeddings", None)):
            raise VLMConfigError(
                f"GlobalContrastive: the batch carries negative_input_ids (hard-negative captions) but "
                f"{type(model).__name__} has no negative_text_embeddings to embed them. Set the transform's "
                "hard_negatives: 0, or use a model that provides that capability."
            )
        negatives = model.negative_text_embeddings(batch, cache)
        b, k = negatives.shape[:2]
        mask = batch.get("negative_mask")
        mask = (torch.ones(b, k, dtype=torch.bool, device=negatives.device) if mask is None
                else mask.reshape(b, k).to(device=negatives.device, dtype=torch.bool))
        if not self.mismatched_as_candidates and callable(getattr(model, "positive_rows", None)):
            rows = model.positive_rows(batch, cache).to(device=negatives.device, dtype=torch.bool)
            negatives, mask = negatives[rows], mask[rows]
        if negatives.shape[0] != image.shape[0] or negatives.shape[-1] != image.shape[-1]:
            raise VLMConfigError(
                f"GlobalContrastive: model.negative_text_embeddings must return [B,K,E] with B={image.shape[0]} "
                f"and E={image.shape[-1]}, got {tuple(negatives.shape)}."
            )
        return negatives, mask

    def loss_from_features(self, image: Tensor, text: Tensor, keep: Tensor | None = None,
                           negatives: Tensor | None = None, negative_mask: Tensor | None = None) -> ObjectiveOutput:
        """The objective on this rank's features; ``keep`` (bool[B]) marks the rows that are queries.

        Rows outside ``keep`` are weighted out rather than indexed away, so the step needs no device->host sync.

        ``negatives`` ``[B,K,E]`` (NegCLIP): hard-negative captions, one set per row. Like the texts they are
        gathered from every rank (alongside them, with the same gradient rule), and every image query
        scores all of them as extra text candidates; ``negative_mask`` ``bool[B,K]`` drops padding ones.
        Text->image is unchanged. Without ``negatives`` this is plain (FLAVA) InfoNCE.
        """
        scale = self.scale()
        world, rank = get_world_size(), get_rank()
        sizes = gather_sizes(image.shape[0], image.device)
        total = sum(sizes)
        if total == 0:
            extra = () if negatives is None else (negatives,)
            return self._empty_output(image, text, self._scale_metrics(scale), scale, *extra)
        dim = text.shape[-1]
        if negatives is not None:
            k = negatives.shape[1]
            if negative_mask is None:
                negative_mask = torch.ones(negatives.shape[:2], dtype=torch.bool, device=negatives.device)
            # the negatives ride with their row's text: one gather, the same gradient rule
            text = torch.cat([text, negatives.reshape(negatives.shape[0], k * dim).to(text.dtype)], 1)
        if world > 1 and not self.gather_with_grad:
            # Every rank computes the same full loss but only the owner keeps a row's gradient; scaling by
            # the world size makes DDP's average equal the global-batch gradient (open_clip leaves it 1/world).
            image, text = scale_grad(image, float(world)), scale_grad(text, float(world))
        all_image, all_text = gather_features(
            image, text, gather_with_grad=self.gather_with_grad, local_loss=self.local_loss, sizes=sizes
        )
        all_neg = neg_valid = None
        if negatives is not None:
            all_neg = all_text[:, dim:].reshape(-1, dim)
            all_text, text = all_text[:, :dim], text[:, :dim]
            valid = negative_mask.to(image.dtype)
            neg_valid = all_gather_no_grad(valid, sizes, keep_local_grad=False).reshape(-1) > 0.5
        if keep is not None:
            keep = keep.to(image.dtype)
            all_keep = all_gather_no_grad(keep[:, None], sizes, keep_local_grad=False)[:, 0]
        if self.local_loss:
            # Rows: this rank's pairs; columns: all pairs. Positives sit at the rank's offset.
            labels = torch.arange(image.shape[0], device=image.device) + sum(sizes[:rank])
            logits_i2t = scale * image @ all_text.T
            logits_t2i = scale * text @ all_image.T
            weights = keep
            n_queries = total if keep is None else all_keep.sum().clamp_min(1.0)
            queries = image
        else:
            labels = torch.arange(total, device=image.device)
            logits_i2t = scale * all_image @ all_text.T
            logits_t2i = logits_i2t.T
            weights = None if keep is None else all_keep
            n_queries = total if keep is None else all_keep.sum().clamp_min(1.0)
            queries = all_image
        neg_metrics: dict[str, Tensor] = {}
        if all_neg is not None:
            logits_neg = (scale * queries @ all_neg.T).masked_fill(~neg_valid, float("-inf"))
            with torch.no_grad():
                # each query's positive against its own negatives (single process: the whole batch)
                own = (queries[:, None, :] * all_neg.reshape(total, k, dim)[labels]).sum(-1)
                pos = (queries * all_text[labels]).sum(-1, keepdim=True)
                mine = neg_valid.reshape(total, k)[labels].to(image.dtype)
                if weights is not None:
                    mine = mine * weights[:, None]
                neg_metrics["hard_negative_accuracy"] = ((pos > own).to(image.dtype) * mine).sum() / mine.sum().clamp_min(1.0)
            logits_i2t = torch.cat([logits_i2t, logits_neg], 1)
        per_row = F.cross_entropy(logits_i2t, labels, reduction="none") + F.cross_entropy(
            logits_t2i, labels, reduction="none"
        )
        summed = per_row.sum() if weights is None else (per_row * weights).sum()
        # local_loss: the rank's share of the global mean, so averaging over ranks (DDP) gives the global loss
        loss = summed * ((world if self.local_loss else 1) / (2.0 * n_queries))
        with torch.no_grad():
            hits_i2t = (logits_i2t.argmax(1) == labels).float()
            hits_t2i = (logits_t2i.argmax(1) == labels).float()
            if weights is None:
                acc_i2t, acc_t2i = hits_i2t.mean(), hits_t2i.mean()
            else:
                denom = weights.sum().clamp_min(1.0)
                acc_i2t, acc_t2i = (hits_i2t * weights).sum() / denom, (hits_t2i * weights).sum() / denom
            metrics = {"i2t_accuracy": acc_i2t, "t2i_accuracy": acc_t2i, **neg_metrics, **self._scale_metrics(scale)}
        return ObjectiveOutput(loss, metrics)


def _sigmoid_block_sum(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, positive_offset: int) -> Tensor:
    """Sum over pairs of -log sigmoid(y * logit); y = +1 for (i, positive_offset + i), -1 elsewhere."""
    logits = scale * image @ text.T + bias
    # -log sigmoid(-x) = softplus(x) and -log sigmoid(x) = softplus(x) - x: positives only subtract their logit.
    total = F.softplus(logits).sum()
    if positive_offset >= 0:
        pos = scale * (image * text[positive_offset: positive_offset + image.shape[0]]).sum(-1) + bias
        total = total - pos.sum()
    return total


class SigmoidContrastive(_LearnableScale):
    """SigLIP: independent binary (sigmoid) losses on every image-text pair of the global batch.

    Args:
        init_temperature: initial temperature (SigLIP: 1/10, i.e. ``logit_scale = log 10``).
        init_bias: initial ``logit_bias`` (SigLIP: -10, so that the many negatives start near zero loss).
        learnable_temperature: train ``logit_scale`` and ``logit_bias``.
        chunk_size: score at most this many image rows at once; with gradients each chunk is
            recomputed in backward, so activation memory is ``chunk_size x global batch``. 0 = no chunking.
        dist_impl: ``gather`` (all-gather text features with gradients) or ``ring`` (neighbour exchange,
            world-1 point-to-point steps, never holding more than two text blocks).
        max_logit_scale: upper clamp of ``logit_scale``.
    """

    SCALAR_PARAMETERS = ("logit_scale", "logit_bias")

    name = "siglip"
    requires_capabilities = ("contrastive_embeddings",)

    def __init__(
        self,
        init_temperature: float = 0.1,
        init_bias: float = -10.0,
        learnable_temperature: bool = True,
        chunk_size: int = 0,
        dist_impl: str = "gather",
        max_logit_scale: float = MAX_LOGIT_SCALE,
    ) -> None:
        if init_temperature <= 0:
            raise VLMConfigError(f"SigmoidContrastive: init_temperature must be > 0, got {init_temperature}.")
        super().__init__(math.log(1.0 / init_temperature), learnable_temperature, max_logit_scale)
        if dist_impl not in ("gather", "ring"):
            raise VLMConfigError(f"SigmoidContrastive: dist_impl={dist_impl!r}; use 'gather' or 'ring'.")
        if chunk_size < 0:
            raise VLMConfigError(f"SigmoidContrastive: chunk_size must be >= 0 (0 = no chunking), got {chunk_size}.")
        self.logit_bias = nn.Parameter(torch.full((1,), float(init_bias)), requires_grad=learnable_temperature)
        self.chunk_size = chunk_size
        self.dist_impl = dist_impl

    def forward(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> ObjectiveOutput:
        image, text, _ = _embeddings(model, batch, cache, "SigmoidContrastive")
        return self.loss_from_features(image, text)

    def _block(self, image: Tensor, text: Tensor, scale: Tensor, positive_offset: int) -> Tensor:
        rows = image.shape[0]
        chunk = self.chunk_size if self.chunk_size > 0 else rows
        if rows == 0 or text.shape[0] == 0:
            return _disconnected_zero(image, text, scale, self.logit_bias)
        if chunk >= rows:
            return _sigmoid_block_sum(image, text, scale, self.logit_bias, positive_offset)
        total = image.new_zeros((), dtype=torch.float32)
        for start in range(0, rows, chunk):
            off = positive_offset + start if positive_offset >= 0 else -1
            part = image[start: start + chunk]
            if torch.is_grad_enabled():
                # Recompute the chunk's logits in backward instead of keeping rows x N of them alive.
                total = total + checkpoint(
                    _sigmoid_block_sum, part, text, scale, self.logit_bias, off, use_reentrant=False
                )
            else:
                total = total + _sigmoid_block_sum(part, text, scale, self.logit_bias, off)
        return total

    def loss_from_features(self, image: Tensor, text: Tensor) -> ObjectiveOutput:
        """The objective on already-selected local features (this rank's rows)."""
        scale = self.scale()
        world, rank = get_world_size(), get_rank()
        sizes = gather_sizes(image.shape[0], image.device)
        total = sum(sizes)
        if total == 0:
            return self._empty_output(image, text, self._metrics(scale), scale, self.logit_bias)
        if world == 1:
            summed = self._block(image, text, scale, 0)
        elif self.dist_impl == "gather":
            all_text = all_gather_with_grad(text, sizes)
            summed = self._block(image, all_text, scale, sum(sizes[:rank]))
        else:
            summed = self._block(image, text, scale, 0)
            block = text
            for step in range(1, world):
                block = ring_shift_with_grad(block, sizes[(rank - step) % world])
                summed = summed + self._block(image, block, scale, -1)
        # The rank's share of (sum over all global pairs) / (global batch): DDP's average is the global loss.
        loss = summed * (world / total)
        with torch.no_grad():
            local = image @ text.T
            labels = torch.arange(image.shape[0], device=image.device)
            if image.shape[0]:
                acc_i2t = (local.argmax(1) == labels).float().mean()
                acc_t2i = (local.argmax(0) == labels).float().mean()
            else:
                acc_i2t = acc_t2i = image.new_zeros(())
        # Accuracies are within this rank's rows (single process: the whole batch) to spare a gather.
        return ObjectiveOutput(loss, {"i2t_accuracy": acc_i2t, "t2i_accuracy": acc_t2i, **self._metrics(scale)})

    def _metrics(self, scale: Tensor) -> dict[str, Tensor]:
        return {**self._scale_metrics(scale), "logit_bias": self.logit_bias.detach().clone().reshape(())}
