"""Gradient clipping with the fused AdamW under every precision (Lightning's AMP plugin refuses to clip there).

The clipped gradients are checked against the formula g * c / ||g|| on the unscaled gradient of an fp32
run of the same step: under ``16-mixed`` the loss scaler must unscale before clipping, or the norm (and the
clipping) would be off by the scale factor (256 here).
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from tests.toy import SquaredError, ToyModel, toy_batches


class GradProbe(L.Callback):
    """Gradients as the optimizer used them, after clipping (they are zeroed at the next step)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.grads.append({n: p.grad.detach().float().clone() for n, p in pl_module.named_parameters()
                           if p.grad is not None})


def one_step(precision: str, clip: float | None):
    torch.manual_seed(0)
    model = ToyModel(objectives={"se": SquaredError(scale=100.0)}, streams={"a": {"se": 1.0}}, lr=1e-3)
    probe = GradProbe()
    kwargs = {"precision": precision}
    if precision == "16-mixed":  # Lightning turns 16-mixed into bf16 on CPU unless given the plugin and its scaler
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))]}
    trainer = L.Trainer(accelerator="cpu", devices=1, **kwargs, gradient_clip_val=clip, max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe])
    batches = toy_batches(1, streams=("a",), batch_size=16)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    opt = trainer.optimizers[0]
    assert opt.defaults.get("fused"), "the fused AdamW is what Lightning's plugin refused to clip"
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler.get_scale() > 1  # a real loss scale was in play
    return probe.grads[0]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_clipping_with_fused_adamw(precision):
    raw = one_step("32-true", None)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in raw.values()))
    clip = float(norm) / 4  # clipping is active: the gradients shrink by 4
    clipped = one_step(precision, clip)
    # half-precision forward passes move the gradient by ~1%; an unscaled fp16 gradient would be 256x off
    tol = {"32-true": 1e-5, "bf16-mixed": 3e-2, "16-mixed": 3e-2}[precision]
    for name, g in raw.items():
        expected = g.double() * clip / norm
        torch.testing.assert_close(clipped[name].double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
