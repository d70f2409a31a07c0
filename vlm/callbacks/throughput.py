"""Training throughput on the dashboard: samples/s, tokens/s and MFU per stream, and how long steps wait for data.

Every ``every_n_steps`` training batches (default: ``trainer.log_every_n_steps``) the callback logs, to every
logger of the trainer at the current global step (rank 0, per device):

* ``perf/<stream>/samples_per_sec``, ``perf/<stream>/tokens_per_sec``: the stream's samples (tokens) over the
  time its steps took (``on_train_batch_start`` -> ``on_train_batch_end``: forward, backward, optimizer);
* ``perf/<stream>/mfu``: the stream's model FLOPs over that time over the device's peak FLOP/s, with the
  model's own analytic count (``model.flops_per_sample(batch)``); left out when the count or the peak is unknown;
* ``perf/samples_per_sec``, ``perf/tokens_per_sec``, ``perf/mfu``: every stream over the window's wall time
  (data waits included, validation excluded);
* ``perf/data_wait_ms``: mean time from the end of a step (``on_train_batch_end``) to the start of the next
  (``on_train_batch_start``), i.e. the host waiting for its batch.

Tokens of a batch: its text tokens, ``attention_mask.sum()`` (padding not counted; ``input_ids.numel()`` when
there is no mask), plus its image patches, ``B * (H // patch) * (W // patch)`` of ``pixel_values``.

Timing uses ``time.perf_counter``; on CUDA each step is bracketed by CUDA events instead, and the device is
synchronised once per window (and around validation), never per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

#: dense bf16 peak FLOP/s by a substring of ``torch.cuda.get_device_name()`` (H100 SXM and H200 share it)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of a known CUDA device; None elsewhere (CPU, unknown GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def batch_tokens(batch: Mapping[str, Any], patch_size: int | None) -> Tensor | int:
    """Text tokens (``attention_mask.sum()``, else ``input_ids.numel()``) + image patches of a batch.

    The mask sum stays a device tensor (no host sync); the caller reads it once per window.
    """
    tokens: Tensor | int = 0
    mask, ids, pixels = batch.get("attention_mask"), batch.get("input_ids"), batch.get("pixel_values")
    if isinstance(mask, Tensor):
        tokens = mask.detach().sum()
    elif isinstance(ids, Tensor):
        tokens = ids.numel()
    if isinstance(pixels, Tensor) and patch_size and pixels.dim() >= 3:
        tokens = tokens + pixels.shape[0] * (pixels.shape[-2] // patch_size) * (pixels.shape[-1] // patch_size)
    return tokens


def _batch_size(pl_module: Any, batch: Mapping[str, Any]) -> int:
    size_of = getattr(pl_module, "batch_size_of", None)
    if callable(size_of):
        return int(size_of(batch))
    return next((int(v.shape[0]) for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0), 1)


class _StreamWindow:
    """Counts of one stream within one window."""

    def __init__(self) -> None:
        self.samples, self.tokens, self.flops, self.seconds = 0, 0, 0.0, 0.0
        self.flops_known = True


class Throughput(Callback):
    """Logs samples/s, tokens/s and MFU per stream and overall, and ``perf/data_wait_ms``, averaged over windows.

    Args:
        peak_flops: the device's peak FLOP/s for MFU; default: ``PEAK_BF16_FLOPS`` for known GPUs, else no MFU.
        every_n_steps: training batches per window; default ``trainer.log_every_n_steps``.
        patch_size: image patch side for token counts; default the model's ``image_encoder.patch_size`` if any.
        clock: seconds since some origin (tests pass a fake one).
    """

    def __init__(self, peak_flops: float | None = None, every_n_steps: int | None = None,
                 patch_size: int | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.peak_flops, self.every_n_steps, self.patch_size, self.clock = peak_flops, every_n_steps, patch_size, clock
        self.last: dict[str, float] = {}  # the most recent window's metrics
        self._cuda = False
        self._reset_window(None)
        self._last_end: float | None = None
        self._step: tuple[Any, ...] | None = None
        self._val_start: float | None = None

    # ------------------------------------------------------------------ state
    def _reset_window(self, start: float | None) -> None:
        self._window_start = start
        self._streams: dict[str, _StreamWindow] = {}
        self._pending: list[tuple[str, Any, Any]] = []  # (stream, start event, end event) on CUDA
        self._batches = 0
        self._wait_total, self._wait_count = 0.0, 0

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        device = getattr(pl_module, "device", torch.device("cpu"))
        self._cuda = torch.device(device).type == "cuda"
        if self.peak_flops is None:
            self.peak_flops = device_peak_flops(device)
        if self.patch_size is None:
            self.patch_size = getattr(getattr(pl_module, "image_encoder", None), "patch_size", None)
        self._sync()
        self._reset_window(self.clock())
        self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self.clock()
        if self._window_start is None:
            self._window_start = now
        if self._last_end is not None:
            self._wait_total += now - self._last_end
            self._wait_count += 1
        event = None
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._step = (now, event)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock()
        self._last_end = now
        if self._step is None:
            return
        started, start_event = self._step
        self._step = None
        self._batches += 1
        if outputs is not None and isinstance(batch, Mapping):  # None: the step was skipped (no trained samples)
            stream = str(batch.get("stream", "train"))
            win = self._streams.setdefault(stream, _StreamWindow())
            size = _batch_size(pl_module, batch)
            win.samples += size
            win.tokens = win.tokens + batch_tokens(batch, self.patch_size)
            count = getattr(pl_module, "flops_per_sample", None)
            per_sample = count(batch) if callable(count) else None
            if per_sample is None:
                win.flops_known = False
            else:
                win.flops += float(per_sample) * size
            if start_event is not None:
                end_event = torch.cuda.Event(enable_timing=True)
                end_event.record()
                self._pending.append((stream, start_event, end_event))
            else:
                win.seconds += now - started
        every = self.every_n_steps or getattr(trainer, "log_every_n_steps", 50) or 50
        if self._batches >= every:
            self._flush(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._sync()
        self._val_start = self.clock()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_start is None:
            return
        self._sync()
        spent = self.clock() - self._val_start  # validation is not training time: shift it out of the window
        self._val_start = None
        if self._last_end is not None:
            self._last_end += spent
        if self._window_start is not None:
            self._window_start += spent

    def on_train_end(self, trainer, pl_module) -> None:
        if self._batches:
            self._flush(trainer)

    # ------------------------------------------------------------------ window
    def window_metrics(self) -> dict[str, float]:
        """The current window's metrics (reads CUDA events: call after a synchronise)."""
        for stream, start, end in self._pending:
            self._streams[stream].seconds += start.elapsed_time(end) / 1000.0
        self._pending = []
        now = self.clock()
        wall = now - self._window_start if self._window_start is not None else 0.0
        out: dict[str, float] = {}
        total_samples, total_tokens, total_flops, flops_known = 0, 0.0, 0.0, True
        for stream, win in sorted(self._streams.items()):
            tokens = float(win.tokens)
            total_samples, total_tokens = total_samples + win.samples, total_tokens + tokens
            total_flops += win.flops
            flops_known = flops_known and win.flops_known
            if win.seconds <= 0:
                continue
            out[f"perf/{stream}/samples_per_sec"] = win.samples / win.seconds
            out[f"perf/{stream}/tokens_per_sec"] = tokens / win.seconds
            if win.flops_known and self.peak_flops:
                out[f"perf/{stream}/mfu"] = win.flops / win.seconds / self.peak_flops
        if wall > 0 and self._streams:
            out["perf/samples_per_sec"] = total_samples / wall
            out["perf/tokens_per_sec"] = total_tokens / wall
            if flops_known and self.peak_flops:
                out["perf/mfu"] = total_flops / wall / self.peak_flops
        if self._wait_count:
            out["perf/data_wait_ms"] = 1000.0 * self._wait_total / self._wait_count
        return out

    def _flush(self, trainer) -> None:
        self._sync()
        metrics = self.window_metrics()
        self.last = metrics
        self._log(trainer, metrics)
        # the next window starts now; logging is charged neither to it nor to the next step's data wait
        self._reset_window(self.clock())
        self._last_end = self._window_start

    @staticmethod
    def _log(trainer, metrics: dict[str, float]) -> None:
        if not metrics or not getattr(trainer, "is_global_zero", True):
            return
        step = int(getattr(trainer, "global_step", 0))
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_metrics(metrics, step=step)
