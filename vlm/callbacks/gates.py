"""Log the values of gating parameters (Flamingo's tanh gates) so a dashboard shows when vision starts to matter."""

from __future__ import annotations

import fnmatch

import torch
from lightning.pytorch.callbacks import Callback


class GateMonitor(Callback):
    """Log ``tanh(gate)`` (mean of |values|) of each parameter matching ``pattern``, once per optimizer step.

    Logged every ``every_n_steps`` optimizer steps (and at the first), just before the optimizer updates: with
    gradient accumulation (Flamingo's ``accumulate`` schedule) one optimizer step spans several batches and is
    logged once. Keys: ``gates/<parameter name>`` and ``gates/mean``.
    """

    def __init__(self, pattern: str = "*gate*", every_n_steps: int = 50, apply_tanh: bool = True) -> None:
        self.pattern, self.every_n_steps, self.apply_tanh = pattern, max(1, int(every_n_steps)), apply_tanh

    def gate_values(self, pl_module) -> dict[str, float]:
        """Current gate values keyed by parameter name."""
        out = {}
        for name, p in pl_module.named_parameters():
            if fnmatch.fnmatchcase(name, self.pattern):
                v = torch.tanh(p.detach().float()) if self.apply_tanh else p.detach().float()
                out[name] = float(v.abs().mean())
        return out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        values = self.gate_values(pl_module)
        for name, v in values.items():
            pl_module.log(f"gates/{name}", v, on_step=True, on_epoch=False, batch_size=1)
        if values:
            pl_module.log("gates/mean", sum(values.values()) / len(values), on_step=True, on_epoch=False,
                          batch_size=1)
