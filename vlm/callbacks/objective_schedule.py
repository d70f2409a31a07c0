"""Change objective weights on a step schedule (e.g. FLAVA's unimodal-first, then joint, pretraining)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning.pytorch.callbacks import Callback

from vlm.errors import VLMConfigError


@dataclass
class WeightStage:
    """From optimizer step ``at_step`` on, set ``weights[stream][objective]``; unnamed weights keep their values."""

    at_step: int = 0
    weights: dict[str, dict[str, float]] = field(default_factory=dict)


class ObjectiveWeightSchedule(Callback):
    """Sets per-stream objective weights at given steps; a stream whose weights are all 0 is skipped (no step)."""

    def __init__(self, stages: list[WeightStage]) -> None:
        self.stages = sorted((s if isinstance(s, WeightStage) else WeightStage(**s) for s in stages), key=lambda s: s.at_step)
        self._applied = -1

    def _apply_upto(self, pl_module, idx: int) -> None:
        if not hasattr(pl_module, "set_objective_weight"):
            raise VLMConfigError("ObjectiveWeightSchedule needs a vlm model (a VLMModule with set_objective_weight).")
        for stage in self.stages[: idx + 1]:
            for stream, ws in stage.weights.items():
                for obj, w in ws.items():
                    pl_module.set_objective_weight(stream, obj, w)
        self._applied = idx

    def _index(self, step: int) -> int:
        return max((i for i, s in enumerate(self.stages) if s.at_step <= step), default=-1)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._apply_upto(pl_module, self._index(trainer.global_step))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        idx = self._index(trainer.global_step)
        if idx != self._applied:
            self._apply_upto(pl_module, idx)
