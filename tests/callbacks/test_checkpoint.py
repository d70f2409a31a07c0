"""vlm.callbacks.checkpoint: a write killed midway never becomes `last`; SIGTERM on one DDP rank stops every rank.

The DDP test starts this file twice as a script (``LOCAL_RANK=r python tests/callbacks/test_checkpoint.py OUT``, as
torchrun would), so that the test can signal one rank and not the other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from tests.launch import run_ranks
from vlm.callbacks import AtomicCheckpointIO, PreemptionCheckpoint
from vlm.checkpoint import load_checkpoint
from vlm.errors import VLMConfigError

REPO = Path(__file__).resolve().parents[2]


def resolve_last(dirpath: Path) -> Path | None:
    """What Lightning's ``fit(ckpt_path="last")`` loads with a ModelCheckpoint(save_last=True) on ``dirpath``."""
    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    path = trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, "last", model_provided=True,
                                                          model_connected=True)
    return None if path is None else Path(path)


def test_write_killed_midway_leaves_the_previous_last_and_is_never_picked(tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    started = tmp_path / "writing"
    # a real SIGKILL while the second checkpoint's bytes are half written
    script = textwrap.dedent(f"""
        import io, time, torch
        from vlm.callbacks import AtomicCheckpointIO
        io_ = AtomicCheckpointIO()
        io_.save_checkpoint({{"state_dict": {{"w": torch.ones(3)}}, "global_step": 1}}, {str(ckpt_dir / "last.ckpt")!r})
        real_save = torch.save
        def half_save(obj, f):
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            open({str(started)!r}, "w").close()
            time.sleep(300)
        torch.save = half_save
        io_.save_checkpoint({{"state_dict": {{"w": torch.zeros(3)}}, "global_step": 2}}, {str(ckpt_dir / "last.ckpt")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None, f"writer exited with {proc.returncode}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = ckpt_dir / "last.ckpt.tmp"
    assert partial.stat().st_size > 0 and partial.stat().st_mtime >= (ckpt_dir / "last.ckpt").stat().st_mtime
    with pytest.raises(VLMConfigError):
        load_checkpoint(partial)
    # the previous checkpoint is intact, and it is what `--ckpt_path last` loads
    ckpt = load_checkpoint(ckpt_dir / "last.ckpt")
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))
    assert resolve_last(ckpt_dir) == ckpt_dir / "last.ckpt"


def test_truncated_copies_beside_last_are_not_picked(tmp_path):
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 3}, tmp_path / "last.ckpt")
    blob = (tmp_path / "last.ckpt").read_bytes()
    time.sleep(0.01)
    for name in ("last.ckpt.tmp", "step=6.ckpt.tmp"):
        (tmp_path / name).write_bytes(blob[: len(blob) // 3])
    assert resolve_last(tmp_path) == tmp_path / "last.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.tmp", "step=6.ckpt.tmp"]


def test_a_save_replaces_the_file_by_rename_wherever_the_temp_dir_is(tmp_path, monkeypatch):
    # Lightning's writer stages in tempfile's directory and copies over the target across filesystems;
    # here the staging file sits beside the target, so the target is swapped whole (a new inode), never rewritten
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        monkeypatch.setattr("tempfile.tempdir", str(shm))
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    before = path.stat().st_ino
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    assert path.stat().st_ino != before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.zeros(2))


def test_tiny_config_installs_the_callback_and_atomic_writes(tmp_path, monkeypatch):
    from vlm.cli import VLMCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    cli = VLMCLI(args=["--config", str(REPO / "conf/flava/tiny.yaml"), "--trainer.logger=false",
                       "--data.init_args.streams.pairs.init_args.dataset.init_args.num=128"], run=False)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, PreemptionCheckpoint))
    cb.setup(cli.trainer, cli.model, "fit")
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "runs/checkpoints/flava-tiny")


class SignalSelf(L.Callback):
    """Test-only: this rank sends itself SIGTERM at the end of global step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Signal this process once, at step ``at``."""
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


SIGNALLED_RANK, SIGNAL_AT, MAX_STEPS = 1, 4, 40


def run_rank(out: Path) -> None:
    """Body of every rank: train a toy under DDP; one rank gets SIGTERM; record the steps trained."""
    from torch import nn

    from tests.data.test_module import MapToy
    from vlm.data.module import MultiStreamDataModule
    from vlm.data.stream import Stream

    class Toy(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)
            self.steps: list[int] = []

        def training_step(self, batch, batch_idx):
            self.steps.append(self.global_step)
            return ((self.lin(batch["x"]).squeeze(-1) - batch["y"].float()) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    rank = int(os.environ["RANK"])
    callbacks = [SignalSelf(SIGNAL_AT)] if rank == SIGNALLED_RANK else []
    callbacks += [PreemptionCheckpoint(), ModelCheckpoint(dirpath=out / "ckpts", save_last=True,
                                                          every_n_train_steps=1000)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=MAX_STEPS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    model = Toy()
    dm = MultiStreamDataModule({"a": Stream(MapToy(16))}, schedule="round_robin", batch_size=2, seed=7)
    trainer.fit(model, datamodule=dm)
    (out / f"rank{rank}.json").write_text(json.dumps({"steps": model.steps, "global_step": trainer.global_step}))


@pytest.mark.ddp
def test_sigterm_on_one_ddp_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    run_ranks(__file__, tmp_path, timeout=180, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # only rank 1 was signalled (end of step SIGNAL_AT, before the check); both ranks stopped right there
    assert [r["global_step"] for r in ranks] == [SIGNAL_AT, SIGNAL_AT]
    assert ranks[0]["steps"] == ranks[1]["steps"] == list(range(SIGNAL_AT))
    assert load_checkpoint(tmp_path / "ckpts/last.ckpt")["global_step"] == SIGNAL_AT


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
