"""Time a real `vlm fit` run: time to the first optimizer step, steady samples/s, data wait per step.

    python benchmarks/fit_run.py --steps 40 --out fit.json -- --config conf/flava/base.yaml --config conf/trainer/gpu.yaml ...

Everything after ``--`` is passed to the ``vlm fit`` parser (the same config files and overrides a user
gives). The run is the real one: LightningCLI, the DataModule and its workers, the preset's precision,
strategy and clipping. Steady throughput is taken over the second half of the steps (after compilation and
worker start-up); data wait is the time between the end of one step and the start of the next.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import lightning as L
import torch

START = time.perf_counter()


class FitTimer(L.Callback):
    """Wall-clock marks of every training batch (synchronised on CUDA, so they are real step ends)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.rows: list[int] = []

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(self._now())
        self.rows.append(int(pl_module.batch_size_of(batch)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(self._now())

    def summary(self, world_size: int) -> dict:
        n = len(self.ends)
        half = n // 2
        span = self.ends[-1] - self.ends[half - 1] if n >= 4 else float("nan")
        rows = sum(self.rows[half:n])
        waits = [s - e for s, e in zip(self.starts[1:], self.ends[:-1])]
        steady_waits = waits[half:] or waits
        return {
            "steps": n,
            "time_to_first_step_s": round(self.ends[0] - START, 2) if n else None,
            "steady_samples_per_s_per_device": round(rows / span, 2) if n >= 4 else None,
            "steady_samples_per_s": round(world_size * rows / span, 2) if n >= 4 else None,
            "data_wait_ms_per_step": round(1000 * sum(steady_waits) / max(1, len(steady_waits)), 2),
            "step_ms": round(1000 * span / max(1, n - half), 2) if n >= 4 else None,
        }


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps (trainer.max_steps)")
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    args = ap.parse_args(argv[:split])
    from vlm.cli import VLMCLI

    cli = VLMCLI(args=[*argv[split + 1:], f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=0",
                       "--trainer.logger=false",
                       "--trainer.enable_progress_bar=false"], run=False)
    # the run's own callbacks minus those that need a logger or write checkpoints
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if type(c).__name__ not in ("LearningRateMonitor",
                                                                                          "ModelCheckpoint")]
    timer = FitTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cli.trainer.global_rank != 0:
        return
    out = {"precision": str(cli.trainer.precision), "strategy": type(cli.trainer.strategy).__name__,
           "devices": cli.trainer.world_size, **timer.summary(cli.trainer.world_size)}
    if torch.cuda.is_available():
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["device"] = torch.cuda.get_device_name()
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
