"""Test-wide settings: never touch the network, keep wandb offline, keep CPU threads modest."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist workers share the cores: more torch threads than cores per worker makes OpenMP threads spin
# against each other (small ops, e.g. token-by-token generation, slow down several-fold)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 2) // _WORKERS))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True, scope="session")
def _shared_tower_cache(tmp_path_factory):
    """Towers pretrained on the synthetic world (``pretrained: synthetic``, a minute or two each) are trained once
    per test run and shared by every test and worker, as runs on one machine share them; data caches stay per test."""
    if "VLM_TOWER_CACHE_DIR" not in os.environ:
        # the parent of this worker's base temp dir is shared by the xdist workers of one run
        os.environ["VLM_TOWER_CACHE_DIR"] = str(tmp_path_factory.getbasetemp().parent / "vlm-towers")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A fresh working directory for a CLI run: its own cache, wandb offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path
