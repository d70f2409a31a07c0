"""Transforms: shapes, padding, Flamingo's label rule, PaLI prompts/targets, pickling."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.conftest import minilm_vocab
from vlm.data.collate import collate
from vlm.data.synthetic import make_document, make_pair
from vlm.data.tokenizers import END_OF_CHUNK, IMAGE_TOKEN
from vlm.data.transforms import (
    ImageOnlyTransform,
    ImageTextTransform,
    ImageTransform,
    InterleavedTransform,
    PrefixLMTransform,
    TextTransform,
)
from vlm.errors import VLMConfigError


def test_image_transform_normalises_each_channel():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    t = ImageTransform(image_size=32, mean=mean, std=std)
    x = t(Image.new("RGB", (48, 48), (10, 200, 30)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    for c, v in enumerate((10, 200, 30)):
        assert torch.allclose(x[c], torch.full((32, 32), (v / 255 - mean[c]) / std[c]), atol=1e-5)
    arr = np.zeros((32, 32, 3), np.uint8)
    assert torch.allclose(t(arr)[0], torch.full((32, 32), -0.5 / 0.2))
    crop = ImageTransform(image_size=32, train=True, random_resized_crop=True)(Image.new("RGB", (64, 64)))
    assert crop.shape == (3, 32, 32)
    with pytest.raises(VLMConfigError, match="std"):
        ImageTransform(std=(0.0, 1.0, 1.0))


def test_image_text_transform_with_the_bert_vocabulary():
    vocab = minilm_vocab()
    s = make_pair(0, image_size=32)
    s["captions"]["en"] = s["caption"] = "a red circle at the top left"
    out = ImageTextTransform(tokenizer="minilm", max_length=16, image_size=32)(s)
    words = ["[CLS]", "a", "red", "circle", "at", "the", "top", "left", "[SEP]"]
    expected = [vocab[w] for w in words] + [vocab["[PAD]"]] * (16 - len(words))
    assert out["input_ids"].tolist() == expected
    assert out["attention_mask"].tolist() == [1] * len(words) + [0] * (16 - len(words))
    assert out["pixel_values"].shape == (3, 32, 32)
    assert out["pair_id"] == 0 and out["class_index"] == s["class_index"] and out["text"] == s["caption"]
    fr = ImageTextTransform(max_length=64, image_size=32, lang="fr")(make_pair(0, image_size=32))
    assert fr["text"] == make_pair(0)["captions"]["fr"]


def test_transforms_pass_none_and_skips_into_collate():
    t = ImageTextTransform(max_length=12, image_size=32)
    samples = [make_pair(i, image_size=32) for i in range(3)]
    samples[2]["_skipped"] = 2  # a reader skipped two corrupt samples before this one
    batch = collate([t(samples[0]), t(None), t(samples[1]), t(samples[2])])
    assert batch["num_skipped"] == 1 + 2
    assert batch["input_ids"].shape == (3, 12) and batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["pair_id"].tolist() == [0, 1, 2]
    for cls in (TextTransform(), ImageOnlyTransform(), InterleavedTransform(), PrefixLMTransform()):
        assert cls(None) is None


def test_text_and_image_only():
    vocab = minilm_vocab()
    out = TextTransform("minilm", max_length=6)({"text": "a square has four equal sides"})
    # truncated to 6 with [SEP] kept last
    assert out["input_ids"].tolist() == [vocab[w] for w in ["[CLS]", "a", "square", "has", "four", "[SEP]"]]
    img = ImageOnlyTransform(image_size=32)(
        {"image": Image.new("RGB", (32, 32)), "class_index": 3, "pair_id": 5}
    )
    assert img["pixel_values"].shape == (3, 32, 32) and img["class_index"] == 3 and img["pair_id"] == 5


def _flamingo_labels_by_rule(ids, image_id, eoc_id, pad_mask):
    """Flamingo's rule on the token stream: score text after an <image> up to and including <|endofchunk|>."""
    labels, scoring = [], False
    for tid, is_pad in zip(ids, pad_mask):
        if is_pad or tid == image_id:
            labels.append(-100)
            scoring = scoring or tid == image_id
            continue
        labels.append(tid if scoring else -100)
        if tid == eoc_id:
            scoring = False
    return labels


