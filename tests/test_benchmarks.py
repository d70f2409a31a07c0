"""The benchmark scripts run on CPU at their tiny sizes and write the figures they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flamingo_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "flamingo.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/flamingo.py"), "--device", "cpu", "--size", "tiny",
           "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["shapes"]) == {"pairs", "interleaved"}
    ours, theirs = res["vlm"], res["open_flamingo"]
    for shape, (batch, _, _) in res["shapes"].items():
        assert ours[shape]["samples_per_s"] > 0 and len(ours[shape]["step_ms_all"]) == 2
        # samples/s is the batch over the median step, and the loss is the loss (not the batch size)
        assert abs(ours[shape]["samples_per_s"] * ours[shape]["step_ms"] / 1000 - batch) < 1e-6 * batch
        assert 0 < ours[shape]["final_loss"] < 20 and ours[shape]["final_loss"] != batch
    assert ours["facts"]["trainable_embedding_rows"] == 2
    if "error" in theirs:  # open_flamingo could not be built here: reported, not hidden
        assert isinstance(theirs["error"], str) and theirs["error"]
        assert "no verdict" in res["verdict"]
    else:
        assert theirs["facts"]["params_m"] == ours["facts"]["params_m"]  # the same model sizes
        assert theirs["facts"]["vocab_size"] == ours["facts"]["vocab_size"]
        for shape in res["shapes"]:
            assert theirs[shape]["samples_per_s"] > 0
            assert res["comparison"][shape]["speedup"] > 0
        assert "speed target" in res["verdict"] or "targets" in res["verdict"]
    assert "embedding" in res["note"]


def test_pali_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "pali.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/pali.py"), "--device", "cpu", "--size", "tiny", "--batch", "4",
           "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    ours, naive = res["vlm"], res["naive"]
    for r in (ours, naive):
        assert r["samples_per_s"] > 0 and len(r["step_ms_all"]) == 2
        # samples/s is the batch (4) over the median step, and the loss is the loss (not the batch size)
        assert abs(r["samples_per_s"] * r["step_ms"] / 1000 - 4) < 1e-6
        assert 0 < r["final_loss"] < 20 and r["final_loss"] != 4
    # the same model and weights on both sides: same parameter counts, same first loss (fp32)
    assert ours["facts"]["params_m"] == naive["facts"]["params_m"]
    assert ours["facts"]["trainable_m"] == naive["facts"]["trainable_m"]
    assert abs(ours["facts"]["first_loss"] - naive["facts"]["first_loss"]) < 1e-4
    flops = res["flops"]
    assert flops["total"] == flops["trained_fwd_bwd"] + flops["frozen_vit_fwd"] > 0
    assert flops["encoder_tokens"] == 64 + 16 and flops["decoder_tokens"] == 16
    assert res["speedup"] > 0 and "CPU target" in res["verdict"] and "mfu" not in ours
