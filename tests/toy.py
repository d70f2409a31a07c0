"""A toy vlm model and objectives for testing the shared step logic and callbacks without a real tower."""

from __future__ import annotations

import torch
from torch import nn

from vlm.models.base import VLMModule
from vlm.objectives.base import Objective, ObjectiveOutput


class SquaredError(Objective):
    """Mean squared error between a linear map of ``x`` and ``y`` (owns a head, counts its calls)."""

    name = "se"
    requires_fields = ("x", "y")
    requires_capabilities = ("features",)

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.calls = 0

    def build(self, model: nn.Module) -> None:
        self.head = nn.Linear(model.dims["hidden"], 1)

    def forward(self, model, batch, cache) -> ObjectiveOutput:
        self.calls += 1
        pred = self.head(model.features(batch, cache)).squeeze(-1)
        loss = self.scale * ((pred - batch["y"]) ** 2).mean()
        return ObjectiveOutput(loss, {"mae": (pred - batch["y"]).abs().mean()})


class NeedsLogits(Objective):
    """An objective that needs a capability the toy model lacks."""

    name = "needs_logits"
    requires_capabilities = ("lm_logits",)


class ToyModel(VLMModule):
    """An encoder (linear + LayerNorm) exposing one capability, ``features``."""

    def __init__(self, objectives=None, streams=None, hidden: int = 8, **kwargs) -> None:
        super().__init__(objectives=objectives, streams=streams, **kwargs)
        self.dims = {"hidden": hidden}
        self.encoder = nn.Sequential(nn.Linear(4, hidden), nn.LayerNorm(hidden))
        self.gate = nn.Parameter(torch.tensor([0.5]))
        self.encoder_calls = 0
        self.attach_objectives()

    def features(self, batch, cache):
        def run():
            self.encoder_calls += 1
            return self.encoder(batch["x"]) * torch.tanh(self.gate)

        return cache.get_or("features", run)


def toy_batches(n: int, streams=("a", "b"), batch_size: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(batch_size, 4, generator=g)
        out.append({"stream": streams[i % len(streams)], "batch_index": i, "x": x, "y": x.sum(-1)})
    return out
