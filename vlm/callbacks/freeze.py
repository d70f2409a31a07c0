"""Freezing and unfreezing parameters by name pattern on a step schedule."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from vlm.errors import VLMConfigError


@dataclass
class FreezeStage:
    """From optimizer step ``at_step`` on: freeze params matching ``freeze``, then unfreeze those matching ``unfreeze``."""

    at_step: int = 0
    freeze: list[str] = field(default_factory=list)
    unfreeze: list[str] = field(default_factory=list)


def match_parameters(module: nn.Module, patterns: list[str]) -> dict[str, nn.Parameter]:
    """Parameters whose names match any fnmatch pattern (``image_encoder.*``); a pattern matching nothing is an error."""
    named = dict(module.named_parameters())
    out: dict[str, nn.Parameter] = {}
    for pat in patterns:
        # a bare module name ("text_encoder") means everything under it
        hits = {n: p for n, p in named.items() if fnmatch.fnmatchcase(n, pat) or n.startswith(pat + ".")}
        if not hits:
            tops = sorted({n.split(".")[0] for n in named})
            raise VLMConfigError(
                f"Freeze pattern {pat!r} matches no parameter of {type(module).__name__}. Patterns are fnmatch "
                f"globs over parameter names such as 'image_encoder.*'; top-level modules are {tops}."
            )
        out.update(hits)
    return out


class FreezeSchedule(Callback):
    """Freeze/unfreeze parts of the model by name pattern at given steps (e.g. unimodal first, then joint).

    Frozen parameters get ``requires_grad=False`` (no gradient, so AdamW leaves them alone). A parameter
    unfrozen later that the optimizer never saw (frozen when the model was built) is added as a new
    param group. Modules whose parameters are all frozen are kept in eval mode (``eval_frozen``) so
    dropout and norm statistics stay fixed, as for Flamingo's frozen towers.
    """

    def __init__(self, stages: list[FreezeStage], eval_frozen: bool = True) -> None:
        self.stages = sorted((s if isinstance(s, FreezeStage) else FreezeStage(**s) for s in stages), key=lambda s: s.at_step)
        self.eval_frozen = eval_frozen
        self._applied = -1

    def _stage_index(self, step: int) -> int:
        idx = -1
        for i, s in enumerate(self.stages):
            if s.at_step <= step:
                idx = i
        return idx

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, upto: int) -> None:
        """Apply stages ``0..upto`` in order (idempotent, so it also restores state after resuming)."""
        for stage in self.stages[: upto + 1]:
            for p in match_parameters(pl_module, stage.freeze).values():
                p.requires_grad_(False)
            unfrozen = match_parameters(pl_module, stage.unfreeze)
            for p in unfrozen.values():
                p.requires_grad_(True)
            self._add_to_optimizer(trainer, list(unfrozen.values()))
        self._applied = upto
        self._set_modes(pl_module)

    @staticmethod
    def _add_to_optimizer(trainer: L.Trainer, params: list[nn.Parameter]) -> None:
        if not params or not trainer.optimizers:
            return
        opt = trainer.optimizers[0]
        known = {id(p) for g in opt.param_groups for p in g["params"]}
        new = [p for p in params if id(p) not in known]
        if new:
            group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            group["params"] = new
            opt.add_param_group(group)
            # LambdaLR keeps one base lr per group
            for cfg in trainer.lr_scheduler_configs:
                sched = cfg.scheduler
                if hasattr(sched, "base_lrs") and len(sched.base_lrs) < len(opt.param_groups):
                    sched.base_lrs.append(group.get("initial_lr", group["lr"]))
                if hasattr(sched, "lr_lambdas") and len(sched.lr_lambdas) < len(opt.param_groups):
                    sched.lr_lambdas.append(sched.lr_lambdas[0])

    def _set_modes(self, pl_module: L.LightningModule) -> None:
        if not self.eval_frozen or not pl_module.training:
            return
        def walk(module: nn.Module, parent_frozen: bool) -> None:
            params = list(module.parameters())
            # parameter-free modules (dropout) follow their parent
            frozen = (not any(p.requires_grad for p in params)) if params else parent_frozen
            module.training = not frozen
            for child in module.children():
                walk(child, frozen)

        walk(pl_module, False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(trainer, pl_module, self._stage_index(trainer.global_step))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        idx = self._stage_index(trainer.global_step)
        if idx != self._applied:
            self.apply(trainer, pl_module, idx)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._set_modes(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._set_modes(pl_module)
