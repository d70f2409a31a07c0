"""Heads owned by objectives. Attribute names are fixed: the FLAVA importer maps Hugging Face weights onto them.

``PredictionHead`` <- HF ``FlavaMaskedPredictionHead``: ``transform.dense`` -> ``dense``,
``transform.LayerNorm`` -> ``norm``, ``decoder`` (+ the tied ``bias``) -> ``decoder``.
``ITMHead`` <- HF ``FlavaITMHead``: ``pooler.dense`` -> ``pooler``, ``seq_relationship`` -> ``classifier``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vlm.errors import VLMConfigError


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


# Names follow Hugging Face's ACT2FN so that a model's ``hidden_act`` can be passed through unchanged.
ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, what HF FLAVA/BERT call "gelu"
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str):
    """The activation function called ``name`` (Hugging Face spelling)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise VLMConfigError(f"Unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}.") from None


class PredictionHead(nn.Module):
    """BERT/FLAVA masked-prediction head: dense -> activation -> LayerNorm -> decoder (with bias)."""

    def __init__(self, hidden_size: int, out_size: int, eps: float = 1e-12, act: str = "gelu") -> None:
        super().__init__()
        self.act_name = act
        self.act = activation(act)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.decoder = nn.Linear(hidden_size, out_size, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT initialisation (normal(0, 0.02), zero bias): also what HF FLAVA uses for its heads."""
        for lin in (self.dense, self.decoder):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.norm.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """Logits (or regression outputs) for hidden states ``x[..., hidden]``."""
        return self.decoder(self.norm(self.act(self.dense(x))))

    def extra_repr(self) -> str:
        return f"act={self.act_name}"


class ITMHead(nn.Module):
    """Image-text matching head: tanh-pooled token 0 -> 2 logits (index 1 = match)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, 2)
        for lin in (self.pooler, self.classifier):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """``hidden[B,T,D]`` (multimodal CLS first) -> logits ``[B,2]``."""
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))


__all__ = ["ITMHead", "PredictionHead", "activation", "ACTIVATIONS"]
