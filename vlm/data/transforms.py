"""Transforms: raw sample dict -> model fields (see ``vlm.data.fields``).

Every transform is a plain class with simple init args (YAML-friendly through LightningCLI
``class_path``/``init_args``); a tokenizer is named by its source string and loaded lazily, once per process,
so transforms pickle cheaply into DataLoader workers. ``None`` in gives ``None`` out (a skipped sample), and
the reader's ``_skipped`` count rides along to ``collate``. A sample the transform cannot use (a missing,
empty or wrongly typed field, an image that is not an image) raises
:class:`~vlm.data.collate.CorruptSample`, which the stream turns into a skipped, counted, logged sample.
Over-long text is cut to ``max_length`` tokens, never skipped.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlm.data.collate import PAD_ID_KEY, SKIPPED_KEY, CorruptSample
from vlm.data.tokenizers import END_OF_CHUNK, IMAGE_TOKEN, LOC_TOKENS_ALIAS, load_tokenizer
from vlm.errors import VLMConfigError
from vlm.objectives.captioning import flamingo_labels

#: CLIP's normalisation (FLAVA uses it too)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LANG_NAMES = {"en": "EN", "fr": "FR", "de": "DE", "es": "ES"}
PALI_TASKS = ("caption", "vqa", "vqg", "object_qa", "ocr", "detection")


def skips_bad_samples(call: Callable) -> Callable:
    """Make a transform's ``__call__`` raise ``CorruptSample`` (key and shard attached) for a malformed sample.

    Errors a sample's content can cause (a missing key, a wrong type) become ``CorruptSample``; a
    ``VLMConfigError`` (the transform itself is misconfigured) passes through unchanged.
    """

    @functools.wraps(call)
    def wrapper(self, sample):
        try:
            return call(self, sample)
        except VLMConfigError:
            raise
        except CorruptSample as err:
            if err.key is None and isinstance(sample, dict):
                err.key, err.source = sample.get("key"), err.source or sample.get("__url__")
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            missing = err.args[0] if isinstance(err, KeyError) and isinstance(sample, dict) and err.args else None
            reason = f"no field {missing!r}" if missing is not None else f"{type(err).__name__}: {err}"
            raise CorruptSample(reason, sample.get("key") if isinstance(sample, dict) else None,
                                sample.get("__url__") if isinstance(sample, dict) else None,
                                missing_field=missing if isinstance(missing, str) else None) from err

    return wrapper


class ImageTransform:
    """PIL/numpy image -> normalised ``float[3,H,W]``; optional random resized crop for training.

    No horizontal flip: captions name left and right, and a flip would make them wrong.
    """

    def __init__(
        self,
        image_size: int = 64,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        train: bool = False,
        random_resized_crop: bool = False,
        crop_scale_min: float = 0.8,
    ) -> None:
        if image_size < 1 or len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise VLMConfigError(
                f"ImageTransform needs image_size >= 1 and 3-value mean/std with std > 0; got {image_size}, {mean}, {std}"
            )
        self.image_size, self.train = int(image_size), bool(train)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.random_resized_crop, self.crop_scale_min = bool(random_resized_crop), float(crop_scale_min)

    def __call__(self, image: Image.Image | np.ndarray | None) -> Tensor | None:
        if image is None:
            return None
        try:
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if not isinstance(image, Image.Image):
                raise CorruptSample(f"the image is a {type(image).__name__}, not a PIL image or uint8 HWC array")
            if min(image.size) < 1:
                raise CorruptSample(f"the image is empty ({image.size[0]}x{image.size[1]})")
            image = image.convert("RGB")
        except (TypeError, ValueError, OSError) as err:  # an array of the wrong shape or dtype, an odd mode
            if isinstance(err, CorruptSample):
                raise
            raise CorruptSample(f"unusable image ({type(err).__name__}: {err})") from err
        if self.train and self.random_resized_crop:
            from torchvision.transforms import v2

            # crop only mildly (scale >= crop_scale_min) so objects named in the caption stay in view
            crop = v2.RandomResizedCrop(self.image_size, scale=(self.crop_scale_min, 1.0), antialias=True)
            image = crop(image)
        elif image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


class _Tokenized:
    """Shared lazy-tokenizer plumbing: the tokenizer is loaded on first use and never pickled."""

    tokenizer_source: str
    extra_special_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer: str, special_tokens: Sequence[str] | None = None) -> None:
        if not isinstance(tokenizer, str):
            raise VLMConfigError(
                f"give the tokenizer as a source string ('minilm', 'synthetic', a dir or a hub name), got {type(tokenizer).__name__}"
            )
        self.tokenizer_source = tokenizer
        self.special_tokens = [*self.extra_special_tokens, *(special_tokens or [])]
        self._tok = None

    @property
    def tokenizer(self):
        """The loaded tokenizer (loaded on first access in each process)."""
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_source, special_tokens=self.special_tokens or None)
        return self._tok

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tok"] = None  # workers reload it: a few ms, and the pickle stays small
        return state

    def _encode(self, text: str, max_length: int) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(text, padding="max_length", truncation=True, max_length=max_length)
        return torch.tensor(enc["input_ids"], dtype=torch.long), torch.tensor(
            enc["attention_mask"], dtype=torch.long
        )

    def _finish(self, sample: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        if sample.get(SKIPPED_KEY):
            out[SKIPPED_KEY] = sample[SKIPPED_KEY]
        out[PAD_ID_KEY] = self.tokenizer.pad_token_id
        return out


def _pick_text(sample: dict[str, Any], lang: str, field: str) -> str:
    caps = sample.get("captions")
    if lang == "all" and isinstance(caps, dict) and caps:
        keys = sorted(caps)
        text = caps[keys[int(torch.randint(len(keys), ()))]]
        if not isinstance(text, str) or not text.strip():
            raise CorruptSample(f"caption {text!r} is not text")
        return text
    if isinstance(caps, dict) and isinstance(caps.get(lang), str) and caps[lang].strip():
        return caps[lang]
    keys = (field, "caption", "text")
    for key in keys:
        value = sample.get(key)
        if isinstance(value, str) and value.strip():
            return value
    present = [(k, sample[k]) for k in dict.fromkeys(keys) if k in sample]
    if not present:
        fields = sorted(k for k in sample if not k.startswith("_"))
        raise CorruptSample(f"no text field {field!r} (nor 'caption'/'text'); it has {fields}", missing_field=field)
    k, v = present[0]
    raise CorruptSample(f"text field {k!r} is {'empty' if isinstance(v, str) else f'a {type(v).__name__}'}")


def _field_text(sample: dict[str, Any], lang: str, field: str) -> str:
    """``sample[field]`` when it is non-empty text, else what ``_pick_text`` finds (captions, 'caption', 'text')."""
    text = sample.get(field)
    return text if isinstance(text, str) and text.strip() else _pick_text(sample, lang, field)


def _ids_fields(sample: dict[str, Any], out: dict[str, Any]) -> None:
    for k in ("pair_id", "class_index"):
        if k in sample and sample[k] is not None:
            out[k] = int(sample[k])


def _shape_words() -> tuple[str, ...]:
    from vlm.data.synthetic import _SHAPE_WORDS

    return tuple(noun for noun, _ in _SHAPE_WORDS["en"].values())


def shape_swapped_captions(caption: str, objects: Sequence[Any], k: int, key: Any) -> list[str]:
    """``k`` hard negatives of an English synthetic-world caption: one shape word swapped for another shape's.

    Each negative changes exactly one shape noun (an object's, never one inside a quoted word) and fixes the
    article right before it (a/an). Distinct (object, new shape) swaps are drawn first, by a generator seeded
    from ``key``, so a sample gets the same negatives in every epoch and every worker. Empty when the caption
    names no shape of ``objects``.
    """
    words = _shape_words()
    shapes = {str(o.get("shape")) for o in objects if isinstance(o, dict)}
    if not shapes.intersection(words):
        return []
    quoted = [m.span() for m in re.finditer(r'"[^"]*"', caption)]
    spots = [m for m in re.finditer(r"\b(" + "|".join(map(re.escape, words)) + r")\b", caption)
             if not any(a <= m.start() < b for a, b in quoted)]
    swaps = [(m, w) for m in spots for w in words if w != m.group(1)]
    if not swaps:
        return []
    rng = random.Random(zlib.crc32(str(key).encode()))
    picks = rng.sample(swaps, min(k, len(swaps)))
    picks += [rng.choice(swaps) for _ in range(k - len(picks))]
    out = []
    for m, word in picks:
        head, tail = caption[: m.start()], caption[m.end():]
        article = re.search(r"\b(a|an|A|An) $", head)
        if article:
            a = article.group(1)
            new = ("an" if word[0] in "aeiou" else "a")
            head = head[: article.start()] + (new.capitalize() if a[0] == "A" else new) + " "
        out.append(head + word + tail)
    return out


class ImageTextTransform(_Tokenized):
    """Image-text pair -> ``pixel_values``, ``input_ids``, ``attention_mask`` (padded), ``pair_id``, ``class_index``, ``text``.

    ``hard_negatives=K > 0`` (NegCLIP-style) adds ``negative_input_ids`` and ``negative_attention_mask``
    ``[K, max_length]`` and ``negative_mask`` ``bool[K]``: the English caption of a synthetic-world sample
    (one with ``objects``) with one object's shape word swapped (see :func:`shape_swapped_captions`). A sample
    without objects, or whose text is not its English caption, gets padding rows with ``negative_mask`` False,
    so every sample of the stream carries the same fields.
    """

    def __init__(
        self,
        tokenizer: str = "minilm",
        max_length: int = 32,
        image_size: int = 64,
        lang: str = "en",
        text_field: str = "caption",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        train: bool = False,
        random_resized_crop: bool = False,
        special_tokens: list[str] | None = None,
        hard_negatives: int = 0,
    ) -> None:
        super().__init__(tokenizer, special_tokens)
        if hard_negatives < 0:
            raise VLMConfigError(f"ImageTextTransform: hard_negatives must be >= 0, got {hard_negatives}.")
        self.max_length, self.lang, self.text_field = int(max_length), lang, text_field
        self.hard_negatives = int(hard_negatives)
        self.image = ImageTransform(image_size, mean, std, train, random_resized_crop)

    def _negatives(self, sample: dict[str, Any], text: str, out: dict[str, Any]) -> None:
        k, length = self.hard_negatives, self.max_length
        caps = sample.get("captions")
        english = caps.get("en") if isinstance(caps, dict) else sample.get("caption")
        objects = sample.get("objects")
        negs = (shape_swapped_captions(text, objects, k, sample.get("key", text))
                if isinstance(objects, list) and text == english else [])
        ids = torch.full((k, length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(k, length, dtype=torch.long)
        for i, neg in enumerate(negs):
            ids[i], mask[i] = self._encode(neg, length)
        out["negative_input_ids"], out["negative_attention_mask"] = ids, mask
        out["negative_mask"] = torch.arange(k) < len(negs)

    @skips_bad_samples
    def __call__(self, sample: dict[str, Any] | None) -> dict[str, Any] | None:
        if sample is None:
            return None
        text = _pick_text(sample, self.lang, self.text_field)
        ids, mask = self._encode(text, self.max_length)
        out: dict[str, Any] = {
            "pixel_values": self.image(sample["image"]),
            "input_ids": ids,
            "attention_mask": mask,
        }
        if self.hard_negatives:
            self._negatives(sample, text, out)
        _ids_fields(sample, out)
        out["text"] = text
        return self._finish(sample, out)


class TextTransform(_Tokenized):
    """Text sample -> ``input_ids``, ``attention_mask`` (padded to ``max_length``), ``text``."""

    def __init__(
        self, tokenizer: str = "minilm", max_length: int = 32, text_field: str = "text", lang: str = "en",
        special_tokens: list[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(tokenizer, special_tokens)
        self.max_length, self.text_field, self.lang = int(max_length), text_field, lang

    @skips_bad_samples
    def __call__(self, sample: dict[str, Any] | None) -> dict[str, Any] | None:
        if sample is None:
            return None
        text = _field_text(sample, self.lang, self.text_field)
        ids, mask = self._encode(text, self.max_length)
        return self._finish(sample, {"input_ids": ids, "attention_mask": mask, "text": text})


class ImageOnlyTransform:
    """Image sample -> ``pixel_values`` (+ ``class_index``, ``pair_id`` when present)."""

    def __init__(
        self, image_size: int = 64, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
        train: bool = False, random_resized_crop: bool = False,
    ) -> None:  # fmt: skip
        self.image = ImageTransform(image_size, mean, std, train, random_resized_crop)

    @skips_bad_samples
    def __call__(self, sample: dict[str, Any] | None) -> dict[str, Any] | None:
        if sample is None:
            return None
        out: dict[str, Any] = {"pixel_values": self.image(sample["image"])}
        _ids_fields(sample, out)
        if sample.get(SKIPPED_KEY):
            out[SKIPPED_KEY] = sample[SKIPPED_KEY]
        return out


class InterleavedTransform(_Tokenized):
    """Interleaved document (or an image-text pair) -> Flamingo fields.

    ``input_ids`` carry ``<image>`` where an image stands and ``<|endofchunk|>`` after the text that follows
    each image. ``labels`` equal ``input_ids`` (unshifted; the model shifts) except -100 on padding, on
    ``<image>``, on the leading bos, on text before the first image and on text between an
    ``<|endofchunk|>`` and the next ``<image>``: Flamingo scores only text conditioned on a preceding image.
    Images beyond ``max_images`` end the document there. ``pixel_values`` is ``float[max_images,3,H,W]``
    (zeros in empty slots), ``image_mask`` marks real slots.
    """

    extra_special_tokens = (IMAGE_TOKEN, END_OF_CHUNK)

    def __init__(
        self,
        tokenizer: str = "synthetic",
        max_length: int = 64,
        max_images: int = 3,
        image_size: int = 64,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        train: bool = False,
        random_resized_crop: bool = False,
        special_tokens: list[str] | None = None,
    ) -> None:
        super().__init__(tokenizer, special_tokens)
        if max_images < 1 or max_length < 4:
            raise VLMConfigError(
                f"InterleavedTransform needs max_images >= 1 and max_length >= 4, got {max_images}, {max_length}"
            )
        self.max_length, self.max_images, self.image_size = int(max_length), int(max_images), int(image_size)
        self.image = ImageTransform(image_size, mean, std, train, random_resized_crop)

    def token_plan(self, segments: list[tuple[str, Any]]) -> tuple[list[int], list[Any]]:
        """Unpadded ``(input_ids, images)`` of a document, before truncation to ``max_length``."""
        tok = self.tokenizer
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        eoc_id = tok.convert_tokens_to_ids(END_OF_CHUNK)
        ids: list[int] = [tok.bos_token_id] if tok.bos_token_id is not None else []
        images: list[Any] = []
        after_image = False  # the next text is the one that follows an image: it is closed by <|endofchunk|>
        for kind, value in segments:
            if kind == "image":
                if len(images) == self.max_images:
                    break
                images.append(value)
                ids.append(image_id)
                after_image = True
                continue
            ids += tok(" " + value.strip(), add_special_tokens=False)["input_ids"]
            if after_image:
                ids.append(eoc_id)
                after_image = False
        return ids, images

    @skips_bad_samples
    def __call__(self, sample: dict[str, Any] | None) -> dict[str, Any] | None:
        if sample is None:
            return None
        segments = sample.get("segments")
        if segments is None:  # an image-text pair is a one-image document: "<image> caption <|endofchunk|>"
            segments = [("image", sample["image"]), ("text", _pick_text(sample, "en", "caption"))]
        ids, images = self.token_plan(list(segments))
        ids = ids[: self.max_length]
        tok = self.tokenizer
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        images = images[: sum(1 for i in ids if i == image_id)]  # an <image> cut off by truncation drops its image
        n, pad = len(ids), self.max_length - len(ids)
        pixel_values = torch.zeros(self.max_images, 3, self.image_size, self.image_size)
        for t, img in enumerate(images):
            pixel_values[t] = self.image(img)
        image_mask = torch.zeros(self.max_images, dtype=torch.bool)
        image_mask[: len(images)] = True
        input_ids = torch.tensor(ids + [tok.pad_token_id] * pad, dtype=torch.long)
        attention_mask = torch.tensor([1] * n + [0] * pad, dtype=torch.long)
        # Flamingo's label rule, written once (vlm.objectives.captioning.flamingo_labels); padding by the mask,
        # since a tokenizer may pad with a token (eos) that also occurs in text
        labels = flamingo_labels(input_ids[None], image_token_id=image_id,
                                 end_of_chunk_token_id=tok.convert_tokens_to_ids(END_OF_CHUNK),
                                 pad_token_id=-1)[0].masked_fill(attention_mask == 0, -100)
        out = {
            "pixel_values": pixel_values,
            "image_mask": image_mask,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "text": " ".join(v if k == "text" else IMAGE_TOKEN for k, v in segments),
        }
        return self._finish(sample, out)


class PrefixLMTransform(_Tokenized):
    """PaLI-style sample: image + text prompt for the encoder, target text as decoder ``labels``.

    ``task`` is one of 'caption', 'vqa', 'vqg', 'object_qa', 'ocr', 'detection', or several comma-separated (one
    drawn per sample). 'object_qa' is PaLI's object-aware VQA: a question from the sample's ``object_qa`` list
    ("is there a circle in the image?" -> yes / no) in the ``Answer in EN: ...`` prompt. Given ``prompt_field`` and ``target_field``, the prompt and target are read from those fields
    instead. The tokenizer always gets the 1024 ``<locNNNN>`` tokens, so the vocabulary is the same for
    every task mixture.
    """

    extra_special_tokens = (LOC_TOKENS_ALIAS,)

    def __init__(
        self,
        tokenizer: str = "synthetic",
        task: str = "caption",
        lang: str = "en",
        prompt_field: str | None = None,
        target_field: str | None = None,
        max_length: int = 32,
        target_max_length: int = 32,
        image_size: int = 64,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        train: bool = False,
        random_resized_crop: bool = False,
        special_tokens: list[str] | None = None,
    ) -> None:
        super().__init__(tokenizer, special_tokens)
        self.tasks = [t.strip() for t in task.split(",") if t.strip()]
        bad = [t for t in self.tasks if t not in PALI_TASKS]
        if bad or not self.tasks:
            raise VLMConfigError(
                f"unknown PaLI task(s) {bad or task!r}; use one or more (comma-separated) of {list(PALI_TASKS)}"
            )
        if (prompt_field is None) != (target_field is None):
            raise VLMConfigError("give both prompt_field and target_field, or neither")
        if lang not in (*LANG_NAMES, "all"):
            raise VLMConfigError(f"unknown language {lang!r}; use one of {[*LANG_NAMES, 'all']}")
        self.lang, self.prompt_field, self.target_field = lang, prompt_field, target_field
        self.max_length, self.target_max_length = int(max_length), int(target_max_length)
        self.train = bool(train)
        self.image = ImageTransform(image_size, mean, std, train, random_resized_crop)

    def _choice(self, n: int) -> int:
        # training draws (seeded per worker by the DataLoader); evaluation is deterministic
        return int(torch.randint(n, ())) if self.train and n > 1 else 0

    def prompt_and_target(self, sample: dict[str, Any]) -> tuple[str, str]:
        """The (prompt, target) text pair for ``sample`` under this transform's task(s)."""
        if self.prompt_field is not None:
            return str(sample[self.prompt_field]), str(sample[self.target_field])
        task = self.tasks[self._choice(len(self.tasks))]
        langs = list(LANG_NAMES) if self.lang == "all" else [self.lang]
        lang = langs[self._choice(len(langs))]
        code = LANG_NAMES[lang]
        if task == "caption":
            return f"Generate the alt_text in {code}", _pick_text(sample, lang, "caption")
        if task in ("vqa", "vqg"):
            if "question" in sample and ("answer" in sample or sample.get("answers")):
                q, a = sample["question"], sample.get("answer") or sample["answers"][0]
            else:
                pool = [x for x in sample.get("vqa", []) if x.get("lang") == lang]
                if not pool:
                    raise CorruptSample(f"no question/answer in {lang!r} for task {task!r}", missing_field="question")
                qa = pool[self._choice(len(pool))]
                q, a = qa["question"], qa["answer"]
            if task == "vqa":
                return f"Answer in {code}: {q}", a
            return f"Generate a question in {code} for {a}", q
        if task == "object_qa":
            pool = [x for x in sample["object_qa"] if x.get("lang") == lang]
            if not pool:
                raise CorruptSample(f"no object-aware question in {lang!r}", missing_field="object_qa")
            qa = pool[self._choice(len(pool))]
            return f"Answer in {code}: {qa['question']}", qa["answer"]
        if task == "ocr":
            return "Generate the OCR text", sample.get("ocr_text", "")
        from vlm.data.synthetic import CLASS_NAMES

        return "detect " + " ; ".join(CLASS_NAMES), sample["detection_target"]

    def _ids(self, text: str, limit: int) -> list[int]:
        tok = self.tokenizer
        end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        ids = tok(text, add_special_tokens=False)["input_ids"][: limit - (end is not None)]
        return ids + ([end] if end is not None else [])  # an end token tells the decoder where to stop

    @skips_bad_samples
    def __call__(self, sample: dict[str, Any] | None) -> dict[str, Any] | None:
        if sample is None:
            return None
        prompt, target = self.prompt_and_target(sample)
        pad_id = self.tokenizer.pad_token_id
        enc = self._ids(prompt, self.max_length)
        dec = self._ids(target, self.target_max_length)
        pe, pd = self.max_length - len(enc), self.target_max_length - len(dec)
        out: dict[str, Any] = {
            "pixel_values": self.image(sample["image"]),
            "input_ids": torch.tensor(enc + [pad_id] * pe, dtype=torch.long),
            "attention_mask": torch.tensor([1] * len(enc) + [0] * pe, dtype=torch.long),
            "labels": torch.tensor(dec + [-100] * pd, dtype=torch.long),
            "decoder_attention_mask": torch.tensor([1] * len(dec) + [0] * pd, dtype=torch.long),
            "text": prompt,
            "target_text": target,
        }
        _ids_fields(sample, out)
        return self._finish(sample, out)
