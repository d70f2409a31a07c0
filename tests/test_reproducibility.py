"""One seed, one machine: two runs of tiny FLAVA log identical losses and see identical batches, for 0 and 2
loader workers (the data order, masks and negatives are functions of the seed and the position)."""

from pathlib import Path

import lightning as L
import pytest
import torch

from vlm.cli import VLMCLI

ROOT = Path(__file__).resolve().parents[1]


class StepLog(L.Callback):
    """(stream, batch position, a fingerprint of the batch's tensors, loss) of every training step."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point() or
                   (isinstance(v, torch.Tensor) and k in ("input_ids", "pair_id"))}
        fingerprint = tuple(sorted((k, float(v.double().sum()), tuple(v.shape)) for k, v in tensors.items()))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.rows.append((batch["stream"], int(batch["batch_index"]), fingerprint, float(loss)))


def run(workers: int) -> list[tuple]:
    log = StepLog()
    cli = VLMCLI(args=["--config", str(ROOT / "conf/flava/tiny.yaml"), "--trainer.max_steps=9",
                       "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                       "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                       "--data.init_args.batch_size=8", f"--data.init_args.num_workers={workers}",
                       "--data.init_args.streams.pairs.init_args.dataset.init_args.num=128"],
                 run=False, trainer_defaults={"callbacks": [log]})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return log.rows


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_two_runs_with_one_seed_are_identical(workers, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    first, second = run(workers), run(workers)
    assert len(first) == 9 and {r[0] for r in first} == {"pairs", "images", "text"}
    assert first == second  # same streams, same batches, bitwise the same losses
