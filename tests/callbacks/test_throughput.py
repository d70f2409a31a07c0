"""Throughput callback: per-stream samples/s, tokens/s and MFU against their formulas, and `perf/...` on a real run."""

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.models.test_flava import B, L, make_batch, tiny_kwargs
from tests.test_configs import SMALL_SYNTHETIC
from vlm.callbacks import Throughput
from vlm.cli import main

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingLogger:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def fake_trainer(every: int):
    return SimpleNamespace(log_every_n_steps=every, loggers=[RecordingLogger()], is_global_zero=True, global_step=0)


def drive(cb, trainer, module, schedule, clock):
    """Run ``(wait_s, step_s, batch, skipped)`` steps through the callback's hooks with the fake clock."""
    for wait, step, batch, skipped in schedule:
        clock.now += wait
        cb.on_train_batch_start(trainer, module, batch, 0)
        clock.now += step
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None if skipped else {"loss": 0.0}, batch, 0)


def test_rates_follow_their_formulas_with_a_fake_clock():
    clock = FakeClock()
    flops = {"pairs": 5e6, "text": 2e6}  # per sample, as the model would report
    module = SimpleNamespace(device=torch.device("cpu"), image_encoder=SimpleNamespace(patch_size=8),
                             flops_per_sample=lambda batch: flops[batch["stream"]])
    pairs_mask = torch.ones(4, 10, dtype=torch.long)
    pairs_mask[0, 6:] = 0  # 4 * 10 - 4 = 36 real text tokens
    pairs = {"stream": "pairs", "pixel_values": torch.zeros(4, 3, 32, 16), "input_ids": torch.zeros(4, 10),
             "attention_mask": pairs_mask}
    text = {"stream": "text", "input_ids": torch.zeros(6, 5, dtype=torch.long)}  # no mask: every id counts
    peak = 1e9
    cb, trainer = Throughput(peak_flops=peak, clock=clock), fake_trainer(every=5)
    cb.on_train_start(trainer, module)
    start = clock.now
    schedule = [(0.5, 2.0, pairs, False), (0.1, 1.0, text, False), (0.3, 3.0, pairs, False),
                (0.2, 4.0, text, True), (0.4, 0.5, text, False)]  # the 4th step was skipped by the model
    drive(cb, trainer, module, schedule, clock)
    wall = clock.now - start
    [(step, m)] = trainer.loggers[0].rows
    assert step == 5 and m == cb.last

    pairs_tokens = 36 + 4 * (32 // 8) * (16 // 8)  # text tokens + image patches, per batch
    text_tokens = 6 * 5
    assert m["perf/pairs/samples_per_sec"] == pytest.approx(8 / (2.0 + 3.0))
    assert m["perf/pairs/tokens_per_sec"] == pytest.approx(2 * pairs_tokens / 5.0)
    assert m["perf/text/samples_per_sec"] == pytest.approx(12 / (1.0 + 0.5))
    assert m["perf/text/tokens_per_sec"] == pytest.approx(2 * text_tokens / 1.5)
    # MFU = flops_per_sample * samples_per_sec / peak
    for stream in flops:
        assert m[f"perf/{stream}/mfu"] == pytest.approx(flops[stream] * m[f"perf/{stream}/samples_per_sec"] / peak)
    assert m["perf/samples_per_sec"] == pytest.approx(20 / wall)
    assert m["perf/tokens_per_sec"] == pytest.approx((2 * pairs_tokens + 2 * text_tokens) / wall)
    assert m["perf/mfu"] == pytest.approx((8 * flops["pairs"] + 12 * flops["text"]) / wall / peak)
    # waits between steps (the first batch has no previous step; a skipped step still waited for its batch)
    assert m["perf/data_wait_ms"] == pytest.approx(1000 * (0.1 + 0.3 + 0.2 + 0.4) / 4)


def test_validation_time_is_not_data_wait_and_no_peak_means_no_mfu():
    clock = FakeClock()
    module = SimpleNamespace(device=torch.device("cpu"), flops_per_sample=lambda batch: 1e6)
    batch = {"stream": "text", "input_ids": torch.zeros(2, 3, dtype=torch.long)}
    cb, trainer = Throughput(clock=clock), fake_trainer(every=2)
    cb.on_train_start(trainer, module)
    drive(cb, trainer, module, [(0.0, 1.0, batch, False)], clock)
    cb.on_validation_start(trainer, module)
    clock.now += 30.0  # a validation epoch between two training steps
    cb.on_validation_end(trainer, module)
    drive(cb, trainer, module, [(0.25, 1.0, batch, False)], clock)
    m = cb.last
    assert m["perf/data_wait_ms"] == pytest.approx(1000 * 0.25)
    assert m["perf/samples_per_sec"] == pytest.approx(4 / 2.25)
    assert not any(k.endswith("mfu") for k in m)  # CPU: no peak FLOP/s known, none given


def test_partial_window_is_logged_at_the_end_of_training():
    clock = FakeClock()
    module = SimpleNamespace(device=torch.device("cpu"))  # no flops_per_sample: no MFU
    batch = {"stream": "images", "pixel_values": torch.zeros(3, 3, 16, 16)}
    cb, trainer = Throughput(peak_flops=1e9, patch_size=4, clock=clock), fake_trainer(every=50)
    cb.on_train_start(trainer, module)
    drive(cb, trainer, module, [(0.0, 2.0, batch, False)], clock)
    assert trainer.loggers[0].rows == []
    cb.on_train_end(trainer, module)
    m = trainer.loggers[0].rows[-1][1]
    assert m["perf/images/tokens_per_sec"] == pytest.approx(3 * 16 / 2.0)
    assert "perf/images/mfu" not in m and "perf/mfu" not in m


@pytest.fixture(scope="module")
def tiny():
    from vlm.models.flava import FLAVA

    torch.manual_seed(0)
    return FLAVA(**tiny_kwargs())


@pytest.mark.parametrize("stream", ["pairs", "images", "text"])
def test_flava_flops_count_the_tower_passes_a_step_runs(tiny, stream):
    """FLAVA.flops_per_sample uses as many passes per tower as a real training step runs (counted by hooks)."""
    from vlm.models.flava import flava_flops_per_sample

    rows = {"image": 0, "text": 0, "multimodal": 0}
    hooks = [getattr(tiny, f"{name}_encoder").register_forward_hook(
        lambda mod, args, out, name=name: rows.__setitem__(name, rows[name] + args[0].shape[0]))
        for name in ("image", "text", "multimodal")]
    batch = make_batch(stream)
    try:
        tiny.train()
        tiny.compute_losses(batch)
    finally:
        for h in hooks:
            h.remove()
    passes = {k: v / B for k, v in rows.items()}
    if stream == "pairs":  # GC unmasked + ITM/MMM masked towers; the pairs fused once + ITM's shuffled negatives
        assert passes["image"] == 2 and passes["text"] == 2 and passes["multimodal"] > 1
    expected = flava_flops_per_sample(tiny, L, 64, passes)
    assert tiny.flops_per_sample(batch) == pytest.approx(expected)


def test_mfu_of_a_flava_step_is_flops_times_rate_over_peak(tiny):
    clock = FakeClock()
    batch = make_batch("pairs")
    cb, trainer = Throughput(peak_flops=2e12, clock=clock), fake_trainer(every=1)
    cb.on_train_start(trainer, tiny)
    drive(cb, trainer, tiny, [(0.0, 0.5, batch, False)], clock)
    m = cb.last
    assert m["perf/pairs/samples_per_sec"] == pytest.approx(B / 0.5)
    assert m["perf/pairs/mfu"] == pytest.approx(tiny.flops_per_sample(batch) * (B / 0.5) / 2e12)
    # tokens: real text tokens + 64 px / 8 px patches squared per image
    assert m["perf/pairs/tokens_per_sec"] == pytest.approx(
        (int(batch["attention_mask"].sum()) + B * (64 // 8) ** 2) / 0.5)


def test_vlm_fit_logs_perf_per_stream(tmp_path, monkeypatch):
    """A tiny `vlm fit` (CSV logger) writes perf/<stream>/... for each of tiny.yaml's three streams."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["fit", "--config", str(ROOT / "conf/flava/tiny.yaml"), "--config", str(ROOT / "conf/logger/csv.yaml"),
                 *SMALL_SYNTHETIC, "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
                 "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=0",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]) == 0
    [metrics] = list(tmp_path.glob("runs/lightning_logs/version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("perf/") and v != ""}
    for stream in ("pairs", "images", "text"):
        for rate in ("samples_per_sec", "tokens_per_sec"):
            assert logged[f"perf/{stream}/{rate}"] > 0, sorted(logged)
    assert logged["perf/samples_per_sec"] > 0 and "perf/data_wait_ms" in logged
    # an image-only batch has (64 px / 8 px)^2 = 64 tokens per sample (tiny.yaml), whatever the speed
    assert logged["perf/images/tokens_per_sec"] / logged["perf/images/samples_per_sec"] == pytest.approx(64)
    assert not any(k.endswith("/mfu") for k in logged)  # CPU: no peak FLOP/s
