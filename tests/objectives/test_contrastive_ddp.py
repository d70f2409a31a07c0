"""Contrastive objectives across 2 CPU processes (gloo) against a float64 single-process reference.

What "equal" means under DDP. Each rank back-propagates its own loss ``L_r`` and DDP *averages* the
parameter gradients over the W ranks. The single-process reference ``L`` is the loss over the concatenated
global batch. The objectives are correct when training with DDP is training on ``L``:

* loss: ``mean_r L_r == L`` (with ``local_loss`` or SigLIP each ``L_r`` covers only rank r's rows, so the
  per-rank values differ; without ``local_loss`` every rank computes ``L`` itself);
* features: rank r's features belong to rank r only, so DDP's average hands the encoder
  ``grad_r(x_r) / W``; hence we require ``grad_r(x_r) == W * dL/dx_r`` (the gathers sum, across ranks,
  the gradient every rank's loss sends to a row);
* replicated parameters (``logit_scale``, ``logit_bias``): ``mean_r grad_r == dL/dparam``.
"""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlm.objectives.base import StepCache
from vlm.objectives.contrastive import GlobalContrastive, SigmoidContrastive

WORLD = 2
# rows per rank; uneven on purpose for some cases (the last batch of an epoch, rows dropped as mismatched)
EVEN, UNEVEN = (4, 4), (3, 5)
CASES = {
    "gc_gather_with_grad": (GlobalContrastive, {"gather_with_grad": True}, EVEN, False),
    "gc_local_loss": (GlobalContrastive, {"gather_with_grad": True, "local_loss": True}, EVEN, False),
    "gc_no_grad_gather": (GlobalContrastive, {"gather_with_grad": False}, EVEN, False),
    "gc_local_uneven_filtered": (GlobalContrastive, {"local_loss": True, "mismatched_as_candidates": False}, UNEVEN, True),
    # FLAVA's convention: mismatched rows are candidates, never queries
    "gc_local_uneven_candidates": (GlobalContrastive, {"local_loss": True}, UNEVEN, True),
    "gc_gather_uneven_candidates": (GlobalContrastive, {"gather_with_grad": True}, UNEVEN, True),
    "siglip_gather": (SigmoidContrastive, {"dist_impl": "gather"}, EVEN, False),
    "siglip_ring": (SigmoidContrastive, {"dist_impl": "ring"}, EVEN, False),
    "siglip_ring_chunked_uneven_filtered": (SigmoidContrastive, {"dist_impl": "ring", "chunk_size": 2}, UNEVEN, True),
}
E = 6


def global_batch(sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    n = sum(sizes)
    img = F.normalize(torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    keep = torch.rand(n, generator=g) > 0.3
    keep[0] = keep[-1] = True
    return img, txt, keep


class LocalModel(torch.nn.Module):
    def __init__(self, img, txt, keep):
        super().__init__()
        self.img, self.txt = img, txt
        if keep is not None:
            self.positive_rows = lambda batch, cache: keep

    def contrastive_embeddings(self, batch, cache):
        return self.img, self.txt


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for name, (cls, kwargs, sizes, filtered) in CASES.items():
        img, txt, keep = global_batch(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        x_img = img[lo:hi].clone().requires_grad_()
        x_txt = txt[lo:hi].clone().requires_grad_()
        obj = cls(**kwargs).double()
        out = obj(LocalModel(x_img, x_txt, keep[lo:hi] if filtered else None), {}, StepCache())
        out.loss.backward()
        bias = getattr(obj, "logit_bias", None)
        results[name] = {
            "loss": out.loss.detach(), "img": x_img.grad, "txt": x_txt.grad, "scale": obj.logit_scale.grad.reshape(()),
            "bias": None if bias is None else bias.grad.reshape(()),
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def reference(name, img, txt, keep):
    """Float64 loss on the whole (filtered) batch, written from the papers' formulas."""
    cls, kwargs = CASES[name][0], CASES[name][1]
    if cls is GlobalContrastive and kwargs.get("mismatched_as_candidates", True):
        # queries: matching rows; candidates: every row of the global batch
        log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
        logits = log_scale.exp() * img @ txt.T
        q = keep.nonzero().squeeze(1)
        i2t = -logits.log_softmax(1)[q, q].mean()
        t2i = -logits.log_softmax(0)[q, q].mean()
        return (i2t + t2i) / 2, log_scale, None
    img, txt = img[keep], txt[keep]
    n = img.shape[0]
    if cls is GlobalContrastive:
        log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
        logits = log_scale.exp() * img @ txt.T
        diag = torch.arange(n)
        i2t = -logits.log_softmax(1)[diag, diag].mean()
        t2i = -logits.log_softmax(0)[diag, diag].mean()
        return (i2t + t2i) / 2, log_scale, None
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    logits = log_scale.exp() * img @ txt.T + bias
    y = 2 * torch.eye(n, dtype=torch.float64) - 1
    return -torch.log(torch.sigmoid(y * logits)).sum() / n, log_scale, bias


@pytest.mark.ddp
def test_distributed_losses_equal_single_process_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    for name, (_, _, sizes, filtered) in CASES.items():
        img, txt, keep = global_batch(sizes)
        if not filtered:
            keep = torch.ones_like(keep)
        img.requires_grad_(), txt.requires_grad_()
        loss, log_scale, bias = reference(name, img, txt, keep)
        loss.backward()
        got = [r[name] for r in ranks]
        torch.testing.assert_close(sum(g["loss"] for g in got) / WORLD, loss.detach(), msg=name)
        for r, g in enumerate(got):
            lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
            torch.testing.assert_close(g["img"], WORLD * img.grad[lo:hi], msg=f"{name} image grad rank {r}")
            torch.testing.assert_close(g["txt"], WORLD * txt.grad[lo:hi], msg=f"{name} text grad rank {r}")
        torch.testing.assert_close(sum(g["scale"] for g in got) / WORLD, log_scale.grad, msg=name)
        if bias is not None:
            torch.testing.assert_close(sum(g["bias"] for g in got) / WORLD, bias.grad, msg=name)
