"""The ``vlm`` command: LightningCLI (fit/validate/test/predict) with omegaconf interpolation, plus small extras.

    vlm fit --config conf/flava/tiny.yaml --trainer.max_steps=50
    vlm data synth --out data/synth --num 2000
    vlm export --ckpt runs/checkpoints/flava-tiny/last.ckpt --out exported/flava-tiny
    vlm validate --config conf/flava/tiny.yaml --ckpt_path runs/checkpoints/flava-tiny/last.ckpt
        # results table, and runs/checkpoints/flava-tiny/last.validate.json (vlm.callbacks.EvalReport)

Several ``--config`` files and dotted overrides are merged into one config before jsonargparse reads it
(``merge_config_args``): mappings merge key by key, lists and scalars replace, and a changed ``class_path``
starts that class from its defaults.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

EVAL_COMMANDS = ("validate", "test")  # subcommands whose results EvalReport prints and writes as JSON
EXTRAS = {
    "data": "vlm data synth --out DIR --num N   write the synthetic world as WebDataset shards",
    "export": "vlm export --ckpt PATH --out DIR     model.safetensors + config.yaml, loadable without Lightning",
    "report": "vlm report RUN_DIR [--out FILE]     one offline HTML page of a run's plots and predictions",
}


class VLMCLI(LightningCLI):
    """LightningCLI whose configs are read with omegaconf (``${...}`` interpolation) and name any model/data class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf", "default_env": False})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        # `--ckpt_path` is read with torch.load(weights_only=True) unless `--weights_only=false` is given: vlm's
        # checkpoints hold only tensors and plain data (vlm.checkpoint), whatever torch's own default is.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            parser.set_defaults(weights_only=True)
        if subcommand in EVAL_COMMANDS:
            parser.set_defaults(verbose=False)  # EvalReport prints the results (`--verbose=true`: Lightning's too)
        return parser

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # `vlm validate` / `vlm test` print their results and write them as JSON (vlm.callbacks.EvalReport),
        # unless the config's callbacks already hold a report
        from vlm.callbacks.eval_report import EvalReport

        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if self.subcommand in EVAL_COMMANDS and not any(isinstance(c, EvalReport) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, EvalReport()]
        return super()._instantiate_trainer(config, callbacks)

    def parse_arguments(self, parser, args) -> None:
        """Merge the ``--config`` files and dotted overrides (``merge_config_args``), then parse as LightningCLI does."""
        if isinstance(args, (dict, Mapping)) or (args is not None and not isinstance(args, (list, tuple))):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        start = 0
        if getattr(parser, "_subcommands_action", None) is not None:  # `vlm fit ...`: rewrite what follows `fit`
            start = next((i + 1 for i, a in enumerate(argv) if a in parser._subcommands_action.choices), len(argv))
        merged = argv[:start] + merge_config_args(argv[start:])
        if merged == argv:
            return super().parse_arguments(parser, args)
        self.config = parser.parse_args(merged)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps our errors in a long union-validation message
            cause = _config_error_in(err)
            if cause is None:
                raise
            raise cause from None


# ---------------------------------------------------------------------------------------------- config merging
_CONFIG_FLAGS = ("-c", "--config")
_NEGATIVE_NUMBER = re.compile(r"^-\d")


