"""``vlm export``: a trained model as ``model.safetensors`` + ``config.yaml``, loadable without Lightning's Trainer.

    vlm export --ckpt runs/checkpoints/flava-tiny/last.ckpt --out exported/flava-tiny

    from vlm.export import load_exported
    model = load_exported("exported/flava-tiny")      # FLAVA in eval mode, the checkpoint's weights
    model.encode_image(pixel_values), model.encode_text(input_ids, attention_mask)

``config.yaml`` holds the model's ``class_path`` and ``init_args`` (the hyperparameters saved in the checkpoint,
objectives included). Loading builds that class with random weights and loads the safetensors file strictly.
The checkpoint is read with ``torch.load(weights_only=True)``; classes named in a config must be ``nn.Module``
subclasses (nothing else is called).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from vlm.checkpoint import load_checkpoint
from vlm.errors import VLMConfigError

#: file names inside an export directory
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
#: hyperparameter keys LightningCLI adds that are not ``__init__`` arguments
_CLI_KEYS = ("_class_path", "_instantiator")


def import_class(class_path: str, base: type = nn.Module) -> type:
    """The class at ``package.module.Name``; it must be a subclass of ``base`` (nothing else is instantiated)."""
    if not isinstance(class_path, str) or "." not in class_path:
        raise VLMConfigError(f"class_path {class_path!r} must be a dotted path such as 'vlm.models.flava.FLAVA'.")
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise VLMConfigError(f"class_path {class_path!r} does not name an importable class ({err}).") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise VLMConfigError(f"class_path {class_path!r} is not a subclass of {base.__module__}.{base.__name__}; "
                             "only module classes are built from an exported config.")
    return cls


def _instantiate(value: Any) -> Any:
    """Build nested ``{class_path, init_args}`` mappings (e.g. objectives) into modules; other values as they are."""
    if isinstance(value, Mapping):
        if "class_path" in value:
            cls = import_class(value["class_path"])
            kwargs = {**dict(value.get("init_args") or {}), **dict(value.get("dict_kwargs") or {})}
            return _call(cls, {k: _instantiate(v) for k, v in kwargs.items()})
        return {k: _instantiate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_instantiate(v) for v in value]
    return value


def _call(cls: type, kwargs: dict[str, Any]) -> Any:
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(kwargs) - set(params)) if not takes_any else []
    if unknown:
        raise VLMConfigError(f"init_args {unknown} are not arguments of {cls.__module__}.{cls.__qualname__}; "
                             "remove them from the config.")
    return cls(**kwargs)


def checkpoint_model_config(ckpt: Mapping[str, Any], class_path: str | None = None) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of the model saved in a Lightning checkpoint (from its hyperparameters)."""
    hparams = dict(ckpt.get("hyper_parameters") or {})
    saved = hparams.get("_class_path")
    for key in _CLI_KEYS:
        hparams.pop(key, None)
    class_path = class_path or saved
    if class_path is None:
        raise VLMConfigError(
            "The checkpoint's hyper_parameters do not name the model class (the model was not built by `vlm "
            "fit`); pass it: `vlm export ... --class-path vlm.models.flava.FLAVA`."
        )
    return {"class_path": class_path, "init_args": hparams}


