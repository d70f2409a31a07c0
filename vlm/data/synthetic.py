"""A deterministic synthetic visual world: coloured shapes on a 3x3 grid, with multilingual text about them.

Every sample is built from ``(seed, split, kind, index)`` alone, so any index is generated independently in
O(1) and the demo and tests need nothing from outside. One *scene* is 1-3 objects (colour, shape, grid cell,
size, optional rendered word); from a scene come the image and every annotation the three model families
train on: captions in four languages, VQA / VQG pairs, object-aware questions, OCR text, detection boxes
(also as PaLI ``<locNNNN>`` strings), a zero-shot class, interleaved documents and a text corpus.

Splits never share a scene: a scene's composition (cells, colours, shapes, words) hashes into one of ten
buckets, and train / val / test own disjoint buckets (rejection sampling picks scenes of the right bucket).
So no caption and no image layout of a held-out split appears in train.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from vlm.data.tokenizers import box_to_loc_string
from vlm.errors import VLMConfigError

#: bump when the generator's output changes, so cached shards and tokenizers are rebuilt
VERSION = 2

LANGS: tuple[str, ...] = ("en", "fr", "de", "es")
SPLITS: tuple[str, ...] = ("train", "val", "test")
KINDS: tuple[str, ...] = ("pairs", "images", "text", "interleaved", "vqa")
BACKGROUND = (128, 128, 128)

# name -> RGB; all colours stay far from the grey background and from each other
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
    "purple": (150, 40, 170),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
#: zero-shot classes: the shape of a single-object image (multi-object images have no class)
CLASS_NAMES: tuple[str, ...] = SHAPES
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)  # fmt: skip
WORDS: tuple[str, ...] = (
    "cat",
    "dog",
    "sun",
    "sky",
    "box",
    "top",
    "go",
    "ok",
    "7",
    "42",
    "19",
    "3",
    "88",
    "5",
)

# --- lexicon -------------------------------------------------------------------------------------------
# colour adjective forms: fr/es (masculine, feminine); de stem (declined below)
_COLOUR_WORDS = {
    "fr": {"red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
           "yellow": ("jaune", "jaune"), "black": ("noir", "noire"), "white": ("blanc", "blanche"),
           "purple": ("violet", "violette")},
    "es": {"red": ("rojo", "roja"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
           "yellow": ("amarillo", "amarilla"), "black": ("negro", "negra"), "white": ("blanco", "blanca"),
           "purple": ("morado", "morada")},
    "de": {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "black": "schwarz",
           "white": "weiß", "purple": "violett"},
}  # fmt: skip
# shape noun and grammatical gender (m/f/n)
_SHAPE_WORDS = {
    "en": {s: (s, "n") for s in SHAPES},
    "fr": {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
           "cross": ("croix", "f"), "star": ("étoile", "f")},
    "de": {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
           "cross": ("Kreuz", "n"), "star": ("Stern", "m")},
    "es": {"circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"),
           "cross": ("cruz", "f"), "star": ("estrella", "f")},
}  # fmt: skip
# position as an adverbial phrase ("a red circle <at the top left>") and as a short answer
_POSITION_PHRASES = {
    "en": ("at the top left", "at the top", "at the top right", "on the left", "in the center",
           "on the right", "at the bottom left", "at the bottom", "at the bottom right"),
    "fr": ("en haut à gauche", "en haut", "en haut à droite", "à gauche", "au centre", "à droite",
           "en bas à gauche", "en bas", "en bas à droite"),
    "de": ("oben links", "oben", "oben rechts", "links", "in der Mitte", "rechts", "unten links", "unten",
           "unten rechts"),
    "es": ("arriba a la izquierda", "arriba", "arriba a la derecha", "a la izquierda", "en el centro",
           "a la derecha", "abajo a la izquierda", "abajo", "abajo a la derecha"),
}  # fmt: skip
_POSITION_ANSWERS = {"en": POSITIONS, **{k: v for k, v in _POSITION_PHRASES.items() if k != "en"}}
_AND = {"en": "and", "fr": "et", "de": "und", "es": "y"}
_YES_NO = {"en": ("yes", "no"), "fr": ("oui", "non"), "de": ("ja", "nein"), "es": ("sí", "no")}
_WITH_TEXT = {"en": 'with the text "{}"', "fr": 'avec le texte "{}"', "de": 'mit dem Text "{}"',
              "es": 'con el texto "{}"'}  # fmt: skip
_FACTS = (
    "a circle is round and has no corners.",
    "a square has four equal sides.",
    "a triangle has three corners.",
    "a cross is made of two crossing bars.",
    "a star has five points.",
    "the grid has three rows and three columns.",
    "every picture shows one, two or three shapes on a grey background.",
    "some shapes carry a short word or a number.",
    "the center is the middle cell of the grid.",
    "red, green, blue, yellow, black, white and purple are the colours of this world.",
)
_NUMBER_WORDS = {"en": ("zero", "one", "two", "three"), "fr": ("zéro", "un", "deux", "trois"),
                 "de": ("null", "eins", "zwei", "drei"), "es": ("cero", "uno", "dos", "tres")}  # fmt: skip


def _colour_word(lang: str, colour: str, gender: str) -> str:
    if lang == "en":
        return colour
    if lang == "de":
        return _COLOUR_WORDS["de"][colour]
    masc, fem = _COLOUR_WORDS[lang][colour]
    return fem if gender == "f" else masc


def _indef_np(lang: str, colour: str, shape: str, case: str = "nom") -> str:
    """'a red circle' with article, adjective order and agreement of ``lang``."""
    noun, g = _SHAPE_WORDS[lang][shape]
    if lang == "en":
        return f"a {colour} {noun}"
    if lang == "fr":
        return f"{'une' if g == 'f' else 'un'} {noun} {_colour_word(lang, colour, g)}"
    if lang == "es":
        return f"{'una' if g == 'f' else 'un'} {noun} {_colour_word(lang, colour, g)}"
    stem = _COLOUR_WORDS["de"][colour]
    if g == "n":
        return f"ein {stem}es {noun}"
    return f"einen {stem}en {noun}" if case == "acc" else f"ein {stem}er {noun}"


def _def_np(lang: str, shape: str) -> str:
    """'the circle' in ``lang`` (nominative)."""
    noun, g = _SHAPE_WORDS[lang][shape]
    if lang == "en":
        return f"the {noun}"
    if lang == "fr":
        return f"l'{noun}" if noun[0] in "aeiouéè" else f"{'la' if g == 'f' else 'le'} {noun}"
    if lang == "es":
        return f"{'la' if g == 'f' else 'el'} {noun}"
    return f"{'der' if g == 'm' else 'das'} {noun}"


def _join(lang: str, parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + f" {_AND[lang]} " + parts[-1]


# --- scenes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene: colour, shape, grid cell (0..8 in reading order), size and optional word."""

    colour: str
    shape: str
    cell: int
    scale: float  # radius as a fraction of half a cell
    dx: float  # jitter of the centre, fraction of a cell
    dy: float
    word: str | None


