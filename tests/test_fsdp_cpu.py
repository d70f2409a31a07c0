"""conf/trainer/fsdp.yaml really trains every family, on 2 CPU ranks (gloo) with the preset's own settings.

Lightning refuses FSDP without a GPU and torch's FSDP wants an accelerator unless it is told the CPU is its
device, so this test patches exactly those two guards and nothing else: the preset's FULL_SHARD sharding, one
unit and one checkpointed region per block (``vlm.parallel.BlockPolicy``), bf16-mixed precision, gradient
clipping, ``use_orig_params`` and sharded checkpoints all run. (A suite that built the strategy but never ran
a step missed two crashes every GPU user hit at the first FSDP step: a 0-dim ``logit_scale`` parameter, which
FSDP refuses, and an in-place clamp of it, which invalidated the views the towers' weights are in the flat
parameter.)

After a few optimizer steps, each rank gathers the full state dict: both ranks hold the same weights, every
trainable tensor moved from its initial value, and every frozen one (Flamingo's LM and vision tower) did not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.launch import run_ranks

REPO = Path(__file__).resolve().parents[1]
FSDP_PRESET = str(REPO / "conf/trainer/fsdp.yaml")
COMMON = [
    "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--data.init_args.num_workers=0",
    "--data.init_args.pin_memory=false", "--data.init_args.batch_size=4",
]
FAMILIES = {
    "flava": ["--config", str(REPO / "conf/flava/tiny.yaml"),
              "--data.init_args.streams.pairs.init_args.dataset.init_args.num=64"],
    "flamingo": ["--config", str(REPO / "conf/flamingo/tiny.yaml")],
    "pali": ["--config", str(REPO / "conf/pali/tiny.yaml")],
}


def _allow_fsdp_on_cpu() -> None:
    import torch
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
    from torch.distributed.fsdp import FullyShardedDataParallel

    _AcceleratorConnector._check_strategy_and_fallback = lambda self: None
    init = FullyShardedDataParallel.__init__

    def cpu_init(self, *args, device_id=None, **kwargs):
        init(self, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)

    FullyShardedDataParallel.__init__ = cpu_init


def run_rank(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    from vlm.cli import VLMCLI

    _allow_fsdp_on_cpu()
    report = {}
    for name, args in FAMILIES.items():
        root = out.parent / f"{name}-root"
        cli = VLMCLI(args=[*args, "--config", FSDP_PRESET, *COMMON, f"--trainer.default_root_dir={root}",
                           f"--trainer.logger.init_args.save_dir={root}"], run=False)
        before = {k: v.detach().clone().float() for k, v in cli.model.state_dict().items()}
        trainable = {k for k, p in cli.model.named_parameters() if p.requires_grad}
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        wrapped = cli.trainer.strategy.model
        assert isinstance(wrapped, FullyShardedDataParallel)
        with FullyShardedDataParallel.state_dict_type(
                wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=False)):
            after = {k: v.detach().float() for k, v in wrapped.state_dict().items()}
        params = [k for k in before if k in after and k in dict(cli.model.named_parameters())]
        moved = {k: bool((after[k] - before[k]).abs().max() > 0) for k in params}
        ckpt = root / "step2.ckpt"
        cli.trainer.save_checkpoint(ckpt)  # the preset's state_dict_type: sharded, a directory of shards
        dist.barrier()
        resumed = VLMCLI(args=[*args, "--config", FSDP_PRESET, *COMMON, "--trainer.max_steps=3",
                               f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"],
                         run=False)
        resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(ckpt))
        report[name] = {
            "sharded_checkpoint": ckpt.is_dir() and any(ckpt.iterdir()),
            "resumed_steps": resumed.trainer.global_step,
            "steps": cli.trainer.global_step,
            "strategy": type(cli.trainer.strategy).__name__,
            "precision": cli.trainer.precision,
            "loss": float(cli.trainer.callback_metrics.get("train/loss", torch.tensor(float("nan")))),
            "sums": {k: float(after[k].double().sum()) for k in params},
            "trainable": sorted(k for k in params if k in trainable),
            "moved": moved,
        }
        dist.barrier()
    Path(f"{out}.{dist.get_rank()}.json").write_text(json.dumps(report))


def test_fsdp_preset_trains_every_family_on_two_ranks(tmp_path):
    out = tmp_path / "fsdp"
    run_ranks(__file__, out, world=2, timeout=800, cwd=tmp_path,
              env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "VLM_CACHE_DIR": str(tmp_path / "cache")})
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
    for name in FAMILIES:
        r0, r1 = ranks[0][name], ranks[1][name]
        assert r0["strategy"] == "FSDPStrategy" and r0["precision"] == "bf16-mixed", name
        assert r0["steps"] == r1["steps"] == 2, name
        assert r0["sums"] == r1["sums"], f"{name}: the ranks hold different weights after the steps"
        assert r0["trainable"], name
        frozen_moved = [k for k, m in r0["moved"].items() if m and k not in r0["trainable"]]
        trained_still = [k for k in r0["trainable"] if not r0["moved"][k]]
        assert not frozen_moved, f"{name}: frozen parameters changed: {frozen_moved[:5]}"
        # a trainable tensor may stay put only where no stream reaches it in 2 steps (e.g. an unused head)
        assert len(trained_still) < len(r0["trainable"]) / 4, f"{name}: {trained_still[:10]}"
        assert r0["sharded_checkpoint"], f"{name}: no sharded checkpoint directory"
        assert r0["resumed_steps"] == r1["resumed_steps"] == 3, f"{name}: did not resume from step 2 to 3"


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
