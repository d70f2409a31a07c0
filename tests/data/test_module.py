"""MultiStreamDataModule: stream tagging, cycling, skipped samples, rank split, evaluation loaders, errors."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vlm.data.module import MultiStreamDataModule
from vlm.data.schedule import Accumulate, Weighted
from vlm.data.stream import Stream, StreamReader
from vlm.errors import VLMConfigError


class MapToy(Dataset):
    """Map-style toy: sample ``i`` is ``{"id": base + i, "x": features, "y": target}``; ``none_ids`` are corrupt."""

    def __init__(self, n: int, base: int = 0, none_ids: tuple[int, ...] = ()) -> None:
        self.n, self.base, self.none_ids = n, base, set(none_ids)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        sid = self.base + i
        if sid in self.none_ids:
            return None
        g = torch.Generator().manual_seed(sid)
        return {"id": sid, "x": torch.randn(4, generator=g), "y": float(sid % 7) / 7.0}


class IterToy(IterableDataset):
    """Iterable toy with the reader protocol: ``set_epoch`` reshuffles from (seed, epoch), ``set_rank`` and the
    worker info partition the ids (round-robin shards)."""

    def __init__(self, n: int, base: int = 1000, seed: int = 0) -> None:
        self.n, self.base, self.seed = n, base, seed
        self.epoch, self.rank, self.world_size = 0, 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        mine = order[self.rank :: self.world_size]
        info = get_worker_info()
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        for i in mine:
            sid = self.base + i
            gx = torch.Generator().manual_seed(sid)
            yield {"id": sid, "x": torch.randn(4, generator=gx), "y": float(sid % 5) / 5.0}


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def ids(batch):
    return batch["id"].tolist()


def test_round_robin_tags_and_cycles_short_streams():
    # a: 6 samples / bs 2 = 3 batches per epoch; b: 20 samples / bs 2 = 10 batches per epoch
    dm = MultiStreamDataModule({"a": Stream(MapToy(6)), "b": Stream(IterToy(20))}, batch_size=2, seed=3)
    batches = take(dm.train_dataloader(), 24)
    assert [b["stream"] for b in batches] == ["a", "b"] * 12
    assert [b["batch_index"] for b in batches] == list(range(24))
    a = [ids(b) for b in batches if b["stream"] == "a"]  # 12 batches = 4 epochs of a
    epochs = [sorted(sum(a[i : i + 3], [])) for i in range(0, 12, 3)]
    assert epochs == [list(range(6))] * 4  # every epoch of the short stream covers it exactly once
    orders = {tuple(sum(a[i : i + 3], [])) for i in range(0, 12, 3)}
    assert len(orders) > 1  # reshuffled between epochs
    b = sum((ids(x) for x in batches if x["stream"] == "b"), [])
    assert sorted(b[:20]) == list(range(1000, 1020))  # one epoch of b, nothing lost
    assert all(x["num_skipped"] == 0 for x in batches)


def test_same_seed_same_sequence_other_seed_other_order():
    def run(seed):
        dm = MultiStreamDataModule(
            {"a": Stream(MapToy(10)), "b": Stream(MapToy(10, base=100))}, batch_size=2, seed=seed
        )
        return [(b["stream"], tuple(ids(b))) for b in take(dm.train_dataloader(), 10)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_transform_per_sample_and_none_samples_skipped_and_carried():
    calls = []

    def transform(s):
        calls.append(s["id"])
        return {**s, "x": s["x"] * 0 + s["id"]}

    # ids 0-3 corrupt: the first two batches ([0,1], [2,3]) have no survivor and are not yielded;
    # id 7 corrupt: batch [6, 7] keeps one sample.
    ds = MapToy(10, none_ids=(0, 1, 2, 3, 7))
    dm = MultiStreamDataModule({"a": Stream(ds, transform=transform, shuffle=False)}, batch_size=2)
    batches = take(dm.train_dataloader(), 4)
    assert [ids(b) for b in batches] == [[4, 5], [6], [8, 9], [4, 5]]
    assert [b["num_skipped"] for b in batches] == [4, 1, 0, 4]
    assert [b["batch_index"] for b in batches] == [0, 1, 2, 3]
    assert torch.equal(batches[0]["x"], torch.tensor([[4.0] * 4, [5.0] * 4]))
    assert 0 not in calls and 7 not in calls  # the transform never sees a None sample


def test_per_stream_batch_size_and_weighted_mixture():
    dm = MultiStreamDataModule(
        {"a": Stream(MapToy(12), batch_size=3), "b": Stream(IterToy(12), batch_size=4)},
        schedule=Weighted({"a": 3.0, "b": 1.0}),
        batch_size=2,
    )
    batches = take(dm.train_dataloader(), 400)
    sizes = {b["stream"]: len(ids(b)) for b in batches}
    assert sizes == {"a": 3, "b": 4}
    n_a = sum(b["stream"] == "a" for b in batches)
    # a deterministic low-discrepancy mix is much tighter than i.i.d. sampling: within log2(n) + 2 of n * 3/4
    assert abs(n_a - 300) <= math.log2(400) + 2


def test_map_stream_split_across_ranks_is_disjoint_and_covers_the_data():
    stream = Stream(MapToy(16))
    seen = []
    for rank in range(2):
        r = StreamReader("a", stream, batch_size=2, num_workers=0, seed=5, rank=rank, world_size=2)
        epoch0 = [ids(r.next_batch()) for _ in range(4)]  # 16 / 2 ranks / bs 2 = 4 batches per epoch
        assert r.state == (0, 4)
        seen.append(sum(epoch0, []))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(16))


def test_iterable_stream_split_across_ranks_uses_set_rank():
    stream = Stream(IterToy(12))
    seen = []
    for rank in range(2):
        r = StreamReader("b", stream, batch_size=3, num_workers=0, seed=0, rank=rank, world_size=2)
        seen.append(sum((ids(r.next_batch()) for _ in range(2)), []))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(1000, 1012))


def test_iterable_stream_with_workers_reads_every_sample_once_per_epoch():
    r = StreamReader("b", Stream(IterToy(16)), batch_size=2, num_workers=2, seed=0)
    epoch0 = sum((ids(r.next_batch()) for _ in range(8)), [])
    assert sorted(epoch0) == list(range(1000, 1016))
    assert r.state == (0, 8)
    ids(r.next_batch())
    assert r.state == (1, 1)
    r.close()


def test_eval_loaders_one_per_stream_finite_unshuffled_tagged():
    dm = MultiStreamDataModule(
        {"a": Stream(MapToy(4))},
        val_streams={"va": Stream(MapToy(5, none_ids=(0, 1))), "vb": Stream(IterToy(5), batch_size=4)},
        batch_size=2,
    )
    assert (
        dm.stream_names == ["a"]
        and dm.val_stream_names == ["va", "vb"]
        and dm.test_stream_names == ["va", "vb"]
    )
    va, vb = dm.val_dataloader()
    assert len(va) == 3
    out = list(va)
    assert [ids(b) for b in out] == [[2, 3], [4]]  # first batch all corrupt: not yielded, counted in the next
    assert [b["num_skipped"] for b in out] == [2, 0]
    assert [(b["stream"], b["batch_index"]) for b in out] == [("va", 0), ("va", 1)]
    assert list(map(ids, va)) == [[2, 3], [4]]  # a second pass is identical
    outb = list(vb)
    assert [len(ids(b)) for b in outb] == [4, 1] and {b["stream"] for b in outb} == {"vb"}


class Recorder(L.LightningModule):
    """Linear regression over ``x``; records (stream, batch_index, ids) of every training/validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.seen: list[tuple] = []
        self.val_seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["stream"], batch["batch_index"], tuple(ids(batch))))
        return ((self.lin(batch["x"]).squeeze(-1) - batch["y"].float()) ** 2).mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_seen.append((dataloader_idx, batch["stream"], tuple(ids(batch))))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(**kw):
    kw.setdefault("max_steps", 4)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


