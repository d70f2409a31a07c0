"""The results of ``vlm validate`` / ``vlm test``: one table on the terminal and one JSON file.

``vlm validate`` and ``vlm test`` add an :class:`EvalReport` unless the config's callbacks hold one. At the end of
the evaluation it reads every metric the model logged (``trainer.callback_metrics``: the values
``trainer.validate`` returns), counts each evaluation stream's samples and skipped samples over all ranks, prints
them, and writes them as JSON:

* with a checkpoint: ``<checkpoint folder>/<checkpoint stem>.validate.json`` (``.test.json`` for ``vlm test``);
* without one: ``<run dir>/validate.json``, the run dir being ``trainer.log_dir`` (the logger's folder:
  ``save_dir`` of wandb, ``save_dir/name/version_N`` of CSV and TensorBoard, or ``default_root_dir`` without a
  logger).

The JSON holds ``command``, ``checkpoint``, ``metrics`` (name -> value), ``streams`` (name -> ``samples``,
``skipped``, and the prompt ``task`` / ``shots`` of few-shot streams) and ``fewshot`` (metric -> stream name
without its shot count -> shots -> value: ``vqav2_0shot`` and ``vqav2_4shot`` are one row).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

_STAGES = {"validate": "val", "test": "test"}


def _stage(trainer) -> str | None:
    if trainer.sanity_checking:
        return None
    fn = getattr(trainer.state, "fn", None)
    value = getattr(fn, "value", fn)
    return value if value in _STAGES else None


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().float().item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class EvalReport(Callback):
    """Print the metrics of ``validate``/``test`` as a table and write them as JSON (see the module docstring).

    Args:
        path: the JSON file; default: beside the checkpoint (``<stem>.validate.json``), or in the run dir.
        print_table: print the table (rank 0).
    """

    def __init__(self, path: str | None = None, print_table: bool = True) -> None:
        self.path = None if path is None else Path(path)
        self.print_table = print_table
        self.counts: dict[str, list[int]] = {}  # stream -> [samples, skipped] on this rank
        self.written: Path | None = None  # the JSON file of the last evaluation
        self.report: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks
    def _start(self, trainer, pl_module) -> None:
        from vlm.data.eval_formats import check_class_names

        self.counts = {}
        group = "test_streams" if _stage(trainer) == "test" else "val_streams"
        streams = getattr(trainer.datamodule, group, None) if trainer.datamodule is not None else None
        if isinstance(streams, Mapping):
            check_class_names(dict(streams), pl_module, group)

    def on_validation_start(self, trainer, pl_module) -> None:
        if _stage(trainer):
            self._start(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        if _stage(trainer):
            self._start(trainer, pl_module)

    def _count(self, trainer, batch: Any) -> None:
        if not _stage(trainer) or not isinstance(batch, Mapping):
            return
        rows = 0
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                rows = int(v.shape[0])
                break
        counts = self.counts.setdefault(str(batch.get("stream")), [0, 0])
        counts[0] += rows
        counts[1] += int(batch.get("num_skipped", 0) or 0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(trainer, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(trainer, batch)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    # ------------------------------------------------------------------ the report
    def _streams(self, trainer, command: str) -> dict[str, dict[str, Any]]:
        from vlm.parallel import all_gather_objects

        totals: dict[str, list[int]] = {}
        for counts in all_gather_objects(self.counts):  # every rank takes part
            for name, (n, k) in counts.items():
                t = totals.setdefault(name, [0, 0])
                t[0], t[1] = t[0] + n, t[1] + k
        group = "test_streams" if command == "test" else "val_streams"
        declared = getattr(trainer.datamodule, group, None) if trainer.datamodule is not None else None
        names = list(declared) if isinstance(declared, Mapping) else []
        out: dict[str, dict[str, Any]] = {}
        for name in names + sorted(set(totals) - set(names)):
            n, k = totals.get(name, (0, 0))
            entry: dict[str, Any] = {"samples": n, "skipped": k}
            stream = declared.get(name) if isinstance(declared, Mapping) else None
            transform = getattr(stream, "transform", None)
            if isinstance(getattr(transform, "shots", None), int):
                entry["task"] = getattr(transform, "task", None)
                entry["shots"] = transform.shots
            out[name] = entry
        return out

    def json_path(self, trainer, command: str) -> Path:
        """Where the report goes: ``path``, else beside the checkpoint, else in the run dir."""
        if self.path is not None:
            return self.path
        ckpt = trainer.ckpt_path
        if ckpt and "://" not in str(ckpt):
            ckpt = Path(ckpt)
            return ckpt.with_name(f"{ckpt.stem}.{command}.json")
        return Path(trainer.log_dir or trainer.default_root_dir) / f"{command}.json"

    def _finish(self, trainer) -> None:
        command = _stage(trainer)
        if command is None:
            return
        metrics = {k: v for k, v in ((str(k), _number(v)) for k, v in trainer.callback_metrics.items())
                   if v is not None}
        streams = self._streams(trainer, command)
        path = self.json_path(trainer, command)  # every rank: log_dir broadcasts
        if not trainer.is_global_zero:
            return
        report: dict[str, Any] = {
            "command": command,
            "checkpoint": None if trainer.ckpt_path is None else str(trainer.ckpt_path),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": dict(sorted(metrics.items())),
            "streams": streams,
        }
        fewshot = fewshot_table(metrics, streams, _STAGES[command])
        if fewshot:
            report["fewshot"] = fewshot
        self.report = report
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(_finite(report), indent=2) + "\n")
            tmp.replace(path)
            self.written = path
        except OSError as err:
            self.written = None
            print(f"vlm {command}: could not write the results to {path} ({err}); set "
                  "trainer.callbacks' EvalReport path to a writable file.")
        if self.print_table:
            print(format_report(report, self.written))


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


_SHOTS_SUFFIX = re.compile(r"_?\d+[-_]?shots?$")


def family(stream: str, task: Any) -> str:
    """The row of a few-shot stream in the grid: its name without the shot count (``vqav2_4shot`` -> ``vqav2``),
    or its task when the name has none."""
    base = _SHOTS_SUFFIX.sub("", stream)
    return base if base and base != stream else str(task)


def fewshot_table(metrics: Mapping[str, float], streams: Mapping[str, Mapping[str, Any]],
                  prefix: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{metric: {family: {shots: value}}}`` over the few-shot streams (those with ``shots``), ``family`` being the
    stream's name without its shot count; empty when two streams of one family have the same number of shots."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, info in streams.items():
        if "shots" not in info:
            continue
        pattern = re.compile(rf"^{re.escape(prefix)}/{re.escape(name)}/(.+)$")
        for key, value in metrics.items():
            m = pattern.match(key)
            if m is None:
                continue
            cell = out.setdefault(m.group(1), {}).setdefault(family(name, info.get("task")), {})
            shots = str(info["shots"])
            if shots in cell:
                return {}
            cell[shots] = value
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def format_report(report: Mapping[str, Any], written: Path | None) -> str:
    """The table ``vlm validate`` prints: streams, then every metric, then the few-shot grid."""
    lines = [f"\n{report['command']} results" + (f" of {report['checkpoint']}" if report.get("checkpoint") else "")]
    streams = report.get("streams") or {}
    if streams:
        width = max(len("stream"), *map(len, streams))
        lines.append(f"  {'stream':<{width}}  {'samples':>8}  {'skipped':>8}  prompts")
        for name, s in streams.items():
            prompts = f"{s['task']}, {s['shots']}-shot" if "shots" in s else ""
            lines.append(f"  {name:<{width}}  {s['samples']:>8}  {s['skipped']:>8}  {prompts}".rstrip())
    metrics = report.get("metrics") or {}
    if not metrics:
        lines.append("  no metric was logged: the model evaluates none of these streams (see the model's "
                     "validation_step / test_step)")
    else:
        width = max(len("metric"), *map(len, metrics))
        lines.append(f"  {'metric':<{width}}  {'value':>10}")
        lines += [f"  {k:<{width}}  {_fmt(v):>10}" for k, v in metrics.items()]
    for metric, rows in (report.get("fewshot") or {}).items():
        shots = sorted({int(s) for cells in rows.values() for s in cells})
        head = "".join(f"{f'{s}-shot':>9}" for s in shots)
        lines.append(f"  {metric + ' by shots':<24}{head}")
        for row, cells in rows.items():
            lines.append(f"  {row:<24}" + "".join(f"{_fmt(cells.get(str(s))):>9}" for s in shots))
    lines.append(f"  written to {written}" if written is not None else "  (not written)")
    return "\n".join(lines)
