"""Every overlay under conf/trainer/ and conf/logger/ runs with its own settings on the tiny model; only the
accelerator is swapped to CPU. (ddp.yaml runs on 2 ranks in tests/models/test_flava_ddp.py; Lightning refuses
FSDP without a GPU, so fsdp.yaml is built and its wrapping checked here, and trains every family on 2 CPU ranks in
tests/test_fsdp_cpu.py with those two guards patched; on a GPU it runs in benchmarks/gpu_session.sh.)"""

from pathlib import Path

import pytest
import torch
import yaml

from vlm.cli import VLMCLI, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "conf/flava/tiny.yaml")
OVERLAYS = sorted(str(p.relative_to(ROOT / "conf")) for d in ("trainer", "logger") for p in (ROOT / "conf" / d).glob("*.yaml"))
SMALL = ["--data.init_args.streams.pairs.init_args.dataset.init_args.num=128", "--data.init_args.batch_size=8",
         "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false"]
RUN = ["--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
       "--trainer.log_every_n_steps=1"]
#: how each overlay is exercised here
CHECKS = {
    "trainer/cpu.yaml": "fit", "trainer/gpu.yaml": "fit", "trainer/debug.yaml": "fit",
    "trainer/ddp.yaml": "parse", "trainer/fsdp.yaml": "fsdp",
    "logger/csv.yaml": "fit", "logger/tensorboard.yaml": "fit", "logger/wandb_online.yaml": "parse", "logger/wandb.yaml": "parse",
}


def test_every_overlay_has_a_check():
    assert set(OVERLAYS) == set(CHECKS), "add the new overlay to CHECKS"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _overlay_trainer(name: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / name).read_text()).get("trainer", {})


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, how in CHECKS.items() if how == "fit"])
def test_overlay_trains_with_its_own_settings(name, workdir):
    """3 optimizer steps (one per stream) of tiny FLAVA through `vlm fit`, the overlay's settings applied."""
    args = ["--config", TINY, "--config", str(ROOT / "conf" / name), *SMALL, *RUN, "--trainer.accelerator=cpu"]
    cli = VLMCLI(args=args, run=False)
    own = _overlay_trainer(name)
    if "precision" in own:
        assert cli.trainer.precision == own["precision"]
    if "gradient_clip_val" in own:
        assert cli.trainer.gradient_clip_val == own["gradient_clip_val"]
    before = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step >= 1
    after = cli.model.state_dict()
    for tower in ("image_encoder", "text_encoder", "multimodal_encoder"):
        assert any(not torch.equal(v, before[k]) for k, v in after.items() if k.startswith(f"core.{tower}.")), tower
    if name == "logger/csv.yaml":
        metrics = next(workdir.rglob("metrics.csv")).read_text()
        assert "train/loss" in metrics and "train/grad_norm" in metrics
    if name == "logger/tensorboard.yaml":
        assert list(workdir.rglob("events.out.tfevents.*"))


def test_gpu_preset_clips_under_bf16_with_the_fused_optimizer(workdir):
    """The first-step crash of the GPU preset (fused AdamW + clipping + bf16-mixed), through the documented command."""
    rc = main(["fit", "--config", TINY, "--config", str(ROOT / "conf/trainer/gpu.yaml"), *SMALL, *RUN,
               "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.callbacks=[]",
               "--trainer.enable_checkpointing=false"])
    assert rc == 0


def test_ddp_preset_uses_the_static_reducer(workdir):
    from lightning.pytorch.strategies import DDPStrategy

    cli = VLMCLI(args=["--config", TINY, "--config", str(ROOT / "conf/trainer/ddp.yaml"), *SMALL,
                       "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.trainer.strategy._ddp_kwargs.get("find_unused_parameters") is False
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.gradient_clip_val == 1.0


def test_wandb_online_overlay_builds_an_online_logger(workdir):
    from vlm.loggers import WandbLogger

    cli = VLMCLI(args=["--config", TINY, "--config", str(ROOT / "conf/logger/wandb_online.yaml"), *SMALL], run=False)
    assert isinstance(cli.trainer.logger, WandbLogger)
    assert cli.trainer.logger._offline is False  # the overlay overrides the offline default (WANDB_MODE=offline here)


def test_fsdp_preset_wraps_every_transformer_block(workdir, monkeypatch):
    """The preset builds Lightning's FSDPStrategy with one unit (and one checkpointed region) per block."""
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
    from timm.models.vision_transformer import Block

    # Lightning refuses FSDP on CPU when the Trainer is built; the check is skipped to inspect the strategy
    monkeypatch.setattr(_AcceleratorConnector, "_check_strategy_and_fallback", lambda self: None)
    cli = VLMCLI(args=["--config", TINY, "--config", str(ROOT / "conf/trainer/fsdp.yaml"), *SMALL,
                       "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "sharded"
    assert strategy.kwargs.get("use_orig_params") is True  # frozen and trainable parameters kept apart
    from torch.distributed.fsdp import ShardingStrategy

    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    wrap = strategy.kwargs["auto_wrap_policy"]
    ckpt = strategy._activation_checkpointing_kwargs
    blocks = [m for m in cli.model.modules() if isinstance(m, Block)]
    assert len(blocks) == 6  # 2 image + 2 text + 2 multimodal blocks in the tiny config
    picked = [m for m in cli.model.modules() if wrap._module_classes and isinstance(m, tuple(wrap._module_classes))]
    assert picked == blocks
    assert ckpt, "activation checkpointing policy missing"