def build_model(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """The model ``config`` describes, with random weights; ``overrides`` replace init_args (e.g. a local path)."""
    if not isinstance(config, Mapping) or "class_path" not in config:
        raise VLMConfigError(f"A model config needs 'class_path' and 'init_args'; got keys {sorted(config or {})}.")
    cls = import_class(config["class_path"])
    init_args = {**dict(config.get("init_args") or {}), **dict(overrides or {})}
    return _call(cls, {k: _instantiate(v) for k, v in init_args.items()})


def _mismatch(what: str, cls: str, missing: list[str], unexpected: list[str], fix: str) -> VLMConfigError:
    def some(keys: list[str]) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

    parts = ([f"missing from the weights: {some(missing)}"] if missing else []) + (
        [f"not in the model: {some(unexpected)}"] if unexpected else [])
    return VLMConfigError(f"{what} does not match the {cls} its config builds ({'; '.join(parts)}). {fix}")


def export(ckpt_path: str | Path, out_dir: str | Path, class_path: str | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.yaml`` from a Lightning checkpoint; returns ``out_dir``.

    The model is rebuilt from the checkpoint's hyperparameters and loads its ``state_dict`` strictly before
    anything is written, so an export that succeeds also loads. Shared (tied) tensors are stored once.
    """
    from safetensors.torch import save_model

    ckpt = load_checkpoint(ckpt_path)
    config = checkpoint_model_config(ckpt, class_path)
    model = build_model(config)
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as err:
        raise VLMConfigError(f"The checkpoint's state_dict ({ckpt_path}) does not fit the {type(model).__name__} "
                             f"its hyperparameters build: {str(err).strip()}") from err
    if missing or unexpected:
        raise _mismatch(
            f"The checkpoint's state_dict ({ckpt_path})", type(model).__name__, list(missing), list(unexpected),
            "Its hyperparameters do not describe the trained model (e.g. objectives built in Python rather than "
            "in a config): rebuild it with `vlm fit --config ...`, or pass --class-path for the right class.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS_NAME), metadata={"format": "pt", "source": Path(ckpt_path).name,
                                                         "global_step": str(ckpt.get("global_step", ""))})
    header = ("# Written by `vlm export`: the model class and its init_args. Load with\n"
              "#   vlm.export.load_exported(DIR)  (builds this class, then loads model.safetensors strictly)\n")
    (out / CONFIG_NAME).write_text(header + yaml.safe_dump(config, sort_keys=False))
    return out


def load_exported(directory: str | Path, overrides: Mapping[str, Any] | None = None,
                  device: str = "cpu") -> nn.Module:
    """The model exported to ``directory`` in eval mode: built from ``config.yaml``, weights loaded strictly.

    ``overrides`` replace init_args before building (e.g. ``{"compile": False}`` or a local path in place of a
    hub name while offline).
    """
    from safetensors.torch import load_model

    root = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (root / name).is_file():
            raise VLMConfigError(f"{str(root / name)!r} is missing; an export directory holds {CONFIG_NAME} and "
                                 f"{WEIGHTS_NAME}. Write one with `vlm export --ckpt PATH --out {root}`.")
    try:
        config = yaml.safe_load((root / CONFIG_NAME).read_text())
    except yaml.YAMLError as err:
        raise VLMConfigError(f"{str(root / CONFIG_NAME)!r} is not valid YAML: {err}") from err
    model = build_model(config, overrides)
    try:
        missing, unexpected = load_model(model, str(root / WEIGHTS_NAME), strict=False)
    except RuntimeError as err:  # same names, other shapes (load_state_dict's "size mismatch for ...")
        raise VLMConfigError(
            f"{str(root / WEIGHTS_NAME)!r} does not fit the {type(model).__name__} that {CONFIG_NAME} builds: "
            f"{str(err).strip()} Change init_args in {CONFIG_NAME} back to the sizes the weights were trained "
            "with (or drop the overrides), or export the checkpoint again.") from err
    if missing or unexpected:
        raise _mismatch(
            str(root / WEIGHTS_NAME), type(model).__name__, list(missing), list(unexpected),
            f"Change init_args in {CONFIG_NAME} back to the values the weights were trained with (or drop the "
            "overrides), or export the checkpoint again.")
    return model.to(device).eval()


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``vlm export`` (arguments after ``export``)."""
    p = argparse.ArgumentParser(prog="vlm export", description="Write a checkpoint's model as safetensors + config.")
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) written by `vlm fit`")
    p.add_argument("--out", required=True, help="directory to write model.safetensors and config.yaml into")
    p.add_argument("--class-path", default=None,
                   help="model class, when the checkpoint does not name it (models built outside `vlm fit`)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``vlm export``; return the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.class_path)
    except VLMConfigError as err:
        print(f"vlm: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / WEIGHTS_NAME} and {out / CONFIG_NAME}")
    return 0


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "build_model", "checkpoint_model_config", "export", "import_class",
           "load_exported"]
