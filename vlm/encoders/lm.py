"""Language-model factory: a Hugging Face causal or seq2seq LM from a config (random init) or pretrained weights.

The decoder models (Flamingo, PaLI) need three things from the LM besides the model itself: its decoder blocks
(to interleave gated cross-attention), its width, and the size of its input embedding table (new tokens such as
``<image>`` get rows from a separate trainable embedding, so this file never resizes the LM).

Extra keyword arguments of ``model(input_ids, ..., **kwargs)`` reach every decoder-layer call in transformers 5.x
(plain forward, with ``labels=``, under gradient checkpointing). ``generate`` rejects keyword arguments that the
model's signatures do not name, so conditioning during generation goes through :func:`layer_kwargs` instead (forward
pre-hooks that add the keywords to every decoder-layer call, every step). ``tests/encoders/test_lm_kwargs.py`` pins
both for GPT-2, OPT, Llama and Qwen2.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from vlm import hub
from vlm.encoders.vision import coerce_numbers
from vlm.errors import VLMConfigError

LM_KINDS = ("causal", "seq2seq")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "16": torch.float16,
}  # fmt: skip
#: where the decoder blocks live, relative to ``model.get_decoder()`` (GPT-2, Llama/Qwen/Mistral, OPT, T5, others)
_LAYER_ATTRS = ("h", "layers", "block", "blocks", "layer", "decoder.layers", "decoder.block")


@dataclass
class LMConfig:
    """Source and loading options of a language model (plain types, so it can live in YAML)."""

    pretrained: str | None = None  #: hub name, or a local directory saved with ``save_pretrained``
    config: dict | None = None  #: random init: a transformers config as a dict with ``model_type`` (and sizes)
    kind: str = "causal"  #: "causal" (AutoModelForCausalLM) or "seq2seq" (AutoModelForSeq2SeqLM)
    dtype: str | None = None  #: parameter dtype: None/"float32", "bfloat16", "float16", or "auto" (checkpoint's)
    attn_implementation: str | None = "sdpa"  #: "sdpa", "eager", "flash_attention_2", ...; None: transformers' pick
    gradient_checkpointing: bool = False  #: recompute each decoder layer in the backward pass

    @classmethod
    def from_any(cls, cfg: Any) -> LMConfig:
        """Accept an LMConfig, a dict (YAML) or None; unknown keys and an unclear source are one clear error each.

        None gives ``LMConfig()``, which has no source and so fails :meth:`validate` (set ``pretrained`` or ``config``).
        """
        if cfg is None:
            out = cls()
        elif isinstance(cfg, cls):
            out = cfg
        elif isinstance(cfg, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise VLMConfigError(
                    f"Unknown key(s) {unknown} in the language-model config; known keys: {sorted(known)}."
                )
            out = cls(**coerce_numbers(cfg, {f.name: f.type for f in fields(cls)}, "lm"))
        else:
            raise VLMConfigError(f"The language-model config must be a mapping, got {type(cfg).__name__}.")
        out.validate()
        return out

    def validate(self) -> None:
        """Raise :class:`VLMConfigError` naming what to set when the fields do not describe one language model."""
        if (self.pretrained is None) == (self.config is None):
            what = "both are set" if self.pretrained is not None else "neither is set"
            raise VLMConfigError(
                f"The language model needs exactly one source, but {what}: set lm.pretrained to a hub name or a "
                "local directory saved with save_pretrained, or lm.config to a transformers config dict with a "
                "'model_type' (e.g. {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 4}) for a random init."
            )
        if self.pretrained is not None and (not isinstance(self.pretrained, (str, os.PathLike)) or not str(self.pretrained)):
            raise VLMConfigError(f"lm.pretrained must be a hub name or a local directory, got {self.pretrained!r}.")
        if self.config is not None:
            if not isinstance(self.config, dict) or not self.config.get("model_type"):
                raise VLMConfigError(
                    "lm.config must be a mapping with a 'model_type' (e.g. {model_type: llama, hidden_size: 64, "
                    f"num_hidden_layers: 2, num_attention_heads: 4, ...}}); got {self.config!r}."
                )
        if self.kind not in LM_KINDS:
            raise VLMConfigError(f"lm.kind={self.kind!r}: expected one of {list(LM_KINDS)}.")
        if self.dtype is not None and self.dtype != "auto" and _dtype_key(self.dtype) not in _DTYPES:
            raise VLMConfigError(f"lm.dtype={self.dtype!r}: expected one of {sorted(set(_DTYPES))}, 'auto' or null.")

    def torch_dtype(self) -> torch.dtype | str:
        """The parameter dtype to build with (float32 unless set; "auto" keeps a checkpoint's own dtype)."""
        if self.dtype is None:
            return torch.float32
        if self.dtype == "auto":
            return "auto"
        return _DTYPES[_dtype_key(self.dtype)]


def _dtype_key(dtype: Any) -> str:
    return str(dtype).lower().removeprefix("torch.")


def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM


def _vocab_of(tokenizer_or_size: Any) -> int:
    return int(tokenizer_or_size) if isinstance(tokenizer_or_size, int) else len(tokenizer_or_size)


def _wrong_kind(err: ValueError, cfg: LMConfig, model_type: str | None) -> VLMConfigError:
    other = "seq2seq" if cfg.kind == "causal" else "causal"
    return VLMConfigError(
        f"A {model_type or 'this'} model cannot be built as lm.kind={cfg.kind!r} ({err}). "
        f"Set lm.kind: {other} if it is a {'encoder-decoder' if other == 'seq2seq' else 'decoder-only'} model."
    )


def _from_config(cfg: LMConfig, vocab_size: int | None) -> nn.Module:
    from transformers import AutoConfig

    kwargs = dict(cfg.config)
    model_type = kwargs.pop("model_type")
    if kwargs.get("vocab_size") is None:
        kwargs.pop("vocab_size", None)
        if vocab_size is not None:
            kwargs["vocab_size"] = int(vocab_size)
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError) as err:
        raise VLMConfigError(f"lm.config: cannot build a {model_type!r} config ({err}).") from err
    extra = {} if cfg.attn_implementation is None else {"attn_implementation": cfg.attn_implementation}
    try:
        model = _auto_class(cfg.kind).from_config(config, trust_remote_code=False, **extra)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise _wrong_kind(err, cfg, model_type) from err
        raise VLMConfigError(f"lm.config: cannot build the {model_type!r} model ({err}).") from err
    dtype = cfg.torch_dtype()
    return model.to(torch.float32 if dtype == "auto" else dtype)


