"""Collate samples into a batch: stack tensors, pad ragged ones, drop and count skipped samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vlm.data.fields import PAD_VALUES

SKIPPED_KEY = "_skipped"  # a sample may carry how many corrupt samples were skipped just before it
PAD_ID_KEY = "_pad_token_id"  # a sample may carry its tokenizer's pad id (used to pad input_ids)


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
