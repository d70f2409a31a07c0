"""Evaluation under DDP: objectives use this rank's rows only, so ranks with different numbers of batches finish.

Iterable evaluation streams are split by shard, so two ranks can hold different numbers of validation
batches. A collective inside a validation step (the contrastive all-gather) would then wait forever for the
rank that has run out. Two gloo processes run 3 and 2 validation steps of a GC model and meet at a barrier;
each step's loss must equal the single-process InfoNCE of that rank's own rows (float64 formula).
"""

import datetime
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from vlm.models.base import VLMModule
from vlm.objectives.contrastive import GlobalContrastive
from vlm.objectives.distributed import get_world_size, local_only

WORLD, ROWS, STEPS = 2, 4, (3, 2)


class PairModel(VLMModule):
    def __init__(self) -> None:
        super().__init__(objectives={"gc": GlobalContrastive(init_temperature=0.1)}, streams={"pairs": {"gc": 1.0}})
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(4, 3), nn.Linear(4, 3)
        self.attach_objectives()

    def contrastive_embeddings(self, batch, cache):
        return F.normalize(self.image(batch["x"]), dim=-1), F.normalize(self.text(batch["t"]), dim=-1)


def batch_of(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {"stream": "pairs", "x": torch.randn(ROWS, 4, generator=g), "t": torch.randn(ROWS, 4, generator=g)}


def info_nce64(model: PairModel, batch: dict) -> float:
    img = F.normalize(model.image(batch["x"]).double(), dim=-1)
    txt = F.normalize(model.text(batch["t"]).double(), dim=-1)
    logits = math.exp(model.objectives["gc"].logit_scale.item()) * img @ txt.T
    labels = torch.arange(ROWS)
    return float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    model = PairModel().eval()
    seen = {"world": get_world_size()}
    with local_only():
        seen["world_local"] = get_world_size()
    with torch.no_grad():
        seen["losses"] = [(float(model.validation_step(batch_of(rank, s))), info_nce64(model, batch_of(rank, s)))
                          for s in range(STEPS[rank])]
    dist.barrier()  # reached by both ranks only if no step waited for the other
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.ddp
def test_ranks_with_uneven_validation_batches_finish_with_local_losses():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    for rank, seen in enumerate(ranks):
        assert seen["world"] == WORLD and seen["world_local"] == 1
        assert len(seen["losses"]) == STEPS[rank]
        for got, expect in seen["losses"]:
            assert got == pytest.approx(expect, rel=1e-5)
