"""Data-parallel training with per-stream objectives, and gradient clipping that works with every precision.

**Why DDP needs help here.** A step trains only the objectives of its stream: an ``images`` step of FLAVA
touches the image tower and the MIM head, never the text tower. DDP's static reducer expects a gradient for
every trainable parameter in every step and stops with "parameters that were not used in producing the
loss"; ``find_unused_parameters=True`` fixes that by walking the whole autograd graph in every step.

**What vlm does instead** (any ``DDPStrategy`` with ``find_unused_parameters=False``, the default of the
``ddp`` preset):

* The set of parameters a step reaches is a function of (stream, active objectives, trainable parameters),
  and every rank picks the same stream at the same step (schedules are pure functions of position). So the
  graph is walked **once per such signature**, not once per step, and the result is cached.
* The step's loss gets a zero-weighted term on one element of every trainable parameter it did not reach.
  Every parameter then has a gradient (exact zeros for the unreached ones), DDP's bucketed all-reduce runs
  as for a static graph, overlapped with the backward pass, and nothing is traversed per step.
* Before the optimizer step, parameters that no micro-batch of the step reached get ``grad = None`` again,
  so AdamW skips them (no weight decay, no moment update) exactly as it does in a single process.
* When the trainable set changes (``FreezeSchedule`` unfreezing a tower), the DDP wrapper is rebuilt over
  the new set at the next step on every rank; DDP only registers parameters that require a gradient.

The alternatives were weighed: ``static_graph=True`` assumes one graph for the whole run; one DDP wrapper
per stream would register hooks twice on shared towers; FSDP (the ``fsdp`` preset) reduce-scatters per
wrapped block and has no unused-parameter check, but shards, which a 350M-parameter model does not need.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vlm.errors import VLMConfigError


def static_ddp(trainer) -> DistributedDataParallel | None:
    """The trainer's DDP wrapper when it runs DDP's static reducer (``find_unused_parameters=False``)."""
    if trainer is None:
        return None
    model = getattr(trainer.strategy, "_model", None)
    if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters and not model.static_graph:
        return model
    return None


def reachable_parameters(loss: Tensor) -> set[int]:
    """``id`` of every leaf tensor whose gradient ``loss.backward()`` would accumulate (its autograd graph)."""
    found: set[int] = set()
    root = loss.grad_fn
    if root is None:
        return found
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            found.add(id(variable))
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return found


class GraphCover:
    """Makes every step's graph reach every trainable parameter for DDP's static reducer (see the module doc).

    ``cover(loss, key, trainable)`` adds the zero-weighted term for the parameters ``loss`` does not reach
    (walking the graph, and listing ``trainable()``, only the first time ``key`` is seen); ``release(trainable)``
    sets ``grad = None`` on those no micro-batch since the last release reached.
    """

    def __init__(self) -> None:
        self._known: dict[tuple, tuple[tuple[nn.Parameter, ...], frozenset[int]]] = {}  # key -> (unreached, reached)
        self._reached_since_step: set[int] = set()
        self.walks = 0  #: graph walks so far (one per signature): tests check it stays small

    def cover(self, loss: Tensor, key: tuple, trainable: Callable[[], Sequence[nn.Parameter]]) -> Tensor:
        known = self._known.get(key)
        if known is None:
            found = reachable_parameters(loss)
            params = trainable()
            known = self._known[key] = (tuple(p for p in params if id(p) not in found),
                                        frozenset(id(p) for p in params if id(p) in found))
            self.walks += 1
        unreached, reached = known
        self._reached_since_step |= reached
        if not unreached:
            return loss
        touch = torch.stack([p.reshape(-1)[0].to(loss.dtype) for p in unreached]).sum()
        return loss + touch * 0.0

    def release(self, trainable: Iterable[nn.Parameter]) -> int:
        """Drop the zero gradients of parameters that no micro-batch of this optimizer step reached."""
        released = 0
        for p in trainable:
            if id(p) not in self._reached_since_step and p.grad is not None:
                p.grad = None
                released += 1
        self._reached_since_step = set()
        return released


def trainable_signature(module: nn.Module) -> tuple[int, ...]:
    """Which parameters currently require a gradient (their ids, in registration order)."""
    return tuple(id(p) for p in module.parameters() if p.requires_grad)


def rewrap_ddp(strategy) -> DistributedDataParallel:
    """Build the strategy's DDP wrapper anew over the parameters that require gradients now (a collective)."""
    old = strategy._model
    inner = old.module
    strategy.model = None
    del old
    gc.collect()  # the old reducer's autograd hooks go with it
    new = strategy._setup_model(inner)
    strategy.model = new
    strategy._register_ddp_hooks()
    return new


