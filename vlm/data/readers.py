"""Readers for real data formats, all yielding raw sample dicts shaped like the synthetic ones.

A raw sample holds ``image`` (PIL RGB) and text fields (``caption``, ``question``/``answers``, ``text``,
``segments`` for interleaved documents). Corrupt or missing data never stops training: map-style readers
return ``None`` (``collate`` drops and counts it); the streaming reader skips the sample and tells the next
good sample how many it skipped (``_skipped``, summed by ``collate`` into ``num_skipped``). The first few
skips of every stream and worker are logged with the sample's key, its shard or file and the reason
(:func:`vlm.data.collate.report_skip`). A problem no sample could get past (no record has an image field, a
JSONL corpus whose first lines lack the text field) is a configuration error with one message instead.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vlm.data.collate import SKIPPED_KEY, CorruptSample, report_skip
from vlm.errors import VLMConfigError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXTS = ("txt", "caption", "text")
CONFIG_CHECK_LINES = 16  # a JSONL corpus whose first this-many lines all lack the text field is misconfigured
_ERROR = "__error__"  # a record or raw sample known to be broken carries the reason under this key


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode image bytes or a file path to a fully loaded PIL RGB image; raise ``CorruptSample`` if unreadable."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data) as img:
            img.load()  # force the full decode now, so a truncated file fails here and not in a transform
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise CorruptSample(f"image file {data} does not exist", source=data) from err
    except Exception as err:  # PIL raises many kinds (OSError, ValueError, SyntaxError, struct.error, ...)
        what = f"{len(data)} bytes" if isinstance(data, bytes | bytearray) else str(data)
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
        raise CorruptSample(f"unreadable image ({what}): {type(err).__name__}: {reason}") from err


def _resolve(path: str, image_root: str | os.PathLike | None, base: Path) -> Path:
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return p
    return (Path(image_root) if image_root is not None else base) / p


def load_image_or_none(path: Path, stream: str | None = None, key: Any = None) -> Image.Image | None:
    """Load an image file, or ``None`` (with a warning naming the file) when it is missing or corrupt."""
    try:
        return decode_image(path)
    except CorruptSample as err:
        report_skip(stream, key if key is not None else Path(path).name, path, err.reason)
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


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


def _tar_events(url: str) -> Iterator[tuple]:
    """``("member", name, data)`` per regular file of a tar shard, and one ``("damage", offset, size, message)``
    per damaged region (offsets in the uncompressed tar), said once it is known whether reading resumed."""
    try:
        f = open(url, "rb")
    except OSError as err:
        yield ("damage", 0, 0, f"cannot be read ({err}); none of its samples")
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        plain = not f.read(6).startswith(_COMPRESSED_MAGIC)  # only a plain tar can be searched for the next header
        start = 0
        pending: tuple[int, str] | None = None  # (offset, what) of damage not yet reported
        while True:
            f.seek(start)
            expected = start  # where the next header should begin
            tar, in_data = None, False
            try:
                # ignore_zeros: an invalid header block is stepped over, block by block, to the next valid one
                tar = tarfile.open(fileobj=f, mode="r|" if plain else "r|*", ignore_zeros=True)
                with tar:
                    for info in tar:
                        header = start + info.offset
                        if header > expected or pending is not None:
                            at, what = pending or (expected, f"{header - expected} unreadable bytes")
                            yield ("damage", at, size, f"{what}; reading resumed at member {info.name!r} (byte "
                                                       f"{header}), so only the samples in between are lost")
                            pending = None
                        expected, in_data = header, True  # until its data is read
                        if info.isreg():
                            member = tar.extractfile(info)
                            data = member.read() if member is not None else b""
                        in_data = False
                        expected = start + info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                        if info.isreg():
                            yield ("member", info.name, data)
            except Exception as err:  # truncated data, a bad size field, a broken gzip stream ...
                # in a member's data: search on from its header; else from where the header scan stopped
                at = expected if in_data or tar is None else max(expected, start + tar.offset)
                if pending is None:
                    pending = (at, f"unreadable ({type(err).__name__}: {err})")
                if plain and at + tarfile.BLOCKSIZE < size:
                    start = at + tarfile.BLOCKSIZE
                    continue
            else:
                if pending is None and plain and expected < size:
                    f.seek(expected)
                    if f.read().strip(b"\0"):  # not the end-of-archive zeros: the shard stops inside an entry
                        pending = (expected, "truncated")
            if pending is not None:
                yield ("damage", pending[0], size, f"{pending[1]}; nothing readable after it, so the rest of the "
                                                   "shard is lost (if the shard was cut there, nothing was left)")
            return


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
        self.stream_name: str | None = None  # set by the stream that reads it; names it in skip warnings

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
        """Group tar members into raw samples (``__key__``, ``__url__``, one entry per extension).

        A damaged region of an uncompressed shard is stepped over to the next intact tar header, so only the
        samples it touches are lost; a truncated or damaged compressed shard ends at the damage. Either way the
        shard, the byte offset and the sample index are logged. A sample that lost a member to the damage
        arrives incomplete and is skipped and counted by ``_decode`` (or the transform) like any other.
        """
        from webdataset.tariterators import base_plus_ext

        current: dict[str, Any] | None = None
        index = 0  # samples begun in this shard
        for event in _tar_events(url):
            if event[0] == "member":
                _, name, data = event
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue  # no extension: not part of a sample (e.g. a README in the tar)
                suffix = suffix.lower()
                if current is None or prefix != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                    index += 1
                if suffix in current:
                    current[_ERROR] = f"member {name!r} appears twice"
                current[suffix] = data
                continue
            _, offset, size, message = event
            where = (f"in or right after sample #{index - 1} ({current['__key__']!r})" if current is not None
                     else "before its first sample")
            who = f"stream '{self.stream_name}': " if self.stream_name else ""
            log.warning("%sshard %s: damaged at byte %d of %d, %s: %s", who, url, offset, size, where, message)
        if current is not None:
            yield current

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key, url = raw["__key__"], raw["__url__"]
        if _ERROR in raw:
            raise CorruptSample(raw[_ERROR], key, url)
        sample: dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError) as err:
                raise CorruptSample(f"bad json: {err}", key, url) from err
            if not isinstance(meta, dict):
                meta = {"json": meta}
            sample.update(meta)
        for ext in TEXT_EXTS:
            if ext in raw and "caption" not in sample:
                try:
                    sample["caption"] = raw[ext].decode("utf-8").strip()
                except UnicodeDecodeError as err:
                    raise CorruptSample(f"bad text in .{ext}: {err}", key, url) from err
        img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if img_ext is not None:
            try:
                sample["image"] = decode_image(raw[img_ext])
            except CorruptSample as err:
                raise CorruptSample(f".{img_ext}: {err.reason}", key, url) from err
        elif self.require_image:
            members = sorted(k for k in raw if not k.startswith("__"))
            raise CorruptSample(f"no image member (has {members})", key, url, missing_field="image")
        sample.setdefault("key", key)
        sample["__url__"] = url
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
                    report_skip(self.stream_name, raw["__key__"], url, err.reason)
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
    """Records of a JSONL, JSON-list or COCO file; a bad line or a non-object record becomes ``{_ERROR: why}``."""
    raw = path.read_bytes()
    data: Any = None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError as err:
            if path.suffix == ".json":
                raise VLMConfigError(
                    f"{path} is not valid JSON ({err}); use a JSON list, a COCO file or JSONL."
                ) from err
    if data is None or path.suffix == ".jsonl":  # one JSON record per line
        records: list[Any] = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line.decode("utf-8")))
                except ValueError as err:  # bad JSON or bad UTF-8
                    records.append({_ERROR: f"line {n} is not valid JSON ({err})"})
    elif isinstance(data, dict) and "images" in data and "annotations" in data:
        # COCO captions: one record per caption; captions of one image share its pair_id
        images = [im for im in data["images"] if isinstance(im, dict) and "id" in im and "file_name" in im]
        files = {im["id"]: im["file_name"] for im in images}
        order = {im["id"]: i for i, im in enumerate(images)}
        return [
            {"image": files[a["image_id"]], "caption": a["caption"], "pair_id": order[a["image_id"]],
             "image_id": a["image_id"], "id": a.get("id")}
            for a in data["annotations"] if isinstance(a, dict) and a.get("image_id") in files and "caption" in a
        ]  # fmt: skip
    elif isinstance(data, list):
        records = data
    elif isinstance(data, dict):  # a one-line JSONL file parses as a single record
        records = [data]
    else:
        raise VLMConfigError(
            f"{path}: expected JSONL, a JSON list of records or a COCO file with 'images' and 'annotations'."
        )
    out = [r if isinstance(r, dict) else {_ERROR: f"record is a {type(r).__name__}, not a JSON object"}
           for r in records]  # fmt: skip
    if out and all(_ERROR in r for r in out):
        raise VLMConfigError(f"{path}: no line is a JSON object ({out[0][_ERROR]}); give a JSONL file, one object per line.")
    return out


class ManifestDataset(Dataset):
    """Map-style image-text records from a JSONL/JSON manifest (COCO-captions-like or VQAv2-like fields)."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.is_file():
            raise VLMConfigError(
                f"manifest {str(self.path)!r} does not exist; give the path of a .jsonl or .json file."
            )
        self.image_root = image_root
        self.stream_name: str | None = None  # set by the stream that reads it; names it in skip warnings
        self.records = _read_records(self.path)
        ids: dict[str, int] = {}
        for r in self.records:
            if _ERROR in r:
                continue
            key = next((k for k in _IMAGE_KEYS if k in r), None)
            if key is None:
                r[_ERROR] = f"no image field (one of {list(_IMAGE_KEYS)}); it has {sorted(r)}"
                continue
            r["_image"] = r[key]
            # records naming the same image share a pair_id, so retrieval counts every caption as a match
            r.setdefault("pair_id", ids.setdefault(str(r[key]), len(ids)))
        if self.records and not ids:  # a record missing its image is skipped; none having one is a mistake
            raise VLMConfigError(
                f"{self.path}: no image field in any record; name it one of {list(_IMAGE_KEYS)} "
                f"(the first record has {sorted(k for k in self.records[0] if k != _ERROR)})."
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        r = self.records[index]
        key = r.get("key", f"{self.path.stem}-{index}")
        try:
            if _ERROR in r:
                raise CorruptSample(r[_ERROR])
            image_path = _resolve(str(r["_image"]), self.image_root, self.path.parent)
            s: dict[str, Any] = {k: v for k, v in r.items() if not k.startswith("_") and k not in _IMAGE_KEYS}
            s["key"] = key
            cap = next((r[k] for k in _CAPTION_KEYS if isinstance(r.get(k), str)), None)
            if cap is not None:
                s["caption"] = cap
            if "answers" in r:
                # VQAv2 answers are dicts {"answer": ...}; keep plain strings, the most frequent as "answer"
                if not isinstance(r["answers"], list):
                    raise CorruptSample(f"'answers' is a {type(r['answers']).__name__}, not a list")
                answers = [str(a["answer"]) if isinstance(a, dict) else str(a) for a in r["answers"]]
                s["answers"] = answers
                if answers and "answer" not in r:
                    s["answer"] = max(answers, key=answers.count)
            s["image"] = decode_image(image_path)
        except (CorruptSample, KeyError, TypeError, ValueError) as err:
            reason = err.reason if isinstance(err, CorruptSample) else f"{type(err).__name__}: {err}"
            report_skip(self.stream_name, key, f"{self.path} record {index}", reason)
            return None
        return s


# --- interleaved documents --------------------------------------------------------------------------------


class InterleavedDataset(Dataset):
    """OBELICS-style (``texts``/``images`` aligned) or MMC4-style (``text_list``/``image_info``) JSONL documents."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.is_file():
            raise VLMConfigError(f"interleaved file {str(self.path)!r} does not exist; give a .jsonl path.")
        self.image_root = image_root
        self.stream_name: str | None = None  # set by the stream that reads it; names it in skip warnings
        self.docs = _read_records(self.path)
        self.dropped_images = 0  # per process; also reported per sample as "dropped_images"
        known = lambda d: ("texts" in d and "images" in d) or "text_list" in d  # noqa: E731
        if self.docs and not any(known(d) for d in self.docs if _ERROR not in d):
            raise VLMConfigError(
                f"no document of {self.path} has 'texts'+'images' (OBELICS) or 'text_list'+'image_info' (MMC4); "
                f"the first has {sorted(self.docs[0])}. Convert the documents to one of these layouts."
            )

    def __len__(self) -> int:
        return len(self.docs)

    def _plan(self, doc: dict[str, Any]) -> list[tuple[str, str]]:
        if _ERROR in doc:
            raise CorruptSample(doc[_ERROR])
        if "texts" in doc and "images" in doc:
            texts, images = doc["texts"], doc["images"]
            if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
                raise CorruptSample("'texts' and 'images' are not aligned lists")
            plan = []
            for t, im in zip(texts, images):
                if im is not None:
                    plan.append(("image", im))
                if t is not None:
                    plan.append(("text", t))
        elif "text_list" in doc:
            # MMC4: each image is matched to a sentence; it goes right before that sentence
            before: dict[int, list[str]] = {}
            for info in doc.get("image_info") or []:
                name = info.get("image_path") or info.get("image_name") or info.get("path")
                if name is not None:
                    before.setdefault(int(info["matched_text_index"]), []).append(name)
            plan = []
            for i, t in enumerate(doc["text_list"]):
                plan += [("image", p) for p in before.get(i, [])]
                plan.append(("text", t))
        else:
            raise CorruptSample(f"neither 'texts'+'images' (OBELICS) nor 'text_list' (MMC4); it has {sorted(doc)}")
        bad = next((v for k, v in plan if not isinstance(v, str)), None)
        if bad is not None:
            raise CorruptSample(f"a text or image entry is a {type(bad).__name__}, not a string")
        return plan

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        doc = self.docs[index]
        key = doc.get("id", f"{self.path.stem}-{index}")
        source = f"{self.path} document {index}"
        try:
            plan = self._plan(doc)
        except (CorruptSample, KeyError, TypeError, ValueError, AttributeError) as err:
            reason = err.reason if isinstance(err, CorruptSample) else f"{type(err).__name__}: {err}"
            report_skip(self.stream_name, key, source, reason)
            return None
        segments: list[tuple[str, Any]] = []
        dropped = 0
        for kind, value in plan:
            if kind == "text":
                segments.append(("text", value))
                continue
            img = load_image_or_none(_resolve(value, self.image_root, self.path.parent), self.stream_name, key)
            if img is None:
                dropped += 1
            else:
                segments.append(("image", img))
        self.dropped_images += dropped
        if dropped and not any(k == "image" for k, _ in segments):
            return None  # every image was bad: nothing left to condition on, count the document as skipped
        if not any(k == "text" and v.strip() for k, v in segments):
            report_skip(self.stream_name, key, source, "no text")
            return None
        return {"key": key, "segments": segments, "dropped_images": dropped}


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
        self.stream_name: str | None = None  # set by the stream that reads it; names it in skip warnings
        self.jsonl = self.path.suffix in (".jsonl", ".json")
        # byte offsets of non-empty lines: the corpus stays on disk, workers seek to their line
        self.offsets: list[int] = []
        with open(self.path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    self.offsets.append(pos)
                pos += len(line)
        if self.jsonl:
            self._check_field()

    def _check_field(self) -> None:
        # a few bad lines are skipped; a text_field that none of the first lines has is a configuration error
        head = range(min(CONFIG_CHECK_LINES, len(self.offsets)))
        recs = []
        for i in head:
            try:
                rec = json.loads(self._line(i))
            except ValueError:
                continue
            if isinstance(rec, dict):
                recs.append(rec)
        if head and not recs:
            raise VLMConfigError(
                f"{self.path}: none of its first {len(head)} lines is a JSON object; give JSONL records with a "
                f"{self.text_field!r} field, or plain text in a .txt file."
            )
        if recs and not any(self.text_field in r for r in recs):
            seen = sorted({k for r in recs for k in r})
            raise VLMConfigError(
                f"{self.path}: none of its first {len(head)} records has the text field {self.text_field!r} "
                f"(they have {seen}); set text_field to the field that holds the text."
            )

    def __len__(self) -> int:
        return len(self.offsets)

    def _line(self, index: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            return f.readline().decode("utf-8").strip()

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        key = f"{self.path.stem}-{index}"
        try:
            line = self._line(index)
            if not self.jsonl:
                return {"key": key, "text": line}
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise CorruptSample(f"line is a JSON {type(rec).__name__}, not an object")
            text = rec.get(self.text_field)
            if not isinstance(text, str) or not text.strip():
                what = "missing" if text is None else "empty" if isinstance(text, str) else f"a {type(text).__name__}"
                raise CorruptSample(f"text field {self.text_field!r} is {what}")
            return {"key": key, **rec, "text": text}
        except (CorruptSample, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
            reason = err.reason if isinstance(err, CorruptSample) else f"{type(err).__name__}: {err}"
            report_skip(self.stream_name, key, f"{self.path} line {index + 1} (non-empty)", reason)
            return None


class ImageFolder(Dataset):
    """Images in class sub-folders (``class_index`` from the sorted folder names) or in one flat folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise VLMConfigError(
                f"image folder {str(self.root)!r} does not exist; give a directory of images."
            )
        self.stream_name: str | None = None  # set by the stream that reads it; names it in skip warnings
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

    def image_sample(self, index: int) -> dict[str, Any] | None:
        """``key``, ``image`` and (in class folders) ``class_index``/``class_name`` of item ``index``; None when the
        file does not decode (skipped and counted)."""
        path, cls = self.items[index]
        key = str(path.relative_to(self.root))
        image = load_image_or_none(path, self.stream_name, key)
        if image is None:
            return None
        s: dict[str, Any] = {"key": key, "image": image}
        if cls is not None:
            s["class_index"], s["class_name"] = cls, self.classes[cls]
        return s

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        s = self.image_sample(index)
        return None if s is None else {**s, "pair_id": index}
