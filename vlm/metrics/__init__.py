"""Task metrics built on torchmetrics."""

from vlm.metrics.retrieval import RetrievalRecall, zero_shot_accuracy, zero_shot_classifier

__all__ = ["RetrievalRecall", "zero_shot_accuracy", "zero_shot_classifier"]