def _split_bucket(split: str) -> range:
    # ten buckets of the scene-composition hash: 8 for train, 1 each for val and test
    return {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}[split]


def canonical_split(split: str) -> str:
    """Normalise a split name ('validation' -> 'val'); raise a clear error for unknown ones."""
    split = {"validation": "val", "valid": "val", "eval": "val"}.get(split, split)
    if split not in SPLITS:
        raise VLMConfigError(f"unknown synthetic split {split!r}; use one of {list(SPLITS)}")
    return split


def _rng(seed: int, split: str, kind: str, index: int) -> random.Random:
    # hashing (rather than seed + index) keeps neighbouring indices and seeds uncorrelated
    h = hashlib.blake2b(f"{seed}|{split}|{kind}|{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def scene_signature(objects: tuple[SceneObject, ...] | list[SceneObject]) -> str:
    """The composition of a scene (what captions describe), ignoring size and jitter."""
    return ";".join(
        f"{o.cell}:{o.colour}:{o.shape}:{o.word or ''}" for o in sorted(objects, key=lambda o: o.cell)
    )


def scene_bucket(objects) -> int:
    """Bucket 0..9 of a scene composition; splits own disjoint buckets."""
    return zlib.crc32(scene_signature(objects).encode()) % 10


def make_scene(seed: int, split: str, kind: str, index: int) -> tuple[SceneObject, ...]:
    """The objects of scene ``index`` of ``split``; deterministic and independent of every other index."""
    split = canonical_split(split)
    rng = _rng(seed, split, kind, index)
    buckets = _split_bucket(split)
    while True:  # expected 1.25 draws for train, 10 for val/test: cheap, no image is drawn yet
        n = rng.choice((1, 2, 2, 3, 3))
        cells = rng.sample(range(9), n)
        shapes = rng.sample(SHAPES, n)  # distinct shapes keep "what colour is the circle?" unambiguous
        word_at = rng.randrange(n) if rng.random() < 0.4 else -1
        objs = tuple(
            sorted(
                (
                    SceneObject(
                        colour=rng.choice(COLOUR_NAMES),
                        shape=shapes[i],
                        cell=cells[i],
                        scale=rng.uniform(0.55, 0.95),
                        dx=rng.uniform(-0.06, 0.06),
                        dy=rng.uniform(-0.06, 0.06),
                        word=rng.choice(WORDS) if i == word_at else None,
                    )
                    for i in range(n)
                ),
                key=lambda o: o.cell,
            )
        )
        if scene_bucket(objs) in buckets:
            return objs


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]  # fmt: skip
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]  # square / circle bbox


