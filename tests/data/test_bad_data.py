"""Corrupt data: every malformed sample of every reader and transform is skipped, counted and logged; nothing
else is lost; a field no sample has and a stream that yields nothing are one clear error each.

The fuzz tests inject seeded corruptions and compare what arrives with what was injected: every good sample
exactly once across 2 ranks x 2 workers, and the skipped counts equal the corrupt samples.
"""

import io
import json
import logging
import random
import tarfile
from collections import Counter
from types import SimpleNamespace

import pytest
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from vlm.data.collate import SKIP_LOG_LIMIT, collate
from vlm.data.module import MultiStreamDataModule
from vlm.data.readers import ImageFolder, InterleavedDataset, ManifestDataset, TextCorpus, WebDatasetSource
from vlm.data.stream import CONFIG_CHECK_SAMPLES, RankSampler, Stream, StreamCollate, StreamReader
from vlm.data.transforms import ImageOnlyTransform, ImageTextTransform, InterleavedTransform, TextTransform
from vlm.errors import VLMConfigError

RANKS, WORKERS = 2, 2


@pytest.fixture(autouse=True)
def _fresh_skip_log(monkeypatch):
    # the first few skips of a stream are logged once per process: give every test its own budget
    import vlm.data.collate

    monkeypatch.setattr(vlm.data.collate, "_skip_logged", {})


