"""Lightning callbacks: freezing schedules, objective-weight schedules, gate monitoring, throughput, preemption,
evaluation reports, validation prediction tables."""

from vlm.callbacks.checkpoint import AtomicCheckpointIO, PreemptionCheckpoint
from vlm.callbacks.eval_report import EvalReport
from vlm.callbacks.freeze import FreezeSchedule, FreezeStage
from vlm.callbacks.gates import GateMonitor
from vlm.callbacks.history import MetricHistory
from vlm.callbacks.objective_schedule import ObjectiveWeightSchedule, WeightStage
from vlm.callbacks.predictions import PredictionWriter
from vlm.callbacks.tables import PredictionsTable
from vlm.callbacks.throughput import Throughput

__all__ = ["AtomicCheckpointIO", "EvalReport", "FreezeSchedule", "FreezeStage", "GateMonitor", "MetricHistory",
           "ObjectiveWeightSchedule", "PredictionWriter", "PredictionsTable", "PreemptionCheckpoint", "Throughput",
           "WeightStage"]