def test_interleaved_labels_follow_flamingo_rule():
    t = InterleavedTransform(tokenizer="synthetic", max_length=48, max_images=3, image_size=32)
    tok = t.tokenizer
    img = Image.new("RGB", (32, 32), (200, 0, 0))
    doc = {"segments": [("text", "a page about shapes"), ("image", img), ("text", "a red circle"),
                        ("text", "loose words"), ("image", img), ("text", "a blue square")]}  # fmt: skip
    out = t(doc)
    image_id, eoc_id = tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(END_OF_CHUNK)

    def enc(text):
        return tok(" " + text, add_special_tokens=False)["input_ids"]

    ids = [tok.bos_token_id, *enc("a page about shapes"), image_id, *enc("a red circle"), eoc_id,
           *enc("loose words"), image_id, *enc("a blue square"), eoc_id]  # fmt: skip
    n = len(ids)
    assert out["input_ids"].tolist() == ids + [tok.pad_token_id] * (48 - n)
    assert out["attention_mask"].tolist() == [1] * n + [0] * (48 - n)
    by_hand = ([-100] * (1 + len(enc("a page about shapes")) + 1) + enc("a red circle") + [eoc_id]
               + [-100] * (len(enc("loose words")) + 1) + enc("a blue square") + [eoc_id] + [-100] * (48 - n))  # fmt: skip
    assert out["labels"].tolist() == by_hand
    pad = (out["attention_mask"] == 0).tolist()
    assert out["labels"].tolist() == _flamingo_labels_by_rule(
        out["input_ids"].tolist(), image_id, eoc_id, pad
    )
    assert out["image_mask"].tolist() == [True, True, False]
    assert out["pixel_values"].shape == (3, 3, 32, 32) and out["pixel_values"][2].abs().sum() == 0
    assert torch.equal(out["pixel_values"][0], ImageTransform(32)(img))


def test_interleaved_limits_images_and_length():
    img = Image.new("RGB", (32, 32))
    doc = {"segments": [("image", img), ("text", "one"), ("image", img), ("text", "two"), ("image", img),
                        ("text", "three")]}  # fmt: skip
    t = InterleavedTransform(max_length=64, max_images=2, image_size=32)
    out = t(doc)
    image_id = t.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (out["input_ids"] == image_id).sum() == 2 and out["image_mask"].tolist() == [True, True]
    short = InterleavedTransform(max_length=5, max_images=3, image_size=32)(doc)
    kept = int((short["input_ids"] == image_id).sum())
    assert short["image_mask"].sum() == kept < 3
    # a synthetic document and a plain pair both work
    d = InterleavedTransform(max_length=96, image_size=32)(make_document(0, image_size=32))
    assert d["image_mask"].sum() == sum(k == "image" for k, _ in make_document(0)["segments"])
    p = InterleavedTransform(max_length=48, image_size=32)(make_pair(1, image_size=32))
    assert p["image_mask"].tolist() == [True, False, False]


