"""Checkpoints that load with ``torch.load(weights_only=True)``: plain hyperparameters, and one safe reader.

``weights_only=True`` accepts tensors and plain containers of primitives only. What else a Lightning
checkpoint could hold comes from the model's hyperparameters: an object passed to ``__init__`` (objectives or
an image codebook built in Python, a config dataclass) is pickled as its class. :func:`keep_plain_hparams`
keeps hyperparameters plain at the source: dataclasses become dicts, and objects are left out (they cannot be
rebuilt from a checkpoint anyway). Under LightningCLI the hyperparameters are the config itself (dicts with
``class_path``/``init_args``), so nothing is lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vlm.errors import VLMConfigError

_MISSING = object()


def _plain(value: Any) -> Any:
    """``value`` as None/bool/int/float/str and lists/tuples/str-keyed dicts of those; ``_MISSING`` if it is not one."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _MISSING if any(v is _MISSING for v in items) else type(value)(items)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            return _MISSING
        items = {k: _plain(v) for k, v in value.items()}
        return _MISSING if any(v is _MISSING for v in items.values()) else items
    return _MISSING


def is_plain(value: Any) -> bool:
    """True if ``value`` is (or converts to) plain data that ``torch.load(weights_only=True)`` accepts."""
    return _plain(value) is not _MISSING


def keep_plain_hparams(module: Any) -> list[str]:
    """Make ``module.hparams`` plain in place (dataclasses -> dicts, objects dropped); returns the dropped names."""
    dropped = []
    for store in (module.hparams, getattr(module, "_hparams_initial", None)):
        if store is None:
            continue
        for key in list(store):
            value = _plain(store[key])
            if value is _MISSING:
                del store[key]
                if key not in dropped:
                    dropped.append(key)
            else:
                store[key] = value
    return dropped


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)`` on CPU; clear errors for a bad path."""
    path = Path(path)
    if not path.is_file():
        raise VLMConfigError(f"Checkpoint {str(path)!r} does not exist (or is not a file); pass the .ckpt path "
                             "that ModelCheckpoint wrote, e.g. runs/checkpoints/flava-tiny/last.ckpt.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError names the offending global
        raise VLMConfigError(
            f"Checkpoint {str(path)!r} does not load with torch.load(weights_only=True): {err}. vlm writes "
            "checkpoints without pickled objects; one that holds them came from elsewhere or from an older "
            "version, and is not read here."
        ) from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise VLMConfigError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' entry).")
    return dict(ckpt)


__all__ = ["is_plain", "keep_plain_hparams", "load_checkpoint"]
