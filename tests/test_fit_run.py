"""benchmarks/fit_run.py (the `vlm fit` rows of benchmarks/gpu_session.sh) runs on CPU and reports its figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fit_run_reports_time_to_first_step_and_throughput(tmp_path):
    out = tmp_path / "fit.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/fit_run.py"), "--steps", "6", "--out", str(out), "--",
           "--config", str(ROOT / "conf/flava/tiny.yaml"), "--config", str(ROOT / "conf/trainer/gpu.yaml"),
           "--trainer.accelerator=cpu", "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false",
           "--data.init_args.batch_size=8", "--data.init_args.streams.pairs.init_args.dataset.init_args.num=128"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "VLM_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["steps"] == 6 and res["precision"] == "bf16-mixed"
    assert 0 < res["time_to_first_step_s"] < 300
    # steady throughput = rows / time of the second half of the steps: rows per step over ms per step
    assert res["steady_samples_per_s"] == pytest.approx(8 / (res["step_ms"] / 1000), rel=0.02)
    assert res["data_wait_ms_per_step"] >= 0