def test_prefix_lm_tasks():
    s = make_pair(4, image_size=32)
    vqa = PrefixLMTransform(task="vqa", lang="de", max_length=32, target_max_length=8, image_size=32)
    out = vqa(s)
    tok = vqa.tokenizer
    first_de = next(q for q in s["vqa"] if q["lang"] == "de")  # evaluation picks deterministically
    assert out["text"] == f"Answer in DE: {first_de['question']}" and out["target_text"] == first_de["answer"]
    target = tok(first_de["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out["labels"].tolist() == target + [-100] * (8 - len(target))
    assert out["decoder_attention_mask"].tolist() == [1] * len(target) + [0] * (8 - len(target))
    assert (
        tok.decode(out["input_ids"][out["attention_mask"].bool()], skip_special_tokens=True).strip()
        == out["text"]
    )

    cap = PrefixLMTransform(task="caption", lang="fr", target_max_length=64, image_size=32)(s)
    assert cap["text"] == "Generate the alt_text in FR" and cap["target_text"] == s["captions"]["fr"]
    vqg = PrefixLMTransform(task="vqg", image_size=32)(s)
    assert vqg["text"].startswith("Generate a question in EN for ") and vqg["target_text"].endswith("?")
    ocr = PrefixLMTransform(task="ocr", image_size=32)(s)
    assert ocr["target_text"] == s["ocr_text"]

    det_t = PrefixLMTransform(task="detection", target_max_length=40, image_size=32)
    det = det_t(s)
    labels = det["labels"][det["labels"] >= 0].tolist()
    n_obj = len(s["objects"])
    loc_ids = [i for i in labels if det_t.tokenizer.convert_ids_to_tokens(i).startswith("<loc")]
    assert len(loc_ids) == 4 * n_obj  # every <locNNNN> is one id
    assert det_t.tokenizer.decode(labels, skip_special_tokens=True).replace(" ", "") == s[
        "detection_target"
    ].replace(" ", "")

    generic = PrefixLMTransform(prompt_field="question", target_field="answer", image_size=32)
    g = generic({"image": Image.new("RGB", (8, 8)), "question": "q?", "answer": "a"})
    assert g["text"] == "q?" and g["target_text"] == "a"
    mix = PrefixLMTransform(task="caption,vqa", train=True, image_size=32)
    assert {mix(s)["text"].split()[0] for _ in range(30)} == {"Generate", "Answer"}
    with pytest.raises(VLMConfigError, match="task"):
        PrefixLMTransform(task="segmentation")


def test_transforms_pickle_small_and_work_after():
    s = make_pair(2, image_size=32)
    doc = make_document(2, image_size=32)
    for t, x in [
        (ImageTextTransform(image_size=32), s),
        (TextTransform("synthetic"), {"text": "a star has five points."}),
        (ImageOnlyTransform(image_size=32), s),
        (InterleavedTransform(image_size=32), doc),
        (PrefixLMTransform(task="detection", image_size=32), s),
    ]:
        before = t(dict(x))
        blob = pickle.dumps(t)
        assert len(blob) < 20_000  # the tokenizer is not pickled: workers reload it
        after = pickle.loads(blob)(dict(x))
        for k, v in before.items():
            assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]


def test_hard_negatives_swap_exactly_one_shape_word():
    from vlm.data.synthetic import SHAPES
    from vlm.data.transforms import shape_swapped_captions

    t = ImageTextTransform(max_length=48, image_size=32, hard_negatives=2)
    tok = t.tokenizer
    for i in range(20):
        s = make_pair(i, image_size=32)
        out = t(s)
        assert out["negative_input_ids"].shape == out["negative_attention_mask"].shape == (2, 48)
        assert out["negative_mask"].tolist() == [True, True]
        negs = shape_swapped_captions(s["caption"], s["objects"], 2, s["key"])
        assert negs == shape_swapped_captions(s["caption"], s["objects"], 2, s["key"])  # seeded by the key
        assert negs[0] != negs[1]  # distinct swaps first
        for k, neg in enumerate(negs):
            a, b = s["caption"].split(" "), neg.split(" ")
            assert len(a) == len(b)
            diff = [(x, y) for x, y in zip(a, b) if x != y]
            assert len(diff) == 1, (s["caption"], neg)
            old, new = (w.rstrip(",") for w in diff[0])
            assert old in SHAPES and new in SHAPES and old != new
            assert old in [o["shape"] for o in s["objects"]]
            ids = out["negative_input_ids"][k]
            assert ids.tolist() == tok(neg, padding="max_length", truncation=True, max_length=48)["input_ids"]
            assert out["negative_attention_mask"][k].tolist() == (ids != tok.pad_token_id).long().tolist()
    # the article before the swapped word agrees with it; a shape inside a quoted word is never touched
    objs = [{"shape": "circle"}]
    assert shape_swapped_captions('A circle with the text "star"', objs, 4, "k") and all(
        n.endswith('with the text "star"') and n.split(" ")[0] == "A" for n in
        shape_swapped_captions('A circle with the text "star"', objs, 4, "k"))
    import vlm.data.transforms as tr

    orig = tr._shape_words
    tr._shape_words = lambda: ("circle", "oval")
    try:
        assert shape_swapped_captions("an oval on the left", [{"shape": "oval"}], 1, "k") == ["a circle on the left"]
        assert shape_swapped_captions("a circle", [{"shape": "circle"}], 1, "k") == ["an oval"]
    finally:
        tr._shape_words = orig


def test_hard_negatives_absent_for_real_data_still_collate():
    t = ImageTextTransform(max_length=16, image_size=32, hard_negatives=1)
    real = {"image": Image.new("RGB", (32, 32)), "caption": "a photo of a dog", "key": "x"}
    french = make_pair(1, image_size=32)
    fr = ImageTextTransform(max_length=64, image_size=32, lang="fr", hard_negatives=1)(french)
    assert not fr["negative_mask"].any() and not fr["negative_attention_mask"].any()
    batch = collate([t(real), t(make_pair(0, image_size=32))])
    assert batch["negative_input_ids"].shape == (2, 1, 16)
    assert batch["negative_mask"].tolist() == [[False], [True]]
    assert not batch["negative_attention_mask"][0].any() and batch["negative_attention_mask"][1].any()
    assert "negative_input_ids" not in ImageTextTransform(max_length=16, image_size=32)(real)
    with pytest.raises(VLMConfigError, match="hard_negatives"):
        ImageTextTransform(hard_negatives=-1)
