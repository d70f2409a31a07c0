"""A table of held-out examples at validation: the image, the ground truth and what the model made of it.

    trainer:
      callbacks:
        - class_path: vlm.callbacks.PredictionsTable
          init_args: {max_rows: 8, every_n_epochs: 1}

At every ``every_n_epochs``-th validation run (the training streams are endless, so a "validation epoch" is one
validation run, at each ``val_check_interval``) the callback takes the first ``max_rows`` rows of each validation
stream it can show and writes them out once the validation run ends:

* **prompt streams** (``FewShotPrompts``, ``PaLIPrompts``: batches with ``answers`` and ``task``) of a generative
  model (Flamingo, PaLI): the model's greedy answer or caption beside the references (the texts the validation
  step generated, its output's ``predictions``; else ``generate_batch`` + ``decode`` here, as ``predict_step``);
  an output holding ``<locNNNN>`` boxes (PaLI detection, ``vlm.models.pali.parse_detections``) is drawn as boxes
  on the image;
* **pair streams** of a contrastive model (FLAVA: ``encode_image`` / ``encode_text``): the ``top_k`` texts of
  the batch nearest to each image, with their cosine similarities, beside the image's own caption;
* ``detection_prompt`` (PaLI): the model also runs this prompt on the table's images (``model.detect``) and its
  parsed boxes are drawn.

Other streams (loss-only ones) are left out. Where the rows go, by logger (rank 0 only):

* ``WandbLogger``: a ``wandb.Table`` under ``val/predictions`` (columns ``COLUMNS``; images are ``wandb.Image``
  with ``boxes=``). wandb stores a table's images in a ``run_table`` artifact staged outside the run directory
  (uploaded by ``wandb sync``), so the rows are also written into the run's ``files/`` as for CSV below (and
  saved with the run: ``wandb sync`` uploads them);
* ``TensorBoardLogger``: each row's image (boxes drawn) and its text under ``val/predictions/<stream>/<i>``;
* ``CSVLogger`` (and any logger with a ``log_dir``): ``predictions.jsonl`` in the log dir, one JSON line per row,
  with the image as a PNG under ``predictions/``.

Bounded: at most ``max_rows`` rows per stream and ``max_streams`` streams, images no larger than ``image_px``,
texts cut at ``max_chars``. Under FSDP the table is skipped (one rank alone cannot run the sharded model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from vlm.errors import VLMConfigError
from vlm.report import draw_boxes

#: the table's columns, in order (``boxes`` is drawn on ``image`` rather than shown as a column)
COLUMNS = ["step", "stream", "key", "image", "prompt", "ground_truth", "prediction"]
TABLE_KEY = "val/predictions"
JSONL_NAME = "predictions.jsonl"


def slice_rows(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` rows of a collated batch: per-row tensors and lists are cut, scalars kept as they are."""
    size = next((int(v.shape[0]) for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0), None)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0 and size is not None and v.shape[0] == size:
            out[k] = v[:n]
        elif isinstance(v, list) and size is not None and len(v) == size:
            out[k] = v[:n]
        else:
            out[k] = v
    return out


def to_uint8_image(pixels: Tensor, mean: Sequence[float], std: Sequence[float], max_px: int) -> np.ndarray:
    """A normalised ``[3,H,W]`` image back to ``uint8 [H,W,3]``, shrunk so its longer side is at most ``max_px``."""
    x = pixels.detach().float().cpu()
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    h, w = x.shape[:2]
    if max(h, w) > max_px:
        from PIL import Image

        scale = max_px / max(h, w)
        x = np.asarray(Image.fromarray(x).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                 Image.BICUBIC))
    return x


def wandb_boxes(boxes: Sequence[tuple[Sequence[float], str]]) -> dict[str, Any] | None:
    """``boxes=`` of ``wandb.Image``: one ``predictions`` layer in relative ``[0,1]`` coordinates, one class per label."""
    if not boxes:
        return None
    labels = list(dict.fromkeys(str(label) for _, label in boxes))
    data = []
    for (x0, y0, x1, y1), label in boxes:
        data.append({"position": {"minX": float(x0), "minY": float(y0), "maxX": float(x1), "maxY": float(y1)},
                     "class_id": labels.index(str(label)), "box_caption": str(label)})
    return {"predictions": {"box_data": data, "class_labels": dict(enumerate(labels))}}


