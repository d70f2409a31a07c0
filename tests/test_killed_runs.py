"""Killed and preempted runs: `vlm fit --ckpt_path last` continues with exactly the uninterrupted run's losses.

The CLI tests run ``python -m vlm.cli fit --config conf/flava/tiny.yaml`` as a subprocess on a small setup (12 steps,
a checkpoint every 3) with the CSV logger at every step. A test-only callback (:class:`Pace`) writes each finished
step to a marker file and can hold the run at a chosen step, so the test kills it at a known step without racing
the training loop. The reference is an uninterrupted run of the same command.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "conf/flava/tiny.yaml"
STEPS, EVERY = 12, 3


class Pace(Callback):
    """Test-only: append every finished global step to ``marker``; at step ``hold_at`` wait for ``release``."""

    def __init__(self, marker: str, hold_at: int = -1, release: str = "") -> None:
        self.marker = Path(marker)
        self.hold_at = hold_at
        self.release = Path(release) if release else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Record the step; hold the run while the test kills or signals it."""
        with open(self.marker, "a") as f:
            f.write(f"{trainer.global_step}\n")
        if trainer.global_step == self.hold_at:
            deadline = time.monotonic() + 300
            while not (self.release and self.release.exists()) and time.monotonic() < deadline:
                time.sleep(0.05)


def overlay(path: Path, **pace) -> Path:
    """tiny.yaml's own callbacks with a checkpoint every EVERY steps, plus :class:`Pace`; written to ``path``."""
    callbacks = yaml.safe_load(TINY.read_text())["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = EVERY
    assert any(cb["class_path"] == "vlm.callbacks.PreemptionCheckpoint" for cb in callbacks)
    callbacks.append({"class_path": f"{__name__}.Pace", "init_args": pace})
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def start(cwd: Path, cache: Path, *extra: str, **pace) -> subprocess.Popen:
    """Start `vlm fit` on the small tiny setup in ``cwd`` (its runs/ directory lives there)."""
    cwd.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, "-m", "vlm.cli", "fit", "--config", str(TINY), "--config", str(REPO / "conf/logger/csv.yaml"),
        "--config", str(overlay(cwd / "overlay.yaml", marker=str(cwd / "steps.txt"), **pace)),
        "--data.init_args.streams.pairs.init_args.dataset.init_args.num=128", "--data.init_args.batch_size=8",
        f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=1000", "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLM_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    (cwd / "steps.txt").unlink(missing_ok=True)
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for ``proc``; its exit code and output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def steps_done(cwd: Path) -> list[int]:
    """The global steps the run in ``cwd`` finished, as :class:`Pace` recorded them."""
    marker = cwd / "steps.txt"
    return [int(s) for s in marker.read_text().split()] if marker.exists() else []


def wait_for_step(proc: subprocess.Popen, cwd: Path, step: int, timeout: float = 300) -> None:
    """Block until the run has finished ``step`` (and is held there by :class:`Pace`)."""
    deadline = time.monotonic() + timeout
    while step not in steps_done(cwd):
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout}s"
        time.sleep(0.05)


def logged_losses(cwd: Path) -> dict[int, float]:
    """{step: train/loss} from the newest CSV log under ``cwd``."""
    newest = max((cwd / "runs/lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at."""
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


LAST = Path("runs/checkpoints/flava-tiny/last.ckpt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One dataset cache for every run of this module (the shards are identical)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache) -> dict[int, float]:
    """Losses of the uninterrupted run; started with `--ckpt_path last` too, which finds nothing and starts fresh."""
    cwd = tmp_path_factory.mktemp("straight")
    rc, out = finish(start(cwd, cache, "--ckpt_path", "last"))
    assert rc == 0, out[-3000:]
    losses = logged_losses(cwd)
    assert sorted(losses) == list(range(STEPS)) and steps_done(cwd) == list(range(1, STEPS + 1))
    assert checkpoint_step(cwd / LAST) == STEPS
    return losses


def resume_and_compare(cwd: Path, cache: Path, straight: dict[int, float], from_step: int) -> None:
    """Restart in ``cwd`` with `--ckpt_path last`: steps from_step+1.. log exactly the straight run's losses."""
    rc, out = finish(start(cwd, cache, "--ckpt_path", "last"))
    assert rc == 0, out[-3000:]
    assert steps_done(cwd) == list(range(from_step + 1, STEPS + 1))
    # CSV rows are numbered by the optimizer steps taken before them: the resumed log starts at row from_step
    assert logged_losses(cwd) == {s: straight[s] for s in range(from_step, STEPS)}
    assert checkpoint_step(cwd / LAST) == STEPS


@pytest.mark.slow
def test_sigkill_then_ckpt_path_last_logs_the_uninterrupted_losses(tmp_path, cache, straight):
    k = random.randint(EVERY * 2 + 1, STEPS - 1)  # after the second checkpoint, before the end
    cwd = tmp_path / "killed"
    proc = start(cwd, cache, hold_at=k, release=str(cwd / "never"))
    wait_for_step(proc, cwd, k)
    proc.send_signal(signal.SIGKILL)
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL
    # ModelCheckpoint runs after Pace, so step k itself was not saved: last is the previous multiple of EVERY
    saved = EVERY * ((k - 1) // EVERY)
    assert checkpoint_step(cwd / LAST) == saved, f"killed at step {k}"
    assert not list((cwd / LAST.parent).glob("*.tmp"))  # every finished write was renamed into place
    resume_and_compare(cwd, cache, straight, saved)


@pytest.mark.slow
def test_sigterm_saves_last_stops_with_exit_0_and_resumes_identically(tmp_path, cache, straight):
    k = random.randint(2, STEPS - 3)
    cwd = tmp_path / "term"
    proc = start(cwd, cache, hold_at=k, release=str(cwd / "go"))
    wait_for_step(proc, cwd, k)
    proc.send_signal(signal.SIGTERM)
    (cwd / "go").touch()
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    # the signal came after step k's checks: the run finished step k+1, saved it and stopped there
    assert steps_done(cwd) == list(range(1, k + 2)), f"SIGTERM at step {k}"
    assert checkpoint_step(cwd / LAST) == k + 1
    assert logged_losses(cwd) == {s: straight[s] for s in range(k + 1)}
    resume_and_compare(cwd, cache, straight, k + 1)
