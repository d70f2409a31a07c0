"""The multi-stream DataModule: named streams, a schedule choosing the stream of every step, exact resume.

Training yields one batch per schedule position, tagged ``batch["stream"]`` and ``batch["batch_index"]``
(the position). Every stream has its own DataLoader and cycles on its own (a short stream starts a new,
reshuffled epoch), so the mixture never stalls. All ranks compute the same schedule from ``(seed, position)``
and each reads its own disjoint share of every stream.

Resume: the DataModule's ``state_dict`` (saved in every Lightning checkpoint) holds the schedule position
and each stream's ``(epoch, batches read in that epoch)`` per rank *as of the last batch handed to
training_step* (Lightning fetches one batch ahead; ``on_before_batch_transfer`` marks what was consumed).
``trainer.fit(..., ckpt_path=...)`` reopens every stream at that point, so the run continues with exactly
the batches the uninterrupted run would have seen.

YAML (LightningCLI)::

    data:
      class_path: vlm.data.module.MultiStreamDataModule
      init_args:
        batch_size: 32
        schedule: round_robin          # or accumulate, weighted (by dataset size), or:
        # schedule: {class_path: vlm.data.schedule.Weighted, init_args: {weights: {pairs: 0.7, vqa: 0.3}}}
        streams:
          pairs:
            class_path: vlm.data.stream.Stream
            init_args:
              dataset: {class_path: vlm.data.synthetic.SyntheticPairs, init_args: {...}}
              transform: {class_path: ..., init_args: {...}}
          vqa: {class_path: vlm.data.stream.Stream, init_args: {dataset: ..., batch_size: 16}}
        val_streams: {pairs: {class_path: vlm.data.stream.Stream, init_args: {dataset: ...}}}
        predict_streams: {vqa: {class_path: vlm.data.stream.Stream, init_args: {dataset: ...}}}

Which objectives train on each stream is declared in the model's ``streams:``, not here.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Sampler

from vlm.data.schedule import Schedule, make_schedule
from vlm.data.stream import Stream, StreamCollate, StreamReader, derive_seed, name_stream
from vlm.errors import VLMConfigError

STATE_VERSION = 1
_MAX_PENDING = 64  # more unconsumed batches than this means nothing reports consumption (see mark_consumed)


def _is_empty(batch: Mapping[str, Any]) -> bool:
    return set(batch) <= {"num_skipped"}


class MultiStreamLoader:
    """The training iterable: one batch per schedule position from that position's stream.

    Infinite unless ``steps_per_epoch`` is set (then each ``iter()`` yields up to the next multiple of it).
    Every ``iter()`` starts at the last *consumed* position, so batches fetched ahead but never trained on
    are produced again rather than lost.
    """

    def __init__(self, readers: dict[str, StreamReader], schedule: Schedule, steps_per_epoch: int | None = None,
                 track_consumption: bool = True) -> None:
        self.readers, self.schedule, self.steps_per_epoch = readers, schedule, steps_per_epoch
        self.track_consumption = track_consumption
        self.position = 0  # next position to fetch
        self.consumed_position = 0  # next position training has not seen yet
        self.consumed_streams: dict[str, tuple[int, int]] = {n: r.state for n, r in readers.items()}
        self._pending: dict[int, tuple[str, tuple[int, int]]] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._rewind()
        return self._generate()

    def _rewind(self) -> None:
        if self.position == self.consumed_position:
            return
        for name, reader in self.readers.items():
            reader.seek(*self.consumed_streams[name])
        self.position = self.consumed_position
        self._pending.clear()

    def _generate(self) -> Iterator[dict[str, Any]]:
        spe = self.steps_per_epoch
        end = None if spe is None else (self.position // spe + 1) * spe
        while end is None or self.position < end:
            position = self.position
            name = self.schedule.stream_at(position)
            batch = self.readers[name].next_batch()
            batch["stream"] = name
            batch["batch_index"] = position
            self.position = position + 1
            if self.track_consumption:
                self._pending[position] = (name, self.readers[name].state)
                if len(self._pending) > _MAX_PENDING:
                    warnings.warn(
                        "MultiStreamLoader: batches are fetched but never reported as consumed (a training_step "
                        "taking dataloader_iter, or a manual loop with a trainer attached); the resume point now "
                        "follows fetched batches.", stacklevel=2)
                    self.track_consumption = False
                    self._pending.clear()
            if not self.track_consumption:
                self.consumed_position = self.position
                self.consumed_streams[name] = self.readers[name].state
            yield batch

    def mark_consumed(self, batch_index: Any) -> bool:
        """Record that the batch at ``batch_index`` reached training_step; returns whether it was ours."""
        if isinstance(batch_index, torch.Tensor):
            batch_index = int(batch_index.reshape(-1)[0])
        entry = self._pending.pop(batch_index, None) if isinstance(batch_index, int) else None
        if entry is None:
            return False
        name, state = entry
        self.consumed_position = batch_index + 1
        self.consumed_streams[name] = state
        for p in [p for p in self._pending if p < batch_index]:
            del self._pending[p]
        return True

    def consumed_state(self) -> dict[str, Any]:
        """This rank's resume point: next position and each stream's ``[epoch, batches read in it]``."""
        return {"position": self.consumed_position,
                "streams": {n: list(s) for n, s in self.consumed_streams.items()}}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`consumed_state` (streams it does not name start from their beginning)."""
        self.position = self.consumed_position = int(state["position"])
        self._pending.clear()
        saved = state.get("streams", {})
        for name, reader in self.readers.items():
            epoch, offset = saved.get(name, (0, 0))
            reader.seek(int(epoch), int(offset))
            self.consumed_streams[name] = reader.state

    # Lightning's stateful-loader protocol: marks the loader as resumable (no mid-epoch warning) and
    # cross-checks the position; the per-rank state itself travels in the DataModule's state_dict.
    def state_dict(self) -> dict[str, Any]:
        """The consumed position (the full state is saved by the DataModule)."""
        return {"position": self.consumed_position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check the position restored by the DataModule agrees with the loop's checkpoint."""
        if "position" in state and int(state["position"]) != self.consumed_position:
            warnings.warn(
                f"Checkpoint's loader position {state['position']} differs from the restored DataModule position "
                f"{self.consumed_position}; was it saved with a different DataModule class?", stacklevel=2)

    def close(self) -> None:
        """Release every stream's loader and workers (the resume point is kept)."""
        for reader in self.readers.values():
            reader.close()


class SizedMultiStreamLoader(MultiStreamLoader):
    """A :class:`MultiStreamLoader` whose epochs are ``steps_per_epoch`` batches long."""

    def __len__(self) -> int:
        assert self.steps_per_epoch is not None
        return self.steps_per_epoch


class _EvalBatches(Sampler[list[int]]):
    """The single-process batches of an evaluation set, dealt out: rank ``r`` of ``w`` takes batches
    ``r, r+w, ...``. No sample is repeated or dropped, so ranks may hold different numbers of batches
    (evaluation needs no per-batch collective), and every batch holds exactly the rows it holds in one
    process: per-batch losses, and means weighted by rows, equal a single process's."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int) -> None:
        starts = range(0, size, batch_size)
        self.batches = [list(range(s, min(s + batch_size, size))) for s in starts][rank::world_size]
        if not self.batches and world_size > 1:
            # one empty batch (skipped by EvalLoader): Lightning skips a rank's evaluation loop, epoch-end
            # hooks included, when its loader has no length, and the epoch-end reduction needs every rank
            self.batches = [[]]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EvalLoader:
    """One finite, unshuffled pass over an evaluation stream; batches tagged with the stream and their index."""

    def __init__(self, name: str, stream: Stream, batch_size: int, num_workers: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False, persistent_workers: bool = False) -> None:
        stream.check(name)
        self.name, self.stream = name, stream
        self.rank, self.world_size = rank, world_size
        ds = stream.dataset
        name_stream(ds, name)
        common = dict(num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=StreamCollate(name, stream.transform, stream.collate),
                      generator=torch.Generator().manual_seed(derive_seed("eval", seed, name, rank)))
        if stream.is_iterable:
            if hasattr(ds, "set_rank"):
                ds.set_rank(rank, world_size)
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(0)
            self.loader = DataLoader(ds, batch_size=batch_size, drop_last=False, **common)
        else:
            self.loader = DataLoader(ds, batch_sampler=_EvalBatches(len(ds), batch_size, rank, world_size),
                                     persistent_workers=persistent_workers and num_workers > 0, **common)

    def __len__(self) -> int:
        if self.stream.is_iterable:
            raise TypeError(f"evaluation stream '{self.name}' is iterable and has no length")
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        carry, index = 0, 0
        for batch in self.loader:
            carry += int(batch.get("num_skipped", 0))
            if _is_empty(batch):
                continue
            batch["num_skipped"], carry = carry, 0
            # position over all ranks (rank r holds batches r, r+w, ...): seeds the batch's masks the same way
            # whichever rank evaluates it
            batch["stream"], batch["batch_index"] = self.name, index * self.world_size + self.rank
            index += 1
            yield batch


class MultiStreamDataModule(L.LightningDataModule):
    """Named data streams mixed by a schedule; deterministic per rank, resumable mid-run.

    Args:
        streams: training streams by name (declaration order is the round-robin order).
        schedule: ``"round_robin"``, ``"weighted"`` (mix by dataset size), ``"accumulate"`` or a
            :class:`~vlm.data.schedule.Schedule` instance such as ``Weighted(weights={...})``.
        batch_size: per-device batch size of streams that do not set their own.
        num_workers: loader workers per stream for streams that do not set their own.
        seed: seed of the schedule, of map-style shuffling (per stream and epoch) and of worker seeds.
        val_streams: evaluation streams used by ``validate``/``fit`` (one DataLoader each, in order).
        test_streams: evaluation streams used by ``test``; default: the ``val_streams``.
        steps_per_epoch: batches per training epoch; ``None`` = one endless epoch (``trainer.max_steps`` ends it).
        pin_memory: pin batches in page-locked memory (GPU training).
        persistent_workers: keep workers of map-style streams alive between epochs.
        predict_streams: streams used by ``predict`` (``vlm predict``), read like the evaluation streams: one
            finite, unshuffled loader each, whole batches dealt out to the ranks.
    """

    def __init__(
        self,
        streams: dict[str, Stream],
        schedule: str | Schedule = "round_robin",
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        val_streams: dict[str, Stream] | None = None,
        test_streams: dict[str, Stream] | None = None,
        steps_per_epoch: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        predict_streams: dict[str, Stream] | None = None,
    ) -> None:
        super().__init__()
        self.streams = self._check_streams(streams, "streams", required=True)
        self.val_streams = self._check_streams(val_streams, "val_streams")
        self.test_streams = self._check_streams(test_streams, "test_streams") if test_streams else dict(self.val_streams)
        self.predict_streams = self._check_streams(predict_streams, "predict_streams")
        if batch_size < 1:
            raise VLMConfigError(f"batch_size={batch_size}: use a positive integer.")
        if num_workers < 0:
            raise VLMConfigError(f"num_workers={num_workers}: use 0 or more.")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise VLMConfigError(f"steps_per_epoch={steps_per_epoch}: use a positive integer or null (endless).")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.steps_per_epoch = steps_per_epoch
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.schedule = make_schedule(schedule)
        self.schedule.setup(list(self.streams), {n: s.size() for n, s in self.streams.items()}, seed)
        k = self.schedule.batches_per_step
        if steps_per_epoch is not None and steps_per_epoch % k:
            raise VLMConfigError(
                f"steps_per_epoch={steps_per_epoch} is not a multiple of the {k} batches (one per stream) that the "
                f"{type(self.schedule).__name__} schedule accumulates into one optimizer step; use a multiple of {k}."
            )
        self._train_loader: MultiStreamLoader | None = None
        self._restore_state: dict[str, Any] | None = None
        # evaluation batches are dealt out whole, so a rank may hold none of a small evaluation stream
        self.allow_zero_length_dataloader_with_multiple_devices = True

    @staticmethod
    def _check_streams(streams: Mapping[str, Stream] | None, key: str, required: bool = False) -> dict[str, Stream]:
        if not streams:
            if required:
                raise VLMConfigError(
                    f"MultiStreamDataModule: `{key}` is empty. Declare at least one stream, e.g. "
                    f"`{key}: {{pairs: {{class_path: vlm.data.stream.Stream, init_args: {{dataset: ...}}}}}}`."
                )
            return {}
        out = {}
        for name, stream in streams.items():
            if not isinstance(name, str) or not name:
                raise VLMConfigError(f"`{key}`: stream names must be non-empty strings; got {name!r}.")
            if not isinstance(stream, Stream):
                raise VLMConfigError(
                    f"`{key}.{name}` is a {type(stream).__name__}; wrap the dataset in vlm.data.stream.Stream "
                    f"(class_path: vlm.data.stream.Stream, init_args: {{dataset: ...}})."
                )
            stream.check(name)
            out[name] = stream
        return out

    # ------------------------------------------------------------------ names
    @property
    def stream_names(self) -> list[str]:
        """Training stream names in declaration order."""
        return list(self.streams)

    @property
    def val_stream_names(self) -> list[str]:
        """Validation stream names, in the order of the validation dataloaders (``dataloader_idx``)."""
        return list(self.val_streams)

    @property
    def test_stream_names(self) -> list[str]:
        """Test stream names, in the order of the test dataloaders (``dataloader_idx``)."""
        return list(self.test_streams)

    @property
    def predict_stream_names(self) -> list[str]:
        """Prediction stream names, in the order of the predict dataloaders (``dataloader_idx``)."""
        return list(self.predict_streams)

    # ------------------------------------------------------------------ set-up
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def setup(self, stage: str | None = None) -> None:
        """Check (or set) ``trainer.accumulate_grad_batches`` for schedules that accumulate every stream."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or stage not in (None, "fit"):
            return
        if self.steps_per_epoch is None and trainer.max_steps == -1 and not isinstance(trainer.limit_train_batches, int):
            rank_zero_warn("MultiStreamDataModule: training is endless (steps_per_epoch is null and trainer.max_steps "
                           "is -1); set trainer.max_steps, or data.steps_per_epoch with max_epochs.")
        k = self.schedule.batches_per_step
        if k == 1:
            return
        acc = trainer.accumulate_grad_batches
        if acc == 1:
            trainer.accumulate_grad_batches = k
        elif acc % k:
            raise VLMConfigError(
                f"The {type(self.schedule).__name__} schedule puts one batch of each of the {k} streams "
                f"{self.stream_names} into every optimizer step, but trainer.accumulate_grad_batches={acc}. "
                f"Set trainer.accumulate_grad_batches to {k} (or a multiple of it), or leave it at 1."
            )

    def _stream_loader_args(self, stream: Stream) -> tuple[int, int]:
        bs = stream.batch_size if stream.batch_size is not None else self.batch_size
        nw = stream.num_workers if stream.num_workers is not None else self.num_workers
        return bs, nw

    # ------------------------------------------------------------------ loaders
    def stream_fields(self, max_tries: int = 8) -> dict[str, set[str]]:
        """Batch fields each training stream yields, from one transformed and collated sample (checks at set-up).

        A stream whose first ``max_tries`` samples are all corrupt is left out (it is checked at its first batch).
        """
        out: dict[str, set[str]] = {}
        for name, stream in self.streams.items():
            fn = StreamCollate(name, stream.transform, stream.collate)
            name_stream(stream.dataset, name)
            if stream.is_iterable:
                samples = itertools.islice(iter(stream.dataset), max_tries)
            else:
                samples = (stream.dataset[i] for i in range(min(max_tries, stream.size() or 0)))
            for sample in samples:
                batch = fn([sample])
                if len(batch) > 1:  # more than num_skipped: a sample survived
                    out[name] = set(batch) | {"stream", "batch_index", "num_skipped"}
                    break
        return out

    def train_dataloader(self) -> MultiStreamLoader:
        """The training iterable (a fresh start, or the restored checkpoint position)."""
        rank, world = self._rank_world()
        readers = {}
        for name, stream in self.streams.items():
            bs, nw = self._stream_loader_args(stream)
            readers[name] = StreamReader(name, stream, bs, nw, self.seed, rank, world, self.pin_memory,
                                         self.persistent_workers)
        cls = MultiStreamLoader if self.steps_per_epoch is None else SizedMultiStreamLoader
        loader = cls(readers, self.schedule, self.steps_per_epoch,
                     track_consumption=getattr(self, "trainer", None) is not None)
        if self._train_loader is not None:
            self._train_loader.close()
        self._train_loader = loader
        if self._restore_state is not None:
            self._apply_state(self._restore_state)
            self._restore_state = None
        return loader

    def _eval_loaders(self, streams: dict[str, Stream]) -> list[EvalLoader]:
        rank, world = self._rank_world()
        out = []
        for name, stream in streams.items():
            bs, nw = self._stream_loader_args(stream)
            out.append(EvalLoader(name, stream, bs, nw, self.seed, rank, world, self.pin_memory,
                                  self.persistent_workers))
        return out

    def val_dataloader(self) -> list[EvalLoader]:
        """One finite loader per validation stream (empty list: no validation)."""
        return self._eval_loaders(self.val_streams)

    def test_dataloader(self) -> list[EvalLoader]:
        """One finite loader per test stream."""
        return self._eval_loaders(self.test_streams)

    def predict_dataloader(self) -> list[EvalLoader]:
        """One finite loader per prediction stream."""
        if not self.predict_streams:
            raise VLMConfigError(
                "MultiStreamDataModule: `predict_streams` is empty, so there is nothing to predict. Declare the "
                "streams to run, e.g. `data.init_args.predict_streams: {vqa: {class_path: vlm.data.stream.Stream, "
                "init_args: {dataset: ..., transform: ...}}}` (conf/flamingo/predict.yaml is an overlay that does)."
            )
        return self._eval_loaders(self.predict_streams)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Mark training batches as consumed (the resume point), then run the model's own hook if it has one."""
        trainer = getattr(self, "trainer", None)
        if (trainer is not None and trainer.training and self._train_loader is not None
                and isinstance(batch, Mapping) and "batch_index" in batch):
            self._train_loader.mark_consumed(batch["batch_index"])
        model = trainer.lightning_module if trainer is not None else None
        # Lightning calls only the DataModule's hook when both define it; keep the model's behaviour.
        if model is not None and is_overridden("on_before_batch_transfer", model):
            batch = model.on_before_batch_transfer(batch, dataloader_idx)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The model's ``prepare_batch`` (e.g. PaLI's padding trim) on the batch on its device, before any step and
        before callbacks see it. A model-side Lightning hook would draw Lightning's warning about a DataModule."""
        trainer = getattr(self, "trainer", None)
        model = trainer.lightning_module if trainer is not None else None
        prepare = getattr(model, "prepare_batch", None)
        return prepare(batch) if callable(prepare) else batch

    def teardown(self, stage: str | None = None) -> None:
        """Stop the streams' workers after fitting (the resume point stays available)."""
        if stage in (None, "fit") and self._train_loader is not None:
            self._train_loader.close()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Resume point of every rank (gathered, so call it on all ranks as checkpointing does)."""
        if self._train_loader is None:
            return dict(self._restore_state or {})
        local = self._train_loader.consumed_state()
        rank, world = self._rank_world()
        ranks = [local]
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, local)
        return {"version": STATE_VERSION, "position": local["position"], "world_size": len(ranks),
                "stream_names": self.stream_names, "schedule": repr(self.schedule), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from a checkpoint's state: applied now, or when the training loader is next built."""
        if not state_dict:
            return
        if state_dict.get("version") != STATE_VERSION or "ranks" not in state_dict:
            raise VLMConfigError(
                f"The checkpoint's MultiStreamDataModule state has version {state_dict.get('version')!r}; this "
                f"vlm reads version {STATE_VERSION}. Resume with the vlm version that wrote it."
            )
        self._restore_state = dict(state_dict)
        if self._train_loader is not None and getattr(self, "trainer", None) is None:
            self._apply_state(self._restore_state)
            self._restore_state = None

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        assert self._train_loader is not None
        rank, world = self._rank_world()
        ranks = state["ranks"]
        if len(ranks) != world:
            warnings.warn(
                f"Resuming a run saved with {len(ranks)} ranks on {world}: the schedule position is kept, but each "
                "rank restarts its streams' positions from a saved rank's, so samples may repeat or be skipped.",
                stacklevel=2)
        mine = dict(ranks[rank % len(ranks)])
        mine["position"] = state["position"]
        missing = [n for n in self.stream_names if n not in mine.get("streams", {})]
        if missing:
            warnings.warn(f"The checkpoint has no position for streams {missing}; they start from the beginning.",
                          stacklevel=2)
        self._train_loader.restore(mine)
