"""Flamingo's frozen weights stored in bf16 under bf16 compute (``frozen_dtype``): what changes and what does not."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_flamingo import CORE, LMS, VISION
from vlm.errors import VLMConfigError
from vlm.models.flamingo import Flamingo


def tiny(seed=0, **kw) -> Flamingo:
    torch.manual_seed(seed)
    return Flamingo(size=None, vision=VISION, lm={"config": dict(LMS["opt"])}, tokenizer="synthetic",
                    config=dict(CORE), **kw)


def batch_for(model: Flamingo, b=2, t=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (b, t), generator=g)
    ids[:, 0] = model.core.image_token_id
    return {"stream": "pairs", "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(b, 1, 3, 32, 32, generator=g), "image_mask": torch.ones(b, 1, dtype=torch.bool)}


def test_cast_frozen_halves_frozen_bytes_and_keeps_trainable_fp32():
    model = tiny()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert frozen and trainable
    matrices = [p for p in frozen if p.dim() >= 2]
    saved = model.core.cast_frozen_(torch.bfloat16)
    assert saved == sum(p.numel() * 2 for p in matrices) and saved > 0.9 * sum(p.numel() * 2 for p in frozen)
    assert all(p.dtype == (torch.bfloat16 if p.dim() >= 2 else torch.float32) for p in frozen)
    assert all(p.dtype == torch.float32 for p in trainable)
    assert model.core.cast_frozen_(torch.bfloat16) == 0  # idempotent


def test_bf16_storage_gives_autocast_losses_and_gradients_of_fp32_storage():
    """Autocast computes the frozen matmuls with bf16 copies anyway: storing them in bf16 moves the loss and the
    trainable gradients only by what the fp32 ops (norms, embeddings) see of the bf16 rounding."""
    ref, ours = tiny(), tiny()
    ours.core.cast_frozen_(torch.bfloat16)
    batch = batch_for(ref)
    results = []
    for model in (ref, ours):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.compute_losses(batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (l_ref, g_ref), (l_ours, g_ours) = results
    assert torch.isfinite(l_ours) and abs(l_ours.item() - l_ref.item()) < 0.02 * abs(l_ref.item())
    assert set(g_ref) == set(g_ours)
    flat_ref = torch.cat([g.flatten() for g in g_ref.values()])
    flat_ours = torch.cat([g_ours[n].flatten() for n in g_ref])
    cos = torch.nn.functional.cosine_similarity(flat_ref.double(), flat_ours.double(), dim=0)
    assert cos > 0.99, cos
    assert all(g.dtype == torch.float32 for g in g_ours.values())  # the optimizer keeps fp32 master weights


class _Trainer:
    def __init__(self, precision, strategy=None, callbacks=()):
        self.precision, self.strategy, self.callbacks = precision, strategy, list(callbacks)


def test_auto_picks_bf16_only_where_it_is_safe():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from vlm.callbacks.freeze import FreezeSchedule

    model = tiny()
    assert model.frozen_storage_dtype("bf16-mixed", DDPStrategy()) == torch.bfloat16
    assert model.frozen_storage_dtype("bf16-true") == torch.bfloat16
    assert model.frozen_storage_dtype("32-true") == torch.float32
    assert model.frozen_storage_dtype("16-mixed") == torch.float32
    assert model.frozen_storage_dtype("bf16-mixed", FSDPStrategy()) == torch.float32  # one dtype per flat param
    schedule = FreezeSchedule([{"at_step": 10, "unfreeze": ["core.lm.*"]}])
    assert model.frozen_storage_dtype("bf16-mixed", None, [schedule]) == torch.float32  # may train them later
    assert tiny(frozen_dtype="float32").frozen_storage_dtype("bf16-mixed") == torch.float32


def test_setup_casts_and_refuses_bf16_storage_without_bf16_compute():
    model = tiny()
    model._trainer = _Trainer("bf16-mixed")
    model.setup("fit")
    assert {p.dtype for p in model.parameters() if not p.requires_grad and p.dim() >= 2} == {torch.bfloat16}
    forced = tiny(frozen_dtype="bfloat16")
    forced._trainer = _Trainer("32-true")
    with pytest.raises(VLMConfigError, match="trainer.precision: bf16-mixed"):
        forced.setup("fit")
    with pytest.raises(VLMConfigError, match="frozen_dtype='half'"):
        tiny(frozen_dtype="half")


def test_fit_with_the_gpu_preset_stores_frozen_weights_in_bf16(tmp_path, monkeypatch):
    """conf/flamingo/tiny.yaml + conf/trainer/gpu.yaml (bf16-mixed, clipping), only the accelerator swapped."""
    from pathlib import Path

    from vlm.cli import VLMCLI

    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[2]
    cli = VLMCLI(args=["--config", str(root / "conf/flamingo/tiny.yaml"), "--config", str(root / "conf/trainer/gpu.yaml"),
                       "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                       "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.enable_progress_bar=false",
                       f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.batch_size=4",
                       "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false"], run=False)
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 and cli.trainer.precision == "bf16-mixed"
    frozen = [p for p in cli.model.parameters() if not p.requires_grad and p.dim() >= 2]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    trained = dict(cli.model.named_parameters())
    assert all(trained[n].dtype == torch.float32 for n in before)
    assert any(not torch.equal(trained[n], before[n]) for n in before)