#: transformer blocks of the shipped towers (timm ViT/pre-norm blocks; Hugging Face BERT-style layers)
DEFAULT_BLOCKS = ("timm.models.vision_transformer.Block", "transformers.models.bert.modeling_bert.BertLayer",
                  "vlm.models.flamingo.FlamingoLayer")


def resolve_classes(names: Sequence[str]) -> set[type]:
    """Module classes from import paths (``package.module.Class``); an unknown one is one error naming it."""
    from vlm.export import import_class

    return {import_class(name) for name in names}


try:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy as _ModuleWrapPolicy
except ImportError:  # pragma: no cover - torch without FSDP
    _ModuleWrapPolicy = object


class BlockPolicy(_ModuleWrapPolicy):
    """FSDP auto-wrap and activation-checkpointing policy: one unit per transformer block of the towers.

    A ``ModuleWrapPolicy`` over block classes given by import path, so that a YAML preset can name them.
    """

    def __init__(self, names: Sequence[str] = DEFAULT_BLOCKS) -> None:
        self.names = tuple(names)
        super().__init__(resolve_classes(self.names))


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_objects(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process). Evaluation-time only: pickles."""
    import torch.distributed as dist

    world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def reduce_weighted_means(sums: dict[str, tuple[Tensor, float]], device: torch.device | str) -> dict[str, Tensor]:
    """Means over every rank of ``{key: (sum of value*weight, sum of weight)}``; keys may differ between ranks.

    Every rank must call it (one object gather for the key set, one all-reduce): a rank that saw no batch of
    a stream contributes zeros, so the result is the single-process mean over all ranks' rows.
    """
    import torch.distributed as dist

    keys = sorted(sums)
    if _world() > 1:
        keys = sorted(set().union(*all_gather_objects(keys)))
    if not keys:
        return {}
    n = len(keys)
    vec = torch.zeros(2 * n, dtype=torch.float64, device=device)
    for i, k in enumerate(keys):
        if k in sums:
            total, weight = sums[k]
            vec[i] = total.detach().to(device=device, dtype=torch.float64) if isinstance(total, Tensor) else total
            vec[n + i] = float(weight)
    if _world() > 1:
        dist.all_reduce(vec)
    return {k: (vec[i] / vec[n + i]).float() for i, k in enumerate(keys) if vec[n + i] > 0}


def _fsdp_root(strategy):
    model = getattr(strategy, "_model", None)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP
        return None
    return model if isinstance(model, FullyShardedDataParallel) else None


def clip_gradients(trainer, optimizer: torch.optim.Optimizer, clip_val: float | None,
                   algorithm: str | None) -> Tensor | None:
    """Clip the gradients of ``optimizer``'s parameters; returns the total norm before clipping (norm clipping).

    Works where Lightning's precision plugins refuse: a fused optimizer under ``bf16-mixed`` (no loss scaler,
    nothing to unscale) and under ``16-mixed`` (the scaler unscales first, which torch's GradScaler supports
    for fused optimizers: ``step`` then skips its own unscaling). Under FSDP the norm is the sharded
    module's own ``clip_grad_norm_`` (every shard counts).
    """
    if not clip_val or clip_val <= 0:
        return None
    algorithm = (algorithm or "norm").lower()
    if algorithm not in ("norm", "value"):
        raise VLMConfigError(f"gradient_clip_algorithm={algorithm!r}: use 'norm' or 'value'.")
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        from torch.amp.grad_scaler import OptState

        state = scaler._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.READY:  # Lightning left a fused optimizer's gradients scaled
            scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    fsdp = _fsdp_root(trainer.strategy)
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
        return None
    if fsdp is not None:
        return fsdp.clip_grad_norm_(clip_val)
    if not params:
        return None
    return torch.nn.utils.clip_grad_norm_(params, clip_val)


__all__ = ["BlockPolicy", "DEFAULT_BLOCKS", "GraphCover", "all_gather_objects", "clip_gradients", "reduce_weighted_means", "reachable_parameters", "rewrap_ddp", "static_ddp",
           "trainable_signature"]
