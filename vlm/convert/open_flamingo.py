"""Import OpenFlamingo weights (the ``open_flamingo`` package, v2) into :mod:`vlm.modules`.

Our layers keep OpenFlamingo's attention names (``norm``, ``to_q``, ``to_kv``, ``to_out``, ``attn_gate``,
``ff_gate``), so the import is a key rename plus:

* the Perceiver's ``layers.{i}.0`` / ``layers.{i}.1`` (attention, feed-forward) -> ``layers.{i}.attn`` /
  ``layers.{i}.ff``, with ``norm_latents`` -> ``attn.norm`` and ``norm_media`` -> ``attn.norm_context``;
* the feed-forward ``nn.Sequential`` indices ``0, 1, 3`` -> ``norm, proj_in, proj_out``;
* ``media_time_embs [M, 1, D]`` -> ``media_embs [M, D]``.

Files are read with safetensors (``.safetensors``) or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from vlm.errors import VLMConfigError

_FF = {"0": "norm", "1": "proj_in", "3": "proj_out"}
_PERCEIVER_ATTN = {"norm_media": "norm_context", "norm_latents": "norm", "to_q": "to_q", "to_kv": "to_kv",
                   "to_out": "to_out"}
_PERCEIVER_LAYER = re.compile(r"^layers\.(\d+)\.([01])\.([A-Za-z_]+|\d+)\.(weight|bias)$")
_FF_KEY = re.compile(r"^ff\.(\d+)\.(weight|bias)$")
_XATTN_ATTN = re.compile(r"^attn\.(norm|to_q|to_kv|to_out)\.(weight|bias)$")
_LIST_FORM = re.compile(r"^lang_encoder\.(?:.+\.)?gated_cross_attn_layers\.(\d+)\.(.+)$")
_LAYER_FORM = re.compile(r"^lang_encoder\..+\.(\d+)\.gated_cross_attn_layer\.(.+)$")


def _unknown(kind: str, key: str) -> VLMConfigError:
    return VLMConfigError(f"{kind}: unexpected OpenFlamingo key {key!r}.")


def perceiver_from_open_flamingo(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys of an ``open_flamingo.src.helpers.PerceiverResampler`` state dict -> :class:`PerceiverResampler`'s."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in ("latents", "frame_embs") or key.startswith("norm."):
            out[key] = value
        elif key == "media_time_embs":
            out["media_embs"] = value.reshape(value.shape[0], value.shape[-1])
        elif m := _PERCEIVER_LAYER.match(key):
            layer, part, name, leaf = m.groups()
            if part == "0" and name in _PERCEIVER_ATTN:
                out[f"layers.{layer}.attn.{_PERCEIVER_ATTN[name]}.{leaf}"] = value
            elif part == "1" and name in _FF:
                out[f"layers.{layer}.ff.{_FF[name]}.{leaf}"] = value
            else:
                raise _unknown("perceiver_from_open_flamingo", key)
        else:
            raise _unknown("perceiver_from_open_flamingo", key)
    return out


def xattn_from_open_flamingo(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys of an ``open_flamingo.src.helpers.GatedCrossAttentionBlock`` -> :class:`GatedCrossAttentionBlock`'s."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in ("attn_gate", "ff_gate") or _XATTN_ATTN.match(key):
            out[key] = value
        elif (m := _FF_KEY.match(key)) and m.group(1) in _FF:
            out[f"ff.{_FF[m.group(1)]}.{m.group(2)}"] = value
        else:
            raise _unknown("xattn_from_open_flamingo", key)
    return out


def read_state_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a torch pickle (loaded with ``weights_only=True``)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_open_flamingo_state(state: Mapping[str, Tensor] | str | os.PathLike) -> dict[str, Tensor]:
    """A released OpenFlamingo checkpoint (state dict or file) -> our resampler and cross-attention weights.

    Output keys:

    * ``resampler.<key>``: a :class:`vlm.modules.PerceiverResampler` state dict (from ``perceiver.*``);
    * ``xattn.<i>.<key>``: a :class:`vlm.modules.GatedCrossAttentionBlock` state dict for the block that
      OpenFlamingo runs before decoder layer ``i`` of the language model (``i`` is the decoder-layer index,
      so with ``cross_attn_every_n_layers=4`` the blocks are ``xattn.3``, ``xattn.7``, ...).

    The blocks are found under ``lang_encoder.gated_cross_attn_layers.<i>.*`` and/or under the decoder
    layer wrappers ``lang_encoder.<decoder layers attr>.<i>.gated_cross_attn_layer.*`` (a full
    ``state_dict()`` holds both names for the same tensors; they must agree). A training checkpoint's
    ``model_state_dict`` and a DDP ``module.`` prefix are unwrapped. Everything else (the vision encoder,
    the language model's own weights and embeddings) is not part of the output.
    """
    if not isinstance(state, Mapping):
        state = read_state_file(state)
    if "model_state_dict" in state and isinstance(state["model_state_dict"], Mapping):
        state = state["model_state_dict"]
    perceiver: dict[str, Tensor] = {}
    blocks: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("perceiver."):
            perceiver[key.removeprefix("perceiver.")] = value
            continue
        m = _LIST_FORM.match(key) or _LAYER_FORM.match(key)
        if m is None:
            continue
        block, name = blocks.setdefault(int(m.group(1)), {}), m.group(2)
        if name in block and not torch.equal(block[name], value):
            raise VLMConfigError(
                f"convert_open_flamingo_state: cross-attention layer {m.group(1)} has two different values for {name!r}."
            )
        block[name] = value
    out = {f"resampler.{k}": v for k, v in perceiver_from_open_flamingo(perceiver).items()}
    for i in sorted(blocks):
        out.update({f"xattn.{i}.{k}": v for k, v in xattn_from_open_flamingo(blocks[i]).items()})
    return out
