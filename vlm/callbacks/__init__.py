"""Lightning callbacks: freezing schedules, objective-weight schedules, gate monitoring, throughput."""

from vlm.callbacks.freeze import FreezeSchedule, FreezeStage
from vlm.callbacks.gates import GateMonitor
from vlm.callbacks.history import MetricHistory
from vlm.callbacks.objective_schedule import ObjectiveWeightSchedule, WeightStage
from vlm.callbacks.throughput import Throughput

__all__ = ["FreezeSchedule", "FreezeStage", "GateMonitor", "MetricHistory", "ObjectiveWeightSchedule", "Throughput",
           "WeightStage"]
