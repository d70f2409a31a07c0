"""Held-out evaluation: dual-encoder models (anything with ``encode_image`` / ``encode_text``) by retrieval and
zero-shot classification; generative models (``generate`` / ``decode``) by few-shot VQA accuracy and CIDEr."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlm.data.collate import collate
from vlm.errors import VLMConfigError
from vlm.metrics.retrieval import RetrievalRecall, zero_shot_accuracy, zero_shot_classifier


@dataclass
class PairEmbeddings:
    """Embeddings of held-out image-text pairs, with what is needed to show them."""

    image: Tensor
    text: Tensor
    pair_ids: Tensor
    captions: list[str] = field(default_factory=list)
    class_index: Tensor | None = None
    samples: list[dict] = field(default_factory=list)


@torch.no_grad()
def embed_pairs(model, dataset, transform: Callable, batch_size: int = 50, keep_samples: bool = False) -> PairEmbeddings:
    """Run ``model.encode_image`` / ``model.encode_text`` over every (transformed) sample of ``dataset``."""
    for need in ("encode_image", "encode_text"):
        if not callable(getattr(model, need, None)):
            raise VLMConfigError(f"{type(model).__name__} has no `{need}`: held-out retrieval needs a dual-encoder model.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    imgs, txts, ids, caps, classes, raw = [], [], [], [], [], []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = collate([transform(s) for s in samples])
        if "pixel_values" not in batch:
            continue
        imgs.append(model.encode_image(batch["pixel_values"].to(device)).float().cpu())
        mask = batch.get("attention_mask")
        txts.append(model.encode_text(batch["input_ids"].to(device), None if mask is None else mask.to(device)).float().cpu())
        ids.append(batch["pair_id"].reshape(-1))
        caps.extend(batch.get("text") or [s.get("caption", "") for s in samples if s is not None])
        if "class_index" in batch:
            classes.append(batch["class_index"].reshape(-1))
        if keep_samples:
            raw.extend(s for s in samples if s is not None)
    model.train(was_training)
    return PairEmbeddings(torch.cat(imgs), torch.cat(txts), torch.cat(ids), caps,
                          torch.cat(classes) if classes else None, raw)


def retrieval(emb: PairEmbeddings, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in both directions over the held-out set."""
    metric = RetrievalRecall(ks=ks)
    metric.update(emb.image, emb.text, emb.pair_ids)
    return {k: float(v) for k, v in metric.compute().items()}


def zero_shot(model, emb: PairEmbeddings, class_names: Sequence[str], templates: Sequence[str],
              encode_prompts: Callable[[list[str]], Tensor], rows: Tensor | None = None) -> float:
    """Top-1 zero-shot classification accuracy of the held-out images that have a class (or of ``rows``)."""
    if emb.class_index is None:
        raise VLMConfigError("zero-shot accuracy needs samples with class_index.")
    weights = zero_shot_classifier(encode_prompts, list(class_names), list(templates))
    if rows is None:
        rows = (emb.class_index >= 0).nonzero().squeeze(1)  # -1: no class
    image, targets = emb.image[rows], emb.class_index[rows]
    return float(zero_shot_accuracy(image, weights, targets)["top1"])


def top_matches(emb: PairEmbeddings, n: int = 5) -> list[tuple[int, int, float]]:
    """For the first ``n`` images: (index of the image, index of the best-scoring caption, its similarity)."""
    sims = emb.image[:n] @ emb.text.T
    best = sims.argmax(1)
    return [(i, int(best[i]), float(sims[i, best[i]])) for i in range(min(n, emb.image.shape[0]))]


def evaluate_fewshot(model, queries, transform: Callable, batch_size: int = 50) -> tuple[float, list[dict]]:
    """Generate an answer for every query prompt (``vlm.data.fewshot.FewShotPrompts``) and score it.

    Returns (VQA accuracy or CIDEr-D by the transform's task, one dict per query with its key, prompt shots,
    prediction and references). ``model`` needs ``generate`` and ``decode`` (Flamingo).
    """
    from vlm.metrics.captioning import cider
    from vlm.metrics.vqa import vqa_accuracy

    model.eval()
    rows: list[dict] = []
    for start in range(0, len(queries), batch_size):
        batch = collate([transform(queries[i]) for i in range(start, min(len(queries), start + batch_size))])
        with torch.no_grad():
            preds = model.decode(model.generate(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                                batch["image_mask"]))
        rows += [{"key": k, "shots": int(s), "prediction": p, "references": r}
                 for k, s, p, r in zip(batch["key"], batch["shots"], preds, batch["answers"])]
    if transform.task == "captioning":
        score = cider([r["prediction"] for r in rows], [r["references"] for r in rows])
    else:
        score = sum(vqa_accuracy(r["prediction"], r["references"]) for r in rows) / max(1, len(rows))
    return float(score), rows


def evaluate_prompts(model, queries, transform: Callable, batch_size: int = 50,
                     **generate_kwargs) -> tuple[float | None, list[dict]]:
    """Generate for every query prompt of a single-image prefix-LM transform (``vlm.models.pali.PaLIPrompts``, or
    any transform giving ``pixel_values``/``input_ids``/``attention_mask``) and score it when it has references.

    Returns (VQA accuracy or CIDEr-D by the batch's ``task``, None without references; one dict per query with its
    key, prompt, prediction and references). ``generate_kwargs`` go to ``model.generate`` (``max_new_tokens``).
    """
    from vlm.metrics.captioning import cider
    from vlm.metrics.vqa import vqa_accuracy

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows: list[dict] = []
    task = None
    for start in range(0, len(queries), batch_size):
        batch = collate([transform(queries[i]) for i in range(start, min(len(queries), start + batch_size))])
        pixels = batch.get("pixel_values")
        with torch.no_grad():
            preds = model.decode(model.generate(None if pixels is None else pixels.to(device),
                                                batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                                **generate_kwargs))
        refs = batch.get("answers") or [None] * len(preds)
        keys = batch.get("key") or [None] * len(preds)
        task = batch.get("task", [task])[0] if batch.get("task") else task
        rows += [{"key": k, "prompt": t, "prediction": p, "references": r}
                 for k, t, p, r in zip(keys, batch["text"], preds, refs)]
    model.train(was_training)
    if not rows or rows[0]["references"] is None:
        return None, rows
    if task == "captioning":
        score = cider([r["prediction"] for r in rows], [r["references"] for r in rows])
    else:
        score = sum(vqa_accuracy(r["prediction"], r["references"]) for r in rows) / len(rows)
    return float(score), rows
