"""Readers for real data formats, all yielding raw sample dicts shaped like the synthetic ones.

A raw sample holds ``image`` (PIL RGB) and text fields (``caption``, ``question``/``answers``, ``text``,
``segments`` for interleaved documents). Corrupt or missing data never stops training: map-style readers
return ``None`` (``collate`` drops and counts it); the streaming reader skips the sample and tells the next
good sample how many it skipped (``_skipped``, summed by ``collate`` into ``num_skipped``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vlm.data.collate import SKIPPED_KEY
from vlm.errors import VLMConfigError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXTS = ("txt", "caption", "text")


class CorruptSample(ValueError):
    """A sample whose image or annotation cannot be decoded."""


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode image bytes or a file path to a fully loaded PIL RGB image; raise ``CorruptSample`` if unreadable."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data) as img:
            img.load()  # force the full decode now, so a truncated file fails here and not in a transform
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptSample(
            f"unreadable image {data if not isinstance(data, bytes | bytearray) else ''}: {err}"
        ) from err


def _resolve(path: str, image_root: str | os.PathLike | None, base: Path) -> Path:
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return p
    return (Path(image_root) if image_root is not None else base) / p


def load_image_or_none(path: Path) -> Image.Image | None:
    """Load an image file, or ``None`` (with a warning) when it is missing or corrupt."""
    try:
        return decode_image(path)
    except (CorruptSample, FileNotFoundError) as err:
        log.warning("skipping image: %s", err)
        return None


# --- streaming WebDataset shards ------------------------------------------------------------------------


def expand_shards(urls: str | os.PathLike | list) -> list[str]:
    """Shard list from a brace pattern ('data/{000..009}.tar'), a directory (its *.tar*), or a list of those."""
    from webdataset.shardlists import expand_urls

    items = list(urls) if isinstance(urls, list | tuple) else [urls]
    out: list[str] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            found = sorted(
                str(p) for p in Path(item).iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz"))
            )
            if not found:
                raise VLMConfigError(f"directory {item!r} holds no .tar shards; point `urls` at the shards.")
            out += found
        else:
            out += expand_urls(item)
    if not out:
        raise VLMConfigError(
            f"no shards in {urls!r}; give a brace pattern, a list of .tar paths or a directory."
        )
    return out


class WebDatasetSource(IterableDataset):
    """Deterministic, rank- and worker-partitioned stream of raw samples from WebDataset tar shards.

    Shards are ordered by ``(seed, epoch)``; each (rank, worker) slot takes whole shards when there are at
    least as many shards as slots, else every n-th sample, so small data works on any layout with no
    duplicates and no loss. Bad samples are skipped and counted, a truncated tar ends only its own shard.
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        require_image: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.urls = expand_shards(urls)
        self.seed, self.shuffle_shards, self.shuffle_buffer = (
            int(seed),
            bool(shuffle_shards),
            int(shuffle_buffer),
        )
        self.require_image = require_image
        self.epoch = 0
        self._rank, self._world = rank, world_size
        self.skipped = 0  # samples skipped by this copy (per worker process when inside a DataLoader)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shard order (and the buffer) for ``epoch``; call before creating the epoch's iterator."""
        self.epoch = int(epoch)

    def set_rank(self, rank: int, world_size: int) -> None:
        """Read only this rank's part of the data (defaults to torch.distributed's rank when initialised)."""
        if not 0 <= rank < world_size:
            raise VLMConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self._rank, self._world = int(rank), int(world_size)

    def _rank_world(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def slot(self) -> tuple[int, int]:
        """``(slot, num_slots)`` of this copy: rank-major over DataLoader workers."""
        rank, world = self._rank_world()
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nworkers + wid, world * nworkers

    def shard_order(self) -> list[str]:
        """This epoch's shard order (identical on every rank and worker)."""
        shards = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"{self.seed}|shards|{self.epoch}").shuffle(shards)
        return shards

    def _raw_samples(self, url: str) -> Iterator[dict[str, Any]]:
        """Group tar members into samples; a read error (truncated tar) ends this shard after what was read."""
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        errors: list[Exception] = []

        def _on_error(exn: Exception) -> bool:
            errors.append(exn)
            return False  # stop this shard: after a read error the tar stream position is unreliable

        def _members() -> Iterator[dict[str, Any]]:
            try:
                with open(url, "rb") as f:
                    for m in tar_file_iterator(f, handler=_on_error):
                        m["__url__"] = url
                        yield m
            except Exception as exn:  # header of a truncated member, missing file, bad gzip ...
                errors.append(exn)

        # the partially read sample at a cut is still yielded; it then lacks a member and counts as skipped
        yield from group_by_keys(_members(), handler=_on_error)
        if errors:
            log.warning("shard %s ended early (%s); its remaining samples are lost", url, errors[0])

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        sample: dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError) as err:
                raise CorruptSample(f"bad json in {raw['__key__']}: {err}") from err
            if not isinstance(meta, dict):
                meta = {"json": meta}
            sample.update(meta)
        for ext in TEXT_EXTS:
            if ext in raw and "caption" not in sample:
                try:
                    sample["caption"] = raw[ext].decode("utf-8").strip()
                except UnicodeDecodeError as err:
                    raise CorruptSample(f"bad text in {raw['__key__']}: {err}") from err
        img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if img_ext is not None:
            sample["image"] = decode_image(raw[img_ext])
        elif self.require_image:
            raise CorruptSample(f"sample {raw['__key__']} in {raw['__url__']} has no image")
        sample.setdefault("key", raw["__key__"])
        sample["__url__"] = raw["__url__"]
        return sample

    def _slot_samples(self) -> Iterator[dict[str, Any] | None]:
        """Decoded samples of this slot; ``None`` stands for a skipped one."""
        slot, nslots = self.slot()
        shards = self.shard_order()
        by_shard = len(shards) >= nslots
        counter = 0  # global sample index over the epoch's shard order: the same on every slot
        for i, url in enumerate(shards):
            if by_shard and i % nslots != slot:
                continue
            for raw in self._raw_samples(url):
                mine = by_shard or counter % nslots == slot
                counter += 1
                if not mine:
                    continue  # skip before decoding: other slots pay for their own samples
                try:
                    yield self._decode(raw)
                except CorruptSample as err:
                    log.warning("skipping sample: %s", err)
                    yield None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, _ = self.slot()
        stream = self._slot_samples()
        if self.shuffle_buffer > 1:
            stream = _buffer_shuffle(
                stream, self.shuffle_buffer, random.Random(f"{self.seed}|buf|{self.epoch}|{slot}")
            )
        pending = 0
        for sample in stream:
            if sample is None:
                pending += 1
                self.skipped += 1
                continue
            if pending:
                sample[SKIPPED_KEY] = pending
                pending = 0
            yield sample
        # skips after the last good sample have no sample to ride on: hand them over as None entries, which
        # collate drops and counts, so a worker's trailing skips still reach num_skipped
        for _ in range(pending):
            yield None


