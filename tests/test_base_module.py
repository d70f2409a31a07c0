"""The shared step: per-stream objectives, weights, errors, optimizer groups and LR schedule."""

import math

import pytest
import torch

from tests.toy import NeedsLogits, SquaredError, ToyModel, toy_batches
from vlm.errors import MissingBatchField, MissingCapability, VLMConfigError
from vlm.objectives.base import StepCache


def make(streams=None, **kw):
    objs = {"se": SquaredError(), "se2": SquaredError(scale=3.0)}
    return ToyModel(objs, streams or {"a": {"se": 1.0, "se2": 0.5}, "b": {"se": 2.0}}, **kw)


def test_weighted_sum_matches_objectives_computed_separately():
    model = make()
    batch = toy_batches(1)[0]
    loss, logs = model.compute_losses(batch)
    # independent: each objective's loss from scratch, with the same head weights
    feats = model.encoder(batch["x"]) * torch.tanh(model.gate)
    expect = 0.0
    for key, w in {"se": 1.0, "se2": 0.5}.items():
        head = model.objectives[key].head
        scale = model.objectives[key].scale
        expect = expect + w * scale * ((head(feats).squeeze(-1) - batch["y"]) ** 2).mean()
    torch.testing.assert_close(loss, expect)
    assert set(logs) == {"a/se/loss", "a/se/mae", "a/se2/loss", "a/se2/mae", "a/loss"}
    # the encoder ran once although two objectives used its output
    assert model.encoder_calls == 1


def test_weight_zero_costs_nothing_and_contributes_nothing():
    model = make({"a": {"se": 1.0, "se2": 0.0}})
    batch = toy_batches(1)[0]
    loss, logs = model.compute_losses(batch)
    assert model.objectives["se2"].calls == 0
    assert "a/se2/loss" not in logs
    loss.backward()
    assert all(p.grad is None for p in model.objectives["se2"].parameters())


def test_stream_with_all_weights_zero_skips_the_training_step():
    model = make({"a": {"se": 0.0}})
    assert model.training_step(toy_batches(1)[0]) is None
    assert model.objectives["se"].calls == 0


def test_unknown_stream_names_known_streams():
    model = make()
    with pytest.raises(VLMConfigError, match=r"stream 'zzz'.*\['a', 'b'\]"):
        model.compute_losses({"stream": "zzz", "x": torch.zeros(1, 4), "y": torch.zeros(1)})


def test_stream_naming_missing_objective_fails_at_construction():
    with pytest.raises(VLMConfigError, match="objective 'nope'"):
        ToyModel({"se": SquaredError()}, {"a": {"nope": 1.0}})


def test_missing_capability_fails_at_construction_naming_objective_and_stream():
    with pytest.raises(MissingCapability, match=r"'lm'.*stream 'text'.*lm_logits"):
        ToyModel({"lm": NeedsLogits()}, {"text": {"lm": 1.0}})


def test_missing_batch_field_names_objective_stream_and_field():
    model = make()
    with pytest.raises(MissingBatchField, match=r"'se'.*stream 'a'.*\['y'\]"):
        model.compute_losses({"stream": "a", "x": torch.zeros(2, 4)})


def test_parameter_groups_skip_frozen_and_exempt_norms_biases_gates_from_decay():
    model = make(weight_decay=0.1)
    model.encoder[0].weight.requires_grad_(False)
    groups = model.parameter_groups()
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert id(model.encoder[0].weight) not in decay | no_decay
    assert id(model.encoder[1].weight) in no_decay  # LayerNorm
    assert id(model.gate) in no_decay
    assert id(model.objectives["se"].head.weight) in decay
    assert id(model.objectives["se"].head.bias) in no_decay


def test_optimizer_is_fused_adamw_with_the_adamw_update():
    model = make(weight_decay=0.1, lr=0.01)
    opt = model.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"]  # CPU has a fused kernel: one call per step instead of a per-tensor loop
    params = [p for g in model.parameter_groups() for p in g["params"]]
    before = {id(p): p.detach().double().clone() for p in params}
    for p in params:
        p.grad = torch.randn_like(p)
    grads = {id(p): p.grad.double().clone() for p in params}
    opt.step()
    b1, b2, eps = 0.9, 0.999, 1e-8
    for group in opt.param_groups:
        for p in group["params"]:
            # first AdamW step from zero moments, in float64: decoupled decay, then the bias-corrected ratio
            g, w = grads[id(p)], before[id(p)]
            m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
            expect = w * (1 - 0.01 * group["weight_decay"]) - 0.01 * m_hat / (v_hat.sqrt() + eps)
            torch.testing.assert_close(p.detach().double(), expect, rtol=1e-5, atol=1e-6)


