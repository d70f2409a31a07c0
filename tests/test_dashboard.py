"""What a user sees of a run: the dashboard keys, the validation predictions table and `vlm report`.

Tiny fits of the real configs (few steps, validation once) are read back from disk: the wandb run through wandb's
own reader (`wandb leet inspect --json`), the CSV run through its files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vlm.callbacks.tables import COLUMNS, PredictionsTable, wandb_boxes, write_jsonl
from vlm.errors import VLMConfigError

ROOT = Path(__file__).resolve().parents[1]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def wandb_json(*args: str) -> list[dict]:
    exe = shutil.which("wandb") or os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run([exe, "leet", "inspect", "--json", *args], capture_output=True, text=True, timeout=120,
                         check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def denormalised(pixels: torch.Tensor) -> np.ndarray:
    """A normalised [3,H,W] image back to uint8 HWC, written out by hand from the transform's formula."""
    x = pixels.double().numpy()
    x = x * np.array(CLIP_STD)[:, None, None] + np.array(CLIP_MEAN)[:, None, None]
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def fit(args: list[str]):
    """A `vlm fit` through the CLI classes, returning the CLI (model, datamodule, trainer at hand)."""
    from vlm.cli import VLMCLI

    cli = VLMCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


@pytest.fixture
def flava_run(tmp_path_factory):
    """Tiny FLAVA, 3 steps round-robin, validation once, logged to an offline wandb run."""
    tmp = tmp_path_factory.mktemp("flava_wandb")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DATA_DIR", str(tmp / "wandb-data"))  # where wandb stages a table's artifact
    mp.setenv("VLM_CACHE_DIR", str(tmp / "cache"))
    callbacks = yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
        {"class_path": "vlm.callbacks.Throughput", "init_args": {"peak_flops": 1.0e12}},  # a CPU has no known peak
        {"class_path": "vlm.callbacks.PredictionsTable", "init_args": {"max_rows": 4}},
    ]}})
    cli = fit(["--config", str(ROOT / "conf/flava/tiny.yaml"), "--config", callbacks,
               "--data.init_args.streams.pairs.init_args.dataset.init_args.num=128", "--data.init_args.batch_size=8",
               "--data.init_args.val_streams.pairs.init_args.batch_size=20", "--trainer.max_steps=3",
               "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
               "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    run_dir = Path(cli.trainer.logger.run_dir)
    import wandb

    wandb.finish()
    yield cli, run_dir
    mp.undo()


def test_flava_dashboard_keys_table_and_report(flava_run):
    cli, run_dir = flava_run
    records = wandb_json(str(run_dir))
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged = {k for item in history for k in item}

    # per stream and per objective losses, the objectives' own metrics, lr per group, grad norm, throughput
    for key in ["train/loss", "train/pairs/loss", "train/images/loss", "train/text/loss", "train/pairs/gc/loss",
                "train/pairs/itm/loss", "train/pairs/mmm/loss", "train/images/mim/loss", "train/text/mlm/loss",
                "train/text/mlm/accuracy", "train/pairs/mmm/text_accuracy", "train/pairs/itm/accuracy",
                "train/pairs/gc/i2t_accuracy", "train/pairs/gc/t2i_accuracy", "train/pairs/gc/temperature",
                "lr-AdamW/decay", "lr-AdamW/no_decay", "train/grad_norm", "perf/samples_per_sec",
                "perf/tokens_per_sec", "perf/mfu", "perf/pairs/samples_per_sec", "perf/pairs/mfu",
                "val/pairs/gc/loss", "val/retrieval/t2i_R@1", "val/zeroshot/top1"]:
        assert key in logged, f"{key} not logged; got {sorted(logged)}"
    # lr follows the config's linear warm-up, lr * (step + 1) / warmup_steps, written out: 1e-3 * (s + 1) / 50
    lrs = {int(i["trainer/global_step"]): i["lr-AdamW/decay"] for i in history if "lr-AdamW/decay" in i}
    assert lrs and all(v == pytest.approx(1e-3 * (s + 1) / 50) for s, v in lrs.items()), lrs
    # temperature is 1 / exp(logit_scale), both logged by the contrastive objective
    gc = next(i for i in history if "train/pairs/gc/temperature" in i)
    assert gc["train/pairs/gc/temperature"] == pytest.approx(math.exp(-gc["train/pairs/gc/logit_scale"]), rel=1e-5)

    # the table: one history entry, and wandb's own table file (in the run's artifact) references image files
    [entry] = [i for i in history if i.get("val/predictions._type") == "table-file"]
    assert entry["val/predictions.nrows"] == 4 and entry["val/predictions.ncols"] == len(COLUMNS)
    [art] = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "run_table"]
    files = {c["path"]: c["local_path"] for c in art["manifest"]["contents"]}
    [table_path] = [p for p in files if p.endswith(".table.json")]
    table = json.loads(Path(files[table_path]).read_text())
    assert table["columns"] == COLUMNS and len(table["data"]) == 4
    for row in table["data"]:
        cell = row[COLUMNS.index("image")]
        assert cell["_type"] == "image-file" and cell["path"] in files and (cell["width"], cell["height"]) == (64, 64)
        assert Path(files[cell["path"]]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the rows against an independent computation: float64 cosine similarities of the model's own embeddings
    model, table_cb = cli.model.eval(), next(c for c in cli.trainer.callbacks if isinstance(c, PredictionsTable))
    batch = next(iter(cli.datamodule.val_dataloader()[0]))
    with torch.no_grad():
        img = model.encode_image(batch["pixel_values"][:4]).double()
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"]).double()
    sim = (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T
    rows = table_cb.rows
    assert [r["stream"] for r in rows] == ["pairs"] * 4
    for i, r in enumerate(rows):
        assert r["retrieved"] == sim[i].argsort(descending=True)[:3].tolist()
        assert r["ground_truth"] == batch["text"][i]
        assert r["prediction"].splitlines()[0].startswith("1. " + batch["text"][r["retrieved"][0]][:40])
        assert np.abs(r["image"].astype(int) - denormalised(batch["pixel_values"][i]).astype(int)).max() <= 1
    assert [json.loads(line)["ground_truth"] for line in (run_dir / "files/predictions.jsonl").open()] == \
        [r["ground_truth"] for r in rows]
    saved = {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}
    assert {"predictions.jsonl", *(json.loads(line)["image"] for line in (run_dir / "files/predictions.jsonl").open())} <= saved

    # `vlm report` renders the same panels from the run folder alone
    from vlm.cli import main

    out = run_dir.parent / "report.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    for title in ["Loss per stream and objective", "Objective metrics", "Validation metrics", "Learning rate",
                  "Gradient norm", "Throughput", "Gate values", "Final metrics", "Validation predictions"]:
        assert f"<h2>{title}</h2>" in page
    plots = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', page)
    # every panel with data has its plot; FLAVA has no gates, which the page says
    assert set(plots) >= {"Loss per stream and objective", "Learning rate", "Gradient norm", "Throughput"}
    assert "Gate values" not in plots and "not logged in this run" in page
    assert page.count('width="128"') == 4  # the 4 predictions with their images
    final = float(re.search(r"<td>train/pairs/gc/temperature</td><td>([^<]+)</td>", page).group(1))
    assert final == pytest.approx(gc["train/pairs/gc/temperature"], rel=1e-3)


@pytest.mark.parametrize("shots_stream", ["vqa_4shot"])
def test_flamingo_csv_run_logs_gates_throughput_and_generated_rows(tmp_path, monkeypatch, shots_stream):
    """Tiny Flamingo with the CSV overlay: gates and throughput in metrics.csv, generated answers in
    predictions.jsonl beside the query image and the references."""
    monkeypatch.chdir(tmp_path)
    small = [f"--data.init_args.val_streams.{s}.init_args.batch_size=2" for s in ("vqa_0shot", "vqa_4shot", "caption_0shot")]
    callbacks = yaml.safe_dump({"trainer": {"callbacks": [  # tiny.yaml's, less checkpointing
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
        {"class_path": "vlm.callbacks.GateMonitor", "init_args": {"pattern": "*_gate", "every_n_steps": 1}},
        {"class_path": "vlm.callbacks.Throughput"},
        {"class_path": "vlm.callbacks.PredictionsTable", "init_args": {"max_rows": 2}},
    ]}})
    cli = fit(["--config", str(ROOT / "conf/flamingo/tiny.yaml"), "--config", str(ROOT / "conf/logger/csv.yaml"),
               "--config", callbacks, "--trainer.enable_checkpointing=false", *small,
               "--model.init_args.generation={max_new_tokens: 4}", "--data.init_args.batch_size=2",
               "--trainer.max_steps=1", "--trainer.val_check_interval=3",
               "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    log_dir = Path(cli.trainer.logger.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}
    gates = {k for k in logged if k.startswith("gates/") and k != "gates/mean"}
    # one tanh(alpha) per gate of each cross-attention layer (attention and feed-forward)
    names = [n for n, _ in cli.model.named_parameters() if n.endswith("_gate")]
    assert gates == {f"gates/{n}" for n in names} and len(names) >= 2
    assert logged["perf/vqa/samples_per_sec"] > 0 and logged["perf/interleaved/tokens_per_sec"] > 0
    assert "lr-AdamW/no_decay" in logged

    lines = [json.loads(line) for line in (log_dir / "predictions.jsonl").open()]
    assert {line["stream"] for line in lines} == {"vqa_0shot", "vqa_4shot", "caption_0shot"}
    assert set(lines[0]) >= {"step", "stream", "key", "prompt", "ground_truth", "prediction", "image", "boxes"}
    # each row against the validation batch it came from: references, the query image, the greedy answer
    streams = list(cli.datamodule.val_streams)
    batch = next(iter(cli.datamodule.val_dataloader()[streams.index(shots_stream)]))
    model = cli.model.eval()
    with torch.no_grad():
        answers = model.decode(model.generate_batch(batch))
    mine = [line for line in lines if line["stream"] == shots_stream]
    assert len(mine) == 2
    for i, line in enumerate(mine):
        assert line["ground_truth"] == " | ".join(dict.fromkeys(batch["answers"][i]))
        assert line["prediction"] == answers[i][:300]
        assert line["prompt"].endswith("Short answer:")
        image = np.asarray(Image.open(log_dir / line["image"]))
        query = batch["pixel_values"][i, -1]  # the last image slot of a few-shot prompt is the query
        assert np.abs(image.astype(int) - denormalised(query).astype(int)).max() <= 1


class _Detector(torch.nn.Module):
    """A generative model's interface (prompt batches in, text out) answering with fixed location tokens."""

    answer = "<loc0204><loc0102><loc0613><loc0511> circle ; <loc0000><loc0000><loc1023><loc1023> square"

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    @staticmethod
    def is_prompt_batch(batch):
        return batch.get("answers") is not None and batch.get("task") is not None

    def generate_batch(self, batch):
        return torch.zeros(batch["input_ids"].shape[0], 1, dtype=torch.long)

    def decode(self, tokens):
        return [self.answer] * tokens.shape[0]


def _prompt_batch(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"stream": "det", "task": "vqa", "pixel_values": torch.randn(n, 3, 16, 16, generator=g),
            "input_ids": torch.ones(n, 5, dtype=torch.long), "attention_mask": torch.ones(n, 5, dtype=torch.long),
            "answers": [["a circle"]] * n, "key": [f"k{i}" for i in range(n)], "text": ["detect"] * n}


def test_detection_boxes_reach_wandb_tensorboard_and_jsonl(tmp_path):
    cb = PredictionsTable(max_rows=2)
    rows = cb.rows_for_batch(trainer=None, pl_module=_Detector(), batch=_prompt_batch(), n=2)
    assert len(rows) == 2 and [r["key"] for r in rows] == ["k0", "k1"]
    # PaLI's order is y0 x0 y1 x1 over 1024 bins, read at bin centres: (bin + 0.5) / 1024
    want = [([102.5 / 1024, 204.5 / 1024, 511.5 / 1024, 613.5 / 1024], "circle"),
            ([0.5 / 1024, 0.5 / 1024, 1023.5 / 1024, 1023.5 / 1024], "square")]
    for (box, label), (wbox, wlabel) in zip(rows[0]["boxes"], want):
        assert label == wlabel and box == pytest.approx(wbox)
    layer = wandb_boxes(rows[0]["boxes"])["predictions"]
    assert layer["class_labels"] == {0: "circle", 1: "square"}
    assert layer["box_data"][0]["position"] == pytest.approx(
        {"minX": 102.5 / 1024, "minY": 204.5 / 1024, "maxX": 511.5 / 1024, "maxY": 613.5 / 1024})

    # TensorBoard: each row's image with its boxes drawn, read back with TensorBoard's reader
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in rows:
        r["step"] = 7
    tb = TensorBoardLogger(str(tmp_path / "tb"))
    cb.write(tb, rows, step=7)
    tb.experiment.flush()
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert tags == ["val/predictions/det/0", "val/predictions/det/1"]
    [event] = acc.Images(tags[0])
    drawn = np.asarray(Image.open(__import__("io").BytesIO(event.encoded_image_string)).convert("RGB"))
    assert event.step == 7 and drawn.shape == (16, 16, 3)
    # the box outline of "square" runs along the image border: the drawn pixels differ from the plain image there
    assert (drawn[0] != rows[0]["image"][0]).any()

    # CSV-style JSONL: the boxes and the image file
    path = write_jsonl(tmp_path / "csv", rows)
    line = json.loads(path.read_text().splitlines()[0])
    assert line["boxes"][0][1] == "circle" and line["boxes"][0][0] == pytest.approx(want[0][0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "csv" / line["image"])), rows[0]["image"])


def test_no_rows_without_a_logger_to_show_them():
    """`logger: false` and fast_dev_run's stand-in logger: the table computes nothing."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers.logger import DummyLogger

    cb = PredictionsTable()
    for loggers in ([], [DummyLogger()]):
        cb.on_validation_epoch_start(SimpleNamespace(sanity_checking=False, is_global_zero=True, loggers=loggers), None)
        assert cb._due is False
        cb.on_validation_batch_end(None, _Detector(), None, _prompt_batch(), 0)
        assert cb._collecting == []


def test_bad_settings_and_run_folders_give_one_clear_error(tmp_path, capsys):
    with pytest.raises(VLMConfigError, match="max_rows=0"):
        PredictionsTable(max_rows=0)
    from vlm.cli import main

    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "neither a wandb run" in err and "metrics.csv" in err