def render_scene(objects, image_size: int = 64) -> tuple[Image.Image, list[list[float]]]:
    """Draw a scene; return the RGB image and each object's normalised ``[x0, y0, x1, y1]`` box."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    boxes = []
    for o in objects:
        cx = (o.cell % 3 + 0.5 + o.dx) * cell
        cy = (o.cell // 3 + 0.5 + o.dy) * cell
        r = o.scale * cell / 2
        colour = COLOURS[o.colour]
        pts = _shape_points(o.shape, cx, cy, r)
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(pts, fill=colour)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = [min(xs), min(ys), max(xs), max(ys)]
        boxes.append([min(max(v / image_size, 0.0), 1.0) for v in box])
        if o.word:
            # dark text on light shapes, light text on dark ones, so OCR stays readable
            ink = (0, 0, 0) if sum(colour) > 400 or o.colour == "green" else (255, 255, 255)
            font = _font(max(8, int(cell * 0.5)))
            draw.text((cx, cy), o.word, fill=ink, font=font, anchor="mm")
    return img, boxes


# --- annotations ---------------------------------------------------------------------------------------


def captions(objects, lang: str) -> str:
    """Caption naming every object's colour, shape and position, e.g. 'a red circle at the top left and ...'."""
    parts = []
    for o in objects:
        p = f"{_indef_np(lang, o.colour, o.shape)} {_POSITION_PHRASES[lang][o.cell]}"
        if o.word:
            p += " " + _WITH_TEXT[lang].format(o.word)
        parts.append(p)
    return _join(lang, parts)


def _vqa(objects, rng: random.Random) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    present = {(o.colour, o.shape) for o in objects}
    for lang in LANGS:
        o = objects[rng.randrange(len(objects))]
        d = _def_np(lang, o.shape)
        q_colour = {"en": f"what colour is {d}?", "fr": f"de quelle couleur est {d} ?",
                    "de": f"welche Farbe hat {d}?", "es": f"¿de qué color es {d}?"}[lang]  # fmt: skip
        a_colour = _colour_word(lang, o.colour, "m")
        pos_q = _POSITION_PHRASES[lang][o.cell]
        q_shape = {"en": f"what shape is {pos_q}?", "fr": f"quelle forme est {pos_q} ?",
                   "de": f"welche Form ist {pos_q}?", "es": f"¿qué forma hay {pos_q}?"}[lang]  # fmt: skip
        q_count = {"en": "how many objects are there?", "fr": "combien d'objets y a-t-il ?",
                   "de": "wie viele Objekte gibt es?", "es": "¿cuántos objetos hay?"}[lang]  # fmt: skip
        q_where = {"en": f"where is {d}?", "fr": f"où est {d} ?", "de": f"wo ist {d}?",
                   "es": f"¿dónde está {d}?"}[lang]  # fmt: skip
        # yes/no: half the time about a present object, else about an absent colour/shape combination
        if rng.random() < 0.5:
            colour, shape = o.colour, o.shape
        else:
            colour, shape = rng.choice(COLOUR_NAMES), rng.choice(SHAPES)
        yes = (colour, shape) in present
        npa = _indef_np(lang, colour, shape, case="acc")
        q_yes = {"en": f"is there {npa}?", "fr": f"y a-t-il {npa} ?", "de": f"gibt es {npa}?",
                 "es": f"¿hay {npa}?"}[lang]  # fmt: skip
        out += [
            {"question": q_colour, "answer": a_colour, "lang": lang, "type": "colour"},
            {"question": q_shape, "answer": _SHAPE_WORDS[lang][o.shape][0], "lang": lang, "type": "shape"},
            {"question": q_count, "answer": str(len(objects)), "lang": lang, "type": "count"},
            {
                "question": q_where,
                "answer": _POSITION_ANSWERS[lang][o.cell],
                "lang": lang,
                "type": "position",
            },
            {"question": q_yes, "answer": _YES_NO[lang][0 if yes else 1], "lang": lang, "type": "yes/no"},
        ]
    return out


