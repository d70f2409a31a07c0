"""Keep the logged training metrics in memory, step by step (for notebooks, the demo and tests)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class MetricHistory(Callback):
    """Records every ``train/...`` metric logged at each optimizer step into ``self.history`` ({key: [(step, value)]})."""

    def __init__(self, prefix: str = "train/") -> None:
        self.prefix = prefix
        self.history: dict[str, list[tuple[int, float]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stream = batch.get("stream") if isinstance(batch, dict) else None
        for key, value in trainer.callback_metrics.items():
            # callback_metrics keeps the last value of every key: record only this batch's stream
            if not key.startswith(self.prefix) or (stream and key.count("/") > 1 and f"/{stream}/" not in key):
                continue
            self.history.setdefault(key, []).append((step, float(value)))

    def first_last(self) -> dict[str, tuple[float, float]]:
        """For each metric, its mean over the first and over the last tenth of its records."""
        out = {}
        for key, rows in self.history.items():
            k = max(1, len(rows) // 10)
            first = sum(v for _, v in rows[:k]) / k
            last = sum(v for _, v in rows[-k:]) / k
            out[key] = (first, last)
        return out
