"""A run resumed from a mid-run checkpoint sees exactly the batches and losses of the uninterrupted run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from tests.data.test_module import IterToy, MapToy
from vlm.data.module import MultiStreamDataModule
from vlm.data.schedule import Weighted
from vlm.data.stream import Stream


class SizedIterToy(IterToy):
    """An iterable toy that reports its size (so the "weighted" schedule can mix by dataset size)."""

    def __len__(self) -> int:
        return self.n


class Recorder(L.LightningModule):
    """Dropout-free linear regression whose every step records (stream, position, ids, loss)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)
        self.records: list[tuple] = []

    def training_step(self, batch, batch_idx):
        loss = ((self.lin(batch["x"]).squeeze(-1) - batch["y"].float()) ** 2).mean()
        self.records.append(
            (
                batch["stream"],
                batch["batch_index"],
                tuple(batch["id"].tolist()),
                batch["num_skipped"],
                loss.item(),
            )
        )
        return loss

    def configure_optimizers(self):
        # Adam state lives in the checkpoint too, so a wrong restore would show in the losses
        return torch.optim.Adam(self.parameters(), lr=0.05)


def make_dm(schedule, num_workers, steps_per_epoch=None):
    # a: map-style, 10 samples (id 3 corrupt) / bs 2 = 5 batches per epoch; b: iterable, 12 samples / bs 3;
    # c: map-style, 6 samples / bs 2, so streams cycle at different points before and after the checkpoint.
    streams = {
        "a": Stream(MapToy(10, none_ids=(3,))),
        "b": Stream(SizedIterToy(12, seed=4), batch_size=3),
        "c": Stream(MapToy(6, base=500), num_workers=0),
    }
    return MultiStreamDataModule(
        streams,
        schedule=schedule,
        batch_size=2,
        num_workers=num_workers,
        seed=11,
        steps_per_epoch=steps_per_epoch,
    )


def fit(dm, tmp_path, max_steps, ckpt_path=None, every=None, **kw):
    model = Recorder()
    callbacks = []
    if every:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=every, save_top_k=-1)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        num_sanity_val_steps=0,
        **kw,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.records


@pytest.mark.parametrize(
    "schedule,num_workers",
    [("round_robin", 0), ("weighted", 2), (Weighted({"a": 0.5, "b": 0.3, "c": 0.2}), 0), ("round_robin", 2)],
    ids=["round_robin-w0", "weighted_by_size-w2", "weighted-w0", "round_robin-w2"],
)
def test_resume_mid_run_replays_the_same_batches_and_losses(tmp_path, schedule, num_workers):
    n, k = 18, 7
    straight = fit(make_dm(schedule, num_workers), tmp_path, n, every=k)
    assert [r[1] for r in straight] == list(range(n))
    assert {r[0] for r in straight} == {"a", "b", "c"}
    resumed = fit(make_dm(schedule, num_workers), tmp_path / "r", n, ckpt_path=tmp_path / f"step={k}.ckpt")
    assert resumed == straight[k:]  # streams, positions, sample ids, skipped counts and exact losses


def test_resume_with_epochs_and_accumulation_at_and_inside_epoch_boundaries(tmp_path):
    # 3 streams accumulated into each optimizer step, 6 batches (2 optimizer steps) per epoch
    straight = fit(make_dm("accumulate", 0, steps_per_epoch=6), tmp_path, 6, every=1, max_epochs=-1)
    assert len(straight) == 18
    assert [r[0] for r in straight] == ["a", "b", "c"] * 6
    for k in (2, 3):  # step 2 ends epoch 1 (position 6); step 3 is inside epoch 2 (position 9)
        resumed = fit(
            make_dm("accumulate", 0, steps_per_epoch=6),
            tmp_path / f"r{k}",
            6,
            ckpt_path=tmp_path / f"step={k}.ckpt",
            max_epochs=-1,
        )
        assert resumed == straight[3 * k :]


def test_state_dict_records_consumed_not_prefetched_batches(tmp_path):
    dm = make_dm("round_robin", 0)
    fit(dm, tmp_path, 5)
    state = dm.state_dict()
    # 5 batches consumed (positions 0-4); Lightning had fetched position 5 ahead, which must not count
    assert state["position"] == 5 and state["world_size"] == 1
    # round robin over a, b, c: a had positions 0 and 3, b 1 and 4, c 2 (all in their first epoch)
    assert state["ranks"][0]["streams"]["a"] == [0, 2]
    assert state["ranks"][0]["streams"]["b"] == [0, 2]
    assert state["ranks"][0]["streams"]["c"] == [0, 1]
