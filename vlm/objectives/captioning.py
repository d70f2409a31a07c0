"""Captioning / language-modelling objective (Flamingo, PaLI) and the label helpers its data needs.

``CaptioningLM`` is teacher-forced cross-entropy over ``model.lm_logits`` (labels already aligned with the
logits, -100 = no loss), averaged over all target tokens of the batch. The helpers build those labels:
Flamingo's rule for interleaved sequences, the causal shift, and T5 span corruption for text-only data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.errors import VLMConfigError
from vlm.objectives.base import Objective, ObjectiveOutput, StepCache, masked_accuracy

IGNORE_INDEX = -100


class CaptioningLM(Objective):
    """Teacher-forced token cross-entropy, mean over all non-ignored tokens of the batch.

    Args:
        label_smoothing: as in ``F.cross_entropy`` (perplexity is still reported without smoothing).
    """

    name = "caption"
    requires_capabilities = ("lm_logits",)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise VLMConfigError(f"CaptioningLM: label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, batch: Mapping[str, Any], cache: StepCache) -> ObjectiveOutput:
        logits, labels = model.lm_logits(batch, cache)
        return self.loss_from_logits(logits, labels)

    def loss_from_logits(self, logits: Tensor, labels: Tensor) -> ObjectiveOutput:
        """The objective for aligned ``logits`` [B, T, V] and ``labels`` [B, T]."""
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise VLMConfigError(
                f"CaptioningLM: lm_logits must return logits [B, T, V] and labels [B, T] aligned with them, got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}. Shift with shift_for_causal_lm before returning."
            )
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # half-precision log-softmax loses digits
        flat_labels = labels.reshape(-1)
        n_targets = (flat_labels != IGNORE_INDEX).sum()
        # Sum then divide by the batch's target count: rows with no targets add exactly 0, and an all-ignored
        # batch gives 0 (not 0/0) while staying connected to the graph.
        summed = F.cross_entropy(
            flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=self.label_smoothing
        )
        loss = summed / n_targets.clamp(min=1) + flat_logits.sum() * 0.0
        with torch.no_grad():
            if self.label_smoothing:
                nll = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
            else:
                nll = summed.detach()
            mean_nll = nll / n_targets.clamp(min=1)
            metrics = {
                "token_accuracy": masked_accuracy(logits.detach(), labels),
                "perplexity": mean_nll.exp(),
            }
        return ObjectiveOutput(loss, metrics)


def shift_for_causal_lm(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's outputs with its inputs: position t predicts token t+1."""
    if logits.shape[:2] != labels.shape:
        raise VLMConfigError(
            f"shift_for_causal_lm: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must share [B, T]."
        )
    return logits[:, :-1], labels[:, 1:]


def _last_index_where(flag: Tensor) -> Tensor:
    """For each position, the index of the latest True at or before it (-1 if none)."""
    idx = torch.arange(flag.shape[1], device=flag.device).expand_as(flag)
    return torch.where(flag, idx, torch.full_like(idx, -1)).cummax(1).values


def flamingo_labels(input_ids: Tensor, *, image_token_id: int, end_of_chunk_token_id: int, pad_token_id: int) -> Tensor:
    """Flamingo LM targets (unshifted, same positions as ``input_ids``), -100 where no loss is taken.

    Masked: padding, ``<image>`` tokens, everything before the first ``<image>``, and text after an
    ``<|endofchunk|>`` until the next ``<image>``. The ``<|endofchunk|>`` itself is a target, so the model
    learns where a chunk's text ends. Shift with :func:`shift_for_causal_lm` after the forward pass.
    """
    is_image = input_ids == image_token_id
    is_eoc = input_ids == end_of_chunk_token_id
    last_image = _last_index_where(is_image)
    # Strictly before the position, so an <|endofchunk|> does not mask itself.
    last_eoc = _last_index_where(is_eoc).roll(1, 1)
    last_eoc[:, 0] = -1
    outside_chunk = (last_image < 0) | (last_eoc > last_image)
    drop = outside_chunk | is_image | (input_ids == pad_token_id)
    return input_ids.masked_fill(drop, IGNORE_INDEX)


def _random_segment_lengths(total: Tensor, segments: Tensor, cap: int, generator: torch.Generator | None) -> Tensor:
    """Per row, a uniformly random split of ``total`` items into ``segments`` non-empty runs; [B, cap] (0 beyond)."""
    b = total.shape[0]
    width = max(1, int(total.max()) - 1)
    # Choose segments-1 distinct cut points among the total-1 gaps: the smallest random keys among valid gaps.
    keys = torch.rand((b, width), generator=generator)
    keys = keys.masked_fill(torch.arange(width)[None] >= (total - 1)[:, None], 2.0)
    ranks = keys.argsort(1).argsort(1)
    cut = ranks < (segments - 1)[:, None]
    gap_pos = torch.arange(1, width + 1).expand(b, width)
    # Sorted cut positions with 0 in front and `total` behind; differences are the run lengths.
    cuts = torch.where(cut, gap_pos, torch.full_like(gap_pos, 1 << 30)).sort(1).values[:, : max(cap - 1, 0)]
    bounds = torch.cat([torch.zeros(b, 1, dtype=torch.long), cuts, torch.full((b, 1), 1 << 30)], 1)
    bounds = torch.minimum(bounds, total[:, None])
    lengths = bounds[:, 1:] - bounds[:, :-1]
    return lengths[:, :cap]