def _object_qa(objects) -> list[dict[str, str]]:
    # object-aware questions (PaLI's OA-VQA): presence and count of each shape class, yes/no and numbers
    out = []
    shapes = {o.shape for o in objects}
    for lang in LANGS:
        for s in SHAPES:
            noun = _SHAPE_WORDS[lang][s][0]
            q = {"en": f"is there a {noun} in the image?", "fr": f"y a-t-il un objet de forme {noun} ?",
                 "de": f"gibt es die Form {noun} im Bild?", "es": f"¿hay la forma {noun} en la imagen?"}[lang]  # fmt: skip
            out.append({"question": q, "answer": _YES_NO[lang][0 if s in shapes else 1], "lang": lang,
                        "type": "object"})  # fmt: skip
    return out


def annotate(objects, boxes: list[list[float]], rng: random.Random) -> dict[str, Any]:
    """Every text annotation of a scene (JSON-serialisable)."""
    caps = {lang: captions(objects, lang) for lang in LANGS}
    vqa = _vqa(objects, rng)
    labels = [f"{o.colour} {o.shape}" for o in objects]
    return {
        "caption": caps["en"],
        "captions": caps,
        "objects": [
            {
                "colour": o.colour,
                "shape": o.shape,
                "cell": o.cell,
                "position": POSITIONS[o.cell],
                "box": b,
                "text": o.word,
            }
            for o, b in zip(objects, boxes)
        ],  # fmt: skip
        "num_objects": len(objects),
        "vqa": vqa,
        "vqg": [{"answer": q["answer"], "question": q["question"], "lang": q["lang"]} for q in vqa],
        "object_qa": _object_qa(objects),
        "ocr_text": " ".join(o.word for o in objects if o.word),
        "boxes": boxes,
        "box_labels": labels,
        "detection_target": " ; ".join(f"{box_to_loc_string(b)} {lab}" for b, lab in zip(boxes, labels)),
        # a class only where it is unambiguous: the shape of a single-object image; -1 = no class
        "class_index": CLASS_NAMES.index(objects[0].shape) if len(objects) == 1 else -1,
        "class_name": objects[0].shape if len(objects) == 1 else None,
    }


def class_prompts(lang: str = "en") -> list[str]:
    """Zero-shot text prompts, one per class in ``CLASS_NAMES`` order."""
    prefix = {"en": "a picture of a {}", "fr": "une image de la forme {}", "de": "ein Bild der Form {}",
              "es": "una imagen de la forma {}"}[lang]  # fmt: skip
    return [prefix.format(_SHAPE_WORDS[lang][s][0]) for s in CLASS_NAMES]


