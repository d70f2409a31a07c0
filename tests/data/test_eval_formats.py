"""Readers of the standard evaluation formats (vlm.data.eval_formats) on small fixtures written here: Karpathy's
COCO/Flickr30k JSON, VQAv2 questions + annotations, class folders. Each fixture image is one solid colour, so a
sample's pixels say which file it was read from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlm.data.eval_formats import ClassFolder, KarpathySplit, VQAv2, check_class_names
from vlm.data.stream import Stream
from vlm.errors import VLMConfigError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def png(path: Path, colour: tuple[int, int, int], size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return path


# Karpathy's layout: images[] with split, filepath (COCO only), filename, sentences[].raw, cocoid/imgid
KARPATHY_IMAGES = [
    {"split": "test", "filepath": "val2014", "filename": "a.png", "cocoid": 11, "imgid": 0, "colour": RED,
     "sentences": ["a red square in the center", "a square that is red", "red fills the picture"]},
    {"split": "test", "filepath": "val2014", "filename": "b.png", "cocoid": 12, "imgid": 1, "colour": GREEN,
     "sentences": ["a green square", "green everywhere"]},
    {"split": "test", "filepath": "val2014", "filename": "gone.png", "cocoid": 13, "imgid": 2, "colour": None,
     "sentences": ["an image that is missing", "nothing to see"]},
    {"split": "test", "filepath": "val2014", "filename": "broken.png", "cocoid": 14, "imgid": 3, "colour": "corrupt",
     "sentences": ["a corrupt file"]},
    {"split": "val", "filepath": "val2014", "filename": "c.png", "cocoid": 15, "imgid": 4, "colour": BLUE,
     "sentences": ["a blue square"]},
    {"split": "train", "filepath": "train2014", "filename": "d.png", "cocoid": 16, "imgid": 5, "colour": WHITE,
     "sentences": ["a white square", "white"]},
    {"split": "restval", "filepath": "val2014", "filename": "e.png", "cocoid": 17, "imgid": 6, "colour": BLACK,
     "sentences": ["a black square"]},
]


def write_karpathy(root: Path) -> Path:
    """``root/dataset_coco.json`` + images under ``root/<filepath>/``; 'gone.png' is not written."""
    images = []
    for n, im in enumerate(KARPATHY_IMAGES):
        where = root / im["filepath"] / im["filename"]
        if im["colour"] == "corrupt":
            corrupt(where)
        elif im["colour"] is not None:
            png(where, im["colour"])
        images.append({k: v for k, v in im.items() if k not in ("colour", "sentences")} | {
            "sentids": list(range(10 * n, 10 * n + len(im["sentences"]))),
            "sentences": [{"raw": s, "tokens": s.split(), "imgid": im["imgid"], "sentid": 10 * n + j}
                          for j, s in enumerate(im["sentences"])]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


# VQAv2: questions (with data_subtype naming the image files) and annotations, ten answers per question
VQA_QUESTIONS = [
    {"question_id": 1001, "image_id": 1, "question": "What color is the square?"},
    {"question_id": 1002, "image_id": 1, "question": "How many squares are there?"},
    {"question_id": 2001, "image_id": 2, "question": "Is it green?"},
    {"question_id": 3001, "image_id": 3, "question": "What is missing?"},  # image 3 is not written
]
VQA_ANSWERS = {
    1001: (["red"] * 8 + ["orange", "pink"], "red"),
    1002: (["1"] * 6 + ["one"] * 3 + ["2"], "1"),
    2001: (["yes"] * 10, "yes"),
    3001: (["nothing"] * 10, "nothing"),
}


def write_vqav2(root: Path, with_missing: bool = True) -> tuple[Path, Path]:
    """Questions and annotations in ``root``, images in ``root/val2014``; image 3 is written only without
    ``with_missing``."""
    png(root / "val2014" / "COCO_val2014_000000000001.png", RED)
    png(root / "val2014" / "COCO_val2014_000000000002.png", GREEN)
    if not with_missing:
        png(root / "val2014" / "COCO_val2014_000000000003.png", BLUE)
    questions = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                                     "questions": VQA_QUESTIONS}))
    annotations = root / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
         "answer_type": "other", "multiple_choice_answer": VQA_ANSWERS[q["question_id"]][1],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                     for i, a in enumerate(VQA_ANSWERS[q["question_id"]][0])]}
        for q in VQA_QUESTIONS]}))
    return questions, annotations


# class folders: two good images per class except 'star' (one good, one corrupt)
CLASS_IMAGES = {"circle": [RED, GREEN], "cross": [BLUE, WHITE], "square": [BLACK, RED], "star": [GREEN, "corrupt"],
                "triangle": [BLUE, BLACK]}


def write_class_folders(root: Path) -> Path:
    for name, colours in CLASS_IMAGES.items():
        for i, colour in enumerate(colours):
            path = root / name / f"{i}.png"
            corrupt(path) if colour == "corrupt" else png(path, colour)
    (root / "notes.txt").write_text("not a class")  # files beside the folders are not classes
    return root


def colour_of(image: Image.Image) -> tuple[int, int, int]:
    return image.getpixel((8, 8))


def test_karpathy_per_image_gives_every_caption_as_references(tmp_path):
    ds = KarpathySplit(write_karpathy(tmp_path), split="test", per="image")
    assert len(ds) == 4  # the test split's images, the missing and the corrupt one included
    samples = [ds[i] for i in range(len(ds))]
    assert samples[2] is None and samples[3] is None  # missing file, corrupt file: skipped, not a crash
    for sample, im in zip(samples[:2], KARPATHY_IMAGES):
        assert sample["caption"] == im["sentences"][0]
        assert sample["references"] == im["sentences"]
        assert sample["key"] == str(im["cocoid"]) and colour_of(sample["image"]) == im["colour"]
    assert samples[0]["pair_id"] != samples[1]["pair_id"]


def test_karpathy_per_caption_shares_pair_ids_and_reads_train_plus_restval(tmp_path):
    path = write_karpathy(tmp_path)
    ds = KarpathySplit(path, split="test", per="caption")
    assert len(ds) == 3 + 2 + 2 + 1  # one sample per sentence
    samples = [ds[i] for i in range(len(ds))]
    good = [s for s in samples if s is not None]
    assert [s["caption"] for s in good] == KARPATHY_IMAGES[0]["sentences"] + KARPATHY_IMAGES[1]["sentences"]
    assert [s["pair_id"] for s in good] == [0, 0, 0, 1, 1]
    assert [colour_of(s["image"]) for s in good] == [RED] * 3 + [GREEN] * 2
    assert samples[5:] == [None, None, None]  # 2 sentences of the missing image, 1 of the corrupt one

    train = KarpathySplit(path, split=["train", "restval"], per="image", image_root=tmp_path)
    assert [colour_of(train[i]["image"]) for i in range(len(train))] == [WHITE, BLACK]


def test_karpathy_bad_split_and_bad_file_are_one_clear_error(tmp_path):
    path = write_karpathy(tmp_path)
    with pytest.raises(VLMConfigError, match=r"no image in split \['dev'\].*'restval', 'test', 'train', 'val'"):
        KarpathySplit(path, split="dev")
    with pytest.raises(VLMConfigError, match="per='sentence'"):
        KarpathySplit(path, per="sentence")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(VLMConfigError, match="no 'images' list"):
        KarpathySplit(tmp_path / "list.json")
    with pytest.raises(VLMConfigError, match="does not exist"):
        KarpathySplit(tmp_path / "nope.json")


def test_vqav2_questions_with_their_ten_answers(tmp_path):
    questions, annotations = write_vqav2(tmp_path)
    ds = VQAv2(questions, annotations, image_root=tmp_path / "val2014",
               image_pattern="COCO_val2014_{image_id:012d}.png")
    assert len(ds) == 4
    samples = [ds[i] for i in range(len(ds))]
    assert samples[3] is None  # its image file does not exist: skipped
    for sample, q, colour in zip(samples, VQA_QUESTIONS, [RED, RED, GREEN]):
        answers, majority = VQA_ANSWERS[q["question_id"]]
        assert sample["question"] == q["question"] and sample["key"] == str(q["question_id"])
        assert sample["answers"] == answers and sample["answer"] == majority
        assert colour_of(sample["image"]) == colour


def test_vqav2_default_image_names_come_from_data_subtype(tmp_path):
    questions, annotations = write_vqav2(tmp_path)
    # COCO's names are .jpg: the fixture's .png files are not found under the default pattern
    ds = VQAv2(questions, annotations, image_root=tmp_path / "val2014")
    assert ds.image_pattern.format(image_id=391895) == "COCO_val2014_000000391895.jpg"
    assert ds[0] is None
    with pytest.raises(VLMConfigError, match="image_pattern"):
        VQAv2(questions, annotations, image_pattern="{id}.jpg")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"annotations": [{"question_id": 7, "answers": [{"answer": "x"}]}]}))
    with pytest.raises(VLMConfigError, match="no question_id in common"):
        VQAv2(questions, other)


def test_class_folder_indices_follow_the_given_class_order(tmp_path):
    root = write_class_folders(tmp_path / "classes")
    ds = ClassFolder(root)
    assert ds.classes == sorted(CLASS_IMAGES)
    order = ["star", "circle", "triangle", "square", "cross"]
    ds = ClassFolder(root, classes=order)
    expected = [(name, colour) for name in order for colour in CLASS_IMAGES[name]]
    assert len(ds) == len(expected)
    for i, (name, colour) in enumerate(expected):
        sample = ds[i]
        if colour == "corrupt":
            assert sample is None
            continue
        assert sample["class_name"] == name and sample["class_index"] == order.index(name)
        assert colour_of(sample["image"]) == colour
    with pytest.raises(VLMConfigError, match=r"classes \['hexagon'\] have no folder"):
        ClassFolder(root, classes=["circle", "hexagon"])


def test_class_names_must_be_the_models(tmp_path):
    root = write_class_folders(tmp_path / "classes")

    class Model:
        zeroshot_class_names = ["circle", "square", "triangle", "cross", "star"]

    streams = {"classes": Stream(ClassFolder(root))}  # sorted folders: another order than the model's
    with pytest.raises(VLMConfigError, match=r"val_streams.classes .* zeroshot_class_names"):
        check_class_names(streams, Model())
    check_class_names({"classes": Stream(ClassFolder(root, classes=Model.zeroshot_class_names))}, Model())


def test_stream_counts_the_skipped_samples(tmp_path):
    """Through the evaluation loader and the stream's transform: skipped images are counted in num_skipped."""
    from vlm.data.module import EvalLoader
    from vlm.data.transforms import ImageTextTransform

    stream = Stream(KarpathySplit(write_karpathy(tmp_path), split="test", per="caption"),
                    transform=ImageTextTransform(tokenizer="minilm", max_length=16, image_size=16), batch_size=4)
    batches = list(EvalLoader("coco", stream, batch_size=4, num_workers=0))
    assert sum(b["pixel_values"].shape[0] for b in batches) == 5
    assert sum(b["num_skipped"] for b in batches) == 3
    assert [t for b in batches for t in b["text"]] == KARPATHY_IMAGES[0]["sentences"] + KARPATHY_IMAGES[1]["sentences"]


