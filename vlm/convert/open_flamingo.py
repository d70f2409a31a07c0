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
from torch import Tensor, nn

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


def load_flamingo_weights(core: nn.Module, source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, list[str]]:
    """Load trained Flamingo parts into a ``FlamingoCore``: a released OpenFlamingo checkpoint, or this model's own
    trainable parameters (``FlamingoCore.trainable_state_dict()`` saved with safetensors/torch).

    OpenFlamingo checkpoints give the Perceiver Resampler and every gated cross-attention block; the LM and the
    vision tower come from their own configs (use the LM the checkpoint was trained with: the block count and
    widths are checked). Returns ``{"loaded": [...], "kept": [...]}``: what was set, and the trainable
    parameters the source did not carry. A shape mismatch or a block the model lacks is one clear error.
    """
    from vlm.encoders.lm import decoder_layers

    state = dict(source) if isinstance(source, Mapping) else read_state_file(source)
    for wrapper in ("model_state_dict", "state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = dict(state[wrapper])
    openflamingo = any(k.split(".", 1)[0] in ("perceiver", "lang_encoder", "vision_encoder")
                       or k.startswith("module.") for k in state)
    own = dict(core.named_parameters())
    target: dict[str, Tensor] = {}
    if openflamingo:
        layers = decoder_layers(core.lm)
        prefix = {id(m): n for n, m in core.named_modules()}
        for key, value in convert_open_flamingo_state(state).items():
            part, rest = key.split(".", 1)
            if part == "resampler":
                target[f"resampler.{rest}"] = value
                continue
            index, name = rest.split(".", 1)
            layer = layers[int(index)] if int(index) < len(layers) else None
            xattn = getattr(layer, "xattn", None) if layer is not None else None
            if xattn is None:
                raise VLMConfigError(
                    f"The checkpoint has a gated cross-attention block before LM block {index}, but this model has "
                    f"none there (blocks {len(layers)}, cross_attn_every={getattr(core.cfg, 'cross_attn_every', '?')}). "
                    "Match cross_attn_every and the LM to the checkpoint's.")
            target[f"{prefix[id(xattn)]}.{name}"] = value
    else:
        for key, value in state.items():
            target[key[len("core."):] if key.startswith("core.") else key] = value
    unknown = sorted(k for k in target if k not in own)
    if unknown:
        raise VLMConfigError(f"Checkpoint keys with no parameter in this model: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}. Is it a Flamingo checkpoint of this shape?")
    for key, value in target.items():
        if own[key].shape != value.shape:
            raise VLMConfigError(
                f"Checkpoint tensor {key} has shape {tuple(value.shape)} but the model's is {tuple(own[key].shape)}: "
                "the checkpoint was trained with other sizes (vision width, LM width, heads, latents).")
        with torch.no_grad():
            own[key].copy_(value.to(own[key].dtype))
    kept = sorted(k for k, p in own.items() if p.requires_grad and k not in target)
    return {"loaded": sorted(target), "kept": kept}
