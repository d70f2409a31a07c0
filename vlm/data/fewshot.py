"""In-context (few-shot) prompts for models that read interleaved images and text (Flamingo).

:class:`FewShotPrompts` turns one query sample into a prompt of ``shots`` solved support examples followed by
the query, each as ``<image>`` + text, and keeps the query's reference answers for scoring. The prompt formats
are OpenFlamingo's evaluation prompts:

* VQA: ``<image>Question: {question} Short answer: {answer}<|endofchunk|>`` ... ``<image>Question: {question}
  Short answer:``
* captioning: ``<image>Output: {caption}<|endofchunk|>`` ... ``<image>Output:``

Prompts are left-padded (generation appends on the right). Support examples are drawn per query from a
support dataset with a generator seeded by the query's key, so every run and every rank builds the same
prompts. :class:`TaskDocuments` writes the same chunks as training documents (several solved examples of a
task per document), the interleaved data a model learns the format from.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from vlm.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, _pick_text, _Tokenized, skips_bad_samples
from vlm.errors import VLMConfigError

TASKS = ("vqa", "captioning")


#: how a training document may write its answers: ``short`` ("red"), or ``sentence`` ("the answer is red"),
#: which VQA accuracy counts as wrong. Documents with either style teach a model that the solved examples
#: before a question set the answer format, the reason few-shot prompts beat zero-shot ones in VQA.
ANSWER_STYLES = {"short": "{}", "sentence": "the answer is {}"}


def task_text(task: str, sample: dict[str, Any], with_answer: bool, lang: str = "en", style: str = "short") -> str:
    """The text of one chunk: the question (and answer) or the caption, in the task's prompt format."""
    if task == "vqa":
        text = f"Question: {sample['question']} Short answer:"
        return f"{text} {ANSWER_STYLES[style].format(sample['answer'])}" if with_answer else text
    if task == "captioning":
        return f"Output: {_pick_text(sample, lang, 'caption')}" if with_answer else "Output:"
    raise VLMConfigError(f"unknown few-shot task {task!r}; use one of {list(TASKS)}")


def references(task: str, sample: dict[str, Any], lang: str = "en") -> list[str]:
    """What a prediction is scored against: every accepted answer, or the caption(s)."""
    if task == "vqa":
        answers = sample.get("answers") or [sample["answer"]]
        return [str(a) for a in answers]
    if isinstance(sample.get("references"), list) and sample["references"]:  # every caption of a COCO image
        return [str(r) for r in sample["references"]]
    caps = sample.get("captions")
    if isinstance(caps, dict) and caps.get(lang):
        return [caps[lang]]
    return [_pick_text(sample, lang, "caption")]


