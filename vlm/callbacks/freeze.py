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

    The stage of the starting step is applied in ``setup`` (or, when resuming, at the checkpoint's step while
    it is restored), before the optimizer and DDP see the parameters: frozen parameters get no gradient and
    no optimizer state. A parameter unfrozen later joins the optimizer group that ``parameter_groups()`` gives
    it (its weight decay by the model's rule, the group's learning rate and schedule), and under DDP the
    model rebuilds its wrapper over the new trainable set. Modules whose parameters are all frozen are kept in
    eval mode (``eval_frozen``) so dropout and norm statistics stay fixed, as for Flamingo's frozen towers.
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
        if not new:
            return
        pl_module = trainer.lightning_module
        names = {id(p): n for n, p in pl_module.named_parameters()}
        decays = getattr(pl_module, "decays", None)
        multiplier = getattr(pl_module, "lr_multiplier", None)
        for p in new:
            # the weight decay and learning-rate factor parameter_groups() gives it (decay on weight matrices only,
            # lr_multipliers by name)
            wd = getattr(pl_module, "weight_decay", 0.0) if decays is None or decays(names[id(p)], p) else 0.0
            mult = 1.0 if multiplier is None else multiplier(names[id(p)])
            group = next((g for g in opt.param_groups
                          if g.get("weight_decay", 0.0) == wd and g.get("lr_mult", 1.0) == mult), None)
            if group is not None:
                group["params"].append(p)  # same lr, schedule and betas as its peers; state starts empty
                continue
            group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            # the schedule's current factor, read off a group with a non-zero base learning rate
            ref = next((g for g in opt.param_groups if g.get("initial_lr")), None)
            factor = ref["lr"] / ref["initial_lr"] if ref is not None else 1.0
            base = float(getattr(pl_module, "lr", group.get("initial_lr", group["lr"]))) * mult
            group.update(params=[p], weight_decay=wd, lr_mult=mult, lr=base * factor)
            if "initial_lr" in group:
                group["initial_lr"] = base
            opt.add_param_group(group)
            for cfg in trainer.lr_scheduler_configs:  # LambdaLR keeps one base lr per group
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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before configure_optimizers and the DDP wrapper: frozen parameters never enter either
        if stage == "fit":
            self.apply(trainer, pl_module, self._stage_index(trainer.global_step))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # restored before the optimizer is built: its groups then match the checkpoint's optimizer state
        self.apply(trainer, pl_module, self._stage_index(int(checkpoint.get("global_step", 0))))

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
