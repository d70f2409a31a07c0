"""Checkpoints that survive a killed run: atomic writes, and SIGTERM saves ``last.ckpt`` then stops cleanly.

Lightning 2.6 writes a checkpoint through an fsspec transaction whose temporary file lives in the system temp
directory; the final move is a rename only when that directory shares a filesystem with the checkpoint, and a
copy into the destination otherwise (a kill during the copy leaves a truncated ``last.ckpt`` that
``--ckpt_path last`` then picks). :class:`AtomicCheckpointIO` writes ``<path>.tmp`` beside the target, fsyncs it
and renames it over the target, so a ``*.ckpt`` file is always complete; ``--ckpt_path last`` only considers
``last*.ckpt`` files, never the ``.tmp``.

Lightning's own SIGTERM handling raises ``SIGTERMException`` after the current batch without saving anything, and
under DDP only follows rank 0. :class:`PreemptionCheckpoint` replaces it for the training loop: a SIGTERM on any
rank sets a flag; at the end of the next optimizer step the flag is OR-reduced across ranks, every rank takes part
in saving ``last.ckpt`` into the ModelCheckpoint's directory, and the trainer stops (the process exits 0).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

TMP_SUFFIX = ".tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes go to ``<path>.tmp``, are fsynced, then renamed over ``path``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` so that ``path`` holds either the old file or the complete new one."""
        fs = get_filesystem(path)
        if not isinstance(fs, LocalFileSystem):  # object stores publish an upload only once it is complete
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"`storage_options` is not supported by {type(self).__name__}: {storage_options!r}")
        path = Path(fs._strip_protocol(str(path)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return None


def _fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_checkpoint_io_atomic(trainer: Trainer) -> bool:
    """Swap the strategy's plain TorchCheckpointIO for :class:`AtomicCheckpointIO`; False if another IO is in use."""
    io = trainer.strategy.checkpoint_io
    if isinstance(io, AtomicCheckpointIO):
        return True
    if type(io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


class PreemptionCheckpoint(Callback):
    """SIGTERM (e.g. SLURM before preemption): save ``last.ckpt`` after the next optimizer step and stop, exit 0."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False
        self._step_at_batch_start = -1

    def _handle(self, signum: int, frame: Any) -> None:
        # only a flag: the training loop acts on it at an optimizer-step boundary
        self.requested = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Make checkpoint writes atomic; warn if no ModelCheckpoint gives ``last.ckpt`` a directory."""
        if stage != "fit":
            return
        if not make_checkpoint_io_atomic(trainer):
            rank_zero_warn(f"PreemptionCheckpoint: checkpoint IO {type(trainer.strategy.checkpoint_io).__name__} "
                           "is left as it is; its writes may not be atomic.")
        if not isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            rank_zero_warn("PreemptionCheckpoint: no ModelCheckpoint callback, so a SIGTERM stops the run without "
                           "saving a checkpoint.")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install the SIGTERM handler (after Lightning installed its own, which it replaces until teardown)."""
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread, so no SIGTERM handler is installed.")
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Remember the step, to tell an optimizer step from a gradient-accumulation micro-batch."""
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After an optimizer step: if any rank got SIGTERM, save ``last.ckpt`` on every rank and stop."""
        if trainer.global_step == self._step_at_batch_start:
            return  # inside gradient accumulation: no consistent state to save yet
        stop = self.requested
        if trainer.world_size > 1:  # the signal may reach only some ranks: any of them stops all
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = self.save_last(trainer)
        trainer.should_stop = True
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_skip_next_val"):
            epoch_loop._skip_next_val = True  # should_stop would run validation first: not in a preemption window
        where = f"saved {path}" if path else "no ModelCheckpoint, nothing saved"
        rank_zero_info(f"SIGTERM: {where} at step {trainer.global_step}; stopping. Resume with --ckpt_path last.")

    def save_last(self, trainer: Trainer) -> str | None:
        """Save the checkpoint ``--ckpt_path last`` resolves to (in the ModelCheckpoint's directory); its path."""
        cb = trainer.checkpoint_callback
        if not isinstance(cb, ModelCheckpoint) or cb.dirpath is None:
            return None
        path = cb.last_model_path
        if not path or Path(path).parent != Path(cb.dirpath):
            metrics = {**trainer.callback_metrics, "epoch": torch.tensor(trainer.current_epoch),
                       "step": torch.tensor(trainer.global_step)}
            path = cb.format_checkpoint_name(metrics, cb.CHECKPOINT_NAME_LAST)
        cb.last_model_path = path  # recorded in the checkpoint's ModelCheckpoint state, as ModelCheckpoint does
        trainer.save_checkpoint(path)
        return path

    def _restore(self) -> None:
        if self._installed and signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Give SIGTERM back to the handler it had before training."""
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give SIGTERM back to the handler it had before training."""
        self._restore()


__all__ = ["AtomicCheckpointIO", "PreemptionCheckpoint", "make_checkpoint_io_atomic"]
