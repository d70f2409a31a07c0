"""Global contrastive loss: forward+backward time and memory per rank vs global batch size.

Compares the two ways one rank can score a global batch of G pairs gathered from W ranks:

* ``full``: every rank builds the whole G x G logit matrix (``local_loss=False``): memory quadratic in G;
* ``local_loss``: a rank scores only its own b = G / W rows against all G columns: memory b x G, linear in
  G when the per-rank batch b is fixed and the global batch grows with the number of ranks.

It runs the real ``GlobalContrastive`` objective in one process and simulates rank 0 of W by standing in
for the gather (the other ranks' rows are fixed tensors; no communication is timed). Memory is the bytes
autograd keeps for backward (device independent) and, on CUDA, the peak allocated during the step.

    python benchmarks/contrastive.py --device cpu --batches 256 512 1024
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

import vlm.objectives.contrastive as contrastive
from vlm.objectives.contrastive import GlobalContrastive


@contextlib.contextmanager
def simulated_rank(world: int, local_rows: int, other_image: torch.Tensor, other_text: torch.Tensor):
    """Make the objective behave as rank 0 of ``world`` whose peers hold ``other_*`` (gather without comms)."""

    def gather(image, text, *, gather_with_grad, local_loss, sizes=None):
        return torch.cat([image, other_image]), torch.cat([text, other_text])

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(contrastive, "get_world_size", lambda: world))
        stack.enter_context(mock.patch.object(contrastive, "get_rank", lambda: 0))
        stack.enter_context(mock.patch.object(contrastive, "gather_sizes", lambda n, device=None: [local_rows] * world))
        stack.enter_context(mock.patch.object(contrastive, "gather_features", gather))
        yield


class SavedBytes:
    """Counts the bytes of tensors autograd saves for backward (each storage once)."""

    def __init__(self) -> None:
        self.bytes, self._seen = 0, set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def step(mode: str, global_batch: int, local_batch: int, dim: int, device: torch.device) -> tuple[float, int, int]:
    """One forward+backward; returns (seconds, saved bytes, CUDA peak bytes or 0)."""
    g = torch.Generator().manual_seed(global_batch)
    image = F.normalize(torch.randn(global_batch, dim, generator=g), dim=-1).to(device)
    text = F.normalize(torch.randn(global_batch, dim, generator=g), dim=-1).to(device)
    obj = GlobalContrastive(local_loss=(mode == "local_loss")).to(device)
    if mode == "local_loss":
        world = global_batch // local_batch
        mine_i, mine_t = image[:local_batch].clone().requires_grad_(), text[:local_batch].clone().requires_grad_()
        ctx = simulated_rank(world, local_batch, image[local_batch:], text[local_batch:])
    else:
        mine_i, mine_t = image.clone().requires_grad_(), text.clone().requires_grad_()
        ctx = contextlib.nullcontext()
    saved = SavedBytes()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with ctx, torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        out = obj.loss_from_features(mine_i, mine_t)
    out.loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    return seconds, saved.bytes, peak


def main() -> None:
    """Print a table of time and memory per rank for each global batch size and mode."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024], help="global batch sizes")
    parser.add_argument("--local-batch", type=int, default=64, help="rows per simulated rank for local_loss")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for g in args.batches:
        if g % args.local_batch:
            parser.error(f"--batches must be multiples of --local-batch={args.local_batch}; {g} is not.")

    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# GlobalContrastive fwd+bwd per rank | {hw} | torch {torch.__version__} | "
          f"{time.strftime('%Y-%m-%d')} | dim={args.dim} local_batch={args.local_batch}")
    cols = ["global_batch", "mode", "ranks", "rows_x_cols", "time_ms", "saved_MiB", "saved_vs_first", "KiB_per_pair"]
    if device.type == "cuda":
        cols.append("cuda_peak_MiB")
    print(" | ".join(f"{c:>14}" for c in cols))
    first: dict[str, int] = {}
    for mode in ("full", "local_loss"):
        for g in args.batches:
            step(mode, g, args.local_batch, args.dim, device)  # warm-up
            runs = [step(mode, g, args.local_batch, args.dim, device) for _ in range(args.repeats)]
            ms = 1000 * statistics.median(r[0] for r in runs)
            saved, peak = runs[-1][1], runs[-1][2]
            first.setdefault(mode, saved)
            ranks = g // args.local_batch if mode == "local_loss" else 1
            rows = args.local_batch if mode == "local_loss" else g
            row = [str(g), mode, str(ranks), f"{rows}x{g}", f"{ms:.2f}", f"{saved / 2**20:.2f}",
                   f"{saved / first[mode]:.2f}x", f"{saved / g / 1024:.2f}"]
            if device.type == "cuda":
                row.append(f"{peak / 2**20:.2f}")
            print(" | ".join(f"{c:>14}" for c in row))
    print("# saved = features (linear in G) + logits: full G x G (KiB_per_pair grows with G: quadratic),")
    print("# local_loss b x G with b fixed as ranks are added (KiB_per_pair flat: linear).")


if __name__ == "__main__":
    main()
