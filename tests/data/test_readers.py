"""Readers: every good sample exactly once across ranks and workers, every broken one skipped and counted."""

import io
import json
import shutil
import tarfile
from collections import Counter
from types import SimpleNamespace

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from vlm.data.collate import collate
from vlm.data.readers import (
    ImageFolder,
    InterleavedDataset,
    ManifestDataset,
    SyntheticShards,
    TextCorpus,
    WebDatasetSource,
    expand_shards,
)
from vlm.data.synthetic import make_pair, write_shards
from vlm.errors import VLMConfigError


def _png(colour=(200, 10, 10), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four good shards, one shard with four kinds of broken samples, one tar cut in the middle."""
    root = tmp_path_factory.mktemp("shards")
    good = write_shards(root / "good", 12, "train", image_size=32, samples_per_shard=3)
    expected = {f"train-pairs-s0-{i:08d}" for i in range(12)}

    broken = root / "broken.tar"
    png = _png()
    with tarfile.open(broken, "w") as tf:
        for key, members in [
            ("b0", {"png": png, "json": b'{"caption": "ok"}'}),
            ("b1", {"png": b"this is not a png at all", "json": b'{"caption": "garbage"}'}),
            ("b2", {"png": png[: len(png) // 2], "json": b'{"caption": "truncated png"}'}),
            ("b3", {"json": b'{"caption": "image missing"}', "txt": b"image missing"}),
            ("b4", {"png": png, "json": b'{"caption": "bad json'}),
            ("b5", {"png": png, "txt": b"ok too"}),
        ]:
            for ext, data in members.items():
                _add(tf, f"{key}.{ext}", data)
    expected |= {"b0", "b5"}

    # a shard cut in the middle of its third sample's png: two samples arrive, the third counts as skipped,
    # the fourth is lost without a trace (nothing of it was read)
    whole = write_shards(root / "cut", 4, "train", image_size=32, seed=5, samples_per_shard=4)[0]
    with tarfile.open(whole) as tf:
        png3 = next(m for m in tf.getmembers() if m.name == "train-pairs-s5-00000002.png")
    cut = root / "cut.tar"
    cut.write_bytes(open(whole, "rb").read()[: png3.offset_data + png3.size // 2])
    shutil.rmtree(root / "cut")
    expected |= {"train-pairs-s5-00000000", "train-pairs-s5-00000001"}
    return {"good": good, "broken": str(broken), "cut": str(cut), "expected": expected, "num_broken": 4 + 1}


def _key_batch(samples):
    # raw samples of different sources carry different fields; keep what the test checks, then collate
    return collate(
        [
            None if s is None else {"key": s["key"], "rgb": s["image"].mode == "RGB", "_skipped": s.get("_skipped", 0)}
            for s in samples
        ]
    )


def _layout(shards, layout):
    if layout == "by_shard":  # 6 shards >= 2 ranks x 2 workers: whole shards per slot
        return [*shards["good"], shards["broken"], shards["cut"]], shards["expected"]
    # 3 shards (+ one missing file) < 4 slots: every 4th sample per slot
    urls = [shards["good"][0], shards["broken"], shards["cut"], shards["broken"] + ".missing.tar"]
    dropped = {f"train-pairs-s0-{i:08d}" for i in range(3, 12)}  # the good shards left out here
    return urls, shards["expected"] - dropped


@pytest.mark.parametrize("layout", ["by_shard", "by_sample"])
def test_dataloader_two_ranks_two_workers_exactly_once(shards, layout):
    urls, expected = _layout(shards, layout)
    keys, skipped = [], 0
    for rank in range(2):
        src = WebDatasetSource(urls, seed=7, shuffle_buffer=4 if layout == "by_sample" else 0)
        src.set_rank(rank, 2)
        src.set_epoch(1)
        for batch in DataLoader(src, batch_size=2, num_workers=2, collate_fn=_key_batch):
            keys += batch.get("key", [])
            skipped += batch["num_skipped"]
            assert "rgb" not in batch or bool(batch["rgb"].all())  # a batch of trailing skips has no samples
    assert not [k for k, n in Counter(keys).items() if n > 1]
    assert set(keys) == expected
    # every skip reaches a batch, also those after a worker's last good sample (handed over as None)
    assert skipped == shards["num_broken"]


@pytest.mark.parametrize("layout", ["by_shard", "by_sample"])
def test_simulated_workers_count_every_skip(shards, layout, monkeypatch):
    import vlm.data.readers as readers

    urls, expected = _layout(shards, layout)
    keys, counted, carried = [], 0, 0
    for rank in range(2):
        for wid in range(2):
            monkeypatch.setattr(
                readers, "get_worker_info", lambda w=wid: SimpleNamespace(id=w, num_workers=2)
            )
            src = WebDatasetSource(urls, seed=11)
            src.set_rank(rank, 2)
            for s in src:
                if s is None:  # trailing skips of this worker
                    carried += 1
                    continue
                keys.append(s["key"])
                carried += s.get("_skipped", 0)
            counted += src.skipped
    assert sorted(keys) == sorted(expected)  # exactly once: no duplicates, nothing lost
    assert counted == shards["num_broken"]
    assert carried == counted


def test_single_process_counts_skips_on_the_source(shards):
    src = WebDatasetSource([shards["broken"], shards["cut"]], shuffle_shards=False)
    out = [s for s in src if s is not None]
    assert [s["key"] for s in out] == ["b0", "b5", "train-pairs-s5-00000000", "train-pairs-s5-00000001"]
    assert src.skipped == 5
    # the skips before a good sample ride on it: b1..b4 before b5, the cut sample after the last one
    assert out[1]["_skipped"] == 4 and "_skipped" not in out[0]
    assert out[0]["caption"] == "ok" and out[1]["caption"] == "ok too"


def test_epochs_are_deterministic_and_reshuffle(shards):
    def order(epoch):
        src = WebDatasetSource(shards["good"], seed=3, shuffle_buffer=5)
        src.set_epoch(epoch)
        return [s["key"] for s in src]

    assert order(0) == order(0)
    orders = [tuple(order(e)) for e in range(4)]
    assert len(set(orders)) > 1
    assert all(sorted(o) == sorted(orders[0]) for o in orders)


def test_samples_match_the_synthetic_world(shards):
    s = next(iter(WebDatasetSource(shards["good"][0], shuffle_shards=False)))
    ref = make_pair(0, image_size=32)
    assert s["key"] == ref["key"] and s["captions"] == ref["captions"] and s["vqa"] == ref["vqa"]
    assert list(s["image"].getdata()) == list(ref["image"].getdata())


def test_expand_shards(tmp_path, shards):
    assert expand_shards("/d/s-{000..002}.tar") == ["/d/s-000.tar", "/d/s-001.tar", "/d/s-002.tar"]
    d = tmp_path / "dir"
    d.mkdir()
    for p in shards["good"]:
        shutil.copy(p, d)
    assert len(expand_shards(str(d))) == 4
    with pytest.raises(VLMConfigError, match="no .tar shards"):
        expand_shards(str(tmp_path / "dir" / ".."))
    with pytest.raises(VLMConfigError, match="rank"):
        WebDatasetSource(shards["good"]).set_rank(2, 2)


@pytest.fixture()
def images(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(tmp_path / "img" / "b.jpg")
    (tmp_path / "img" / "bad.png").write_bytes(b"garbage")
    return tmp_path


def test_manifest_jsonl_and_vqa(images):
    m = images / "m.jsonl"
    rows = [
        {"image": "img/a.png", "caption": "first"},
        {"image": "img/missing.png", "caption": "gone"},
        {"image": "img/bad.png", "caption": "corrupt"},
        {"image": "img/a.png", "caption": "second caption of a"},
        {
            "image": "img/b.jpg",
            "question": "q?",
            "answers": [{"answer": "x"}, {"answer": "y"}, {"answer": "y"}],
        },
    ]
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = ManifestDataset(m)
    assert len(ds) == 5 and ds[1] is None and ds[2] is None
    assert ds[0]["caption"] == "first" and ds[0]["image"].getpixel((0, 0)) == (1, 2, 3)
    assert ds[0]["pair_id"] == ds[3]["pair_id"] != ds[4]["pair_id"]
    assert ds[4]["answers"] == ["x", "y", "y"] and ds[4]["answer"] == "y" and ds[4]["question"] == "q?"
    assert collate([ds[i] for i in range(3)])["num_skipped"] == 2


def test_manifest_coco(images):
    coco = {
        "images": [{"id": 10, "file_name": "a.png"}, {"id": 20, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 10, "caption": "c1"}, {"image_id": 20, "caption": "c2"}, {"image_id": 10, "caption": "c3"},
        ],
    }  # fmt: skip
    (images / "coco.json").write_text(json.dumps(coco))
    ds = ManifestDataset(images / "coco.json", image_root=images / "img")
    assert [ds[i]["caption"] for i in range(3)] == ["c1", "c2", "c3"]
    assert ds[0]["pair_id"] == ds[2]["pair_id"] != ds[1]["pair_id"]
    (images / "bad.jsonl").write_text('{"caption": "no image"}\n')
    with pytest.raises(VLMConfigError, match="no image field"):
        ManifestDataset(images / "bad.jsonl")


def test_interleaved_obelics_and_mmc4(images):
    p = images / "docs.jsonl"
    docs = [
        {
            "texts": ["intro", None, "after a", None, "after bad"],
            "images": [None, "img/a.png", None, "img/bad.png", None],
        },
        {"text_list": ["s0", "s1"], "image_info": [{"image_name": "img/b.jpg", "matched_text_index": 1}]},
        {"texts": [None], "images": ["img/missing.png"]},
    ]
    p.write_text("\n".join(json.dumps(d) for d in docs))
    ds = InterleavedDataset(p)
    d0 = ds[0]
    assert [k for k, _ in d0["segments"]] == ["text", "image", "text", "text"]
    assert [v for k, v in d0["segments"] if k == "text"] == ["intro", "after a", "after bad"]
    assert d0["dropped_images"] == 1
    d1 = ds[1]
    assert [k for k, _ in d1["segments"]] == ["text", "image", "text"]
    assert d1["segments"][1][1].getpixel((0, 0))[0] in range(0, 12)  # the jpeg of (4, 5, 6)
    assert ds[2] is None and ds.dropped_images == 2


def test_text_corpus(tmp_path):
    (tmp_path / "c.txt").write_text("one line\n\nsecond líne\n")
    ds = TextCorpus(tmp_path / "c.txt")
    assert len(ds) == 2 and [ds[i]["text"] for i in range(2)] == ["one line", "second líne"]
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\nnot json\n{"text": "b", "lang": "en"}\n')
    ds = TextCorpus(tmp_path / "c.jsonl")
    assert ds[0]["text"] == "a" and ds[1] is None and ds[2]["lang"] == "en"


def test_image_folder(tmp_path):
    for cls, colour in [("circle", (9, 9, 9)), ("square", (200, 200, 200))]:
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8), colour).save(tmp_path / cls / "x.png")
    (tmp_path / "square" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["circle", "square"] and len(ds) == 3
    got = [ds[i] for i in range(3)]
    assert got[0]["class_index"] == 0 and got[0]["class_name"] == "circle"
    assert sum(s is None for s in got) == 1
    assert {s["class_index"] for s in got if s is not None} == {0, 1}
    flat = ImageFolder(tmp_path / "circle")
    assert "class_index" not in flat[0]


def test_synthetic_shards_source(tmp_path):
    src = SyntheticShards(
        "val", num=5, image_size=32, samples_per_shard=2, root=str(tmp_path), shuffle_shards=False
    )
    assert len(src.urls) == 3
    keys = [s["key"] for s in src]
    assert keys == [make_pair(i, "val")["key"] for i in range(5)]