def zero_shot_templates() -> list[str]:
    """Caption-shaped English prompt templates ("a red {} at the top left", ...) for zero-shot shape classification.

    A model trained on this world's captions has only seen shapes with a colour and a position, so the class
    embedding is the mean over every colour and position (CLIP-style prompt ensembling).
    """
    return [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {{}} {p}" for c in COLOUR_NAMES for p in _POSITION_PHRASES["en"]]


def _sample_key(seed: int, split: str, kind: str, index: int) -> str:
    return f"{split}-{kind}-s{seed}-{index:08d}"


def make_pair(index: int, split: str = "train", seed: int = 0, image_size: int = 64, kind: str = "pairs"):
    """Raw image-text sample ``index``: image (PIL) + every annotation; independent of other indices."""
    split = canonical_split(split)
    objects = make_scene(seed, split, kind, index)
    image, boxes = render_scene(objects, image_size)
    ann = annotate(objects, boxes, _rng(seed, split, kind + "/ann", index))
    return {
        "key": _sample_key(seed, split, kind, index),
        "pair_id": index,
        "split": split,
        "image": image,
        **ann,
    }


def make_text(index: int, split: str = "train", seed: int = 0, lang: str = "en") -> dict[str, Any]:
    """Raw unpaired text sample: a caption of an unseen scene, a fact about the world, or a relation."""
    split = canonical_split(split)
    rng = _rng(seed, split, "text/choice", index)
    objects = make_scene(seed, split, "text", index)
    langs = LANGS if lang == "all" else (lang,)
    lg = langs[rng.randrange(len(langs))]
    r = rng.random()
    if r < 0.2 and lg == "en":
        text = _FACTS[rng.randrange(len(_FACTS))]
    elif r < 0.4 and lg == "en" and len(objects) >= 2:
        a, b = objects[0], objects[1]  # sorted by cell, so a comes first in reading order
        rel = (
            "to the left of"
            if a.cell % 3 < b.cell % 3
            else ("above" if a.cell // 3 < b.cell // 3 else "before")
        )
        text = f"{_indef_np('en', a.colour, a.shape)} is {rel} {_indef_np('en', b.colour, b.shape)}."
    else:
        text = captions(objects, lg)
    return {"key": _sample_key(seed, split, "text", index), "text": text, "lang": lg}


def make_document(index: int, split: str = "train", seed: int = 0, image_size: int = 64, lang: str = "en"):
    """Raw interleaved document (Flamingo's M3W shape): ``segments`` = list of ("text", str) / ("image", PIL)."""
    split = canonical_split(split)
    rng = _rng(seed, split, "doc", index)
    n_images = rng.choice((1, 2, 2, 3, 3))
    segments: list[tuple[str, Any]] = []
    if rng.random() < 0.5:
        segments.append(("text", make_text(index, split, seed, lang)["text"]))
    captions_out = []
    for j in range(n_images):
        objects = make_scene(seed, split, f"doc{j}", index)
        image, _ = render_scene(objects, image_size)
        cap = captions(objects, lang) + "."
        segments += [("image", image), ("text", cap)]
        captions_out.append(cap)
        if rng.random() < 0.3:  # loose text between chunks: context only, Flamingo gives it no loss
            segments.append(("text", _FACTS[rng.randrange(len(_FACTS))]))
    return {
        "key": _sample_key(seed, split, "interleaved", index),
        "segments": segments,
        "captions": captions_out,
    }


class SyntheticWorld(Dataset):
    """Map-style dataset of raw synthetic samples of one ``kind`` ('pairs', 'images', 'text', 'interleaved', 'vqa')."""

    def __init__(
        self,
        split: str = "train",
        num: int = 1000,
        image_size: int = 64,
        seed: int = 0,
        kind: str = "pairs",
        lang: str = "en",
        image_format: str = "pil",
    ) -> None:
        if kind not in KINDS:
            raise VLMConfigError(f"unknown synthetic kind {kind!r}; use one of {list(KINDS)}")
        if lang not in (*LANGS, "all"):
            raise VLMConfigError(f"unknown language {lang!r}; use one of {[*LANGS, 'all']}")
        if image_format not in ("pil", "numpy"):
            raise VLMConfigError(f"image_format must be 'pil' or 'numpy', got {image_format!r}")
        if num < 1 or image_size < 8:
            raise VLMConfigError(f"need num >= 1 and image_size >= 8, got num={num}, image_size={image_size}")
        self.split = canonical_split(split)
        self.num, self.image_size, self.seed, self.kind = int(num), int(image_size), int(seed), kind
        self.lang, self.image_format = lang, image_format

    def __len__(self) -> int:
        return self.num

    def _lang(self, index: int) -> str:
        if self.lang != "all":
            return self.lang
        return LANGS[_rng(self.seed, self.split, "lang", index).randrange(len(LANGS))]

    def _img(self, image: Image.Image):
        return np.asarray(image) if self.image_format == "numpy" else image

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} samples")
        index = int(index)
        if self.kind == "text":
            return make_text(index, self.split, self.seed, self.lang)
        if self.kind == "interleaved":
            doc = make_document(index, self.split, self.seed, self.image_size, self._lang(index))
            doc["segments"] = [(t, self._img(v) if t == "image" else v) for t, v in doc["segments"]]
            return doc
        s = make_pair(index, self.split, self.seed, self.image_size)
        lang = self._lang(index)
        s["caption"], s["lang"], s["image"] = s["captions"][lang], lang, self._img(s["image"])
        if self.kind == "images":
            return {k: s[k] for k in ("key", "image", "pair_id", "class_index", "class_name")}
        if self.kind == "vqa":
            rng = _rng(self.seed, self.split, "vqa/pick", index)
            pool = [q for q in s["vqa"] if q["lang"] == lang]
            qa = pool[rng.randrange(len(pool))]
            s.update(question=qa["question"], answer=qa["answer"], answers=[qa["answer"]], qa_type=qa["type"])
        return s


class SyntheticPairs(SyntheticWorld):
    """Image-caption pairs with every annotation (``kind='pairs'``)."""

    def __init__(self, split: str = "train", num: int = 1000, image_size: int = 64, seed: int = 0,
                 lang: str = "en", image_format: str = "pil") -> None:  # fmt: skip
        super().__init__(split, num, image_size, seed, "pairs", lang, image_format)


class SyntheticImages(SyntheticWorld):
    """Unpaired images with their zero-shot class (``kind='images'``)."""

    def __init__(self, split: str = "train", num: int = 1000, image_size: int = 64, seed: int = 0,
                 image_format: str = "pil") -> None:  # fmt: skip
        super().__init__(split, num, image_size, seed, "images", "en", image_format)


class SyntheticText(SyntheticWorld):
    """Unpaired sentences about the world (``kind='text'``); ``lang='all'`` mixes languages."""

    def __init__(self, split: str = "train", num: int = 1000, seed: int = 0, lang: str = "en") -> None:
        super().__init__(split, num, 64, seed, "text", lang)


class SyntheticInterleaved(SyntheticWorld):
    """Interleaved image-text documents (``kind='interleaved'``), Flamingo's M3W shape."""

    def __init__(self, split: str = "train", num: int = 1000, image_size: int = 64, seed: int = 0,
                 lang: str = "en", image_format: str = "pil") -> None:  # fmt: skip
        super().__init__(split, num, image_size, seed, "interleaved", lang, image_format)


class SyntheticVQA(SyntheticWorld):
    """Image + one question/answer in ``lang`` (``kind='vqa'``); the full annotation rides along."""

    def __init__(self, split: str = "train", num: int = 1000, image_size: int = 64, seed: int = 0,
                 lang: str = "en", image_format: str = "pil") -> None:  # fmt: skip
        super().__init__(split, num, image_size, seed, "vqa", lang, image_format)


# --- shards --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where vlm caches generated data and tokenizers: ``$VLM_CACHE_DIR`` or ``~/.cache/vlm``."""
    return Path(os.environ.get("VLM_CACHE_DIR") or Path.home() / ".cache" / "vlm")


def publish_dir(final: Path, write) -> None:
    """Fill a cache directory with ``write(tmp)`` beside ``final``, then rename it into place: an interrupted or
    concurrent writer never leaves half of one, and when another process finished first its copy is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    write(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race: keep its (identical) copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # speed over size: shards are a local cache
    return buf.getvalue()


def write_shards(
    out_dir: str | os.PathLike,
    num: int,
    split: str = "train",
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
) -> list[str]:
    """Write ``num`` synthetic pairs as WebDataset tar shards (``{key}.png/.json/.txt``); return their paths."""
    import webdataset as wds

    if num < 1 or samples_per_shard < 1:
        raise VLMConfigError(f"need num >= 1 and samples_per_shard >= 1, got {num}, {samples_per_shard}")
    split = canonical_split(split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num, samples_per_shard)):
        path = out / f"synth-{split}-{shard:06d}.tar"
        # a fixed mtime makes the shards byte-identical across runs
        with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
            for i in range(start, min(num, start + samples_per_shard)):
                s = make_pair(i, split, seed, image_size)
                image = s.pop("image")
                sink.write(
                    {
                        "__key__": s["key"],
                        "png": _png_bytes(image),
                        "json": json.dumps(s, ensure_ascii=False).encode(),
                        "txt": s["caption"].encode(),
                    }
                )
        paths.append(str(path))
    return paths


def ensure_synthetic_shards(
    root: str | os.PathLike | None,
    split: str = "train",
    num: int = 1000,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
) -> list[str]:
    """Write synthetic shards once into ``root`` (default: ``cache_dir()/synthetic``), keyed by the parameters; reuse after."""
    split = canonical_split(split)
    base = Path(root) if root is not None else cache_dir() / "synthetic"
    name = f"v{VERSION}-{split}-n{num}-px{image_size}-seed{seed}-per{samples_per_shard}"
    final = base / name
    done = final / "_COMPLETE"
    if not done.exists():
        def write(tmp: Path) -> None:
            write_shards(tmp, num, split, image_size, seed, samples_per_shard)
            (tmp / "_COMPLETE").write_text("ok\n")

        publish_dir(final, write)
    return sorted(str(p) for p in final.glob("*.tar"))
