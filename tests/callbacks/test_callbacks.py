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


def test_gate_monitor_logs_once_per_optimizer_step_under_accumulation():
    """Three batches per optimizer step (Flamingo's accumulate schedule): one logged value per step, taken
    before that step's update (the gate it reports is the one the step's batches saw)."""
    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}}, lr=1e-1)
    logged: list[tuple[int, float]] = []
    log = model.log

    def spy(name, value, *args, **kwargs):
        if name == "gates/gate":
            logged.append((model.trainer.global_step, float(value)))
        return log(name, value, *args, **kwargs)

    model.log = spy
    loader = DataLoader(toy_batches(12), batch_size=None)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=3,
                        callbacks=[GateMonitor(pattern="gate", every_n_steps=2)])
    trainer.fit(model, loader)
    assert [step for step, _ in logged] == [0, 2]  # 12 batches, 4 optimizer steps, every 2nd step once
    assert logged[0][1] == pytest.approx(float(torch.tanh(torch.tensor(0.5))))  # before the first update
    seen = logged
    assert trainer.callback_metrics["gates/gate"] == pytest.approx(seen[-1][1])


def _group_of(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def test_frozen_before_the_optimizer_and_unfrozen_into_the_group_parameter_groups_gives():
    """Frozen at step 0: in no group and without AdamW state; unfrozen later: the group (weight decay, lr)
    that parameter_groups() gives it when built unfrozen."""
    reference = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}}, lr=1e-2, weight_decay=0.1)
    expected = {}
    for g in reference.parameter_groups():
        for p in g["params"]:
            name = next(n for n, q in reference.named_parameters() if q is p)
            expected[name] = g["weight_decay"]
    assert {expected["encoder.0.weight"], expected["encoder.0.bias"], expected["encoder.1.weight"]} == {0.1, 0.0}

    class Probe(L.Callback):
        def __init__(self):
            self.before = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                opt = trainer.optimizers[0]
                enc = [p for n, p in pl_module.named_parameters() if n.startswith("encoder")]
                self.before = (all(not any(q is p for g in opt.param_groups for q in g["params"]) for p in enc),
                               all(p not in opt.state for p in enc))

    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}}, lr=1e-2, weight_decay=0.1)
    probe = Probe()
    trainer = run(model, [FreezeSchedule([FreezeStage(0, freeze=["encoder"]), FreezeStage(3, unfreeze=["encoder"])]),
                          probe])
    assert probe.before == (True, True)  # frozen: neither in a group nor with optimizer state
    opt = trainer.optimizers[0]
    lrs = {g["lr"] for g in opt.param_groups}
    assert len(lrs) == 1  # every group follows the same schedule
    for name, p in model.named_parameters():
        if name.startswith("encoder"):
            assert _group_of(opt, p)["weight_decay"] == expected[name], name
            assert p in opt.state  # it trained after the switch


def test_unfrozen_parameters_train_at_their_lr_multiplier():
    """A tower frozen first and unfrozen at step 3 under lr_multipliers: its group's learning rate is the factor
    times the others' at every later step (same schedule), as if it had been trainable from the start."""
    seen = []

    class Rates(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            opt = trainer.optimizers[0]
            enc = pl_module.encoder[0].weight
            mine = [g["lr"] for g in opt.param_groups if any(q is enc for q in g["params"])]
            rest = {g["lr"] for g in opt.param_groups if g.get("lr_mult", 1.0) == 1.0}
            seen.append((trainer.global_step, mine, rest))

    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}}, lr=1e-2, weight_decay=0.1,
                     warmup_steps=4, lr_multipliers={r"encoder\.": 0.25})
    run(model, [FreezeSchedule([FreezeStage(0, freeze=["encoder"]), FreezeStage(3, unfreeze=["encoder"])]),
                Rates()])
    for step, mine, rest in seen:
        assert len(rest) == 1
        if step < 3:
            assert mine == []
        else:
            assert mine == [pytest.approx(0.25 * next(iter(rest)))], step
    assert next(iter(seen[-1][2])) == pytest.approx(1e-2 * model.lr_lambda(5))


def test_resume_after_an_unfreeze_restores_the_optimizer(tmp_path):
    """A checkpoint written after the unfreeze resumes: the freeze stage of the checkpoint's step is applied
    before the optimizer is built, so its groups match the saved optimizer state."""
    def fit(steps, ckpt=None):
        model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}}, lr=1e-2)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[FreezeSchedule([FreezeStage(0, freeze=["encoder"]),
                                                       FreezeStage(2, unfreeze=["encoder"])])])
        trainer.fit(model, DataLoader(toy_batches(steps), batch_size=None), ckpt_path=ckpt)
        return trainer, model

    trainer, _ = fit(4)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    trainer, model = fit(6, ckpt=str(tmp_path / "after.ckpt"))
    assert trainer.global_step == 6
    assert all(p.requires_grad for p in model.encoder.parameters())
