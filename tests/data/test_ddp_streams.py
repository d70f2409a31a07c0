"""Two CPU ranks under Lightning DDP (gloo) pick the same stream at every step and read disjoint data.

The test starts this file twice as a script (``LOCAL_RANK=r python tests/data/test_ddp_streams.py OUT``, the
way torchrun would) with ``Trainer(strategy="ddp", devices=2)``; each rank writes what it trained on and the
test compares the ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import run_ranks

MAP_N, ITER_N, BS, STEPS = 16, 12, 2, 14


def run_rank(out: Path) -> None:
    """Body of every rank: fit a few steps on two streams, save what was seen and a checkpoint."""
    import lightning as L
    from torch import nn

    from tests.data.test_module import IterToy, MapToy
    from vlm.data.module import MultiStreamDataModule
    from vlm.data.schedule import Weighted
    from vlm.data.stream import Stream

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)
            self.records: list = []

        def training_step(self, batch, batch_idx):
            self.records.append([batch["stream"], batch["batch_index"], batch["id"].tolist()])
            return ((self.lin(batch["x"]).squeeze(-1) - batch["y"].float()) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = MultiStreamDataModule(
        {"a": Stream(MapToy(MAP_N)), "b": Stream(IterToy(ITER_N))},
        schedule=Weighted({"a": 1.0, "b": 1.0}),
        batch_size=BS,
        seed=7,
    )
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(out / "last.ckpt")  # every rank takes part: the DataModule gathers rank states
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(model.records))


def last_state(count: int, per_epoch: int) -> list[int]:
    """(epoch, batches read in it) of a stream after ``count`` batches of ``per_epoch`` each."""
    return [(count - 1) // per_epoch, (count - 1) % per_epoch + 1]


@pytest.mark.ddp
def test_ddp_ranks_agree_on_streams_and_split_the_data(tmp_path):
    # Both ranks are started at once (as torchrun would: Lightning sees LOCAL_RANK and launches nothing),
    # so their slow imports overlap instead of running one after the other.
    elapsed = run_ranks(__file__, tmp_path, timeout=120)
    assert elapsed < 60, f"DDP run took {elapsed:.0f}s"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # the same stream at every position on both ranks
    seq = [[(s, i) for s, i, _ in recs] for recs in ranks]
    assert seq[0] == seq[1]
    assert [i for _, i in seq[0]] == list(range(STEPS))

    # the first epoch of each stream: disjoint across ranks, together exactly the data
    per_epoch = {"a": MAP_N // 2 // BS, "b": ITER_N // 2 // BS}
    universe = {"a": set(range(MAP_N)), "b": set(range(1000, 1000 + ITER_N))}
    for stream, n in per_epoch.items():
        firsts = []
        for recs in ranks:
            batches = [ids for s, _, ids in recs if s == stream]
            assert len(batches) >= n, f"stream {stream} got {len(batches)} batches, fewer than one epoch"
            firsts.append([x for ids in batches[:n] for x in ids])
        assert not set(firsts[0]) & set(firsts[1])
        assert sorted(firsts[0] + firsts[1]) == sorted(universe[stream])

    # the checkpoint holds every rank's resume point
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["MultiStreamDataModule"]
    assert state["position"] == STEPS and state["world_size"] == 2
    for r, recs in enumerate(ranks):
        for stream, n in per_epoch.items():
            count = sum(s == stream for s, _, _ in recs)
            assert state["ranks"][r]["streams"][stream] == last_state(count, n)


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