def merge_into(base: Any, new: Any) -> Any:
    """``new`` laid over ``base``: mappings merge key by key, anything else (lists, scalars) replaces.

    A mapping with a ``class_path`` other than ``base``'s replaces it whole (the new class starts from its own
    defaults, not the old class's ``init_args``); an empty mapping ``{}`` replaces (clears); ``null`` over a
    mapping removes that key (its default applies); a mapping without ``class_path``/``init_args`` laid over a
    class spec sets that class's ``init_args``.
    """
    if not isinstance(new, Mapping) or not new:
        return new
    if isinstance(base, str) and "class_path" not in new and "init_args" in new:
        base = {"class_path": base}  # `logger: CSVLogger` then `logger: {init_args: {...}}`
    if not isinstance(base, Mapping):
        return dict(new)
    if "class_path" in base and "class_path" in new and new["class_path"] != base["class_path"]:
        return dict(new)
    if "class_path" in base and not {"class_path", "init_args", "dict_kwargs"} & set(new):
        new = {"init_args": dict(new)}
    out = dict(base)
    for key, value in new.items():
        if value is None and isinstance(out.get(key), Mapping):
            out.pop(key)
        elif key in out:
            out[key] = merge_into(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(cfg: dict, key: str, raw: str) -> dict:
    """``cfg`` with the dotted ``key`` set to the command-line string ``raw`` (merged as a config would be).

    Scalars stay strings: jsonargparse converts them by the key's type, exactly as it converts a command-line
    value. A mapping (``'{gc: 0.5}'``) or ``null`` is loaded, so it merges (or removes) like one in a file.
    """
    from jsonargparse import get_loader

    try:
        value = get_loader("yaml")(raw)
    except Exception:  # not YAML: a plain string
        value = raw
    if not (isinstance(value, Mapping) or value is None):
        value = raw
    return merge_into(cfg, _nested(key.split("."), value))


def _nested(parts: list[str], leaf: Any) -> Any:
    for part in reversed(parts):
        leaf = {part: leaf}
    return leaf


def _foldable(cfg: Mapping, key: str, kept: set[str]) -> bool:
    """Whether ``--key=value`` can be merged: it sets a key under mappings only (``--trainer.callbacks.monitor``
    after ``--trainer.callbacks+=EarlyStopping`` sets the last list item: jsonargparse's rule, left to it)."""
    parts = key.split(".")
    if any(".".join(parts[:n]) in kept for n in range(1, len(parts) + 1)):
        return False
    node: Any = cfg
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            return True
        if not isinstance(node, Mapping):
            return False
    return True


def _load_config(value: str) -> Mapping | None:
    from jsonargparse import get_loader

    try:
        is_file = Path(value).is_file()
    except OSError:  # a YAML string too long to be a path name
        is_file = False
    try:
        cfg = get_loader("yaml")(Path(value).read_text() if is_file else value)
    except Exception:  # OSError (a name too long to be a path), a YAML error: jsonargparse reports it
        return None
    return cfg if isinstance(cfg, Mapping) else None


def merge_config_args(args: list[str]) -> list[str]:
    """Command-line arguments with every ``--config`` and dotted override merged into one config (``merge_into``).

    The merged config (a YAML string: ``${...}`` interpolation resolves over the merge) stands where the first
    ``--config`` stood; other arguments (``--print_config``, ``--ckpt_path``, ``--trainer.callbacks+=...``)
    keep their places. Without a ``--config`` the arguments are returned unchanged.
    """
    import yaml

    merged: dict = {}
    out: list[str] = []
    kept: set[str] = set()  # keys of arguments left to jsonargparse (`--trainer.callbacks+=...`)
    where: int | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        has_value = nxt is not None and (not nxt.startswith("-") or bool(_NEGATIVE_NUMBER.match(nxt)))
        if arg in _CONFIG_FLAGS or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else nxt
            cfg = _load_config(value) if value is not None else None
            if cfg is None:
                return list(args)  # not a readable mapping: let jsonargparse report it as usual
            merged = merge_into(merged, cfg)
            if where is None:
                where = len(out)
            i += 1 if "=" in arg else 2
            continue
        key, _, raw = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        dotted = "." in key and not key.endswith(("+", ".help")) and key.split(".")[0].isidentifier()
        if dotted and ("=" in arg or has_value) and _foldable(merged, key, kept):
            merged = _set_dotted(merged, key, raw if "=" in arg else nxt)
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        if key:
            kept.add(key.rstrip("+"))
        i += 1
    if where is None:
        return list(args)
    return out[:where] + ["--config", yaml.safe_dump(merged, sort_keys=False)] + out[where:]


def _config_error_in(err: BaseException | None):
    """The first VLMConfigError in an exception's cause/context chain, if any."""
    from vlm.errors import VLMConfigError

    seen = 0
    while err is not None and seen < 32:
        if isinstance(err, VLMConfigError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _extras(argv: list[str]) -> int | None:
    if argv[:2] == ["data", "synth"]:
        from vlm.data.synth_cli import main as synth_main

        return synth_main(argv[2:])
    if argv[:1] == ["data"]:
        print("usage: " + EXTRAS["data"], file=sys.stderr)
        return 2
    if argv[:1] == ["export"]:
        from vlm.export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["report"]:
        from vlm.report import main as report_main

        return report_main(argv[1:])
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlm`` console script."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    rc = _extras(argv)
    if rc is not None:
        return rc
    if argv[:1] in (["-h"], ["--help"]):
        print("Extra subcommands:\n  " + "\n  ".join(EXTRAS.values()) + "\n", file=sys.stderr)
    try:
        VLMCLI(args=None if from_shell else argv)
    except Exception as err:
        cause = _config_error_in(err)
        if cause is None:
            raise
        # a problem the user fixes in the config or environment: one message, no traceback
        print(f"vlm: error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
