"""Cross-rank gathering of features for contrastive losses, written once.

Every helper is the identity in a single process (no initialised process group), so objectives call them
unconditionally. Gathers accept a different number of rows on each rank (the last batch of an epoch,
rows dropped by ``positive_rows``): sizes are exchanged first and tensors are padded to the largest one.

Gradient convention (the one DDP needs): each rank back-propagates its own loss and DDP *averages*
parameter gradients. :func:`all_gather_with_grad` therefore sums, in backward, the gradients every rank
computed for a row, so a rank's features receive ``d(sum of all ranks' losses) / d(features)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor

_LOCAL_DEPTH = 0


@contextlib.contextmanager
def local_only():
    """Inside, every helper here acts as in a single process: objectives compute on this rank's rows alone.

    Evaluation uses it: a collective per batch would deadlock ranks that hold different numbers of
    evaluation batches (iterable streams split by shard), and evaluation losses are averaged over ranks
    at the end of the epoch anyway.
    """
    global _LOCAL_DEPTH
    _LOCAL_DEPTH += 1
    try:
        yield
    finally:
        _LOCAL_DEPTH -= 1


def _group_active() -> bool:
    return _LOCAL_DEPTH == 0 and dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised (and not inside ``local_only``)."""
    return _group_active() and dist.get_world_size() > 1


def get_world_size() -> int:
    """Number of ranks; 1 without an initialised process group or inside ``local_only``."""
    return dist.get_world_size() if _group_active() else 1


def get_rank() -> int:
    """This process's rank; 0 without an initialised process group or inside ``local_only``."""
    return dist.get_rank() if _group_active() else 0


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Row counts of every rank (``[n]`` in a single process)."""
    if not is_distributed():
        return [int(n)]
    # gloo needs CPU tensors, NCCL needs CUDA ones: follow the features' device.
    local = torch.tensor([int(n)], device=device, dtype=torch.long)
    out = [torch.zeros_like(local) for _ in range(get_world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], 0).contiguous()


def _gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenation over ranks of ``x`` (rank r contributes ``sizes[r]`` rows); no autograd."""
    biggest = max(sizes)
    if biggest == 0:
        return x.new_zeros((0, *x.shape[1:]))
    padded = _pad_rows(x.detach(), biggest)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], 0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns each rank the sum over ranks of the gradient of its rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.rank = get_rank()
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        sizes, rank = ctx.sizes, ctx.rank
        biggest = max(sizes)
        blocks = torch.stack([_pad_rows(g, biggest) for g in grad.split(sizes, 0)], 0)
        if dist.get_backend() == dist.Backend.NCCL:
            # reduce-scatter moves 1/world of the bytes an all-reduce moves; gloo lacks it.
            mine = torch.empty_like(blocks[0])
            dist.reduce_scatter_tensor(mine, blocks.contiguous())
        else:
            dist.all_reduce(blocks)
            mine = blocks[rank]
        return mine[: sizes[rank]], None


def all_gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Rows of every rank concatenated in rank order, differentiable w.r.t. the local rows."""
    if not is_distributed():
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    return _AllGatherWithGrad.apply(x, sizes)


def all_gather_no_grad(x: Tensor, sizes: list[int] | None = None, keep_local_grad: bool = True) -> Tensor:
    """Rows of every rank concatenated; only this rank's rows (re-inserted) carry gradients if asked."""
    if not is_distributed():
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    with torch.no_grad():
        full = _gather_padded(x, sizes)
    if not keep_local_grad:
        return full
    rank = get_rank()
    start = sum(sizes[:rank])
    return torch.cat([full[:start], x, full[start + sizes[rank]:]], 0)


def gather_features(
    image: Tensor,
    text: Tensor,
    *,
    gather_with_grad: bool,
    local_loss: bool,
    sizes: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Image and text features of all ranks, concatenated in rank order (identity in a single process).

    ``gather_with_grad``: gradients flow back to the rank that owns each row (exact gradients for any loss).
    Otherwise the gather is detached; unless ``local_loss``, this rank's own rows are put back so that they
    carry gradients (with ``local_loss`` they already enter the loss as the local operand).
    """
    if image.shape[0] != text.shape[0]:
        raise ValueError(
            f"gather_features needs as many image rows as text rows, got {image.shape[0]} and {text.shape[0]}."
        )
    if not is_distributed():
        return image, text
    sizes = sizes if sizes is not None else gather_sizes(image.shape[0], image.device)
    # One collective for both modalities when they can share a buffer.
    fuse = image.dtype == text.dtype and image.dim() == text.dim() == 2
    both = torch.cat([image, text], 1) if fuse else None
    if gather_with_grad:
        if fuse:
            full = all_gather_with_grad(both, sizes)
            return full[:, : image.shape[1]], full[:, image.shape[1]:]
        return all_gather_with_grad(image, sizes), all_gather_with_grad(text, sizes)
    keep = not local_loss
    if fuse:
        full = all_gather_no_grad(both, sizes, keep_local_grad=keep)
        return full[:, : image.shape[1]], full[:, image.shape[1]:]
    return (all_gather_no_grad(image, sizes, keep_local_grad=keep),
            all_gather_no_grad(text, sizes, keep_local_grad=keep))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity in forward; multiplies the incoming gradient by ``factor`` in backward."""
    if factor == 1.0:
        return x
    return _ScaleGrad.apply(x, factor)


class _RingShift(torch.autograd.Function):
    """Send a block to the right neighbour and receive one from the left; backward goes the other way."""

    @staticmethod
    def forward(ctx, x: Tensor, incoming_rows: int) -> Tensor:  # type: ignore[override]
        world, rank = get_world_size(), get_rank()
        ctx.right, ctx.left = (rank + 1) % world, (rank - 1) % world
        ctx.outgoing_rows = x.shape[0]
        return _exchange(x.detach().contiguous(), ctx.right, ctx.left, incoming_rows)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # The gradient of what we received belongs to the left neighbour, who sent it.
        return _exchange(grad.contiguous(), ctx.left, ctx.right, ctx.outgoing_rows), None


def _exchange(x: Tensor, send_to: int, recv_from: int, incoming_rows: int) -> Tensor:
    buf = x.new_empty((incoming_rows, *x.shape[1:]))
    ops = []
    if x.shape[0] > 0:
        ops.append(dist.P2POp(dist.isend, x, send_to))
    if incoming_rows > 0:
        ops.append(dist.P2POp(dist.irecv, buf, recv_from))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return buf


def ring_shift_with_grad(x: Tensor, incoming_rows: int) -> Tensor:
    """Neighbour exchange (send right, receive ``incoming_rows`` rows from the left) with gradients."""
    if not is_distributed():
        return x
    return _RingShift.apply(x, incoming_rows)
