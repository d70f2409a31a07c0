"""Collate samples into a batch: stack tensors, pad ragged ones, drop and count skipped samples."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vlm.data.fields import PAD_VALUES

SKIPPED_KEY = "_skipped"  # a sample may carry how many corrupt samples were skipped just before it
PAD_ID_KEY = "_pad_token_id"  # a sample may carry its tokenizer's pad id (used to pad input_ids)
SKIP_LOG_LIMIT = 10  # skipped samples described in the log per stream and process (DataLoader worker)

log = logging.getLogger("vlm.data")
_skip_logged: dict[tuple[str, int], int] = {}


class CorruptSample(ValueError):
    """A sample that cannot be used (undecodable, truncated, a missing or malformed field): skipped and counted.

    ``missing_field`` names a field the sample does not have at all; when the first samples of a stream all lack
    the same field, the field name is more likely wrong than the data (see ``vlm.data.stream.StreamCollate``).
    """

    def __init__(self, reason: str, key: Any = None, source: Any = None, missing_field: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.key, self.source, self.missing_field = reason, key, source, missing_field


def report_skip(stream: str | None, key: Any, source: Any, reason: Any) -> None:
    """Log a skipped sample (key, shard or file, reason): the first ``SKIP_LOG_LIMIT`` per stream and process."""
    slot = (str(stream), os.getpid())  # the pid makes every forked DataLoader worker start its own budget
    n = _skip_logged.get(slot, 0)
    if n > SKIP_LOG_LIMIT:
        return
    _skip_logged[slot] = n + 1
    where = f"stream '{stream}': " if stream else ""
    if n == SKIP_LOG_LIMIT:
        log.warning("%sfurther skipped samples in this process are counted (data/<stream>/skipped), not logged",
                    where)
        return
    log.warning("%sskipping sample %s in %s: %s", where, key if key is not None else "?",
                source if source is not None else "?", reason)


def _pad_stack(values: Sequence[Tensor], pad: float | int | bool) -> Tensor:
    if all(v.shape == values[0].shape for v in values):
        return torch.stack(list(values))
    dims = values[0].dim()
    if any(v.dim() != dims for v in values):
        raise ValueError(f"cannot batch tensors of different ranks: {[tuple(v.shape) for v in values]}")
    shape = [max(v.shape[d] for v in values) for d in range(dims)]
    out = values[0].new_full((len(values), *shape), pad)
    for i, v in enumerate(values):
        out[(i, *[slice(0, s) for s in v.shape])] = v
    return out


def collate(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch a list of sample dicts. ``None`` entries (corrupt samples) are dropped and counted in ``num_skipped``.

    Returns a dict with ``num_skipped`` and, when at least one sample survived, the stacked fields. A batch
    whose every sample was skipped has only ``num_skipped`` (the DataModule carries the count forward).
    """
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    for s in good:
        skipped += int(s.pop(SKIPPED_KEY, 0))
    batch: dict[str, Any] = {"num_skipped": skipped}
    if not good:
        return batch
    pad_id = good[0].pop(PAD_ID_KEY, 0)
    for s in good[1:]:
        s.pop(PAD_ID_KEY, None)
    for key in good[0]:
        values = [s.get(key) for s in good]
        first = values[0]
        if isinstance(first, Tensor):
            pad = PAD_VALUES.get(key, pad_id if key in ("input_ids", "input_ids_masked") else 0)
            batch[key] = _pad_stack(values, pad)
        elif isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch


#: the batch fields ``trim_padding`` shortens together: (the field that marks padding, its padding value, the fields)
TRIM_GROUPS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("attention_mask", 0, ("input_ids", "attention_mask")),
    ("labels", -100, ("labels", "decoder_attention_mask")),
)


def trim_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop the trailing columns that are padding in every row of a batch's prompt and target token fields.

    Transforms pad to a fixed length (static shapes); a batch of one-word VQA answers then spends most of the
    decoder and the output layer on padding. Only columns after the last used one go: leading padding stays,
    because with relative position biases (T5) and tokens placed in front of the prompt (PaLI's image) the
    distance across it counts. So the masked computation is unchanged. At least one column stays. Returns a new
    dict.
    """
    out = dict(batch)
    for marker, pad, fields in TRIM_GROUPS:
        ref = batch.get(marker)
        if not isinstance(ref, Tensor) or ref.dim() != 2 or ref.shape[1] == 0:
            continue
        used = (ref != pad).any(0)
        # one device-to-host read: 1 + the last used column's index (0 when none is used)
        width = max(1, int((used * torch.arange(1, used.numel() + 1, device=used.device)).max()))
        if width == ref.shape[1]:
            continue
        for f in fields:
            t = batch.get(f)
            if isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] == ref.shape[1]:
                out[f] = t[:, :width]
    return out
