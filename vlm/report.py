"""``vlm report RUN_DIR``: one static HTML page of a run's dashboard panels, readable offline.

    vlm report runs/wandb/offline-run-20261128_051433-y5eag82v        # -> that folder's report.html
    vlm report runs/lightning_logs/version_0 --out flava.html          # a CSV logger's folder

RUN_DIR is an offline (or synced) wandb run folder (``.../wandb/offline-run-...``, or a ``wandb`` folder: its
``latest-run``), or a CSVLogger folder holding ``metrics.csv``. The wandb history is read with wandb's own
reader (``wandb leet inspect --json``). The page holds, as PNG plots embedded in the HTML (matplotlib):
loss curves per stream and objective, the objectives' own metrics, validation metrics, learning rate per
parameter group, gradient norm, throughput, gate values, then the final value of every metric and the latest
validation predictions table (``vlm.callbacks.PredictionsTable``) with its images.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm.errors import VLMConfigError

#: A run's metric history: {key: [(step, value), ...]} in logging order.
History = dict[str, list[tuple[float, float]]]

#: the panels, in page order: (title, what it shows, which keys)
PANELS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("Loss per stream and objective", "train/<stream>/<objective>/loss, train/<stream>/loss and train/loss",
     lambda k: k.startswith("train/") and k.endswith("/loss") or k == "train/loss"),
    ("Objective metrics", "train/<stream>/<objective>/<metric>: accuracies, temperature, perplexity, ...",
     lambda k: k.startswith("train/") and k.count("/") == 3 and not k.endswith("/loss")),
    ("Validation metrics", "val/...: held-out losses, accuracies, retrieval, CIDEr",
     lambda k: k.startswith("val/")),
    ("Learning rate", "lr-<optimizer>/<parameter group> (LearningRateMonitor)", lambda k: k.startswith("lr-")),
    ("Gradient norm", "train/grad_norm: global norm before clipping", lambda k: k == "train/grad_norm"),
    ("Throughput", "perf/...: samples/s, tokens/s, MFU, data wait (vlm.callbacks.Throughput)",
     lambda k: k.startswith("perf/")),
    ("Gate values", "gates/...: tanh(alpha) per gated cross-attention layer (vlm.callbacks.GateMonitor)",
     lambda k: k.startswith("gates/")),
]
MAX_PLOTS = 30  # per panel: the page stays small whatever a run logs


# ---------------------------------------------------------------------------------------------- reading a run
def find_run(path: str | Path) -> tuple[str, Path]:
    """``("wandb", run folder)`` or ``("csv", folder of metrics.csv)`` for a RUN_DIR as the user gives it."""
    p = Path(path).resolve()  # `latest-run` is a link: name the run it points to
    if not p.exists():
        raise VLMConfigError(f"vlm report: {p} does not exist; give a wandb run folder (.../wandb/offline-run-...) "
                             "or a CSV logger folder (with metrics.csv).")
    if p.is_file() and p.suffix == ".wandb":
        return "wandb", p.parent
    if p.is_file() and p.name == "metrics.csv":
        return "csv", p.parent
    if p.is_dir():
        if any(p.glob("*.wandb")):
            return "wandb", p
        if (p / "metrics.csv").is_file():
            return "csv", p
        latest = p / "latest-run"
        if latest.exists() and any(latest.glob("*.wandb")):
            return "wandb", latest.resolve()
        if (p / "wandb" / "latest-run").exists():
            return find_run(p / "wandb" / "latest-run")
    raise VLMConfigError(f"vlm report: {p} holds neither a wandb run (a .wandb file) nor a CSV logger's metrics.csv; "
                         "give .../wandb/offline-run-... or the CSV logger's version folder.")


def _wandb_exe() -> str:
    exe = shutil.which("wandb") or os.path.join(os.path.dirname(sys.executable), "wandb")
    if not os.path.exists(exe):
        raise VLMConfigError("vlm report: the `wandb` command is not installed (pip install wandb) to read the run.")
    return exe


def wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a wandb run's transaction log, as wandb's reader prints them (``wandb leet inspect --json``)."""
    out = subprocess.run([_wandb_exe(), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise VLMConfigError(f"vlm report: wandb could not read {run_dir}: {out.stderr.strip()[-500:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip().startswith("{")]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def wandb_history(records: Iterable[dict[str, Any]]) -> History:
    """Numeric metrics of the ``history`` records by ``trainer/global_step`` (else wandb's ``_step``); media
    entries (``key._type`` and their fields) and wandb's own ``_`` keys left out."""
    hist: History = {}
    for rec in records:
        if rec.get("type") != "history":
            continue
        item = rec.get("history", {}).get("item", {})
        media = {k[: -len("._type")] for k in item if k.endswith("._type")}
        step = _number(item.get("trainer/global_step"))
        step = step if step is not None else _number(item.get("_step")) or 0.0
        for key, value in item.items():
            v = _number(value)
            if v is None or key.startswith("_") or key in ("trainer/global_step", "epoch"):
                continue
            if any(key.startswith(m + ".") for m in media):
                continue
            hist.setdefault(key, []).append((step, v))
    return hist


def csv_history(path: Path) -> History:
    """Numeric metrics of a CSVLogger's ``metrics.csv`` by its ``step`` column."""
    hist: History = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = _number(_parse(row.get("step")))
            for key, raw in row.items():
                v = _number(_parse(raw))
                if v is None or key in ("step", "epoch"):
                    continue
                hist.setdefault(key, []).append((step or 0.0, v))
    return hist


def _parse(raw: str | None) -> float | None:
    try:
        return float(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def read_predictions(folder: Path) -> list[dict[str, Any]]:
    """The rows of the latest validation run in ``folder/predictions.jsonl`` (``PredictionsTable``), images opened."""
    path = folder / "predictions.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return []
    last = max(r.get("step", 0) for r in rows)
    rows = [r for r in rows if r.get("step", 0) == last]
    for r in rows:
        image = folder / str(r.get("image", ""))
        r["image_path"] = image if image.is_file() else None
    return rows


def drop_stale(history: History) -> History:
    """``history`` without the stale repeats of per-stream training metrics.

    Lightning sends every key logged earlier in the epoch at every step, with its last value: a step of stream
    ``a`` also carries ``train/b/...`` from b's last step. Per-stream keys (``train/<stream>/...``) therefore keep
    a point only where its value changed; losses of a stream that really trained never repeat bit for bit.
    """
    out: History = {}
    for key, pts in history.items():
        if key.startswith("train/") and key.count("/") >= 2:
            kept = [p for i, p in enumerate(pts) if i == 0 or p[1] != pts[i - 1][1]]
            out[key] = kept
        else:
            out[key] = pts
    return out


def load_run(path: str | Path) -> dict[str, Any]:
    """``{"kind", "dir", "history", "predictions", "name"}`` of a run folder (see ``find_run``)."""
    kind, folder = find_run(path)
    if kind == "wandb":
        history = wandb_history(wandb_records(folder))
        predictions = read_predictions(folder / "files")
    else:
        history = csv_history(folder / "metrics.csv")
        predictions = read_predictions(folder)
    return {"kind": kind, "dir": folder, "history": drop_stale(history), "predictions": predictions, "name": folder.name}


# ---------------------------------------------------------------------------------------------- rendering
def draw_boxes(image: np.ndarray, boxes: Sequence[tuple[Sequence[float], str]]) -> np.ndarray:
    """``image`` with each ``(box_xyxy normalised to [0,1], label)`` drawn on it (for loggers without box layers)."""
    if not boxes:
        return image
    from PIL import Image, ImageDraw

    im = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(im)
    h, w = image.shape[:2]
    for (x0, y0, x1, y1), label in boxes:
        xy = [x0 * w, y0 * h, max(x0, x1) * w, max(y0, y1) * h]
        draw.rectangle(xy, outline=(255, 0, 64), width=1)
        if label:
            draw.text((xy[0] + 1, xy[1] + 1), str(label), fill=(255, 0, 64))
    return np.asarray(im)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_FRACTION = re.compile(r"(accuracy|R@\d+|rate|fraction|top\d)$")
_LOSS = re.compile(r"(loss|mse)$")


def _group(keys: list[str]) -> dict[str, list[str]]:
    """Subplots of a panel, one line per key: throughput by quantity, losses by stream, lr and gates together;
    other keys with the same prefix share a plot when they share a scale (fractions, losses), else stand alone."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        head, _, tail = key.rpartition("/")
        if key.startswith("perf/"):  # throughput: one plot per quantity, one line per stream
            groups.setdefault(f"perf/{tail}", []).append(key)
        elif key == "train/loss":
            groups.setdefault("train/loss (the step's stream)", []).append(key)
        elif key.startswith("train/") and key.endswith("/loss"):  # losses: one plot per stream
            groups.setdefault(f"train/{key.split('/')[1]} losses", []).append(key)
        elif key.startswith(("lr-", "gates/")):
            groups.setdefault(key.split("/")[0], []).append(key)
        elif _FRACTION.search(tail):
            groups.setdefault(f"{head}/ (fractions)", []).append(key)
        elif _LOSS.search(tail):
            groups.setdefault(f"{head}/ (losses)", []).append(key)
        else:
            groups.setdefault(key, []).append(key)
    return groups


def plot_panel(history: History, keys: list[str]) -> str | None:
    """A grid of line plots of ``keys`` (base64 PNG), or None when there is nothing to draw."""
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = list(_group(keys).items())[:MAX_PLOTS]  # the rest stay in the final metrics table
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (title, members) in zip(axes.flat, groups):
        for key in members:
            pts = history[key]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            prefix = os.path.commonprefix(members) if len(members) > 1 else ""
            label = (key[len(prefix[: prefix.rfind("/") + 1]):] or key) if len(members) > 1 else None
            ax.plot(xs, ys, marker="o" if len(pts) <= 20 else None, markersize=3, linewidth=1.2, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(members) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _prediction_cells(row: dict[str, Any]) -> str:
    from PIL import Image

    img = ""
    if row.get("image_path") is not None:
        arr = np.asarray(Image.open(row["image_path"]).convert("RGB"))
        arr = draw_boxes(arr, [(b, label) for b, label in row.get("boxes") or []])
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        img = f'<img src="data:image/png;base64,{data}" alt="{html.escape(str(row.get("key", "")))}" width="128">'
    cells = [html.escape(str(row.get("stream", ""))), img]
    cells += [html.escape(str(row.get(k, ""))).replace("\n", "<br>") for k in ("prompt", "ground_truth", "prediction")]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def render(run: dict[str, Any]) -> str:
    """The report page of a loaded run (``load_run``)."""
    history: History = run["history"]
    keys = sorted(history)
    parts = [f"<h1>vlm report: {html.escape(run['name'])}</h1>",
             f"<p class=note>{html.escape(str(run['dir']))} ({run['kind']} run, {len(keys)} metrics)</p>"]
    for title, what, wanted in PANELS:
        chosen = [k for k in keys if wanted(k)]
        parts.append(f"<h2>{html.escape(title)}</h2><p class=note>{html.escape(what)}</p>")
        png = plot_panel(history, chosen)
        parts.append(f'<img src="data:image/png;base64,{png}" alt="{html.escape(title)}">' if png
                     else "<p class=note>not logged in this run</p>")
    parts.append("<h2>Final metrics</h2><p class=note>the last logged value of every metric, at its step</p>")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(history[k][-1][1])}</td><td>{int(history[k][-1][0])}</td></tr>"
                   for k in keys)
    parts.append(f"<table><tr><th>metric</th><th>value</th><th>step</th></tr>{rows}</table>")
    parts.append("<h2>Validation predictions</h2>")
    preds = run["predictions"]
    if preds:
        step = preds[0].get("step")
        parts.append(f"<p class=note>held-out examples at step {step} (vlm.callbacks.PredictionsTable)</p>")
        head = "".join(f"<th>{h}</th>" for h in ("stream", "image", "prompt", "ground truth", "prediction"))
        parts.append(f"<table><tr>{head}</tr>{''.join(_prediction_cells(r) for r in preds)}</table>")
    else:
        parts.append("<p class=note>no predictions table in this run (add vlm.callbacks.PredictionsTable)</p>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1300px} table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left} .note{color:#666}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vlm report: {html.escape(run['name'])}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the report of ``run_dir`` to ``out`` (default ``<run folder>/report.html``); returns the path."""
    run = load_run(run_dir)
    path = Path(out) if out is not None else run["dir"] / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(run), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """``vlm report RUN_DIR [--out FILE]``."""
    parser = argparse.ArgumentParser(prog="vlm report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a wandb run folder (.../wandb/offline-run-...) or a CSV logger folder")
    parser.add_argument("--out", default=None, help="the HTML file to write (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out)
    except VLMConfigError as err:
        print(f"vlm: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


__all__ = ["PANELS", "csv_history", "find_run", "load_run", "main", "read_predictions", "render", "wandb_history",
           "write_report"]
