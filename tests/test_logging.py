"""Per-stream losses reach an offline wandb run, read back through wandb's own reader."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
from torch.utils.data import DataLoader

from tests.toy import SquaredError, ToyModel, toy_batches
from vlm.loggers import WandbLogger


def read_summary(run_dir: str) -> dict:
    exe = shutil.which("wandb") or os.path.join(os.path.dirname(os.sys.executable), "wandb")
    out = subprocess.run([exe, "leet", "inspect", "--summary", "--json", run_dir],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_offline_wandb_run_holds_per_stream_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="vlm-test", save_dir=str(tmp_path))
    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}})
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(toy_batches(4), batch_size=None))
    run_dir = logger.run_dir
    assert "offline-run" in run_dir
    import wandb

    wandb.finish()
    summary = read_summary(run_dir)
    assert summary["state"] == "finished"
    logged = summary["summary"]
    for key in ["train/a/se/loss", "train/b/se/loss", "train/a/loss", "train/b/loss", "train/loss"]:
        assert key in logged, f"{key} not in wandb summary {sorted(logged)}"
    # one objective of weight 1 per stream: the stream loss is that objective's loss
    assert logged["train/a/loss"] == pytest.approx(logged["train/a/se/loss"])
    # the last step came from stream b, and train/loss is the latest step's loss
    assert logged["train/loss"] == pytest.approx(logged["train/b/loss"])


@pytest.mark.parametrize("mode,expect_offline", [("offline", True), ("online", False)])
def test_wandb_mode_follows_environment(monkeypatch, tmp_path, mode, expect_offline):
    monkeypatch.setenv("WANDB_MODE", mode)
    logger = WandbLogger(save_dir=str(tmp_path))
    assert logger._offline is expect_offline


def test_wandb_overlay_brings_back_the_offline_logger(monkeypatch, tmp_path):
    """conf/logger/wandb.yaml over the CSV overlay: vlm's WandbLogger again, offline unless WANDB_MODE=online."""
    from pathlib import Path

    from vlm.cli import VLMCLI

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    cli = VLMCLI(args=["--config", str(root / "conf/flava/tiny.yaml"), "--config", str(root / "conf/logger/csv.yaml"),
                       "--config", str(root / "conf/logger/wandb.yaml"),
                       "--data.init_args.streams.pairs.init_args.dataset.init_args.num=128"], run=False)
    assert isinstance(cli.trainer.logger, WandbLogger) and cli.trainer.logger._offline is True


def test_run_folder_is_whole_after_a_chdir(tmp_path, monkeypatch):
    """A relative save_dir is taken from the working directory of the run's creation, also once wandb's service
    (started earlier in the process, elsewhere) is running: the .wandb log sits beside the run's files."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    first, second = tmp_path / "first", tmp_path / "second"
    for where in (first, second):
        where.mkdir()
        monkeypatch.chdir(where)
        logger = WandbLogger(project="vlm-test", save_dir="runs")
        logger.experiment.log({"x": 1.0})
        run_dir = logger.run_dir
        wandb.finish()
        assert run_dir.startswith(str(where / "runs")), run_dir
        assert list(Path(run_dir).glob("*.wandb")), f"no transaction log in {run_dir}"
