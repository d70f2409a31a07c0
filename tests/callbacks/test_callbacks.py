"""Freezing schedules, objective-weight schedules and the gate monitor, in real (tiny) Lightning runs."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.toy import SquaredError, ToyModel, toy_batches
from vlm.callbacks import FreezeSchedule, FreezeStage, GateMonitor, ObjectiveWeightSchedule, WeightStage
from vlm.errors import VLMConfigError


class Recorder(L.Callback):
    """Snapshots parameters before every optimizer step's batch."""

    def __init__(self):
        self.snaps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snaps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def run(model, callbacks, steps=6):
    loader = DataLoader(toy_batches(steps), batch_size=None)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, loader)
    return trainer


def changed(rec, name, i):
    return not torch.equal(rec.snaps[i][name], rec.snaps[i + 1][name])


def test_freeze_then_unfreeze_by_pattern():
    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}}, lr=1e-2)
    rec = Recorder()
    sched = FreezeSchedule([FreezeStage(0, freeze=["encoder.*"]), FreezeStage(3, unfreeze=["encoder"])])
    run(model, [sched, rec])
    name = "encoder.0.weight"
    assert not any(changed(rec, name, i) for i in range(2))  # steps 0,1 frozen
    assert changed(rec, name, 3)  # after step 3 it trains
    assert changed(rec, "objectives.se.head.weight", 0)  # the rest trained all along


def test_unfreezing_a_parameter_frozen_at_construction_adds_it_to_the_optimizer():
    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}}, lr=1e-2)
    model.gate.requires_grad_(False)  # frozen before configure_optimizers: not in any param group
    rec = Recorder()
    trainer = run(model, [FreezeSchedule([FreezeStage(2, unfreeze=["gate"])]), rec])
    assert not changed(rec, "gate", 0)
    assert changed(rec, "gate", 3)
    assert any(any(p is model.gate for p in g["params"]) for g in trainer.optimizers[0].param_groups)


def test_frozen_modules_are_kept_in_eval_mode():
    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}})
    cb = FreezeSchedule([FreezeStage(0, freeze=["encoder"])])
    model.train()
    cb.apply(type("T", (), {"optimizers": [], "lr_scheduler_configs": []})(), model, 0)
    assert not model.encoder.training and not model.encoder[0].training
    assert model.objectives.training


def test_bad_pattern_lists_top_level_modules():
    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}})
    cb = FreezeSchedule([FreezeStage(0, freeze=["image_encoder.*"])])
    with pytest.raises(VLMConfigError, match=r"image_encoder.*\['encoder', 'gate', 'objectives'\]"):
        cb.apply(type("T", (), {"optimizers": [], "lr_scheduler_configs": []})(), model, 0)


def test_objective_weight_schedule_switches_streams_on():
    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 0.0}}, lr=1e-2)
    sched = ObjectiveWeightSchedule([WeightStage(2, {"b": {"se": 1.0}})])
    run(model, [sched], steps=6)
    # stream b (odd batches) was skipped while its weight was 0: 1 skipped + 5 trained calls in 6 batches
    assert model.stream_weights["b"]["se"] == 1.0
    assert model.objectives["se"].calls == 5


def test_gate_monitor_reports_tanh_of_gates():
    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}})
    values = GateMonitor(pattern="gate").gate_values(model)
    assert values == {"gate": pytest.approx(float(torch.tanh(torch.tensor(0.5))))}
