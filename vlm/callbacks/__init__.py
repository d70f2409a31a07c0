"""Lightning callbacks: freezing schedules, objective-weight schedules, gate monitoring."""

from vlm.callbacks.freeze import FreezeSchedule, FreezeStage
from vlm.callbacks.gates import GateMonitor
from vlm.callbacks.history import MetricHistory
from vlm.callbacks.objective_schedule import ObjectiveWeightSchedule, WeightStage

__all__ = ["FreezeSchedule", "FreezeStage", "GateMonitor", "MetricHistory", "ObjectiveWeightSchedule", "WeightStage"]
