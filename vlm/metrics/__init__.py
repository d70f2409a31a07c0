"""Task metrics built on torchmetrics."""

from vlm.metrics.captioning import BLEU, CIDEr, cider, cider_d_scores, tokenize_caption
from vlm.metrics.retrieval import RetrievalRecall, zero_shot_accuracy, zero_shot_classifier
from vlm.metrics.vqa import VQAAccuracy, normalize_answer, vqa_accuracy

__all__ = [
    "BLEU",
    "CIDEr",
    "RetrievalRecall",
    "VQAAccuracy",
    "cider",
    "cider_d_scores",
    "normalize_answer",
    "tokenize_caption",
    "vqa_accuracy",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
