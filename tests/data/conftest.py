"""Shared fixtures of the data tests."""

import pytest

from vlm.hub import minilm_path


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # trained tokenizers and written shards go to the test session's temp dir, never the user's home cache
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vlm-cache"))


def minilm_vocab() -> dict[str, int]:
    """token -> id, read straight from the shipped vocab.txt (independent of any tokenizer code)."""
    lines = (minilm_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {tok: i for i, tok in enumerate(lines)}
