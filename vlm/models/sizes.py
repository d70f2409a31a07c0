"""Named model sizes: a family's ``SIZES`` table with a user's overrides laid over it, checked once for all families."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from vlm.errors import VLMConfigError


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` laid over ``base``: nested mappings merge key by key (two levels), None keeps the base."""
    out = copy.deepcopy(dict(base))
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            merged = dict(out[k])
            for kk, vv in v.items():
                if isinstance(vv, Mapping) and isinstance(merged.get(kk), Mapping):
                    merged[kk] = {**merged[kk], **vv}
                else:
                    merged[kk] = vv
            out[k] = merged
        else:
            out[k] = v
    return out


def sized_fields(family: str, sizes: Mapping[str, Mapping[str, Any]], fields: Iterable[str], size: str | None,
                 overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields of ``family``'s named ``size`` (or none) with ``overrides`` merged in; one clear error for an
    unknown size or key. An ``lm`` given as ``pretrained`` drops the size's random-init ``config``."""
    if size is not None and size not in sizes:
        raise VLMConfigError(f"Unknown {family} size {size!r}; named sizes are {sorted(sizes)} (or null).")
    names = set(fields)
    unknown = sorted(set(overrides or {}) - names)
    if unknown:
        raise VLMConfigError(f"Unknown {family} config key(s) {unknown}; known: {sorted(names)}.")
    out = merge_overrides(sizes[size] if size else {}, overrides or {})
    if isinstance(out.get("lm"), Mapping) and out["lm"].get("pretrained"):
        out["lm"] = {k: v for k, v in out["lm"].items() if k != "config"}
    return out