class FewShotPrompts(_Tokenized):
    """Query sample -> left-padded in-context prompt with ``shots`` support examples; answers kept for scoring.

    Args:
        support: dataset of solved examples (same kind as the queries, another split), e.g. ``SyntheticVQA``.
        shots: support examples before the query (0 = zero-shot).
        task: ``vqa`` or ``captioning``.
        tokenizer: the model's tokenizer source ('synthetic', a local dir, a hub name).
        max_length: prompt tokens; support examples that do not fit are dropped, oldest first.
        image_size: images are resized to this square.
        seed: with the query's key, picks the support examples.
    """

    extra_special_tokens = ("<image>", "<|endofchunk|>")

    def __init__(self, support: Dataset, shots: int = 4, task: str = "vqa", tokenizer: str = "synthetic",
                 max_length: int = 128, image_size: int = 64, seed: int = 0,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        super().__init__(tokenizer)
        if task not in TASKS:
            raise VLMConfigError(f"FewShotPrompts: task={task!r}; use one of {list(TASKS)}.")
        if shots < 0 or (shots > 0 and len(support) < shots + 1):
            raise VLMConfigError(
                f"FewShotPrompts: shots={shots} needs shots >= 0 and a support set of at least shots+1 samples "
                f"(it has {len(support)}).")
        self.support, self.shots, self.task = support, int(shots), task
        self.max_length, self.image_size, self.seed = int(max_length), int(image_size), int(seed)
        self.image = ImageTransform(image_size, mean, std)

    def support_indices(self, key: Any) -> list[int]:
        """The support examples of the query with ``key`` (seeded by key and seed)."""
        if self.shots == 0:
            return []
        rng = random.Random(zlib.crc32(f"{self.seed}/{key}".encode()))
        return rng.sample(range(len(self.support)), self.shots)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]

    @skips_bad_samples
    def __call__(self, sample: dict[str, Any] | None) -> dict[str, Any] | None:
        if sample is None:
            return None
        tok = self.tokenizer
        image_id, eoc_id = (tok.convert_tokens_to_ids(t) for t in self.extra_special_tokens)
        shots = [self.support[i] for i in self.support_indices(sample.get("key"))]
        query = [image_id, *self._ids(task_text(self.task, sample, with_answer=False))]
        chunks = [[image_id, *self._ids(task_text(self.task, s, with_answer=True)), eoc_id] for s in shots]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        while chunks and len(bos) + sum(map(len, chunks)) + len(query) > self.max_length:
            chunks, shots = chunks[1:], shots[1:]
        ids = bos + [t for c in chunks for t in c] + query
        if len(ids) > self.max_length:
            raise VLMConfigError(
                f"FewShotPrompts: the query prompt alone takes {len(ids)} tokens; raise max_length ({self.max_length}).")
        pad = self.max_length - len(ids)
        images = [s["image"] for s in shots] + [sample["image"]]
        pixel_values = torch.stack([self.image(im) for im in images])
        slots = self.shots + 1
        if len(images) < slots:  # support examples dropped for length: empty slots at the front stay masked
            pixel_values = torch.cat([pixel_values.new_zeros(slots - len(images), *pixel_values.shape[1:]),
                                      pixel_values])
        image_mask = torch.zeros(slots, dtype=torch.bool)
        image_mask[slots - len(images):] = True
        out = {
            "pixel_values": pixel_values,
            "image_mask": image_mask,
            "input_ids": torch.tensor([tok.pad_token_id] * pad + ids, dtype=torch.long),
            "attention_mask": torch.tensor([0] * pad + [1] * len(ids), dtype=torch.long),
            "answers": references(self.task, sample),
            "shots": len(shots),
            "task": self.task,
            "key": str(sample.get("key")),
        }
        return self._finish(sample, out)


class TaskDocuments(Dataset):
    """Interleaved training documents of solved task examples: ``<image>`` + task text, ``per_document`` times.

    Each document takes ``per_document`` consecutive samples of ``dataset`` (document i uses samples
    i*per_document ...), written as :func:`task_text` with the answer; an :class:`InterleavedTransform`
    then tokenizes it with Flamingo's labels. ``answer_styles`` (VQA): each document writes all its answers in
    one style of :data:`ANSWER_STYLES`, picked per document (seeded by its index).
    """

    def __init__(self, dataset: Dataset, task: str = "vqa", per_document: int = 3,
                 answer_styles: Sequence[str] = ("short",)) -> None:
        unknown = sorted(set(answer_styles) - set(ANSWER_STYLES))
        if unknown or not answer_styles:
            raise VLMConfigError(f"TaskDocuments: answer_styles={list(answer_styles)}; use some of {list(ANSWER_STYLES)}.")
        self.answer_styles = list(answer_styles)
        if task not in TASKS:
            raise VLMConfigError(f"TaskDocuments: task={task!r}; use one of {list(TASKS)}.")
        if per_document < 1 or len(dataset) < per_document:
            raise VLMConfigError(
                f"TaskDocuments: per_document={per_document} needs 1 <= per_document <= len(dataset)={len(dataset)}.")
        self.dataset, self.task, self.per_document = dataset, task, int(per_document)

    def __len__(self) -> int:
        return len(self.dataset) // self.per_document

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range for {len(self)}")
        segments: list[tuple[str, Any]] = []
        keys = []
        style = self.answer_styles[zlib.crc32(f"style/{index}".encode()) % len(self.answer_styles)]
        for j in range(self.per_document):
            s = self.dataset[index * self.per_document + j]
            segments += [("image", s["image"]), ("text", task_text(self.task, s, with_answer=True, style=style))]
            keys.append(str(s.get("key")))
        return {"key": "+".join(keys), "segments": segments}
