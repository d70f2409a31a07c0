"""Write what ``predict_step`` returns to a JSON Lines file, one line per prediction, as the batches arrive.

    trainer:
      callbacks:
        - class_path: vlm.callbacks.PredictionWriter
          init_args: {path: runs/predictions/flamingo-tiny.jsonl}

``predict_step`` returning a list of dicts (Flamingo: ``{key, stream, prediction, references}``) gives one line
per dict; a single dict gives one line; a tensor gives one line holding it as a (nested) list. Tensors inside a
dict are written as lists too.

Under DDP each rank writes its own file (``predictions.rank1.jsonl`` for ``predictions.jsonl``); at the end of
prediction rank 0 merges them into ``path``, sorted by key (each rank holds a share of the batches, so the merged
file does not depend on the number of ranks), and removes the per-rank files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter


def _plain(value: Any) -> Any:
    """``value`` with tensors (and numpy values) turned into JSON-writable lists and numbers."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return value


def records_of(prediction: Any) -> list[Any]:
    """The lines one ``predict_step`` output becomes."""
    if prediction is None:
        return []
    if isinstance(prediction, Mapping) or isinstance(prediction, torch.Tensor):
        return [_plain(prediction)]
    if isinstance(prediction, Sequence) and not isinstance(prediction, (str, bytes)):
        return [_plain(p) for p in prediction]
    return [_plain(prediction)]


def _order(record: Any) -> tuple:
    """Sort key of a merged line: by ``key`` (then ``stream``); lines without a key keep their place at the end."""
    if isinstance(record, Mapping) and record.get("key") is not None:
        return (0, str(record["key"]), str(record.get("stream") or ""))
    return (1, "", "")


class PredictionWriter(BasePredictionWriter):
    """Append every prediction of ``predict`` to ``path`` as one JSON line (written after each batch).

    Args:
        path: the JSON Lines file; its folder is created. A run starts the file afresh.
    """

    def __init__(self, path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)

    def rank_path(self, rank: int, world_size: int) -> Path:
        """The file rank ``rank`` writes: ``path`` itself in one process, ``stem.rank{r}.suffix`` under DDP."""
        if world_size <= 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")

    def _mine(self, trainer) -> Path:
        return self.rank_path(int(trainer.global_rank), int(trainer.world_size))

    def on_predict_start(self, trainer, pl_module) -> None:
        out = self._mine(trainer)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records_of(prediction)]
        if lines:
            with self._mine(trainer).open("a", encoding="utf-8") as f:
                f.writelines(lines)

    def on_predict_end(self, trainer, pl_module) -> None:
        world = int(trainer.world_size)
        if world <= 1:
            return
        trainer.strategy.barrier("PredictionWriter.merge")
        if trainer.global_rank == 0:
            self.merge(world)
        trainer.strategy.barrier("PredictionWriter.merged")

    def merge(self, world_size: int) -> Path:
        """Join the per-rank files into ``path`` in key order and remove them."""
        parts = [self.rank_path(r, world_size) for r in range(world_size)]
        records = []
        for part in parts:
            if part.exists():
                with part.open(encoding="utf-8") as f:
                    records += [json.loads(line) for line in f if line.strip()]
        records.sort(key=_order)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        tmp.replace(self.path)
        for part in parts:
            part.unlink(missing_ok=True)
        return self.path