def span_corruption(
    input_ids: Tensor,
    *,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    sentinel_ids: Sequence[int],
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """T5 span corruption: returns (encoder inputs, targets), both padded with ``pad_id`` and ending in EOS.

    Per row of ``n`` tokens (padding and a trailing EOS excluded): ``round(n * noise_density)`` noise tokens
    (at least 1, at most n-1) in ``round(noise / mean_span_length)`` spans (at least 1); noise and kept
    tokens are each split at random into that many non-empty runs and interleaved, kept run first. The
    inputs replace the k-th noise span with ``sentinel_ids[k]``; the targets are ``sentinel_ids[k]``
    followed by the k-th span, for every k.
    """
    if input_ids.dim() != 2:
        raise VLMConfigError(f"span_corruption expects input_ids [B, L], got {tuple(input_ids.shape)}.")
    if not 0.0 < noise_density < 1.0 or mean_span_length < 1.0:
        raise VLMConfigError(
            f"span_corruption: need 0 < noise_density < 1 and mean_span_length >= 1, got {noise_density}, {mean_span_length}."
        )
    device = input_ids.device
    ids = input_ids.cpu()
    b, length = ids.shape
    valid = ids != pad_id
    n = valid.sum(1)
    last = (n - 1).clamp(min=0)
    has_eos = (n > 0) & (ids.gather(1, last[:, None]).squeeze(1) == eos_id)
    n = n - has_eos.long()
    if bool((n < 2).any()):
        raise VLMConfigError("span_corruption: every row needs at least 2 tokens besides padding and EOS.")
    if bool((valid != (torch.arange(length)[None] < valid.sum(1)[:, None])).any()):
        raise VLMConfigError("span_corruption: padding must be on the right (pad_id found between tokens).")

    num_noise = (n.double() * noise_density).round().long().clamp(min=1)
    num_noise = torch.minimum(num_noise, n - 1)
    num_spans = (num_noise.double() / mean_span_length).round().long().clamp(min=1)
    num_spans = torch.minimum(num_spans, torch.minimum(num_noise, n - num_noise))
    max_spans = int(num_spans.max())
    if max_spans > len(sentinel_ids):
        raise VLMConfigError(
            f"span_corruption needs {max_spans} sentinel ids for these rows but got {len(sentinel_ids)}; pass more "
            f"sentinel_ids (T5 has 100) or shorter rows."
        )

    noise_len = _random_segment_lengths(num_noise, num_spans, max_spans, generator)
    keep_len = _random_segment_lengths(n - num_noise, num_spans, max_spans, generator)
    # Interleave [keep_0, noise_0, keep_1, noise_1, ...] and mark the noise positions.
    runs = torch.stack([keep_len, noise_len], 2).reshape(b, 2 * max_spans)
    ends = runs.cumsum(1)
    pos = torch.arange(length)
    run_of_pos = torch.searchsorted(ends, pos.expand(b, length).contiguous(), right=True)
    noise = (run_of_pos % 2 == 1) & (pos[None] < n[:, None])
    span_idx = run_of_pos // 2
    span_start = noise & ~torch.cat([torch.zeros(b, 1, dtype=torch.bool), noise[:, :-1]], 1)
    body = pos[None] < n[:, None]
    sentinels = torch.tensor(list(sentinel_ids), dtype=ids.dtype)
    sent = sentinels[span_idx.clamp(max=len(sentinel_ids) - 1)]

    # Inputs: kept tokens, a sentinel at each span's first position, nothing for the rest of a span.
    in_tok = torch.where(span_start, sent, ids)
    in_keep = body & (~noise | span_start)
    inputs = _compact(in_tok, in_keep, eos_id, pad_id)
    # Targets: each noise position writes its token, preceded by the span's sentinel at a span start.
    count = noise.long() + span_start.long()
    out_len = int(count.sum(1).max()) + 1
    start = count.cumsum(1) - count
    targets = torch.full((b, out_len + 1), pad_id, dtype=ids.dtype)
    dump = torch.full_like(start, out_len)  # where positions that write nothing go; the column is dropped
    targets.scatter_(1, torch.where(span_start, start, dump), sent)
    targets.scatter_(1, torch.where(noise, start + span_start.long(), dump), ids)
    targets = targets[:, :out_len]
    targets[torch.arange(b), count.sum(1)] = eos_id
    return inputs.to(device), targets.to(device)


def _compact(tokens: Tensor, keep: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Left-pack the kept tokens of each row, append EOS, pad on the right."""
    b = tokens.shape[0]
    lengths = keep.sum(1)
    width = int(lengths.max()) + 1
    out = torch.full((b, width + 1), pad_id, dtype=tokens.dtype)
    dest = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(tokens, width))
    out.scatter_(1, dest, torch.where(keep, tokens, torch.full_like(tokens, pad_id)))
    out = out[:, :width]
    out[torch.arange(b), lengths] = eos_id
    return out