def _device(module) -> torch.device:
    device = getattr(module, "device", None)
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return torch.device(device)


def _cut(text: Any, limit: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _references(refs: Any) -> str:
    if isinstance(refs, (list, tuple)):
        return " | ".join(dict.fromkeys(str(r) for r in refs))
    return "" if refs is None else str(refs)


class PredictionsTable(Callback):
    """Validation examples with ground truth and the model's output, as a table on the run's dashboard.

    Args:
        max_rows: rows per validation stream (the stream's first rows, from its first batches).
        every_n_epochs: log at every n-th validation run (the first one included; sanity checks never).
        streams: the validation streams to show; default every stream the model can show (see module doc).
        top_k: texts listed per image for pair streams of a contrastive model.
        detection_prompt: a prompt the model's ``detect`` answers on the table's images (PaLI:
            ``"detect circle ; square ; triangle ; cross ; star"``); its boxes are drawn on the image.
        max_streams: at most this many streams per table.
        image_px: longer side of a logged image at most (larger ones are shrunk).
        max_chars: texts are cut to this many characters.
    """

    def __init__(self, max_rows: int = 8, every_n_epochs: int = 1, streams: list[str] | None = None, top_k: int = 3,
                 detection_prompt: str | None = None, max_streams: int = 6, image_px: int = 256,
                 max_chars: int = 300) -> None:
        for name, value in (("max_rows", max_rows), ("every_n_epochs", every_n_epochs), ("top_k", top_k),
                            ("max_streams", max_streams), ("image_px", image_px), ("max_chars", max_chars)):
            if int(value) < 1:
                raise VLMConfigError(f"PredictionsTable: {name}={value}; it must be at least 1.")
        self.max_rows, self.every_n_epochs, self.top_k = int(max_rows), int(every_n_epochs), int(top_k)
        self.streams = list(streams) if streams is not None else None
        self.detection_prompt, self.max_streams = detection_prompt, int(max_streams)
        self.image_px, self.max_chars = int(image_px), int(max_chars)
        self.rows: list[dict[str, Any]] = []  # the latest table's rows (images as uint8 HWC arrays)
        self._runs = 0
        self._due = False
        self._collecting: list[dict[str, Any]] = []
        self._warned = False

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._collecting = []
        self._due = False
        from lightning.pytorch.loggers.logger import DummyLogger

        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if not [lg for lg in trainer.loggers if not isinstance(lg, DummyLogger)]:
            return  # no logger (`logger: false`, fast_dev_run): nobody would see the rows
        self._runs += 1
        self._due = (self._runs - 1) % self.every_n_epochs == 0
        if self._due and "fsdp" in type(trainer.strategy).__name__.lower():
            self._due = False
            if not self._warned:
                rank_zero_warn("PredictionsTable: skipped under FSDP (rank 0 alone cannot run the sharded model).")
                self._warned = True

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._due or not isinstance(batch, Mapping):
            return
        stream = str(batch.get("stream"))
        if self.streams is not None and stream not in self.streams:
            return
        have = sum(r["stream"] == stream for r in self._collecting)
        seen = {r["stream"] for r in self._collecting}
        if have >= self.max_rows or (stream not in seen and len(seen) >= self.max_streams):
            return
        done = outputs.get("predictions") if isinstance(outputs, Mapping) else None
        with torch.no_grad():
            rows = self.rows_for_batch(trainer, pl_module, batch, self.max_rows - have, predictions=done)
        step = int(trainer.global_step)
        for r in rows:
            r["step"] = step
        self._collecting.extend(rows)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._due or not self._collecting:
            return
        self.rows, self._collecting = self._collecting, []
        for logger in trainer.loggers:
            self.write(logger, self.rows, int(trainer.global_step))

    # ------------------------------------------------------------------ rows
    def _mean_std(self, trainer, stream: str) -> tuple[Sequence[float], Sequence[float]]:
        from vlm.data.transforms import CLIP_MEAN, CLIP_STD

        dm = getattr(trainer, "datamodule", None)
        spec = (getattr(dm, "val_streams", None) or {}).get(stream)
        image = getattr(getattr(spec, "transform", None), "image", None)
        return getattr(image, "mean", CLIP_MEAN), getattr(image, "std", CLIP_STD)

    def rows_for_batch(self, trainer, pl_module, batch: Mapping[str, Any], n: int,
                       predictions: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Up to ``n`` table rows from one validation batch (``[]`` for a stream the model cannot show).

        ``predictions``: the texts the validation step already generated for this batch (its output's
        ``"predictions"``); without them a prompt batch's first ``n`` rows are generated here.
        """
        pixels = batch.get("pixel_values")
        if not isinstance(pixels, Tensor) or n < 1:
            return []
        is_prompt = getattr(pl_module, "is_prompt_batch", None)
        if callable(is_prompt) and is_prompt(batch) and callable(getattr(pl_module, "generate_batch", None)):
            rows = self._generated_rows(pl_module, slice_rows(batch, n), predictions)
        elif (callable(getattr(pl_module, "encode_image", None)) and callable(getattr(pl_module, "encode_text", None))
              and pixels.dim() == 4 and isinstance(batch.get("input_ids"), Tensor)):
            rows = self._retrieval_rows(pl_module, batch, n)
        else:
            return []
        mean, std = self._mean_std(trainer, str(batch.get("stream")))
        sub = pixels[: len(rows)]
        if sub.dim() == 5:  # [B, images, 3, H, W]: the query is the last image (few-shot prompts)
            sub = sub[:, -1]
        keys = batch.get("key")
        for i, row in enumerate(rows):
            row["image"] = to_uint8_image(sub[i], mean, std, self.image_px)
            row["key"] = str(keys[i]) if isinstance(keys, (list, tuple)) and i < len(keys) else str(i)
            row["stream"] = str(batch.get("stream"))
        if self.detection_prompt and callable(getattr(pl_module, "detect", None)) and sub.dim() == 4:
            for row, found in zip(rows, self._detect(pl_module, sub.to(_device(pl_module)))):
                row["boxes"] = row["boxes"] + found
                sep = "\n" if row["prediction"] else ""
                row["prediction"] = _cut(f"{row['prediction']}{sep}detected: {self._boxes_text(found)}", self.max_chars)
        return rows

    def _prompt_text(self, pl_module, batch: Mapping[str, Any], i: int) -> str:
        text = batch.get("text")
        if isinstance(text, (list, tuple)) and i < len(text):
            return _cut(text[i], self.max_chars)
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        tok = getattr(pl_module, "tokenizer", None)
        if not isinstance(ids, Tensor) or tok is None:
            return ""
        row = ids[i][mask[i].bool()] if isinstance(mask, Tensor) else ids[i]
        text = tok.decode(row.tolist(), skip_special_tokens=False)
        # a few-shot prompt is long: keep its end, where the query is
        return text if len(text) <= self.max_chars else "…" + text[-(self.max_chars - 1):]

    def _generated_rows(self, pl_module, batch: Mapping[str, Any],
                        predictions: Sequence[str] | None = None) -> list[dict[str, Any]]:
        from vlm.models.pali import parse_detections

        n = int(batch["pixel_values"].shape[0])
        if predictions is not None and len(predictions) >= n:
            preds = [str(p) for p in predictions[:n]]
        else:
            moved = {k: v.to(_device(pl_module)) if isinstance(v, Tensor) else v for k, v in batch.items()}
            preds = pl_module.decode(pl_module.generate_batch(moved))
        refs = batch.get("answers") or [None] * len(preds)
        return [{"prompt": self._prompt_text(pl_module, batch, i), "ground_truth": _cut(_references(refs[i]), self.max_chars),
                 "prediction": _cut(p, self.max_chars), "boxes": parse_detections(p)} for i, p in enumerate(preds)]

    def _retrieval_rows(self, pl_module, batch: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
        dev = _device(pl_module)
        ids = batch["input_ids"].to(dev)
        mask = batch.get("attention_mask")
        image = pl_module.encode_image(batch["pixel_values"][:n].to(dev)).float()
        text = pl_module.encode_text(ids, mask.to(dev) if isinstance(mask, Tensor) else None).float()
        sim = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
        k = min(self.top_k, sim.shape[1])
        scores, idx = sim.topk(k, dim=1)
        texts = batch.get("text")
        if not (isinstance(texts, (list, tuple)) and len(texts) == ids.shape[0]):
            tok = getattr(pl_module, "tokenizer", None) or pl_module._get_tokenizer()
            texts = tok.batch_decode(batch["input_ids"].tolist(), skip_special_tokens=True)
        rows = []
        for i in range(image.shape[0]):
            listed = [f"{r + 1}. {_cut(texts[j], 120)} ({s:.2f}){' ✓' if j == i else ''}"
                      for r, (j, s) in enumerate(zip(idx[i].tolist(), scores[i].tolist()))]
            rows.append({"prompt": f"top-{k} of {len(texts)} texts", "ground_truth": _cut(texts[i], self.max_chars),
                         "prediction": _cut("\n".join(listed), self.max_chars), "boxes": [],
                         "retrieved": [int(j) for j in idx[i].tolist()]})
        return rows

    def _detect(self, pl_module, pixels: Tensor) -> list[list[tuple[list[float], str]]]:
        tok = pl_module.tokenizer
        ids = tok(self.detection_prompt, add_special_tokens=False)["input_ids"]
        end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        ids = torch.tensor(ids + ([end] if end is not None else []), device=pixels.device)
        ids = ids.unsqueeze(0).expand(pixels.shape[0], -1)
        return pl_module.detect(pixels, ids, torch.ones_like(ids))

    @staticmethod
    def _boxes_text(boxes: Sequence[tuple[Sequence[float], str]]) -> str:
        return "; ".join(f"{label} ({', '.join(f'{c:.2f}' for c in box)})" for box, label in boxes) or "none"

    # ------------------------------------------------------------------ writing
    def write(self, logger, rows: list[dict[str, Any]], step: int) -> None:
        """Send ``rows`` to one logger (see the module doc for what each kind gets)."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        if isinstance(logger, WandbLogger):
            import wandb

            data = [[r["step"], r["stream"], r["key"],
                     wandb.Image(r["image"], boxes=wandb_boxes(r["boxes"])), r["prompt"], r["ground_truth"],
                     r["prediction"]] for r in rows]
            logger.log_table(TABLE_KEY, columns=COLUMNS, data=data, step=step)
            # wandb keeps a table's images in an artifact staged outside the run directory: a copy of the rows
            # inside it keeps the run readable on its own (`vlm report`); saved, so `wandb sync` uploads it too
            run = logger.experiment
            files = Path(run.dir)
            write_jsonl(files, rows)
            for pattern in (JSONL_NAME, "predictions/*.png"):
                run.save(str(files / pattern), base_path=str(files), policy="end")
        elif isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            for i, r in enumerate(rows):
                tag = f"{TABLE_KEY}/{r['stream']}/{i}"
                writer.add_image(tag, draw_boxes(r["image"], r["boxes"]), global_step=step, dataformats="HWC")
                writer.add_text(tag, self.markdown(r), global_step=step)
        elif isinstance(getattr(logger, "log_dir", None), (str, os.PathLike)):  # CSVLogger and the like
            write_jsonl(Path(logger.log_dir), rows)

    @staticmethod
    def markdown(row: Mapping[str, Any]) -> str:
        return (f"**{row['stream']}** `{row['key']}`  \nprompt: {row['prompt']}  \nground truth: {row['ground_truth']}"
                f"  \nprediction: {row['prediction']}")


def write_jsonl(log_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Append ``rows`` to ``log_dir/predictions.jsonl``; each image is saved as ``predictions/<step>_<stream>_<i>.png``."""
    from PIL import Image

    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "predictions").mkdir(exist_ok=True)
    out = log_dir / JSONL_NAME
    with out.open("a", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            rel = f"predictions/{r['step']:08d}_{r['stream']}_{i}.png"
            Image.fromarray(r["image"]).save(log_dir / rel)
            line = {k: r[k] for k in COLUMNS if k != "image"}
            line["image"] = rel
            line["boxes"] = [[[float(c) for c in box], str(label)] for box, label in r["boxes"]]
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return out


__all__ = ["COLUMNS", "PredictionsTable", "TABLE_KEY", "draw_boxes", "slice_rows", "to_uint8_image", "wandb_boxes",
           "write_jsonl"]
