"""One named data stream (dataset + per-sample transform + collate) and the cursor that reads it.

A :class:`Stream` is plain configuration, usable from YAML through ``class_path``/``init_args``. The
multi-stream DataModule turns each one into a :class:`StreamReader`: a main-process cursor that owns the
stream's own ``torch.utils.data.DataLoader`` (with its own workers), knows its position as
``(epoch, batches read in that epoch)``, cycles into a new reshuffled epoch when the data runs out and can
be reopened at any saved position.

Iterable datasets may implement ``set_rank(rank, world_size)`` (partition across ranks; inside workers the
reader partitions further by ``get_worker_info``) and ``set_epoch(epoch)`` (deterministic reshuffle).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from vlm.data.collate import SKIPPED_KEY, CorruptSample, report_skip
from vlm.data.collate import collate as default_collate
from vlm.errors import VLMConfigError


class Stream:
    """One named data stream: a dataset, a per-sample transform, a collate function and loader overrides.

    Args:
        dataset: a map-style ``Dataset`` (``__len__`` + ``__getitem__``) or an ``IterableDataset``; samples are
            dicts of batch fields (see :mod:`vlm.data.fields`) or ``None`` for a corrupt sample.
        transform: applied to every sample in the worker (a ``None`` sample stays ``None``).
        collate: turns a list of samples into a batch dict; default :func:`vlm.data.collate.collate`.
        batch_size: per-device batch size of this stream (default: the DataModule's ``batch_size``).
        num_workers: loader workers of this stream (default: the DataModule's ``num_workers``).
        shuffle: reshuffle a map-style dataset every epoch of this stream (iterable datasets shuffle themselves
            in ``set_epoch``).
        drop_last: drop the last incomplete batch of each epoch (training only; evaluation keeps it).
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[[Any], Any] | None = None,
        collate: Callable[[Sequence[Any]], dict[str, Any]] | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.collate = collate if collate is not None else default_collate
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.drop_last = drop_last
        if batch_size is not None and batch_size < 1:
            raise VLMConfigError(f"Stream batch_size={batch_size}: use a positive integer or leave it unset.")
        if num_workers is not None and num_workers < 0:
            raise VLMConfigError(f"Stream num_workers={num_workers}: use 0 or more, or leave it unset.")

    @property
    def is_iterable(self) -> bool:
        """Whether the dataset is an ``IterableDataset`` (read in order) rather than map-style (random access)."""
        return isinstance(self.dataset, IterableDataset)

    def size(self) -> int | None:
        """Number of samples, or ``None`` when the dataset cannot tell (an iterable without ``__len__``)."""
        try:
            return len(self.dataset)  # type: ignore[arg-type]
        except (TypeError, NotImplementedError):
            return None

    def check(self, name: str) -> None:
        """Raise one clear error if the dataset is neither map-style nor iterable."""
        if self.is_iterable:
            return
        if not (hasattr(self.dataset, "__getitem__") and hasattr(self.dataset, "__len__")):
            raise VLMConfigError(
                f"Stream '{name}': dataset {type(self.dataset).__name__} is neither map-style (__len__ and "
                "__getitem__) nor a torch.utils.data.IterableDataset. Give the stream a dataset of one of these kinds."
            )

    def __repr__(self) -> str:
        return (f"Stream({type(self.dataset).__name__}, batch_size={self.batch_size}, "
                f"num_workers={self.num_workers}, shuffle={self.shuffle}, drop_last={self.drop_last})")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


#: when the first this-many samples a worker transforms all lack the same field, the field name is wrong
CONFIG_CHECK_SAMPLES = 16


def name_stream(dataset: Any, name: str) -> None:
    """Tell a reader which stream reads it (its skip warnings name the stream), if it has ``stream_name``."""
    if hasattr(dataset, "stream_name"):
        dataset.stream_name = name


class StreamCollate:
    """Per-batch function run in the workers: transform each sample, check it is a dict, then collate.

    A sample the transform rejects with :class:`~vlm.data.collate.CorruptSample` becomes ``None`` (skipped,
    counted, the first few logged). If the first ``CONFIG_CHECK_SAMPLES`` samples this copy (one per worker)
    transforms all lack the same field, that is one configuration error naming the field, not a skip.
    """

    def __init__(self, name: str, transform: Callable[[Any], Any] | None, collate: Callable[..., dict[str, Any]]):
        self.name, self.transform, self.collate = name, transform, collate
        self._missing: dict[str, int] | None = {}  # field -> count while no sample got past it; None: checked

    def _transform(self, sample: Any) -> Any:
        try:
            out = self.transform(sample)  # type: ignore[misc]
        except CorruptSample as err:
            key = err.key if err.key is not None else sample.get("key") if isinstance(sample, dict) else None
            source = err.source if err.source is not None else sample.get("__url__") if isinstance(sample, dict) else None
            report_skip(self.name, key, source, err.reason)
            self._note(err.missing_field, sample)
            return None
        self._note(None, sample)
        return out

    def _note(self, missing: str | None, sample: Any) -> None:
        if self._missing is None:
            return
        if missing is None:
            self._missing = None  # a sample got past the field lookups: from here on every problem is a skip
            return
        self._missing[missing] = n = self._missing.get(missing, 0) + 1
        if n >= CONFIG_CHECK_SAMPLES:
            fields = sorted(k for k in sample if not str(k).startswith("_")) if isinstance(sample, dict) else []
            raise VLMConfigError(
                f"Stream '{self.name}': none of its first {n} samples has the field {missing!r} that its transform "
                f"reads (a sample has {fields}). Point the transform at a field the data has (e.g. its text_field) "
                "or fix the data."
            )

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        out = []
        carried = 0  # skips counted on samples that the transform then rejected
        for s in samples:
            if s is not None and self.transform is not None:
                before = s.get(SKIPPED_KEY, 0) if isinstance(s, dict) else 0
                s = self._transform(s)
                carried += int(before) if s is None else 0
            if s is not None and not isinstance(s, dict):
                raise VLMConfigError(
                    f"Stream '{self.name}': a sample is a {type(s).__name__}, but samples must be dicts of batch "
                    "fields (see vlm.data.fields) or None for a corrupt sample. Make the dataset or the stream's "
                    "transform return a dict such as {'pixel_values': ..., 'input_ids': ...}."
                )
            out.append(s)
        batch = self.collate(out)
        if not isinstance(batch, dict):
            raise VLMConfigError(
                f"Stream '{self.name}': collate returned a {type(batch).__name__}; it must return a dict batch."
            )
        if carried:
            batch["num_skipped"] = int(batch.get("num_skipped", 0)) + carried
        return batch


class RankSampler(Sampler[int]):
    """Deterministic per-rank sampler of a map-style dataset for one epoch at a time.

    The permutation depends only on ``(seed, stream, epoch)``, so every rank computes the same one without
    communication; rank ``r`` takes every ``world_size``-th index starting at ``r`` from the first
    ``world_size * (n // world_size)`` entries (no padding duplicates; the few left over rotate every epoch).
    ``start`` skips indices already consumed when a run resumes mid-epoch.
    """

    def __init__(self, size: int, name: str, seed: int, rank: int, world_size: int, shuffle: bool) -> None:
        self.size, self.name, self.seed = size, name, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        """Select the epoch and how many of this rank's indices of it to skip."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch, in order (before skipping ``start``)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed("perm", self.seed, self.name, self.epoch))
            perm = torch.randperm(self.size, generator=g).tolist()
        else:
            perm = list(range(self.size))
        usable = (self.size // self.world_size) * self.world_size
        return perm[self.rank:usable:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, self.size // self.world_size - self.start)


class StreamReader:
    """Main-process cursor over one training stream: yields non-empty collated batches, cycling epochs.

    Its position is ``(epoch, offset)`` with ``offset`` = loader batches read in that epoch (including
    batches whose every sample was skipped). A batch with no surviving sample is not returned: its
    ``num_skipped`` is added to the next batch of the stream.
    """

    def __init__(
        self,
        name: str,
        stream: Stream,
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        epoch: int = 0,
        offset: int = 0,
    ) -> None:
        stream.check(name)
        self.name, self.stream = name, stream
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.rank, self.world_size = rank, world_size
        self.pin_memory = pin_memory
        # set_epoch/set_rank on the main-process copy never reach persistent workers of an iterable dataset,
        # so those are reopened every epoch; map-style sampling happens in the main process and can persist.
        self.persistent_workers = persistent_workers and num_workers > 0 and not stream.is_iterable
        self.epoch, self.offset = epoch, offset
        #: loader batches in a row without a usable sample after which an iterable stream counts as yielding
        #: nothing (a map-style stream is judged by its whole epoch)
        self.max_empty_batches = max(100, -(-10_000 // batch_size))
        self._iter: Iterator[dict[str, Any]] | None = None
        self._loader: DataLoader | None = None
        self._sampler: RankSampler | None = None
        if stream.is_iterable and world_size > 1 and not hasattr(stream.dataset, "set_rank"):
            warnings.warn(
                f"Stream '{name}': the iterable dataset {type(stream.dataset).__name__} has no set_rank(rank, "
                f"world_size), so all {world_size} ranks read the same samples. Implement set_rank to partition it.",
                stacklevel=2,
            )

    @property
    def state(self) -> tuple[int, int]:
        """``(epoch, offset)`` after the last batch read."""
        return self.epoch, self.offset

    def seek(self, epoch: int, offset: int) -> None:
        """Move to a saved position; the loader is reopened lazily at the next read."""
        if (epoch, offset) != (self.epoch, self.offset) or self._iter is None:
            self.close_iterator()
            self.epoch, self.offset = epoch, offset

    def close_iterator(self) -> None:
        """Drop the current loader iterator (its workers exit unless they are persistent)."""
        self._iter = None

    def close(self) -> None:
        """Release the loader and its workers."""
        self._iter = None
        self._loader = None

    def _generator(self) -> torch.Generator:
        # An explicit generator keeps the DataLoader from drawing its worker seed from the global RNG
        # (which would shift the model's randomness between a straight and a resumed run).
        return torch.Generator().manual_seed(derive_seed("workers", self.seed, self.name, self.rank, self.epoch))

    def _open(self) -> None:
        ds = self.stream.dataset
        name_stream(ds, self.name)
        collate_fn = StreamCollate(self.name, self.stream.transform, self.stream.collate)
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_fn,
                      drop_last=self.stream.drop_last, pin_memory=self.pin_memory)
        if self.stream.is_iterable:
            if hasattr(ds, "set_rank"):
                ds.set_rank(self.rank, self.world_size)
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(self.epoch)
            loader = DataLoader(ds, generator=self._generator(), **common)
            self._iter = iter(loader)
            # An iterable stream can only be positioned by reading; the worker seeds match the original
            # run's, so even random transforms replay identically.
            for _ in range(self.offset):
                try:
                    next(self._iter)
                except StopIteration:
                    break
            return
        if self._loader is None:
            self._sampler = RankSampler(len(ds), self.name, self.seed, self.rank, self.world_size, self.stream.shuffle)
            self._loader = DataLoader(ds, sampler=self._sampler, generator=self._generator(),
                                      persistent_workers=self.persistent_workers, **common)
        assert self._sampler is not None
        self._sampler.set_position(self.epoch, self.offset * self.batch_size)
        self._loader.generator = self._generator()
        self._iter = iter(self._loader)

    def _next(self) -> dict[str, Any]:
        assert self._iter is not None
        try:
            return next(self._iter)
        except VLMConfigError as err:
            # a worker's error arrives re-raised with its traceback as the message: keep the message alone
            msg = str(err)
            if "Traceback" in msg and "VLMConfigError: " in msg:
                raise VLMConfigError(msg.rsplit("VLMConfigError: ", 1)[1].strip()) from err
            raise

    def next_batch(self) -> dict[str, Any]:
        """The next batch with at least one sample; starts a new epoch of the stream when this one ends."""
        skipped = 0
        empty_in_a_row = 0
        read_this_epoch = self.offset
        survivors_this_epoch = self.offset > 0  # unknown before a resume point: assume the epoch had data
        while True:
            if self._iter is None:
                self._open()
            try:
                batch = self._next()
            except StopIteration:
                if read_this_epoch == 0:
                    raise VLMConfigError(
                        f"Stream '{self.name}' yields no batch in an epoch on rank {self.rank}/{self.world_size}: "
                        f"its dataset has {self.stream.size()} samples for batch_size {self.batch_size} per rank "
                        f"with drop_last={self.stream.drop_last}. Give it more data, a smaller batch_size or "
                        "drop_last=False."
                    ) from None
                if not survivors_this_epoch:
                    raise VLMConfigError(
                        f"Stream '{self.name}': every sample of a whole epoch was skipped (None) on rank "
                        f"{self.rank}. Check the dataset and the stream's transform; the 'skipping sample' "
                        "warnings above say why samples were skipped."
                    ) from None
                self.epoch, self.offset = self.epoch + 1, 0
                read_this_epoch, survivors_this_epoch = 0, False
                self._iter = None
                continue
            self.offset += 1
            read_this_epoch += 1
            skipped += int(batch.get("num_skipped", 0))
            if set(batch) <= {"num_skipped"}:
                # every sample was skipped: carry the count into the next batch of this stream. An endless
                # stream never ends an epoch, so a run of empty batches is where it shows it yields nothing.
                empty_in_a_row += 1
                if self.stream.is_iterable and empty_in_a_row >= self.max_empty_batches:
                    raise VLMConfigError(
                        f"Stream '{self.name}': {empty_in_a_row} batches in a row ({skipped} samples) were all "
                        f"skipped on rank {self.rank}, so it yields no usable sample. Check the dataset and the "
                        "stream's transform; the 'skipping sample' warnings above say why samples were skipped."
                    )
                continue
            survivors_this_epoch = True
            batch["num_skipped"] = skipped
            return batch
