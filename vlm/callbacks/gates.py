"""Log the values of gating parameters (Flamingo's tanh gates) so a dashboard shows when vision starts to matter."""

from __future__ import annotations

import fnmatch

import torch
from lightning.pytorch.callbacks import Callback


class GateMonitor(Callback):
    """Every ``every_n_steps``, log ``tanh(gate)`` (mean of |values|) for each parameter matching ``pattern``."""

    def __init__(self, pattern: str = "*gate*", every_n_steps: int = 50, apply_tanh: bool = True) -> None:
        self.pattern, self.every_n_steps, self.apply_tanh = pattern, every_n_steps, apply_tanh

    def gate_values(self, pl_module) -> dict[str, float]:
        """Current gate values keyed by parameter name."""
        out = {}
        for name, p in pl_module.named_parameters():
            if fnmatch.fnmatchcase(name, self.pattern):
                v = torch.tanh(p.detach().float()) if self.apply_tanh else p.detach().float()
                out[name] = float(v.abs().mean())
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        values = self.gate_values(pl_module)
        for name, v in values.items():
            pl_module.log(f"gates/{name}", v, on_step=True, batch_size=1)
        if values:
            pl_module.log("gates/mean", sum(values.values()) / len(values), on_step=True, batch_size=1)