def test_accumulate_sets_accumulate_grad_batches_and_feeds_every_stream_per_step():
    dm = MultiStreamDataModule(
        {"a": Stream(MapToy(8)), "b": Stream(IterToy(8)), "c": Stream(MapToy(8, base=50))},
        schedule="accumulate",
        batch_size=2,
    )
    model, t = Recorder(), trainer(max_steps=2)
    t.fit(model, datamodule=dm)
    assert t.accumulate_grad_batches == 3
    assert t.global_step == 2
    assert [s for s, _, _ in model.seen] == ["a", "b", "c"] * 2


def test_accumulate_rejects_a_mismatched_accumulate_grad_batches():
    dm = MultiStreamDataModule(
        {"a": Stream(MapToy(8)), "b": Stream(MapToy(8))}, schedule=Accumulate(), batch_size=2
    )
    with pytest.raises(VLMConfigError, match="accumulate_grad_batches=3.*2"):
        trainer(accumulate_grad_batches=3).fit(Recorder(), datamodule=dm)


def test_steps_per_epoch_and_validation_streams_in_fit():
    dm = MultiStreamDataModule(
        {"a": Stream(MapToy(8)), "b": Stream(MapToy(8, base=100))},
        batch_size=2,
        steps_per_epoch=3,
        val_streams={"va": Stream(MapToy(3)), "vb": Stream(MapToy(2, base=9))},
    )
    assert len(dm.train_dataloader()) == 3
    model = Recorder()
    trainer(max_steps=-1, max_epochs=2, num_sanity_val_steps=0).fit(model, datamodule=dm)
    assert [(s, i) for s, i, _ in model.seen] == list(zip(["a", "b"] * 3, range(6)))  # positions continue
    assert model.val_seen == [(0, "va", (0, 1)), (0, "va", (2,)), (1, "vb", (9, 10))] * 2


