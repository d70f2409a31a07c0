"""Held-out evaluation: dual-encoder models (anything with ``encode_image`` / ``encode_text``) by retrieval and
zero-shot classification; generative models (``generate`` / ``decode``) by few-shot VQA accuracy and CIDEr.

Two ways in: functions over a whole dataset (``embed_pairs``, ``retrieval``, ``zero_shot``: the demo's held-out
report), and :class:`Evaluator` objects that a model lists in ``evaluators()``: the base module
(``vlm.models.base.VLMModule``) resets them when a validation/test epoch starts, hands them every evaluation
batch beside the losses, and lets them log at the epoch's end, on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlm.data.collate import collate
from vlm.errors import VLMConfigError
from vlm.metrics.retrieval import RetrievalRecall, zero_shot_accuracy, zero_shot_classifier
from vlm.parallel import all_gather_objects, reduce_weighted_means


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


class Evaluator:
    """Scores held-out batches during ``validate``/``test``: ``reset`` when an epoch starts, ``update`` with every
    evaluation batch (``prefix`` is "val" or "test"), ``log`` at the epoch's end on every rank (it may gather)."""

    def reset(self) -> None:
        """Forget the previous epoch."""

    def update(self, model, prefix: str, batch: Mapping[str, Any]) -> None:
        """Take one evaluation batch (ignore it if it lacks the fields this evaluator needs)."""

    def log(self, model, prefix: str) -> None:
        """Log this epoch's metrics through ``model.log``; called on every rank."""


def _log(model, key: str, value: Tensor) -> None:
    model.log(key, value.to(model.device), sync_dist=False, add_dataloader_idx=False, rank_zero_only=False)


class RetrievalEvaluator(Evaluator):
    """Zero-shot image-text retrieval over every pair of the split: ``{prefix}/retrieval/{t2i,i2t}_R@k``.

    Takes batches with ``pixel_values``, ``input_ids`` and ``pair_id`` and embeds them with the model's
    ``encode_image`` / ``encode_text``. At the end every caption is ranked against every image of the split,
    whichever rank embedded them (``vlm.metrics.RetrievalRecall`` over the rows of all ranks). With several
    such streams each is ranked on its own and its name is appended (``.../t2i_R@1/<stream>``).
    """

    def __init__(self, ks: Sequence[int] = (1, 5, 10)) -> None:
        self.ks = tuple(int(k) for k in ks)
        self.rows: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}

    def reset(self) -> None:
        self.rows = {}

    def update(self, model, prefix: str, batch: Mapping[str, Any]) -> None:
        if batch.get("pair_id") is None or batch.get("input_ids") is None or batch.get("pixel_values") is None:
            return
        self.rows.setdefault(str(batch.get("stream")), []).append((
            model.encode_image(batch["pixel_values"]).float().cpu(),
            model.encode_text(batch["input_ids"], batch.get("attention_mask")).float().cpu(),
            batch["pair_id"].reshape(-1).long().cpu(),
        ))

    def log(self, model, prefix: str) -> None:
        # every rank takes part in the gather, also one that held no pairs batch
        local = {k: tuple(torch.cat(col) for col in zip(*rows)) for k, rows in self.rows.items()}
        gathered = all_gather_objects(local)
        streams = sorted(set().union(*gathered))
        for stream in streams:
            parts = [g[stream] for g in gathered if stream in g]
            metric = RetrievalRecall(ks=self.ks, sync_on_compute=False)
            metric.update(*(torch.cat(col) for col in zip(*parts)))
            suffix = "" if len(streams) == 1 else f"/{stream}"
            for k, v in metric.compute().items():
                _log(model, f"{prefix}/retrieval/{k}{suffix}", v)
        self.rows = {}


class ZeroShotEvaluator(Evaluator):
    """Zero-shot classification by prompts: ``{prefix}/zeroshot/top1``, a mean over every rank's images.

    The class embeddings are the mean of the L2-normalised embeddings of each class's prompts
    (``templates`` with ``{}`` for the name, encoded once per epoch by ``tokenizer`` and the model's
    ``encode_text``); an image of a batch with ``class_index`` is right when its class scores highest
    (``class_index`` -1: the image has no class, left out). With several such streams each gets its own
    ``.../top1/<stream>``.
    """

    def __init__(self, class_names: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 tokenizer: Any = None, max_length: int = 77) -> None:
        if not class_names or not templates:
            raise VLMConfigError("ZeroShotEvaluator needs at least one class name and one template.")
        if tokenizer is None:
            raise VLMConfigError("ZeroShotEvaluator needs the tokenizer of the model's text tower to encode the prompts.")
        self.class_names, self.templates = list(class_names), list(templates)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.weights: Tensor | None = None
        self.sums: dict[str, tuple[Tensor, float]] = {}

    def reset(self) -> None:
        self.weights, self.sums = None, {}

    def classifier(self, model) -> Tensor:
        """Class embeddings ``[C, E]`` from the model's text tower (computed once per epoch)."""
        if self.weights is None:
            tok = self.tokenizer
            length = min(self.max_length, getattr(tok, "model_max_length", self.max_length))

            def encode(texts: list[str]) -> Tensor:
                enc = tok(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
                return model.encode_text(enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device))

            self.weights = zero_shot_classifier(encode, self.class_names, self.templates)
        return self.weights

    def update(self, model, prefix: str, batch: Mapping[str, Any]) -> None:
        if batch.get("class_index") is None or batch.get("pixel_values") is None:
            return
        logits = model.encode_image(batch["pixel_values"]) @ self.classifier(model).to(model.device).T
        target = batch["class_index"].reshape(-1).to(logits.device)
        hits = (logits.argmax(-1) == target).double()[target >= 0]
        stream = str(batch.get("stream"))
        total, count = self.sums.get(stream, (0.0, 0.0))
        self.sums[stream] = (hits.sum().cpu() + total, count + hits.numel())

    def log(self, model, prefix: str) -> None:
        means = reduce_weighted_means(self.sums, model.device)  # every rank, also one without class batches
        for stream, value in means.items():
            _log(model, f"{prefix}/zeroshot/top1" if len(means) == 1 else f"{prefix}/zeroshot/top1/{stream}", value)
        self.sums = {}