class SyntheticShards(WebDatasetSource):
    """``WebDatasetSource`` over synthetic-world shards, written once into a cache dir (YAML-friendly)."""

    def __init__(
        self,
        split: str = "train",
        num: int = 1000,
        image_size: int = 64,
        world_seed: int = 0,
        samples_per_shard: int = 250,
        root: str | None = None,
        *,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
    ) -> None:
        from vlm.data.synthetic import ensure_synthetic_shards

        urls = ensure_synthetic_shards(root, split, num, image_size, world_seed, samples_per_shard)
        super().__init__(urls, seed=seed, shuffle_shards=shuffle_shards, shuffle_buffer=shuffle_buffer)


def _buffer_shuffle(stream, size: int, rng: random.Random):
    buf: list = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


# --- map-style manifests ---------------------------------------------------------------------------------

_IMAGE_KEYS = ("image", "image_path", "file_name", "filepath", "img", "path")
_CAPTION_KEYS = ("caption", "text", "alt_text", "sentence")


def _read_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    data: Any = None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except ValueError as err:
            if path.suffix == ".json":
                raise VLMConfigError(
                    f"{path} is not valid JSON ({err}); use a JSON list, a COCO file or JSONL."
                ) from err
    if data is None or path.suffix == ".jsonl":  # one JSON record per line
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as err:
                    raise VLMConfigError(
                        f"{path}:{n} is not valid JSON ({err}); fix or remove that line."
                    ) from err
        return records
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        # COCO captions: one record per caption; captions of one image share its pair_id
        files = {im["id"]: im["file_name"] for im in data["images"]}
        order = {im["id"]: i for i, im in enumerate(data["images"])}
        return [
            {"image": files[a["image_id"]], "caption": a["caption"], "pair_id": order[a["image_id"]],
             "image_id": a["image_id"], "id": a.get("id")}
            for a in data["annotations"] if a["image_id"] in files and "caption" in a
        ]  # fmt: skip
    if isinstance(data, list):
        return data
    if isinstance(data, dict):  # a one-line JSONL file parses as a single record
        return [data]
    raise VLMConfigError(
        f"{path}: expected JSONL, a JSON list of records or a COCO file with 'images' and 'annotations'."
    )


