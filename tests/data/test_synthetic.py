"""The synthetic world: determinism, captions that match the pixels, disjoint splits, annotations, shards."""

import io
import json
import os
import re
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from vlm.data import synth_cli
from vlm.data.synthetic import (
    CLASS_NAMES,
    COLOURS,
    LANGS,
    POSITIONS,
    SyntheticImages,
    SyntheticInterleaved,
    SyntheticPairs,
    SyntheticText,
    SyntheticVQA,
    SyntheticWorld,
    ensure_synthetic_shards,
    make_pair,
    write_shards,
)
from vlm.errors import VLMConfigError

EN_POSITION = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right", "left": "on the left",
    "center": "in the center", "right": "on the right", "bottom left": "at the bottom left",
    "bottom": "at the bottom", "bottom right": "at the bottom right",
}  # fmt: skip


def test_same_index_gives_same_sample_in_any_order():
    a = [make_pair(i, "train", seed=3) for i in (7, 2, 9)]
    b = [make_pair(i, "train", seed=3) for i in (9, 7, 2)]
    for s, t in zip(a, [b[1], b[2], b[0]]):
        assert np.array_equal(np.asarray(s["image"]), np.asarray(t["image"]))
        assert s["captions"] == t["captions"] and s["vqa"] == t["vqa"]
    assert make_pair(7, "train", seed=4)["key"] != a[0]["key"]


def test_caption_names_what_the_pixels_show():
    size = 48
    for i in range(40):
        s = make_pair(i, "train", image_size=size)
        img = np.asarray(s["image"])
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        cap = s["captions"]["en"]
        assert cap == s["caption"]
        for o in s["objects"]:
            assert f"a {o['colour']} {o['shape']} {EN_POSITION[o['position']]}" in cap
            x0, y0, x1, y1 = o["box"]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            # the box centre lies in the grid cell the caption names (3x3 grid, reading order)
            assert POSITIONS.index(o["position"]) == int(cy * 3) * 3 + int(cx * 3)
            if o["text"] is None:  # a rendered word covers the centre pixel
                assert tuple(img[int(cy * size), int(cx * size)]) == COLOURS[o["colour"]]
        assert 1 <= len(s["objects"]) <= 3
        assert len({o["shape"] for o in s["objects"]}) == len(s["objects"])


def test_captions_in_several_languages():
    s = make_pair(11)
    assert set(s["captions"]) == set(LANGS) and len(set(s["captions"].values())) == len(LANGS)
    langs = {q["lang"] for q in s["vqa"]}
    assert langs == set(LANGS)
    assert SyntheticPairs(num=20, lang="de")[11]["caption"] == s["captions"]["de"]


def test_splits_share_no_scene():
    def caps(split, n):
        return {make_pair(i, split)["caption"] for i in range(n)}

    train, val, test = caps("train", 1500), caps("val", 300), caps("test", 300)
    # single-object scenes (315 possible) would collide often if splits were only seeded apart
    assert not (train & val) and not (train & test) and not (val & test)
    assert {make_pair(i, "val")["key"] for i in range(5)}.isdisjoint(
        {make_pair(i, "train")["key"] for i in range(5)}
    )


def test_vqa_answers_are_true():
    for i in range(30):
        s = make_pair(i)
        by_shape = {o["shape"]: o for o in s["objects"]}
        present = {(o["colour"], o["shape"]) for o in s["objects"]}
        for qa in (q for q in s["vqa"] if q["lang"] == "en"):
            q, a = qa["question"], qa["answer"]
            if m := re.fullmatch(r"what colour is the (\w+)\?", q):
                assert a == by_shape[m[1]]["colour"]
            elif m := re.fullmatch(r"where is the (\w+)\?", q):
                assert a == by_shape[m[1]]["position"]
            elif q == "how many objects are there?":
                assert a == str(len(s["objects"]))
            elif m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
                assert a == ("yes" if (m[1], m[2]) in present else "no")
            elif m := re.fullmatch(r"what shape is (.+)\?", q):
                assert EN_POSITION[by_shape[a]["position"]] == m[1]
            else:
                raise AssertionError(f"unexpected question {q!r}")
        assert {(v["question"], v["answer"]) for v in s["vqg"]} == {
            (v["question"], v["answer"]) for v in s["vqa"]
        }


