"""Import Hugging Face FLAVA weights: ``flava_core_from_hf`` builds a :class:`vlm.models.flava.FLAVACore` (towers,
projections, image codebook) from a ``FlavaModel`` or ``FlavaForPreTraining``; ``flava_from_hf`` builds the
trainable :class:`vlm.models.flava.FLAVA` around such a core, with the pretraining heads in its objectives.

Every HF tensor is mapped or explicitly declared unused; anything else (an unknown name, a shape that does not
fit, one of our tensors left unset) is one clear error. Layout differences handled here:

* HF's separate query/key/value projections -> timm's fused ``qkv`` (rows stacked q, k, v);
* HF's pre-norm layers (``layernorm_before``/``layernorm_after``) -> timm ``Block.norm1``/``norm2``;
* the masked-prediction heads' tied ``bias`` (a second name of ``decoder.bias``) -> ``decoder.bias``;
* ``flava.logit_scale`` -> the GC objective's ``logit_scale``; the image codebook -> ``image_codebook.codebook``.

The towers' poolers (``*.pooler.dense``) are not used by FLAVA's pretraining outputs or losses and are dropped.
"""

from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import torch
from torch import Tensor, nn

from vlm import hub
from vlm.errors import VLMConfigError

#: HF tensors no FLAVA output depends on (the unimodal/multimodal poolers; the ITM head has its own pooler).
UNUSED = re.compile(r"^flava\.(image_model|text_model|multimodal_model)\.pooler\.")
#: HF head prefix -> (objective name, attribute of the objective holding the head)
HEADS = {
    "mim_head": ("mim", "head"),
    "mlm_head": ("mlm", "head"),
    "mmm_image_head": ("mmm", "image_head"),
    "mmm_text_head": ("mmm", "text_head"),
    "itm_head": ("itm", "head"),
}
HEAD_PARTS = {
    "transform.dense": "dense",
    "transform.LayerNorm": "norm",
    "decoder": "decoder",
    "pooler.dense": "pooler",
    "seq_relationship": "classifier",
}
LAYER_PARTS = {
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
TOWERS = {  # HF tower prefix -> our block-stack prefix, our final-norm name
    "flava.image_model": ("image_encoder.vit.blocks", "image_encoder.vit.norm"),
    "flava.text_model": ("text_encoder.encoder.blocks", "text_encoder.encoder.norm"),
    "flava.multimodal_model": ("multimodal_encoder.encoder.blocks", "multimodal_encoder.encoder.norm"),
}
DIRECT = {
    "flava.image_model.embeddings.cls_token": "image_encoder.vit.cls_token",
    "flava.image_model.embeddings.mask_token": "image_encoder.mask_token",
    "flava.image_model.embeddings.position_embeddings": "image_encoder.vit.pos_embed",
    "flava.image_model.embeddings.patch_embeddings.projection.weight": "image_encoder.vit.patch_embed.proj.weight",
    "flava.image_model.embeddings.patch_embeddings.projection.bias": "image_encoder.vit.patch_embed.proj.bias",
    "flava.text_model.embeddings.word_embeddings.weight": "text_encoder.embeddings.word_embeddings.weight",
    "flava.text_model.embeddings.position_embeddings.weight": "text_encoder.embeddings.position_embeddings.weight",
    "flava.text_model.embeddings.token_type_embeddings.weight": "text_encoder.embeddings.token_type_embeddings.weight",
    "flava.text_model.embeddings.LayerNorm.weight": "text_encoder.embeddings.norm.weight",
    "flava.text_model.embeddings.LayerNorm.bias": "text_encoder.embeddings.norm.bias",
    "flava.multimodal_model.cls_token": "multimodal_encoder.cls_token",
}
for _p in ("image_projection", "text_projection", "image_to_mm_projection", "text_to_mm_projection"):
    for _t in ("weight", "bias"):
        DIRECT[f"flava.{_p}.{_t}"] = f"{_p}.{_t}"
#: where the core sits in the LightningModule (the names above are the core's)
CORE_PREFIX = "core."


def load_hf_flava(source: Any) -> nn.Module:
    """A ``FlavaForPreTraining`` (or a bare ``FlavaModel`` object) from an object, a local directory or a hub name
    (offline: one clear error)."""
    from transformers import FlavaForPreTraining, FlavaModel

    if isinstance(source, (FlavaForPreTraining, FlavaModel)):
        return source
    if isinstance(source, (str, os.PathLike)):
        return hub.call_hub(FlavaForPreTraining.from_pretrained, str(source), "HF FLAVA checkpoint")
    raise VLMConfigError(
        f"Expected a FlavaForPreTraining, a local directory or a hub name; got {type(source).__name__}."
    )


def hf_state_of(hf_model: nn.Module) -> dict[str, Tensor]:
    """The state dict of a ``FlavaForPreTraining``, or of a ``FlavaModel`` under the names it has inside one."""
    from transformers import FlavaModel

    state = dict(hf_model.state_dict())
    return {f"flava.{k}": v for k, v in state.items()} if isinstance(hf_model, FlavaModel) else state


def _objective_keys(model: nn.Module) -> dict[str, str]:
    """Objective class name ('gc', 'mim', ...) -> the key under which the model holds it."""
    out: dict[str, str] = {}
    for key, obj in model.objectives.items():
        out.setdefault(getattr(obj, "name", key), key)
    return out


def map_hf_state(hf_state: dict[str, Tensor], model: nn.Module, strict_heads: bool = True) -> dict[str, Tensor]:
    """``model``'s state-dict entries for an HF ``FlavaForPreTraining`` state dict; unknown HF names are an error.

    ``model`` is a :class:`~vlm.models.flava.FLAVA` (core tensors under ``core.``, heads and the logit scale under
    its objectives) or a bare :class:`~vlm.models.flava.FLAVACore` (the heads and the logit scale are dropped).
    """
    from vlm.models.flava import FLAVACore

    bare = isinstance(model, FLAVACore)
    core = _map_hf_tensors(hf_state, {} if bare else _objective_keys(model), strict_heads and not bare)
    if bare:
        return {k: v for k, v in core.items() if not k.startswith("objectives.")}
    return {k if k.startswith("objectives.") else CORE_PREFIX + k: v for k, v in core.items()}


def _map_hf_tensors(hf_state: dict[str, Tensor], objectives: dict[str, str], strict_heads: bool) -> dict[str, Tensor]:
    """Core entries under the core's names, head entries under ``objectives.<key>.``; heads of objectives not in
    ``objectives`` are dropped (or, with ``strict_heads``, reported)."""
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    qkv: dict[str, dict[str, Tensor]] = {}
    for name, tensor in hf_state.items():
        if UNUSED.match(name):
            continue
        if name in DIRECT:
            out[DIRECT[name]] = tensor
            continue
        if name == "flava.logit_scale":
            if "gc" not in objectives:
                if strict_heads:
                    unmapped.append(f"{name} (the model has no 'gc' objective)")
                continue
            out[f"objectives.{objectives['gc']}.logit_scale"] = tensor.reshape(1)  # a 1-element vector here (FSDP)
            continue
        if name.startswith("image_codebook."):
            out["image_codebook.codebook." + name[len("image_codebook."):]] = tensor
            continue
        m = re.match(r"^(flava\.\w+_model)\.(layernorm)\.(weight|bias)$", name)
        if m and m.group(1) in TOWERS:
            out[f"{TOWERS[m.group(1)][1]}.{m.group(3)}"] = tensor
            continue
        m = re.match(r"^(flava\.\w+_model)\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m and m.group(1) in TOWERS:
            tower, idx, part, kind = m.groups()
            prefix = f"{TOWERS[tower][0]}.{idx}"
            qm = re.match(r"^attention\.attention\.(query|key|value)$", part)
            if qm:
                qkv.setdefault(f"{prefix}.attn.qkv.{kind}", {})[qm.group(1)] = tensor
                continue
            if part in LAYER_PARTS:
                out[f"{prefix}.{LAYER_PARTS[part]}.{kind}"] = tensor
                continue
        m = re.match(r"^(\w+_head)\.(.+)$", name)
        if m and m.group(1) in HEADS:
            head, rest = m.groups()
            objective, attr = HEADS[head]
            if objective not in objectives:
                if strict_heads:
                    unmapped.append(f"{name} (the model has no '{objective}' objective)")
                continue
            target = f"objectives.{objectives[objective]}.{attr}"
            if rest == "bias":  # tied to decoder.bias in HF; both names are the same values
                dec = hf_state.get(f"{head}.decoder.bias")
                if dec is not None and not torch.equal(dec, tensor):
                    raise VLMConfigError(f"HF {head}.bias differs from {head}.decoder.bias; they should be tied.")
                out.setdefault(f"{target}.decoder.bias", tensor)
                continue
            pm = re.match(r"^(.+)\.(weight|bias)$", rest)
            if pm and pm.group(1) in HEAD_PARTS:
                out[f"{target}.{HEAD_PARTS[pm.group(1)]}.{pm.group(2)}"] = tensor
                continue
        unmapped.append(name)
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise VLMConfigError(f"Incomplete q/k/v for {key}: found only {sorted(parts)}.")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unmapped:
        raise VLMConfigError(
            f"{len(unmapped)} HF FLAVA tensor(s) have no place in the vlm FLAVA model: {unmapped[:10]}. "
            "Add the missing objectives (gc, itm, mmm, mim, mlm) or pass strict_heads=False to drop their heads."
        )
    return out


@torch.no_grad()
def load_hf_flava_state(model: nn.Module, hf_model: Any, strict_heads: bool = True) -> nn.Module:
    """Copy every tensor of ``hf_model`` (``FlavaForPreTraining`` / ``FlavaModel`` / hub name / dir) into
    ``model`` (a ``FLAVA`` or a ``FLAVACore``) in place."""
    from vlm.models.flava import FLAVACore

    hf_model = load_hf_flava(hf_model)
    mapped = map_hf_state(hf_state_of(hf_model), model, strict_heads=strict_heads)
    own = model.state_dict()
    codebook = model.image_codebook if isinstance(model, FLAVACore) else model.core.image_codebook
    codebook_key = "image_codebook." if isinstance(model, FLAVACore) else CORE_PREFIX + "image_codebook."
    wrong = [f"{k}: HF {tuple(v.shape)} vs ours {tuple(own[k].shape)}"
             for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    extra = sorted(k for k in mapped if k not in own)
    if wrong or extra:
        raise VLMConfigError(
            f"HF FLAVA tensors do not fit the vlm model: shape mismatches {wrong[:8]}, unknown targets {extra[:8]}. "
            "Build the model with flava_from_hf(...) so its sizes follow the HF config."
        )
    ours = {k for k in own if not k.startswith(codebook_key) or codebook is not None}
    missing = sorted(ours - set(mapped))
    if not strict_heads or isinstance(model, FLAVACore):
        missing = [k for k in missing if not k.startswith("objectives.")]
    if missing:
        raise VLMConfigError(
            f"{len(missing)} tensor(s) of the vlm model get no value from the HF checkpoint: {missing[:10]}. "
            "Remove objectives/parts the checkpoint does not have, or build the model with flava_from_hf(...)."
        )
    for k, v in mapped.items():
        own[k].copy_(v.to(own[k].dtype))
    return model


def _mlp_ratio(cfg: Any) -> float:
    return cfg.intermediate_size / cfg.hidden_size


def _check_hf_config(config: Any) -> None:
    for sub in (config.image_config, config.text_config, config.multimodal_config):
        if sub.hidden_act != "gelu":
            raise VLMConfigError(f"HF FLAVA config uses hidden_act={sub.hidden_act!r}; only exact 'gelu' is supported.")
    if not config.multimodal_config.use_cls_token:
        raise VLMConfigError("HF FLAVA config has multimodal use_cls_token=False; vlm FLAVA always uses the CLS token.")


def flava_config_from_hf(config: Any):
    """The :class:`~vlm.models.flava.FLAVAConfig` of an HF ``FlavaConfig`` (towers, projection, codebook size)."""
    from vlm.models.flava import FLAVAConfig

    _check_hf_config(config)
    ic, tc, mc = config.image_config, config.text_config, config.multimodal_config
    image_size = ic.image_size if isinstance(ic.image_size, int) else int(ic.image_size[0])
    patch_size = ic.patch_size if isinstance(ic.patch_size, int) else int(ic.patch_size[0])
    vision = dict(image_size=image_size, patch_size=patch_size, hidden=ic.hidden_size, layers=ic.num_hidden_layers,
                  heads=ic.num_attention_heads, mlp_ratio=_mlp_ratio(ic), layer_norm_eps=ic.layer_norm_eps,
                  qkv_bias=ic.qkv_bias, dropout=ic.hidden_dropout_prob, attn_dropout=ic.attention_probs_dropout_prob,
                  in_chans=ic.num_channels)
    text = dict(kind="flava", vocab_size=tc.vocab_size, hidden=tc.hidden_size, layers=tc.num_hidden_layers,
                heads=tc.num_attention_heads, mlp_ratio=_mlp_ratio(tc), max_positions=tc.max_position_embeddings,
                type_vocab_size=tc.type_vocab_size, pad_token_id=tc.pad_token_id or 0, layer_norm_eps=tc.layer_norm_eps,
                qkv_bias=tc.qkv_bias, dropout=tc.hidden_dropout_prob, attn_dropout=tc.attention_probs_dropout_prob)
    multimodal = dict(hidden=mc.hidden_size, layers=mc.num_hidden_layers, heads=mc.num_attention_heads,
                      mlp_ratio=_mlp_ratio(mc), layer_norm_eps=mc.layer_norm_eps, qkv_bias=mc.qkv_bias,
                      dropout=mc.hidden_dropout_prob, attn_dropout=mc.attention_probs_dropout_prob)
    return FLAVAConfig.named(None, dict(vision=vision, text=text, multimodal=multimodal,
                                        projection_dim=config.projection_dim, codebook_size=ic.vocab_size,
                                        fusion_input="last_layer"))


def flava_core_from_hf(source: Any):
    """A :class:`~vlm.models.flava.FLAVACore` with the sizes and weights of an HF ``FlavaModel`` or
    ``FlavaForPreTraining`` (object / hub name / dir); the latter's image codebook, if it has one, comes along."""
    from vlm.models.flava import FLAVACore

    hf = load_hf_flava(source)
    codebook = getattr(hf, "image_codebook", None)
    core = FLAVACore(flava_config_from_hf(hf.config),
                     image_codebook=copy.deepcopy(codebook) if codebook is not None else None)
    load_hf_flava_state(core, hf)
    return core


def flava_kwargs_from_hf_config(config: Any) -> dict[str, Any]:
    """FLAVA constructor arguments (``config``, objectives with the HF heads' settings, streams, masking ids)
    matching an HF ``FlavaConfig``."""
    import dataclasses

    from vlm.models.flava import DEFAULT_STREAMS
    from vlm.objectives.contrastive import GlobalContrastive
    from vlm.objectives.itm import ImageTextMatching
    from vlm.objectives.mim import MaskedImageModeling
    from vlm.objectives.mlm import MaskedLanguageModeling
    from vlm.objectives.mmm import MaskedMultimodalModeling

    cfg = flava_config_from_hf(config)
    tc = config.text_config
    objectives = {
        "gc": GlobalContrastive(init_temperature=math.exp(-config.logit_scale_init_value)),
        "itm": ImageTextMatching(negatives="batch"),
        "mmm": MaskedMultimodalModeling(text_weight=config.mmm_text_weight, image_weight=config.mmm_image_weight,
                                        target="codebook"),
        "mim": MaskedImageModeling(target="codebook"),
        "mlm": MaskedLanguageModeling(),
    }
    weights = {"gc": config.global_contrastive_weight, "itm": config.itm_weight, "mmm": 1.0,
               "mim": config.mim_weight, "mlm": config.mlm_weight}
    streams = {s: {k: float(weights[k]) for k in ws} for s, ws in DEFAULT_STREAMS.items()}
    return dict(size=None, config=dataclasses.asdict(cfg), objectives=objectives, streams=streams,
                mask_token_id=103 if tc.vocab_size > 103 else 1,
                special_token_ids=tuple(i for i in (0, 100, 101, 102, 103) if i < tc.vocab_size))


def flava_from_hf(source: Any, **overrides: Any):
    """A vlm ``FLAVA`` with the sizes, heads and weights of an HF ``FlavaForPreTraining`` (object / hub name / dir):
    its core as ``flava_core_from_hf`` builds it, the pretraining heads and the logit scale in its objectives.

    ``overrides`` replace FLAVA constructor arguments (e.g. ``lr``, ``streams``, ``compile``); the HF codebook,
    when the checkpoint has one, becomes the model's image tokenizer.
    """
    from vlm.models.flava import FLAVA

    hf = load_hf_flava(source)
    kwargs = flava_kwargs_from_hf_config(hf.config)
    if getattr(hf, "image_codebook", None) is not None and "image_codebook" not in overrides:
        kwargs["image_codebook"] = copy.deepcopy(hf.image_codebook)
    kwargs.update(overrides)
    model = FLAVA(**kwargs)
    strict = "objectives" not in overrides and "streams" not in overrides
    load_hf_flava_state(model, hf, strict_heads=strict)
    return model


__all__ = ["flava_from_hf", "flava_core_from_hf", "flava_config_from_hf", "load_hf_flava_state", "load_hf_flava",
           "map_hf_state", "flava_kwargs_from_hf_config"]
