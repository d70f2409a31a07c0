"""NaN/inf-loss guard (``max_nonfinite_steps``): a bad step is reported and skipped, too many in a row stop the run."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.toy import SquaredError, ToyModel, toy_batches
from vlm.errors import VLMConfigError
from vlm.models.base import NonFiniteLossError


class NaNAt(SquaredError):
    """``SquaredError`` whose loss is NaN (or inf) on the batches at the given schedule positions."""

    def __init__(self, bad: tuple[int, ...] = (), value: float = float("nan")) -> None:
        super().__init__()
        self.bad, self.value = set(bad), value

    def forward(self, model, batch, cache):
        out = super().forward(model, batch, cache)
        if int(batch["batch_index"]) in self.bad:
            out.loss = out.loss * self.value
        return out


class Snapshots(L.Callback):
    """Parameters and AdamW state (step, exp_avg, exp_avg_sq) after every optimizer step."""

    def __init__(self) -> None:
        self.after: list[tuple[dict, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        state = {names[id(p)]: copy.deepcopy({k: v.clone() for k, v in s.items()}) for p, s in opt.state.items()}
        self.after.append((params, state))


def fit(model, steps: int, callbacks=(), accumulate: int = 1):
    loader = DataLoader(toy_batches(steps * accumulate, streams=("a",)), batch_size=None)
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=list(callbacks), accumulate_grad_batches=accumulate,
              gradient_clip_val=1.0).fit(model, loader)


def make(bad=(), value=float("nan"), **kw):
    return ToyModel({"se": SquaredError(), "bad": NaNAt(bad, value)}, {"a": {"se": 1.0, "bad": 0.5}}, lr=0.1, **kw)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_step_is_reported_and_leaves_parameters_and_adamw_state_untouched(value):
    model, snaps = make(bad=(2,), value=value), Snapshots()
    with pytest.warns(UserWarning) as record:
        fit(model, 5, [snaps])
    (msg,) = [str(w.message) for w in record if "Non-finite loss" in str(w.message)]
    assert "step 2" in msg and "stream 'a'" in msg and "objective 'bad'" in msg and "'se'" not in msg
    before, after = snaps.after[1], snaps.after[2]
    for name in before[0]:
        assert torch.equal(before[0][name], after[0][name]), name  # no parameter moved
    assert before[1].keys() == after[1].keys()
    for name, state in before[1].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[k], after[1][name][k]), (name, k)
    # the steps around it trained, and nothing non-finite reached the weights
    assert not all(torch.equal(snaps.after[2][0][n], snaps.after[3][0][n]) for n in before[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.nonfinite_in_a_row == 0  # reset by the good steps after it


def test_skipped_step_equals_a_run_without_that_batch_on_the_parameters():
    """Skipping leaves the optimizer exactly where it was: the next update equals the one a run without the
    bad batch makes from the same state (independent: a run whose step-2 batch contributes nothing)."""
    torch.manual_seed(0)
    guarded = make(bad=(2,))
    torch.manual_seed(0)
    reference = make()
    assert all(torch.equal(a, b) for a, b in zip(guarded.parameters(), reference.parameters()))

    class SkipTwo(L.Callback):  # reference: the step-2 batch leaves no gradient at all
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                optimizer.zero_grad(set_to_none=True)

    with pytest.warns(UserWarning, match="Non-finite loss at step 2"):
        fit(guarded, 5)
    fit(reference, 5, [SkipTwo()])
    for (name, a), b in zip(guarded.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_step_under_a_loss_scaler_is_skipped_by_the_scaler():
    """16-mixed: the scaler skips the step (and lowers its scale) as for an overflow; state stays untouched."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # what CUDA 16-mixed uses, on CPU
    model, snaps = make(bad=(2,)), Snapshots()
    with pytest.warns(UserWarning, match="Non-finite loss at step 2"):
        L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[snaps], gradient_clip_val=1.0,
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                  ).fit(model, DataLoader(toy_batches(4, streams=("a",)), batch_size=None))
    before, after = snaps.after[1], snaps.after[2]
    assert all(torch.equal(before[0][n], after[0][n]) for n in before[0])
    assert all(torch.equal(before[1][n][k], after[1][n][k]) for n in before[1] for k in before[1][n])
    assert scaler.get_scale() == 128.0  # backed off once, by the default factor 0.5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_bad_steps_in_a_row_stop_the_run_with_one_clear_error():
    model = make(bad=(1, 2, 3, 4, 5), max_nonfinite_steps=2)
    with pytest.warns(UserWarning), pytest.raises(NonFiniteLossError) as err:
        fit(model, 8)
    msg = str(err.value)
    assert "step 3" in msg and "stream 'a'" in msg and "objective 'bad'" in msg and "max_nonfinite_steps=2" in msg
    assert isinstance(err.value, VLMConfigError)  # the CLI prints it as one `vlm: error:` line


def test_bad_micro_batch_skips_the_whole_accumulated_step():
    model, snaps = make(bad=(4,)), Snapshots()  # accumulate 2: batches 4 and 5 make optimizer step 2
    with pytest.warns(UserWarning, match="Non-finite loss at step 2"):
        fit(model, 4, [snaps], accumulate=2)
    # on_train_batch_end runs per micro-batch: entries 3 (after step 1) and 5 (after the skipped step 2)
    for name, p in snaps.after[3][0].items():
        assert torch.equal(p, snaps.after[5][0][name]), name


def test_guard_off_trains_through_and_bad_limit_is_checked():
    model = make(bad=(2,), max_nonfinite_steps=None)
    fit(model, 4)
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # what the guard prevents
    with pytest.raises(VLMConfigError, match=r"max_nonfinite_steps=-1: use 0 or more"):
        make(max_nonfinite_steps=-1)


def test_fused_adamw_skips_on_device_without_dropping_gradients(monkeypatch):
    """With the fused AdamW and no loss scaler the skip is the kernel's ``found_inf`` (no host read of the flag
    before the step): gradients are not dropped, yet parameters and moments stay as they were."""
    from vlm.models.base import VLMModule

    def refuse(self, *args):
        raise AssertionError("the fused path must not drop gradients on the host")

    monkeypatch.setattr(VLMModule, "_drop_gradients", refuse)
    model, snaps = make(bad=(2,)), Snapshots()
    with pytest.warns(UserWarning, match="Non-finite loss at step 2"):
        fit(model, 4, [snaps])
    (p1, s1), (p2, s2) = snaps.after[1], snaps.after[2]
    for name in p1:
        assert torch.equal(p1[name], p2[name]), name
    for name in s1:
        for k in s1[name]:
            assert torch.equal(s1[name][k], s2[name][k]), (name, k)
    assert not hasattr(model.trainer.optimizers[0], "found_inf")  # nothing left over for the next step