def test_detection_ocr_and_class():
    for i in range(30):
        s = make_pair(i)
        parts = s["detection_target"].split(" ; ")
        assert len(parts) == len(s["objects"])
        for part, o in zip(parts, s["objects"]):
            x0, y0, x1, y1 = o["box"]
            bins = [min(1023, int(v * 1024)) for v in (y0, x0, y1, x1)]  # PaLI order: y before x
            assert part == "".join(f"<loc{b:04d}>" for b in bins) + f" {o['colour']} {o['shape']}"
        assert s["ocr_text"].split() == [o["text"] for o in s["objects"] if o["text"]]
        if len(s["objects"]) == 1:
            assert CLASS_NAMES[s["class_index"]] == s["class_name"] == s["objects"][0]["shape"]
        else:
            assert s["class_index"] == -1 and s["class_name"] is None


def test_dataset_kinds():
    im = SyntheticImages(num=4, image_size=32)[1]
    assert set(im) >= {"image", "class_index", "pair_id"} and im["image"].size == (32, 32)
    t = SyntheticText(num=4, lang="all")[2]
    assert isinstance(t["text"], str) and t["text"]
    doc = SyntheticInterleaved(num=4, image_size=32)[3]
    kinds = [k for k, _ in doc["segments"]]
    assert "image" in kinds and "text" in kinds
    assert all(isinstance(v, Image.Image) for k, v in doc["segments"] if k == "image")
    # every image is followed by its own caption
    for j, k in enumerate(kinds):
        if k == "image":
            assert kinds[j + 1] == "text"
    v = SyntheticVQA(num=4, lang="es")[0]
    assert {"question", "answer", "answers"} <= set(v) and any(
        q["question"] == v["question"] and q["lang"] == "es" for q in v["vqa"]
    )
    arr = SyntheticWorld(num=2, image_size=32, image_format="numpy")[0]["image"]
    assert isinstance(arr, np.ndarray) and arr.shape == (32, 32, 3)
    with pytest.raises(VLMConfigError, match="kind"):
        SyntheticWorld(kind="nope")
    with pytest.raises(VLMConfigError, match="split"):
        SyntheticPairs(split="dev")
    with pytest.raises(IndexError):
        SyntheticPairs(num=3)[3]


def test_generation_is_fast():
    start = time.perf_counter()
    for i in range(1000):
        make_pair(i, image_size=64)
    # thousands per second on one core; generous bound for a shared machine
    assert time.perf_counter() - start < 5.0


def test_write_shards_and_cache(tmp_path):
    paths = write_shards(tmp_path / "s", 7, "val", image_size=32, seed=1, samples_per_shard=3)
    assert len(paths) == 3
    names = []
    for p in paths:
        with tarfile.open(p) as tf:
            names += tf.getnames()
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "json":
                meta = json.loads(data)
                assert meta["key"] == key and members[f"{key}.txt"].decode() == meta["caption"]
                idx = meta["pair_id"]
                ref = make_pair(idx, "val", seed=1, image_size=32)
                img = Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB")
                assert np.array_equal(np.asarray(img), np.asarray(ref["image"]))
    assert len(names) == 7 * 3
    first = ensure_synthetic_shards(tmp_path / "c", "train", num=4, image_size=32, samples_per_shard=2)
    stamp = [(p, os.stat(p).st_mtime_ns) for p in first]
    again = ensure_synthetic_shards(tmp_path / "c", "train", num=4, image_size=32, samples_per_shard=2)
    assert again == first and [(p, os.stat(p).st_mtime_ns) for p in again] == stamp


def test_synth_cli(tmp_path, capsys):
    assert (
        synth_cli.main(
            ["--out", str(tmp_path), "--num", "5", "--image-size", "32", "--samples-per-shard", "2"]
        )
        == 0
    )
    assert len(list(tmp_path.glob("*.tar"))) == 3
    assert synth_cli.main(["--out", str(tmp_path), "--num", "0"]) == 2
    assert "num" in capsys.readouterr().err
