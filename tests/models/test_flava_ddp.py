"""The real tiny FLAVA under DDP on 2 CPU ranks (gloo), from conf/flava/tiny.yaml + conf/trainer/ddp.yaml.

The ddp preset's own settings (static reducer, bf16-mixed, gradient clipping with the fused AdamW) run with
only the accelerator swapped to CPU. Both ranks are started at once as torchrun would start them (LOCAL_RANK,
RANK, WORLD_SIZE set; Lightning launches nothing) and run every scenario in one process each:

* training on every schedule (round-robin, weighted, accumulate) and FLAVA's staged freeze schedule: after
  the steps every parameter is bitwise identical on both ranks, the towers a stream does not use included,
  and the graph is walked once per (stream, trainable set), not once per step;
* ``validate`` with uneven evaluation shards (one rank holds fewer rows, or none): it finishes, and every
  logged mean (losses, retrieval, zero-shot) equals a single process's on the same data;
* resume across strategies: a single-process checkpoint resumes under DDP and a DDP checkpoint resumes in a
  single process, each continuing the schedule at the saved position.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import run_ranks

REPO = Path(__file__).resolve().parents[2]
TINY, DDP = str(REPO / "conf/flava/tiny.yaml"), str(REPO / "conf/trainer/ddp.yaml")
STAGED = str(REPO / "conf/flava/staged.yaml")
# small and quick: the preset's precision/clipping/strategy stay, only the accelerator and sizes change
COMMON = [
    "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0",
    "--data.init_args.batch_size=8", "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false",
    "--data.init_args.streams.pairs.init_args.dataset.init_args.num=128",
]
VAL = ["--data.init_args.val_streams.pairs.init_args.dataset.init_args.num=100", "--trainer.limit_val_batches=1.0"]


class BatchRecorder:
    """Callback recording the schedule position of every training batch."""

    def __new__(cls):
        import lightning as L

        class _Recorder(L.Callback):
            def __init__(self) -> None:
                self.positions: list[int] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self.positions.append(int(batch["batch_index"]))

        return _Recorder()


def build(args: list[str]):
    from vlm.cli import VLMCLI

    return VLMCLI(args=args, run=False)


def fit(args: list[str], ckpt_path: str | None = None):
    cli = build(args)
    rec = BatchRecorder()
    cli.trainer.callbacks.append(rec)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli, rec.positions


def validate(args: list[str]) -> dict[str, float]:
    cli = build(args)
    out = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    return {k: float(v) for k, v in out[0].items()}


def run_rank(out: Path) -> None:
    """Body of every rank: each scenario in turn, results written per rank."""
    from vlm.callbacks import FreezeSchedule, ObjectiveWeightSchedule

    rank = int(os.environ["RANK"])
    report: dict = {}
    scenarios = {
        "round_robin": [],
        "weighted": ["--data.init_args.schedule={class_path: vlm.data.schedule.Weighted, init_args: {weights: {pairs: 2.0, images: 1.0, text: 1.0}}}"],
        "accumulate": ["--data.init_args.schedule=accumulate"],
        "staged": ["--config", STAGED],
    }
    for name, extra in scenarios.items():
        if name == "staged":  # keeps the overlay's callbacks (its checkpoint callback needs checkpointing on)
            args = [a for a in COMMON if a != "--trainer.enable_checkpointing=false"] + extra
        else:
            args = [*COMMON, *extra, "--trainer.callbacks=[]"]
        cli = build(["--config", TINY, "--config", DDP, *args, "--trainer.max_steps=6"])
        if name == "staged":  # the overlay's switch at step 300, moved to step 3 of this short run
            for cb in cli.trainer.callbacks:
                if isinstance(cb, (FreezeSchedule, ObjectiveWeightSchedule)):
                    cb.stages[-1].at_step = 3
            cli.trainer.callbacks = [c for c in cli.trainer.callbacks
                                     if isinstance(c, (FreezeSchedule, ObjectiveWeightSchedule))]
        initial = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        final = cli.model.state_dict()
        torch.save({k: v.detach().cpu() for k, v in final.items()}, out / f"{name}-rank{rank}.pt")
        opt = cli.trainer.optimizers[0]
        group_wd = {id(q): g["weight_decay"] for g in opt.param_groups for q in g["params"]}
        wd = cli.model.weight_decay
        report[name] = {
            # every trainable parameter (the ones unfrozen mid-run too) sits in the group parameter_groups() gives
            "groups_ok": all(group_wd.get(id(q)) == (wd if cli.model.decays(n, q) else 0.0)
                             for n, q in cli.model.named_parameters() if q.requires_grad),
            "walks": cli.model._graph_cover.walks,
            "global_step": cli.trainer.global_step,
            "changed": sorted({k.removeprefix("core.").split(".")[0] for k, v in final.items()
                               if not torch.equal(v, initial[k])}),
        }

    # evaluation with uneven shards: 100 pairs in batches of 60 (rank 0: 60 rows, rank 1: 40) or 100 (rank 1: none)
    for bs in (60, 100):
        report[f"validate{bs}"] = validate(["--config", TINY, "--config", DDP, *COMMON, *VAL,
                                            "--trainer.callbacks=[]",
                                            f"--data.init_args.val_streams.pairs.init_args.batch_size={bs}"])

    # resume across strategies: the single-process checkpoint continues under DDP ...
    _, positions = fit(["--config", TINY, "--config", DDP, *COMMON, "--trainer.callbacks=[]", "--trainer.max_steps=6"],
                       ckpt_path=str(out / "single.ckpt"))
    report["resumed_from_single"] = positions
    # ... and a DDP checkpoint for the single process to continue
    cli, _ = fit(["--config", TINY, "--config", DDP, *COMMON, "--trainer.callbacks=[]", "--trainer.max_steps=3"])
    cli.trainer.save_checkpoint(out / "ddp.ckpt")  # every rank takes part (the DataModule gathers rank states)
    (out / f"report-rank{rank}.json").write_text(json.dumps(report))


def single_args() -> list[str]:
    return ["--config", TINY, "--config", DDP, *[a for a in COMMON if a != "--trainer.devices=2"],
            "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.callbacks=[]"]


@pytest.mark.ddp
@pytest.mark.slow
def test_tiny_flava_under_ddp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("VLM_CACHE_DIR", str(cache))
    # a single-process checkpoint after 3 steps, for the ranks to resume
    cli, _ = fit([*single_args(), "--trainer.max_steps=3"])
    cli.trainer.save_checkpoint(tmp_path / "single.ckpt")

    run_ranks(__file__, tmp_path, cwd=tmp_path, env={"VLM_CACHE_DIR": str(cache)})
    reports = [json.loads((tmp_path / f"report-rank{r}.json").read_text()) for r in range(2)]

    # 1. every schedule and the staged freeze: parameters bitwise equal across ranks, every tower trained
    towers = {"image_encoder", "text_encoder", "multimodal_encoder", "objectives"}
    for name in ("round_robin", "weighted", "accumulate", "staged"):
        a, b = (torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(2))
        assert a.keys() == b.keys()
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differing, f"{name}: parameters differ across ranks: {differing[:5]}"
        rep = reports[0][name]
        assert rep["global_step"] == 6 and rep["groups_ok"], name
        assert towers <= set(rep["changed"]), f"{name}: untrained parts {towers - set(rep['changed'])}"
        # one graph walk per (stream, trainable set), not per step: 3 streams; the staged run has 2 trainable sets
        assert rep["walks"] <= (6 if name == "staged" else 3), (name, rep["walks"])

    # 2. uneven evaluation shards finish, and the means equal a single process's on the same data
    for bs in (60, 100):
        single = validate([*single_args(), *VAL, f"--data.init_args.val_streams.pairs.init_args.batch_size={bs}"])
        for rep in reports:
            got = rep[f"validate{bs}"]
            assert got.keys() == single.keys(), (sorted(got), sorted(single))
            for k, v in single.items():
                assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (bs, k, got[k], v)
        assert {"val/retrieval/t2i_R@1", "val/zeroshot/top1", "val/pairs/gc/loss"} <= set(single)

    # 3. resume across strategies: the schedule continues where the checkpoint stopped
    assert reports[0]["resumed_from_single"] == reports[1]["resumed_from_single"] == [3, 4, 5]
    _, positions = fit([*single_args(), "--trainer.max_steps=6"], ckpt_path=str(tmp_path / "ddp.ckpt"))
    assert positions == [3, 4, 5]


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