def test_lr_multipliers_scale_the_adamw_step_of_the_parameters_they_match():
    model = make(weight_decay=0.1, lr=0.01, lr_multipliers={r"encoder\.0\.": 0.1, r"encoder\.": 0.5})
    opt = model.configure_optimizers()["optimizer"]
    factor = {n: 0.1 if n.startswith("encoder.0.") else 0.5 if n.startswith("encoder.") else 1.0
              for n, _ in model.named_parameters()}  # the first matching pattern counts
    params = dict(model.named_parameters())
    before = {n: p.detach().double().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.randn_like(p)
    grads = {n: p.grad.double().clone() for n, p in params.items()}
    opt.step()
    for n, p in params.items():
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        lr = 0.01 * factor[n]
        assert group["lr"] == pytest.approx(lr) and group["lr_mult"] == factor[n], n
        expect = before[n] * (1 - lr * group["weight_decay"]) - lr * grads[n] / (grads[n].abs() + 1e-8)
        torch.testing.assert_close(p.detach().double(), expect, rtol=1e-5, atol=1e-6)
    # the schedule scales every group alike
    sched = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sorted(sched.base_lrs) == sorted(0.01 * g["lr_mult"] for g in sched.optimizer.param_groups)


@pytest.mark.parametrize("bad, match", [({"encoder[": 0.1}, "not a regular expression"),
                                        ({"encoder": -1.0}, "finite factor >= 0"),
                                        ({"encoder": float("nan")}, "finite factor >= 0"),
                                        ({"encoder": True}, "finite factor >= 0")])
def test_bad_lr_multipliers_are_one_clear_error(bad, match):
    with pytest.raises(VLMConfigError, match=match):
        make(lr_multipliers=bad)


def test_an_lr_multiplier_that_matches_no_parameter_names_the_pattern():
    model = make(lr_multipliers={"image_encoder": 0.1})
    with pytest.raises(VLMConfigError, match=r"\['image_encoder'\] match no parameter"):
        model.configure_optimizers()


def test_lr_schedule_warmup_then_cosine_formula():
    model = make(warmup_steps=10, min_lr_ratio=0.1)

    class T:  # the only trainer attribute the schedule reads
        max_steps = 110

    model._trainer = T()
    for step in [0, 5, 9]:
        assert model.lr_lambda(step) == pytest.approx((step + 1) / 10)
    for step in [10, 35, 60, 110]:
        progress = (step - 10) / 100
        assert model.lr_lambda(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_step_generator_depends_on_position_and_stream_only():
    model = make()
    b = toy_batches(2)
    g1 = model.step_generator(b[0]).initial_seed()
    assert g1 == model.step_generator(dict(b[0])).initial_seed()
    assert g1 != model.step_generator(b[1]).initial_seed()


def test_cache_memoises():
    cache = StepCache()
    calls = []
    assert cache.get_or("k", lambda: calls.append(1) or 5) == 5
    assert cache.get_or("k", lambda: calls.append(1) or 6) == 5
    assert calls == [1]


def test_data_checked_before_the_first_step():
    """A stream without objectives, or lacking a field an objective needs, fails at fit start (not at its first batch)."""
    import lightning as L

    from vlm.data.module import MultiStreamDataModule
    from vlm.data.stream import Stream

    class Rows(torch.utils.data.Dataset):
        def __init__(self, fields):
            self.fields = fields

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {k: torch.ones(4) if k == "x" else torch.tensor(1.0) for k in self.fields}

    def fit(model, streams):
        data = MultiStreamDataModule({k: Stream(Rows(v)) for k, v in streams.items()}, batch_size=2)
        L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(model, data)

    model = make()
    with pytest.raises(MissingBatchField, match=r"'se'.*stream 'b'.*\['y'\]"):
        fit(model, {"a": ["x", "y"], "b": ["x"]})
    assert model.objectives["se"].calls == 0  # failed before any step, stream 'a' included
    with pytest.raises(VLMConfigError, match=r"Data stream 'c' has no objectives"):
        fit(make(), {"a": ["x", "y"], "c": ["x", "y"]})
    model = make()
    fit(model, {"a": ["x", "y"], "b": ["x", "y"]})  # the right fields: trains
    assert model.objectives["se"].calls == 2
