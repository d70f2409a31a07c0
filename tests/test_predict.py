"""`vlm predict` and `vlm validate` on the tiny Flamingo and PaLI configs, through the real CLI, after a 2-step `vlm fit`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from vlm.callbacks import PredictionWriter
from vlm.callbacks.predictions import records_of
from vlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "conf/flamingo/tiny.yaml")
PREDICT = str(ROOT / "conf/flamingo/predict.yaml")
VAL = "--data.init_args.val_streams"
# a CPU-sized run: small evaluation sets in one batch each, no sanity validation, no wandb
SMALL = [
    f"{VAL}.interleaved.init_args.dataset.init_args.num=8",
    *(f"{VAL}.{s}.init_args.dataset.init_args.num=6" for s in ("vqa_0shot", "vqa_4shot", "caption_0shot")),
    *(f"{VAL}.{s}.init_args.transform.init_args.support.init_args.num=20" for s in
      ("vqa_0shot", "vqa_4shot", "caption_0shot")),
    "--data.init_args.batch_size=4",
    "--model.init_args.generation={max_new_tokens: 4}",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _overlay(cfg: dict) -> list[str]:
    return ["--config", yaml.safe_dump(cfg)]


@pytest.mark.slow
def test_fit_then_predict_and_validate_through_the_cli(run_dir):
    ckpt_dir = run_dir / "ckpt"
    fit_callbacks = {"trainer": {"logger": False, "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(ckpt_dir), "save_last": True, "every_n_train_steps": 2}}]}}
    assert main(["fit", "--config", TINY, *_overlay(fit_callbacks), *SMALL, "--trainer.max_steps=2"]) == 0
    ckpt = ckpt_dir / "last.ckpt"
    assert ckpt.exists(), sorted(p.name for p in ckpt_dir.iterdir())

    num = 6
    rc = main(["predict", "--config", TINY, "--config", PREDICT, *SMALL,
               f"--data.init_args.predict_streams.vqa_4shot.init_args.dataset.init_args.num={num}",
               "--data.init_args.predict_streams.vqa_4shot.init_args.batch_size=4",
               "--data.init_args.predict_streams.vqa_4shot.init_args.transform.init_args.support.init_args.num=20",
               "--ckpt_path", str(ckpt)])
    assert rc == 0
    out = run_dir / "runs/predictions/flamingo-tiny.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == num  # one line per query, over two batches (4 + 2)
    assert len({r["key"] for r in rows}) == num
    for row in rows:
        assert row["key"].startswith("val-") and row["stream"] == "vqa_4shot"
        assert isinstance(row["prediction"], str)
        assert isinstance(row["references"], list) and row["references"] and all(
            isinstance(a, str) for a in row["references"])

    csv_logger = {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                         "init_args": {"save_dir": str(run_dir / "logs"), "name": "val"}}}}
    assert main(["validate", "--config", TINY, *_overlay(csv_logger), *SMALL, "--ckpt_path", str(ckpt)]) == 0
    (metrics,) = (run_dir / "logs").rglob("metrics.csv")
    with metrics.open() as f:
        logged = set(next(csv.reader(f)))
    assert {"val/vqa_0shot/vqa_accuracy", "val/vqa_4shot/vqa_accuracy", "val/caption_0shot/cider"} <= logged


def test_predict_without_predict_streams_is_one_clear_error(run_dir, capsys):
    rc = main(["predict", "--config", TINY, *SMALL, "--trainer.logger=false"])
    assert rc == 2
    assert "predict_streams" in capsys.readouterr().err.strip().splitlines()[-1]


def test_prediction_writer_lines_and_rank_files(tmp_path):
    writer = PredictionWriter(str(tmp_path / "p.jsonl"))
    assert writer.rank_path(0, 1) == tmp_path / "p.jsonl"
    assert writer.rank_path(1, 2) == tmp_path / "p.rank1.jsonl"
    assert records_of([{"key": "a", "x": torch.tensor([1, 2])}, {"key": "b"}]) == [{"key": "a", "x": [1, 2]},
                                                                                   {"key": "b"}]
    assert records_of(torch.tensor([[1.0], [2.0]])) == [[[1.0], [2.0]]]
    # rank files merge in key order, whichever rank held which batch
    writer.rank_path(0, 2).write_text('{"key": "k3"}\n{"key": "k1"}\n')
    writer.rank_path(1, 2).write_text('{"key": "k2"}\n')
    writer.merge(2)
    assert [json.loads(line)["key"] for line in (tmp_path / "p.jsonl").read_text().splitlines()] == ["k1", "k2", "k3"]
    assert not list(tmp_path.glob("p.rank*"))


PALI = str(ROOT / "conf/pali/tiny.yaml")
PALI_PREDICT = str(ROOT / "conf/pali/predict.yaml")
_PALI_DATA = yaml.safe_load(Path(PALI).read_text())["data"]["init_args"]
# the tiny PaLI config shrunk to a CPU test: every training and evaluation set small, short generations
PALI_SMALL = [
    *(f"--data.init_args.streams.{s}.init_args.dataset.init_args.num=16" for s in _PALI_DATA["streams"]),
    *(f"{VAL}.{s}.init_args.dataset.init_args.num=4" for s in _PALI_DATA["val_streams"]),
    "--data.init_args.batch_size=4",
    "--model.init_args.generation={max_new_tokens: 4}",
    "--model.init_args.warmup_steps=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.mark.slow
def test_pali_fit_then_predict_through_the_cli(run_dir):
    ckpt_dir = run_dir / "ckpt"
    fit_callbacks = {"trainer": {"logger": False, "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(ckpt_dir), "save_last": True, "every_n_train_steps": 2}}]}}
    assert main(["fit", "--config", PALI, *_overlay(fit_callbacks), *PALI_SMALL, "--trainer.max_steps=2"]) == 0
    ckpt = ckpt_dir / "last.ckpt"
    assert ckpt.exists(), sorted(p.name for p in ckpt_dir.iterdir())

    num = 6
    stream = "--data.init_args.predict_streams.vqa.init_args"
    rc = main(["predict", "--config", PALI, "--config", PALI_PREDICT, *PALI_SMALL,
               f"{stream}.dataset.init_args.num={num}", f"{stream}.batch_size=4", "--ckpt_path", str(ckpt)])
    assert rc == 0
    out = run_dir / "runs/predictions/pali-tiny.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == num  # one line per question, over two batches (4 + 2)
    assert len({r["key"] for r in rows}) == num
    for row in rows:
        assert row["key"].startswith("val-") and row["stream"] == "vqa"
        assert isinstance(row["prediction"], str)
        assert isinstance(row["references"], list) and row["references"] and all(
            isinstance(a, str) for a in row["references"])


def test_pali_predict_overlay_is_forty_vqa_answers_to_jsonl():
    cfg = yaml.safe_load(Path(PALI_PREDICT).read_text())
    (name, stream), = cfg["data"]["init_args"]["predict_streams"].items()
    args = stream["init_args"]
    assert args["dataset"]["init_args"]["num"] == 40 and args["dataset"]["init_args"]["split"] == "val"
    assert args["transform"]["class_path"] == "vlm.models.pali.PaLIPrompts"
    assert args["transform"]["init_args"]["task"] == "vqa"
    (writer,) = cfg["trainer"]["callbacks"]
    assert writer["init_args"]["path"] == "runs/predictions/pali-tiny.jsonl"