def _img_bytes(rng: random.Random, mode: str = "RGB", size: tuple[int, int] = (12, 12), fmt: str = "PNG") -> bytes:
    colour = {"RGB": (rng.randrange(256), 9, 9), "RGBA": (1, 2, 3, 4), "LA": (5, 6), "CMYK": (1, 2, 3, 4)}
    img = Image.new(mode, size, colour.get(mode, 7))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _truncated_png(rng: random.Random) -> bytes:
    """A PNG cut in the middle of its pixel data (noise, so that the data is most of the file)."""
    img = Image.frombytes("RGB", (24, 24), bytes(rng.randrange(256) for _ in range(24 * 24 * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _good_image(rng: random.Random) -> tuple[bytes, str]:
    # odd modes and sizes are still images: they must arrive (converted to RGB, resized)
    choice = rng.randrange(6)
    if choice == 0:
        return _img_bytes(rng, rng.choice(["L", "P", "LA", "RGBA", "1"])), "png"
    if choice == 1:
        return _img_bytes(rng, rng.choice(["I;16", "CMYK", "F"]), fmt="TIFF"), "tiff"
    if choice == 2:
        return _img_bytes(rng, size=rng.choice([(1, 1), (1, 40), (300, 2)])), "png"
    return _img_bytes(rng), rng.choice(["png", "jpg"]) if choice == 3 else "png"


CORRUPTIONS = ["garbage_image", "truncated_image", "no_caption", "empty_caption", "caption_not_text",
               "bad_json", "no_image", "json_not_text", "duplicate_member"]  # fmt: skip


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _sample_members(rng: random.Random, i: int, kind: str | None) -> list[tuple[str, bytes]]:
    img, ext = _good_image(rng)
    meta = {"caption": f"sample {i}", "pair_id": i}
    if kind == "garbage_image":
        img = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    elif kind == "truncated_image":
        img, ext = _truncated_png(rng), "png"
    elif kind == "no_caption":
        del meta["caption"]
    elif kind == "empty_caption":
        meta["caption"] = rng.choice(["", "   "])
    elif kind == "caption_not_text":
        meta["caption"] = rng.choice([17, ["a", "b"], None, {"en": 1}])
    members = [("json", json.dumps(meta).encode())]
    if kind == "bad_json":
        members = [("json", b'{"caption": "cut')]
    elif kind == "json_not_text":
        members = [("json", b"\xff\xfe not utf-8 {")]
    if kind != "no_image":
        members.append((ext, img))
    if kind == "duplicate_member":
        members.append(("json", json.dumps(meta).encode()))
    return [(f"s{i:05d}.{e}", d) for e, d in members]


@pytest.fixture(scope="module")
def fuzz_shards(tmp_path_factory):
    """Eight shards of 30 seeded samples (about a third corrupt); one cut mid-way, one with a smashed header."""
    rng = random.Random(1234)
    root = tmp_path_factory.mktemp("fuzz")
    good: set[int] = set()
    corrupt = 0
    urls = []
    i = 0
    for shard in range(8):
        url = str(root / f"shard-{shard}.tar")
        layout = []  # (index, kind, name of its image member or None)
        with tarfile.open(url, "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(30):
                kind = rng.choice(CORRUPTIONS) if rng.random() < 0.35 else None
                members = _sample_members(rng, i, kind)
                for name, data in members:
                    _add(tf, name, data)
                image = next((n for n, _ in members if not n.endswith(".json")), None)
                layout.append((i, kind, image))
                i += 1
        members = {m.name: m for m in tarfile.open(url).getmembers()}
        data = bytearray(open(url, "rb").read())
        if shard == 2:  # cut inside the image of its 12th sample: it counts as skipped, nothing after exists
            cut_at = next(k for k, (_, _, image) in enumerate(layout) if k >= 11 and image)
            m = members[layout[cut_at][2]]
            data = data[: m.offset_data + m.size // 2]
            layout = layout[: cut_at + 1]
            layout[cut_at] = (layout[cut_at][0], "cut", None)
        if shard == 5:  # garbage over the image header of its 8th sample: that sample loses its image only
            hit = next(k for k, (_, _, image) in enumerate(layout) if k >= 7 and image)
            m = members[layout[hit][2]]
            data[m.offset : m.offset + 512] = bytes(rng.randrange(1, 256) for _ in range(512))
            layout[hit] = (layout[hit][0], "smashed", None)
        open(url, "wb").write(bytes(data))
        for idx, kind, _ in layout:
            if kind is None:
                good.add(idx)
            else:
                corrupt += 1
        urls.append(url)
    return {"urls": urls, "good": good, "corrupt": corrupt, "cut_url": urls[2], "smashed_url": urls[5]}


def _read_iterable(make_source, collate_fn, batch_size=4):
    """Every batch of an iterable source read as 2 ranks x 2 DataLoader workers."""
    batches = []
    for rank in range(RANKS):
        src = make_source()
        src.set_rank(rank, RANKS)
        batches += list(DataLoader(src, batch_size=batch_size, num_workers=WORKERS, collate_fn=collate_fn))
    return batches


def _read_map(ds, collate_fn, batch_size=4):
    """Every batch of a map-style dataset read as 2 ranks (the training sampler) x 2 DataLoader workers."""
    assert len(ds) % RANKS == 0  # the sampler leaves out len % ranks samples per epoch
    batches = []
    for rank in range(RANKS):
        sampler = RankSampler(len(ds), "fuzz", 3, rank, RANKS, shuffle=True)
        batches += list(DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=WORKERS,
                                   collate_fn=collate_fn))  # fmt: skip
    return batches


def _tally(batches, field):
    seen = Counter(v for b in batches for v in (b[field].tolist() if field in b else []))
    return seen, sum(b["num_skipped"] for b in batches)


def test_fuzz_webdataset_through_the_image_text_transform(fuzz_shards):
    transform = ImageTextTransform(tokenizer="minilm", max_length=12, image_size=16)
    batches = _read_iterable(lambda: WebDatasetSource(fuzz_shards["urls"], seed=5, shuffle_buffer=3),
                             StreamCollate("pairs", transform, collate))  # fmt: skip
    seen, skipped = _tally(batches, "pair_id")
    assert not [k for k, n in seen.items() if n > 1]
    assert set(seen) == fuzz_shards["good"]
    assert skipped == fuzz_shards["corrupt"]
    assert all(b["pixel_values"].shape[1:] == (3, 16, 16) for b in batches if "pixel_values" in b)


def test_fuzz_webdataset_single_process_logs_the_damage(fuzz_shards, caplog):
    src = WebDatasetSource(fuzz_shards["urls"], shuffle_shards=False)
    src.stream_name = "pairs"
    t = ImageTextTransform(tokenizer="minilm", max_length=12, image_size=16)
    fn = StreamCollate("pairs", t, collate)
    with caplog.at_level(logging.WARNING):
        batch = fn(list(src))
    assert sorted(batch["pair_id"].tolist()) == sorted(fuzz_shards["good"])
    assert batch["num_skipped"] == fuzz_shards["corrupt"]
    text = caplog.text
    # the cut shard: named, with the byte offset and the sample where reading stopped
    cut = [r.getMessage() for r in caplog.records if fuzz_shards["cut_url"] in r.getMessage()]
    assert cut and any("byte" in m and "sample #" in m for m in cut)
    # the smashed header: stepped over, reading resumed
    assert any("resumed" in r.getMessage() for r in caplog.records if fuzz_shards["smashed_url"] in r.getMessage())
    # sample warnings name the stream, the key, the shard and the reason (at most SKIP_LOG_LIMIT, then one note)
    skips = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(skips) == SKIP_LOG_LIMIT and "further skipped samples" in text
    assert all(m.startswith("stream 'pairs': skipping sample s") and ".tar" in m for m in skips)
    assert "BytesIO" not in text


def _manifest_fixture(root, rng, n=120):
    (root / "img").mkdir()
    lines, good, corrupt = [], set(), 0
    kinds = ["bad_json", "not_object", "no_image_field", "garbage_image", "missing_file", "caption_not_text",
             "empty_caption", "answers_not_list", "truncated_image"]  # fmt: skip
    for i in range(n):
        kind = rng.choice(kinds) if rng.random() < 0.35 else None
        data, ext = _good_image(rng)
        if kind == "garbage_image":
            data = bytes(rng.randrange(256) for _ in range(50))
        if kind == "truncated_image":
            data, ext = _truncated_png(rng), "png"
        name = f"img/{i}.{ext}"
        if kind != "missing_file":
            (root / name).write_bytes(data)
        rec = {"image": name, "caption": f"record {i}", "pair_id": i}
        if kind == "no_image_field":
            del rec["image"]
        if kind == "caption_not_text":
            rec["caption"] = rng.choice([3, None, ["x"]])
        if kind == "empty_caption":
            rec["caption"] = ""
        if kind == "answers_not_list":
            rec["answers"] = 5
        line = json.dumps(rec)
        if kind == "bad_json":
            line = line[: len(line) // 2]
        if kind == "not_object":
            line = json.dumps([1, 2])
        lines.append(line)
        good.update([i] if kind is None else [])
        corrupt += kind is not None
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    return good, corrupt


def test_fuzz_manifest_through_the_image_text_transform(tmp_path):
    good, corrupt = _manifest_fixture(tmp_path, random.Random(99))
    ds = ManifestDataset(tmp_path / "m.jsonl")
    batches = _read_map(ds, StreamCollate("m", ImageTextTransform(max_length=12, image_size=16), collate))
    seen, skipped = _tally(batches, "pair_id")
    assert not [k for k, n in seen.items() if n > 1]
    assert set(seen) == good and skipped == corrupt


def test_fuzz_interleaved_documents(tmp_path):
    rng = random.Random(7)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(_img_bytes(rng, "P"))
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    lines, good, corrupt = [], set(), 0
    for i in range(80):
        kind = rng.choice(["misaligned", "unknown", "text_not_str", "all_images_bad", "no_text", "bad_json",
                           "not_object", "mmc4_no_index"]) if rng.random() < 0.4 else None  # fmt: skip
        doc = {"id": f"d{i}", "texts": [f"intro{i}", None, f"word{i}"], "images": [None, "img/ok.png", None]}
        if i % 3 == 0:
            doc = {"id": f"d{i}", "text_list": [f"intro{i}", f"word{i}"],
                   "image_info": [{"image_name": "img/ok.png", "matched_text_index": 1}]}  # fmt: skip
        if kind == "misaligned":
            doc = {"id": f"d{i}", "texts": ["a"], "images": ["img/ok.png", None]}
        elif kind == "unknown":
            doc = {"id": f"d{i}", "body": "text"}
        elif kind == "text_not_str":
            doc = {"id": f"d{i}", "texts": [5, None], "images": [None, "img/ok.png"]}
        elif kind == "all_images_bad":
            doc = {"id": f"d{i}", "texts": ["x", None], "images": [None, "img/bad.png"]}
        elif kind == "no_text":
            doc = {"id": f"d{i}", "texts": [None], "images": ["img/ok.png"]}
        elif kind == "mmc4_no_index":
            doc = {"id": f"d{i}", "text_list": ["x"], "image_info": [{"image_name": "img/ok.png"}]}
        line = json.dumps(doc)
        if kind == "bad_json":
            line = "{" + line
        elif kind == "not_object":
            line = '"just a string"'
        lines.append(line)
        good.update([i] if kind is None else [])
        corrupt += kind is not None
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    ds = InterleavedDataset(tmp_path / "docs.jsonl")
    t = InterleavedTransform(tokenizer="minilm", max_length=24, max_images=2, image_size=8)
    batches = _read_map(ds, StreamCollate("docs", t, collate))
    words = Counter(w for b in batches for text in b.get("text", []) for w in text.split() if w.startswith("word"))
    assert not [k for k, n in words.items() if n > 1]
    assert {int(w[4:]) for w in words} == good
    assert sum(b["num_skipped"] for b in batches) == corrupt


def test_fuzz_text_corpus(tmp_path):
    rng = random.Random(3)
    lines, good, corrupt = [], set(), 0
    for i in range(100):
        kind = rng.choice(["bad_json", "not_object", "no_field", "empty", "not_text", "bad_utf8"]) \
            if i >= 2 and rng.random() < 0.4 else None  # fmt: skip
        line = json.dumps({"text": f"line{i} here", "n": i}).encode()
        if kind == "bad_json":
            line = line[:-3]
        elif kind == "not_object":
            line = b"[1, 2, 3]"
        elif kind == "no_field":
            line = json.dumps({"body": "x"}).encode()
        elif kind == "empty":
            line = json.dumps({"text": " "}).encode()
        elif kind == "not_text":
            line = json.dumps({"text": rng.choice([1, None, [1]])}).encode()
        elif kind == "bad_utf8":
            line = b'{"text": "caf\xe9"}'
        lines.append(line)
        good.update([i] if kind is None else [])
        corrupt += kind is not None
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = TextCorpus(tmp_path / "c.jsonl")
    batches = _read_map(ds, StreamCollate("text", TextTransform(max_length=8), collate))
    seen = Counter(int(t.split()[0][4:]) for b in batches for t in b.get("text", []))
    assert not [k for k, n in seen.items() if n > 1]
    assert set(seen) == good and sum(b["num_skipped"] for b in batches) == corrupt


def test_fuzz_image_folder(tmp_path):
    rng = random.Random(5)
    good_names, corrupt = set(), 0
    for i in range(60):
        kind = rng.choice(["garbage", "truncated", "empty_file"]) if rng.random() < 0.35 else None
        data, ext = _good_image(rng)
        if kind == "garbage":
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        elif kind == "truncated":
            data, ext = _truncated_png(rng), "png"
        elif kind == "empty_file":
            data = b""
        name = f"{i:03d}.{ext}"
        (tmp_path / name).write_bytes(data)
        good_names.update([name] if kind is None else [])
        corrupt += kind is not None
    ds = ImageFolder(tmp_path)
    batches = _read_map(ds, StreamCollate("imgs", ImageOnlyTransform(image_size=8), collate))
    seen, skipped = _tally(batches, "pair_id")
    names = sorted(p.name for p in tmp_path.iterdir())  # ImageFolder's pair_id is the index in name order
    assert not [k for k, n in seen.items() if n > 1]
    assert {names[k] for k in seen} == good_names and skipped == corrupt


# --- the cases, one by one -------------------------------------------------------------------------


def _shard(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                _add(tf, f"{key}.{ext}", data)
    return str(path)


def test_a_sample_without_caption_is_skipped_counted_and_named(tmp_path, caplog):
    png = _img_bytes(random.Random(0))
    ok = [(f"ok-{i:06d}", {"png": png, "txt": f"caption {i}".encode()}) for i in range(6)]
    url = _shard(tmp_path / "s.tar", [*ok[:3], ("nocaption-000001", {"png": png}), *ok[3:]])
    dm = MultiStreamDataModule({"pairs": Stream(WebDatasetSource(url, shuffle_shards=False),
                                                ImageTextTransform(max_length=8, image_size=8))},
                               batch_size=2)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        it = iter(dm.train_dataloader())
        batches = [next(it) for _ in range(6)]  # two epochs of 3 batches: the stream goes on past the sample
    assert [b["num_skipped"] for b in batches] == [0, 1, 0, 0, 1, 0]
    assert [len(b["text"]) for b in batches] == [2, 1, 2] * 2
    msg = next(r.getMessage() for r in caplog.records if "nocaption-000001" in r.getMessage())
    assert msg.startswith("stream 'pairs': skipping sample nocaption-000001") and url in msg and "'caption'" in msg


def test_a_text_field_no_sample_has_is_one_config_error(tmp_path):
    png = _img_bytes(random.Random(0))
    # the text is under "alt" while the transform reads "caption" (nor "text"): a configuration mistake
    url = _shard(tmp_path / "s.tar", [(f"k{i:04d}", {"png": png, "json": b'{"alt": "a caption"}'}) for i in range(40)])
    reader = StreamReader("pairs", Stream(WebDatasetSource(url), ImageTextTransform(max_length=8, image_size=8)),
                          batch_size=4, num_workers=2, seed=0)  # fmt: skip
    with pytest.raises(VLMConfigError) as err:
        reader.next_batch()
    msg = str(err.value)
    assert msg.startswith(f"Stream 'pairs': none of its first {CONFIG_CHECK_SAMPLES} samples has the field 'caption'")
    assert "'alt'" in msg and "Traceback" not in msg  # the worker's traceback is not part of the message
    # a few such samples among good ones are skipped instead
    mixed = [(f"k{i:04d}", {"png": png, "json": b'{"alt": "x"}' if i % 3 else b'{"caption": "y"}'}) for i in range(40)]
    reader = StreamReader("pairs", Stream(WebDatasetSource(_shard(tmp_path / "m.tar", mixed)),
                                          ImageTextTransform(max_length=8, image_size=8)),
                          batch_size=4, num_workers=2, seed=0)  # fmt: skip
    assert reader.next_batch()["num_skipped"] >= 1


class _EndlessBroken(IterableDataset):
    """An endless stream whose every sample is corrupt."""

    def __iter__(self):
        while True:
            yield None


def test_an_endless_stream_of_corrupt_samples_is_an_error_not_a_hang():
    reader = StreamReader("junk", Stream(_EndlessBroken()), batch_size=50, num_workers=0, seed=0)
    with pytest.raises(VLMConfigError, match=r"Stream 'junk': \d+ batches in a row .* all skipped"):
        reader.next_batch()


def test_an_all_corrupt_finite_stream_is_an_error(tmp_path):
    url = _shard(tmp_path / "s.tar", [(f"k{i}", {"png": b"junk", "txt": b"c"}) for i in range(5)])
    reader = StreamReader("bad", Stream(WebDatasetSource(url), ImageTextTransform(max_length=8, image_size=8)),
                          batch_size=2, num_workers=0, seed=0)  # fmt: skip
    with pytest.raises(VLMConfigError, match="Stream 'bad'"):
        reader.next_batch()


def test_long_text_is_cut_to_max_length_not_skipped():
    t = ImageTextTransform(max_length=10, image_size=8)
    out = t({"image": Image.new("RGB", (4, 4)), "caption": " ".join(["word"] * 5000), "key": "long"})
    assert out["input_ids"].shape == (10,) and out["attention_mask"].tolist() == [1] * 10
    assert out["input_ids"][-1].item() == t.tokenizer.sep_token_id


def test_truncated_shard_logs_where_reading_stopped(tmp_path, caplog):
    png = _img_bytes(random.Random(0), size=(30, 30))
    url = _shard(tmp_path / "s.tar", [(f"k{i}", {"txt": b"c", "png": png}) for i in range(5)])
    with tarfile.open(url) as tf:
        m = next(m for m in tf.getmembers() if m.name == "k2.png")
    data = open(url, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: m.offset_data + 10])
    src = WebDatasetSource(str(tmp_path / "cut.tar"))
    with caplog.at_level(logging.WARNING):
        keys = [s["key"] for s in src if s is not None]
    assert keys == ["k0", "k1"] and src.skipped == 1  # k2 was begun and lost its image; k3, k4 never existed
    msg = next(r.getMessage() for r in caplog.records if "cut.tar" in r.getMessage() and "byte" in r.getMessage())
    assert f"byte {m.offset}" in msg and "sample #2" in msg and "'k2'" in msg


# --- the skipped count: summed over ranks, kept across a resume ---------------------------------------------


def _toy():
    from tests.toy import SquaredError, ToyModel

    model = ToyModel(objectives={"se": SquaredError()}, streams={"a": {"se": 1.0}})
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)
    return model, logged


def test_skipped_count_is_summed_over_ranks_at_the_log_cadence_and_survives_resume():
    model, logged = _toy()
    reduces = []

    def reduce(t, reduce_op):
        reduces.append(t.tolist())
        return t * RANKS  # the other rank skipped as many

    model._trainer = SimpleNamespace(world_size=RANKS, log_every_n_steps=3, strategy=SimpleNamespace(reduce=reduce))
    for i, n in enumerate([2, 0, 1, 4, 0, 3, 1]):
        model._count_skipped({"stream": "a", "batch_index": i, "num_skipped": n})
    assert len(reduces) == 3  # positions 0, 3 and 6 only: no collective on the other steps
    assert logged["data/a/skipped"] == RANKS * (2 + 0 + 1 + 4 + 0 + 3 + 1)
    ckpt: dict = {}
    model.on_save_checkpoint(ckpt)
    saved = RANKS * 11
    assert ckpt["vlm_skipped_samples"] == {"a": saved}

    resumed, logged2 = _toy()
    resumed.on_load_checkpoint(ckpt)
    resumed._trainer = SimpleNamespace(world_size=1, log_every_n_steps=50, strategy=None)
    resumed._count_skipped({"stream": "a", "batch_index": 7, "num_skipped": 5})
    assert logged2["data/a/skipped"] == saved + 5