class ManifestDataset(Dataset):
    """Map-style image-text records from a JSONL/JSON manifest (COCO-captions-like or VQAv2-like fields)."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.is_file():
            raise VLMConfigError(
                f"manifest {str(self.path)!r} does not exist; give the path of a .jsonl or .json file."
            )
        self.image_root = image_root
        self.records = _read_records(self.path)
        ids: dict[str, int] = {}
        for n, r in enumerate(self.records):
            key = next((k for k in _IMAGE_KEYS if k in r), None)
            if key is None:
                raise VLMConfigError(
                    f"record {n} of {self.path} has no image field; name it one of {list(_IMAGE_KEYS)}."
                )
            r["_image"] = r[key]
            # records naming the same image share a pair_id, so retrieval counts every caption as a match
            r.setdefault("pair_id", ids.setdefault(str(r[key]), len(ids)))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        r = self.records[index]
        image = load_image_or_none(_resolve(str(r["_image"]), self.image_root, self.path.parent))
        if image is None:
            return None
        s: dict[str, Any] = {k: v for k, v in r.items() if not k.startswith("_") and k not in _IMAGE_KEYS}
        s["image"] = image
        s.setdefault("key", f"{self.path.stem}-{index}")
        cap = next((r[k] for k in _CAPTION_KEYS if isinstance(r.get(k), str)), None)
        if cap is not None:
            s["caption"] = cap
        if "answers" in r:
            # VQAv2 answers are dicts {"answer": ...}; keep plain strings, the most frequent as "answer"
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in r["answers"]]
            s["answers"] = answers
            if answers and "answer" not in r:
                s["answer"] = max(answers, key=answers.count)
        return s


# --- interleaved documents --------------------------------------------------------------------------------


class InterleavedDataset(Dataset):
    """OBELICS-style (``texts``/``images`` aligned) or MMC4-style (``text_list``/``image_info``) JSONL documents."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.is_file():
            raise VLMConfigError(f"interleaved file {str(self.path)!r} does not exist; give a .jsonl path.")
        self.image_root = image_root
        self.docs = _read_records(self.path)
        self.dropped_images = 0  # per process; also reported per sample as "dropped_images"

    def __len__(self) -> int:
        return len(self.docs)

    def _plan(self, doc: dict[str, Any], index: int) -> list[tuple[str, str]]:
        if "texts" in doc and "images" in doc:
            if len(doc["texts"]) != len(doc["images"]):
                raise VLMConfigError(
                    f"document {index} of {self.path}: 'texts' and 'images' must be aligned lists."
                )
            plan = []
            for t, im in zip(doc["texts"], doc["images"]):
                if im is not None:
                    plan.append(("image", im))
                if t is not None:
                    plan.append(("text", t))
            return plan
        if "text_list" in doc:
            # MMC4: each image is matched to a sentence; it goes right before that sentence
            before: dict[int, list[str]] = {}
            for info in doc.get("image_info", []):
                name = info.get("image_path") or info.get("image_name") or info.get("path")
                if name is not None:
                    before.setdefault(int(info["matched_text_index"]), []).append(name)
            plan = []
            for i, t in enumerate(doc["text_list"]):
                plan += [("image", p) for p in before.get(i, [])]
                plan.append(("text", t))
            return plan
        raise VLMConfigError(
            f"document {index} of {self.path} has neither 'texts'+'images' (OBELICS) nor 'text_list'+'image_info' (MMC4)."
        )

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        plan = self._plan(self.docs[index], index)
        segments: list[tuple[str, Any]] = []
        dropped = 0
        for kind, value in plan:
            if kind == "text":
                segments.append(("text", value))
                continue
            img = load_image_or_none(_resolve(str(value), self.image_root, self.path.parent))
            if img is None:
                dropped += 1
            else:
                segments.append(("image", img))
        self.dropped_images += dropped
        if dropped and not any(k == "image" for k, _ in segments):
            return None  # every image was bad: nothing left to condition on, count the document as skipped
        return {"key": self.docs[index].get("id", f"{self.path.stem}-{index}"), "segments": segments,
                "dropped_images": dropped}  # fmt: skip


