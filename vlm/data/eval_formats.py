"""Readers for the standard evaluation sets, yielding raw samples in the fields the transforms already read.

* :class:`KarpathySplit`: ``dataset_coco.json`` / ``dataset_flickr30k.json`` (Karpathy's splits:
  ``images[].split/filepath/filename/sentences[].raw``). ``per: image`` gives one sample per image for
  captioning (``caption`` = its first sentence, ``references`` = all of them, scored by CIDEr-D); ``per: caption``
  gives one sample per sentence, the sentences of one image sharing its ``pair_id`` (image <-> text retrieval).
* :class:`VQAv2`: the VQAv2 questions and annotations JSON files (``questions[].question_id/image_id/question``,
  ``annotations[].answers[].answer/multiple_choice_answer``) -> ``question``, ``answers`` (the ten human answers,
  scored by VQA accuracy) and ``answer`` (the majority answer, written into few-shot support examples).
* :class:`ClassFolder`: ``root/<class name>/*.jpg`` for zero-shot classification -> ``class_index`` (the position
  of the folder in ``classes``) and ``class_name``.

All three are map-style: a missing or corrupt image, or a malformed record, gives ``None`` (skipped and counted in
the batch's ``num_skipped``, the first few logged with the file and the reason), as in :mod:`vlm.data.readers`.
A file that is not the format at all, or a split with no image, is one :class:`~vlm.errors.VLMConfigError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlm.data.collate import CorruptSample, report_skip
from vlm.data.readers import IMAGE_EXTS, ImageFolder, decode_image
from vlm.errors import VLMConfigError

_PER = ("image", "caption")


def _load_json(path: Path, what: str, needs: str) -> dict[str, Any]:
    if not path.is_file():
        raise VLMConfigError(f"{what} {str(path)!r} does not exist; give the path of the JSON file.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise VLMConfigError(f"{path} is not valid JSON ({err}); give the {what}.") from err
    if not isinstance(data, dict) or not isinstance(data.get(needs), list):
        has = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise VLMConfigError(f"{path} has no {needs!r} list (it has {has}); give the {what}.")
    return data


class KarpathySplit(Dataset):
    """One split of Karpathy's COCO / Flickr30k JSON (``dataset_coco.json``): captioning or retrieval samples.

    Args:
        path: the JSON file (``{"images": [{"split", "filepath"?, "filename", "sentences": [{"raw"}], ...}]}``).
        image_root: folder the ``filepath/filename`` of each image is relative to (default: the JSON's folder).
        split: ``test``, ``val``, ``train``, ``restval`` or a list of them (COCO's Karpathy training set is
            ``[train, restval]``).
        per: ``image`` (one sample per image: ``caption`` = the first sentence, ``references`` = every sentence) or
            ``caption`` (one sample per sentence; an image's sentences share its ``pair_id``, so retrieval counts
            each of them as a match).
    """

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 split: str | Sequence[str] = "test", per: str = "image") -> None:
        self.path = Path(os.path.expanduser(str(path)))
        if per not in _PER:
            raise VLMConfigError(f"KarpathySplit: per={per!r}; use 'image' (captioning) or 'caption' (retrieval).")
        data = _load_json(self.path, "Karpathy split JSON (dataset_coco.json)", "images")
        splits = {split} if isinstance(split, str) else set(split)
        self.image_root = Path(os.path.expanduser(str(image_root))) if image_root is not None else self.path.parent
        self.per, self.stream_name = per, None
        images = [im for im in data["images"] if isinstance(im, dict) and im.get("split") in splits]
        if not images:
            present = sorted({str(im.get("split")) for im in data["images"] if isinstance(im, dict)})
            raise VLMConfigError(f"{self.path}: no image in split {sorted(splits)} (its splits are {present}); "
                                 "set split to one of them.")
        self.images = images
        # (image index, sentence index or None); a malformed image entry is one item that is skipped when read
        self.items: list[tuple[int, int | None]] = []
        for i, im in enumerate(images):
            n = len(im["sentences"]) if per == "caption" and isinstance(im.get("sentences"), list) else 0
            self.items += [(i, j) for j in range(n)] if n else [(i, None)]
        self._last: tuple[Path, Any] | None = None  # the last decoded image: per caption, 5 samples share one

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, path: Path):
        if self._last is None or self._last[0] != path:
            self._last = (path, decode_image(path))
        return self._last[1]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        i, j = self.items[index]
        im = self.images[i]
        image_id = im.get("cocoid", im.get("imgid", im.get("filename")))
        key = f"{image_id}" if j is None else f"{image_id}/{j}"
        try:
            name = im.get("filename")
            if not isinstance(name, str) or not name:
                raise CorruptSample(f"no 'filename' (it has {sorted(im)})")
            sents = [s.get("raw") if isinstance(s, dict) else s for s in im.get("sentences") or []]
            sents = [s.strip() for s in sents if isinstance(s, str) and s.strip()]
            if not sents:
                raise CorruptSample("no sentence with a 'raw' text")
            sample: dict[str, Any] = {"key": key, "image_id": image_id, "pair_id": i}
            if j is None:
                sample.update(caption=sents[0], references=sents)
            else:
                raw = im["sentences"][j]
                text = raw.get("raw") if isinstance(raw, dict) else raw
                if not isinstance(text, str) or not text.strip():
                    raise CorruptSample(f"sentence {j} has no 'raw' text")
                sample["caption"] = text.strip()
            sample["image"] = self._image(self.image_root / str(im.get("filepath") or "") / name)
        except CorruptSample as err:
            report_skip(self.stream_name, key, f"{self.path} image {i}", err.reason)
            return None
        return sample


class VQAv2(Dataset):
    """VQAv2 questions with their annotations (``v2_OpenEnded_mscoco_val2014_questions.json`` +
    ``v2_mscoco_val2014_annotations.json``): one sample per question.

    Args:
        questions: the questions JSON (``{"data_subtype": "val2014", "questions": [{question_id, image_id,
            question}]}``).
        annotations: the annotations JSON (``{"annotations": [{question_id, answers: [{answer}],
            multiple_choice_answer, question_type, answer_type}]}``).
        image_root: the folder of the images (e.g. ``val2014/``); default: the questions file's folder.
        image_pattern: file name of an image from its ``image_id``; default COCO's
            ``COCO_{data_subtype}_{image_id:012d}.jpg`` with ``data_subtype`` read from the questions file.
    """

    def __init__(self, questions: str | os.PathLike, annotations: str | os.PathLike,
                 image_root: str | os.PathLike | None = None, image_pattern: str | None = None) -> None:
        self.path = Path(os.path.expanduser(str(questions)))
        qdata = _load_json(self.path, "VQAv2 questions JSON", "questions")
        apath = Path(os.path.expanduser(str(annotations)))
        adata = _load_json(apath, "VQAv2 annotations JSON", "annotations")
        if image_pattern is None:
            subtype = qdata.get("data_subtype")
            if not isinstance(subtype, str):
                raise VLMConfigError(f"{self.path} has no 'data_subtype' to name the images by; set image_pattern, "
                                     "e.g. 'COCO_val2014_{image_id:012d}.jpg'.")
            image_pattern = f"COCO_{subtype}_{{image_id:012d}}.jpg"
        try:
            image_pattern.format(image_id=0)
        except (KeyError, IndexError, ValueError) as err:
            raise VLMConfigError(f"VQAv2: image_pattern={image_pattern!r} must name one field, {{image_id}} "
                                 f"(e.g. 'COCO_val2014_{{image_id:012d}}.jpg'): {err}") from err
        self.image_pattern = image_pattern
        self.image_root = Path(os.path.expanduser(str(image_root))) if image_root is not None else self.path.parent
        self.stream_name: str | None = None
        self.annotations = {a["question_id"]: a for a in adata["annotations"]
                            if isinstance(a, dict) and "question_id" in a}
        self.questions = [q for q in qdata["questions"] if isinstance(q, dict)]
        if self.questions and not any(q.get("question_id") in self.annotations for q in self.questions):
            raise VLMConfigError(f"no question of {self.path} has an annotation in {apath} (no question_id in "
                                 "common); give the annotations file of the same split.")

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        q = self.questions[index]
        qid = q.get("question_id")
        key = str(qid if qid is not None else f"{self.path.stem}-{index}")
        try:
            ann = self.annotations.get(qid)
            if ann is None:
                raise CorruptSample("no annotation with this question_id")
            question, image_id = q.get("question"), q.get("image_id")
            if not isinstance(question, str) or not question.strip():
                raise CorruptSample("no 'question' text")
            if not isinstance(image_id, int):
                raise CorruptSample(f"image_id is {image_id!r}, not an integer")
            answers = [str(a["answer"]) if isinstance(a, dict) else str(a) for a in ann.get("answers") or []
                       if not isinstance(a, dict) or "answer" in a]
            if not answers:
                raise CorruptSample("the annotation has no answers")
            answer = ann.get("multiple_choice_answer")
            sample = {"key": key, "question_id": qid, "image_id": image_id, "question": question.strip(),
                      "answers": answers, "answer": str(answer) if answer else max(answers, key=answers.count),
                      "question_type": ann.get("question_type"), "answer_type": ann.get("answer_type")}
            sample["image"] = decode_image(self.image_root / self.image_pattern.format(image_id=image_id))
        except CorruptSample as err:
            report_skip(self.stream_name, key, f"{self.path} question {index}", err.reason)
            return None
        return sample


class ClassFolder(ImageFolder):
    """Zero-shot classification images in ``root/<class name>/``: ``class_index`` is the folder's place in
    ``classes``.

    Args:
        root: the folder of class folders.
        classes: the class folders, in the order of the model's class names (FLAVA's ``zeroshot_class_names``);
            default: every sub-folder holding an image, sorted. Every listed folder must exist.
    """

    def __init__(self, root: str | os.PathLike, classes: Sequence[str] | None = None) -> None:  # noqa: D107
        # ImageFolder's reading (image_sample) with its own item list: classes in the given order, no flat folder
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise VLMConfigError(f"class folder root {str(self.root)!r} does not exist; give a directory of "
                                 "class folders (root/<class name>/*.jpg).")
        is_img = lambda p: p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS  # noqa: E731
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and any(map(is_img, d.iterdir())))
        if classes is None:
            classes = found
        missing = [c for c in classes if not (self.root / c).is_dir()]
        if missing:
            raise VLMConfigError(f"ClassFolder: classes {missing} have no folder under {self.root} (its class "
                                 f"folders are {found}); fix `classes` or the folder names.")
        self.classes = [str(c) for c in classes]
        if not self.classes:
            raise VLMConfigError(f"no class folder with images ({', '.join(IMAGE_EXTS)}) under {self.root}.")
        self.items = [(p, c) for c, name in enumerate(self.classes)
                      for p in sorted((self.root / name).iterdir()) if is_img(p)]
        self.stream_name: str | None = None

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.image_sample(index)  # no pair_id: class images are not retrieval pairs


def check_class_names(streams: dict[str, Any], model: Any, group: str = "val_streams") -> None:
    """One clear error when a stream's classes (a dataset with ``classes``) are not the model's zero-shot class
    names, in order: ``class_index`` would point at the wrong prompt, and the accuracy would mean nothing."""
    if not hasattr(model, "zeroshot_class_names"):
        return
    names = list(model.zeroshot_class_names or [])
    for name, stream in streams.items():
        classes = getattr(getattr(stream, "dataset", None), "classes", None)
        if not isinstance(classes, list) or not classes or classes == names:
            continue
        raise VLMConfigError(
            f"data.init_args.{group}.{name} reads the classes {classes}, but model.init_args.zeroshot_class_names "
            f"is {names or None}: zero-shot accuracy needs the same names in the same order. Set "
            "zeroshot_class_names to the stream's classes (or give ClassFolder `classes` in the model's order).")