def test_prompt_transforms_score_against_every_reference(tmp_path):
    """FewShotPrompts (Flamingo) and PaLIPrompts keep every caption of a COCO image and the ten VQAv2 answers as the
    references a prediction is scored against; support examples are written with the majority answer."""
    from vlm.data.fewshot import FewShotPrompts, task_text
    from vlm.models.pali import PaLIPrompts

    path = write_karpathy(tmp_path)
    queries = KarpathySplit(path, split="test", per="image")
    support = KarpathySplit(path, split=["train", "restval", "val"], per="image")
    prompts = FewShotPrompts(support, shots=2, task="captioning", max_length=96, image_size=16)
    out = prompts(queries[0])
    assert out["answers"] == KARPATHY_IMAGES[0]["sentences"] and out["shots"] == 2
    assert PaLIPrompts(task="caption", image_size=16)(queries[1])["answers"] == KARPATHY_IMAGES[1]["sentences"]

    questions, annotations = write_vqav2(tmp_path / "vqa", with_missing=False)
    vqa = VQAv2(questions, annotations, image_root=tmp_path / "vqa" / "val2014",
                image_pattern="COCO_val2014_{image_id:012d}.png")
    out = FewShotPrompts(vqa, shots=1, task="vqa", max_length=96, image_size=16)(vqa[1])
    assert out["answers"] == VQA_ANSWERS[1002][0]
    assert PaLIPrompts(task="vqa", image_size=16)(vqa[0])["answers"] == VQA_ANSWERS[1001][0]
    assert task_text("vqa", vqa[1], with_answer=True).endswith("Short answer: 1")  # the majority answer