# --- text and image folders -------------------------------------------------------------------------------


class TextCorpus(Dataset):
    """Map-style text corpus: one example per line of a .txt file, or JSONL records with a ``text`` field."""

    def __init__(self, path: str | os.PathLike, text_field: str = "text") -> None:
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.is_file():
            raise VLMConfigError(
                f"text corpus {str(self.path)!r} does not exist; give a .txt or .jsonl path."
            )
        self.text_field = text_field
        self.jsonl = self.path.suffix in (".jsonl", ".json")
        # byte offsets of non-empty lines: the corpus stays on disk, workers seek to their line
        self.offsets: list[int] = []
        with open(self.path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    self.offsets.append(pos)
                pos += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            line = f.readline().decode("utf-8", errors="replace").strip()
        if not self.jsonl:
            return {"key": f"{self.path.stem}-{index}", "text": line}
        try:
            rec = json.loads(line)
            return {"key": f"{self.path.stem}-{index}", **rec, "text": str(rec[self.text_field])}
        except (ValueError, KeyError, TypeError) as err:
            log.warning("skipping line %d of %s: %s", index, self.path, err)
            return None


class ImageFolder(Dataset):
    """Images in class sub-folders (``class_index`` from the sorted folder names) or in one flat folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise VLMConfigError(
                f"image folder {str(self.root)!r} does not exist; give a directory of images."
            )
        is_img = lambda p: p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS  # noqa: E731
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        self.classes = [d.name for d in subdirs if any(is_img(p) for p in d.iterdir())]
        if self.classes:
            self.items = [
                (p, c)
                for c, name in enumerate(self.classes)
                for p in sorted((self.root / name).iterdir())
                if is_img(p)
            ]
        else:
            self.items = [(p, None) for p in sorted(self.root.iterdir()) if is_img(p)]
        if not self.items:
            raise VLMConfigError(
                f"no images ({', '.join(IMAGE_EXTS)}) in {self.root} or its class sub-folders."
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, cls = self.items[index]
        image = load_image_or_none(path)
        if image is None:
            return None
        s: dict[str, Any] = {"key": str(path.relative_to(self.root)), "image": image, "pair_id": index}
        if cls is not None:
            s["class_index"], s["class_name"] = cls, self.classes[cls]
        return s