def _from_pretrained(cfg: LMConfig) -> nn.Module:
    source = str(cfg.pretrained)
    extra = {} if cfg.attn_implementation is None else {"attn_implementation": cfg.attn_implementation}
    auto = _auto_class(cfg.kind)

    def load(src: str) -> nn.Module:
        return auto.from_pretrained(src, trust_remote_code=False, dtype=cfg.torch_dtype(), **extra)

    try:
        return hub.call_hub(load, source, "Language model weights")
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise _wrong_kind(err, cfg, None) from err
        raise


def build_lm(cfg: LMConfig | dict, vocab_size: int | None = None, *, tokenizer: Any = None) -> nn.Module:
    """Build a Hugging Face ``PreTrainedModel`` (causal or seq2seq LM) from ``cfg``.

    ``cfg.config``: random init (offline; drawn from the global torch RNG, so ``torch.manual_seed`` makes it
    reproducible); its ``vocab_size`` defaults to ``vocab_size`` or ``len(tokenizer)`` when absent.
    ``cfg.pretrained``: a local directory or hub name via ``from_pretrained`` (safetensors preferred,
    ``trust_remote_code=False``); a hub name while ``HF_HUB_OFFLINE=1`` raises :class:`vlm.errors.OfflineHubError`.
    With ``vocab_size``/``tokenizer`` given, :func:`check_tokenizer` runs on the result.
    """
    cfg = LMConfig.from_any(cfg)
    if vocab_size is None and tokenizer is not None:
        vocab_size = _vocab_of(tokenizer)
    model = _from_config(cfg, vocab_size) if cfg.config is not None else _from_pretrained(cfg)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if vocab_size is not None:
        check_tokenizer(model, vocab_size)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant, so keyword tensors get gradients too)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def text_config(model: nn.Module):
    """The text (decoder) part of a model's config (the config itself for plain LMs)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _num_decoder_layers(model: nn.Module) -> int | None:
    config = text_config(model)
    if getattr(config, "is_encoder_decoder", False):
        for name in ("num_decoder_layers", "decoder_layers"):  # T5, BART-style
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
    value = getattr(config, "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def _get(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of a causal LM, or of a seq2seq LM's decoder.

    Known places first (GPT-2 ``transformer.h``, OPT ``model.decoder.layers``, Llama/Qwen/Mistral ``model.layers``,
    T5 ``decoder.block``), then the one ModuleList whose length is the text config's number of decoder layers.
    Replacing entries of the returned list replaces the model's blocks.
    """
    expected = _num_decoder_layers(model)
    is_seq2seq = bool(getattr(text_config(model), "is_encoder_decoder", False))
    roots: list[nn.Module] = []
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        try:
            decoder = getter()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if isinstance(decoder, nn.Module):
            roots.append(decoder)
    if not is_seq2seq or not roots:  # a seq2seq model's own lists include the encoder's blocks
        roots.append(model)

    def fits(m: Any) -> bool:
        return isinstance(m, nn.ModuleList) and len(m) > 0 and (expected is None or len(m) == expected)

    for root in roots:
        for attr in _LAYER_ATTRS:
            found = _get(root, attr)
            if fits(found):
                return found
    if expected is not None:
        for root in roots:
            found = {id(m): (name, m) for name, m in root.named_modules() if fits(m)}
            if len(found) == 1:
                return next(iter(found.values()))[1]
            if len(found) > 1:
                names = sorted((name for name, _ in found.values()), key=lambda n: (n.count("."), n))
                raise VLMConfigError(
                    f"{type(model).__name__}: several ModuleLists have {expected} entries ({names}); cannot tell "
                    "which holds the decoder blocks."
                )
    lists = [f"{name} ({len(m)})" for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    raise VLMConfigError(
        f"Cannot find the decoder blocks of {type(model).__name__}: expected a ModuleList of "
        f"{expected if expected is not None else 'num_hidden_layers'} entries; ModuleLists found: {lists[:12]}."
    )


@contextmanager
def layer_kwargs(model: nn.Module, **kwargs: Any) -> Iterator[None]:
    """Inside the block every call of a :func:`decoder_layers` entry also gets ``kwargs`` (overriding same names).

    Use it around ``model.generate(...)``, which refuses keyword arguments the model does not declare; it works for a
    plain forward too. The hooks sit on the entries as they are when the block is entered.
    """

    def add(module: nn.Module, args: tuple, call_kwargs: dict) -> tuple[tuple, dict]:
        return args, {**call_kwargs, **kwargs}

    handles = [layer.register_forward_pre_hook(add, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_size(model: nn.Module) -> int:
    """Width of the LM's hidden states (text config ``hidden_size`` / ``n_embd`` / ``d_model``)."""
    config = text_config(model)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return int(model.get_input_embeddings().embedding_dim)


def base_vocab_size(model: nn.Module) -> int:
    """Number of rows of the LM's input embedding table (ids at or above it need rows from elsewhere)."""
    return int(model.get_input_embeddings().num_embeddings)


def check_tokenizer(model: nn.Module, tokenizer: Any, extra_rows: int = 0) -> None:
    """One clear error when the tokenizer has more ids than the LM has embedding rows.

    ``tokenizer`` is a tokenizer (``len(tokenizer)`` counts added tokens) or a vocabulary size. ``extra_rows``
    is the number of ids the caller gives rows elsewhere (e.g. a trainable embedding for ``<image>``).
    A tokenizer smaller than the table is fine (many LMs pad their table).
    """
    size = _vocab_of(tokenizer)
    rows = base_vocab_size(model)
    if size > rows + int(extra_rows):
        added = ""
        if not isinstance(tokenizer, int) and hasattr(tokenizer, "vocab_size"):
            added = f" ({size - int(tokenizer.vocab_size)} of them added tokens)"
        extra = f" plus {extra_rows} extra rows" if extra_rows else ""
        raise VLMConfigError(
            f"The tokenizer has {size} tokens{added} but the language model's input embedding table has "
            f"{rows} rows{extra}. Use the tokenizer the LM was trained with, set lm.config.vocab_size: {size - extra_rows} "
            "(or leave it out so the tokenizer sets it) for a random init, or give the added tokens their own "
            "embedding rows."
        )


__all__ = [
    "LMConfig", "LM_KINDS", "build_lm", "decoder_layers", "hidden_size", "base_vocab_size", "check_tokenizer",
    "text_config", "layer_kwargs", "enable_checkpointing",
]