def test_fit_without_validation_streams():
    dm = MultiStreamDataModule({"a": Stream(MapToy(8))}, batch_size=2)
    model = Recorder()
    trainer(max_steps=3).fit(model, datamodule=dm)
    assert [i for _, i, _ in model.seen] == [0, 1, 2]


# ---------------------------------------------------------------------- errors
def test_empty_streams_is_an_error():
    with pytest.raises(VLMConfigError, match="`streams` is empty"):
        MultiStreamDataModule({})


def test_weights_naming_a_missing_stream_is_an_error():
    with pytest.raises(VLMConfigError, match=r"\['capt'\] that do not exist.*\['a', 'b'\]"):
        MultiStreamDataModule(
            {"a": Stream(MapToy(4)), "b": Stream(MapToy(4))},
            schedule=Weighted({"a": 1.0, "b": 1.0, "capt": 2.0}),
        )


def test_non_stream_value_is_an_error():
    with pytest.raises(
        VLMConfigError, match="`streams.a` is a MapToy; wrap the dataset in vlm.data.stream.Stream"
    ):
        MultiStreamDataModule({"a": MapToy(4)})


class Tuples(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return (torch.zeros(2), i)


def test_non_dict_samples_name_the_stream():
    dm = MultiStreamDataModule({"pairs": Stream(Tuples())}, batch_size=2)
    with pytest.raises(VLMConfigError, match="Stream 'pairs': a sample is a tuple.*return a dict"):
        take(dm.train_dataloader(), 1)


def test_a_stream_too_small_for_one_batch_is_an_error_not_a_hang():
    dm = MultiStreamDataModule({"a": Stream(MapToy(8)), "tiny": Stream(MapToy(3))}, batch_size=4)
    with pytest.raises(VLMConfigError, match="Stream 'tiny' yields no batch"):
        take(dm.train_dataloader(), 2)


def test_a_stream_whose_samples_are_all_corrupt_is_an_error_not_a_hang():
    dm = MultiStreamDataModule({"bad": Stream(MapToy(4, none_ids=(0, 1, 2, 3)))}, batch_size=2)
    with pytest.raises(VLMConfigError, match="every sample of a whole epoch was skipped"):
        take(dm.train_dataloader(), 1)


def test_bad_schedule_name_and_steps_per_epoch():
    with pytest.raises(VLMConfigError, match="schedule='mixed'"):
        MultiStreamDataModule({"a": Stream(MapToy(4))}, schedule="mixed")
    with pytest.raises(VLMConfigError, match="steps_per_epoch=3 is not a multiple of the 2"):
        MultiStreamDataModule(
            {"a": Stream(MapToy(4)), "b": Stream(MapToy(4))}, schedule="accumulate", steps_per_epoch=3
        )


def test_persistent_workers_read_the_same_batches():
    def run(persistent):
        dm = MultiStreamDataModule({"a": Stream(MapToy(6)), "b": Stream(MapToy(4, base=50))}, batch_size=2,
                                   num_workers=1, persistent_workers=persistent, seed=2)
        loader = dm.train_dataloader()
        out = [(b["stream"], tuple(ids(b))) for b in take(loader, 10)]
        loader.close()
        return out

    assert run(True) == run(False)


class HookedRecorder(Recorder):
    def on_before_batch_transfer(self, batch, dataloader_idx):
        batch["hooked"] = True
        return batch

    def training_step(self, batch, batch_idx):
        assert batch["hooked"]
        return super().training_step(batch, batch_idx)


def test_a_models_own_on_before_batch_transfer_still_runs():
    dm = MultiStreamDataModule({"a": Stream(MapToy(8))}, batch_size=2)
    model = HookedRecorder()
    with pytest.warns(UserWarning, match="overridden `on_before_batch_transfer` in both"):
        trainer(max_steps=2).fit(model, datamodule=dm)
    assert len(model.seen) == 2 and dm.state_dict()["position"] == 2
