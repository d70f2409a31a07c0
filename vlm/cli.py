"""The ``vlm`` command: LightningCLI (fit/validate/test/predict) with omegaconf interpolation, plus small extras.

    vlm fit --config conf/flava/tiny.yaml --trainer.max_steps=50
    vlm data synth --out data/synth --num 2000
    vlm export --ckpt runs/checkpoints/flava-tiny/last.ckpt --out exported/flava-tiny
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

EXTRAS = {
    "data": "vlm data synth --out DIR --num N   write the synthetic world as WebDataset shards",
    "export": "vlm export --ckpt PATH --out DIR     model.safetensors + config.yaml, loadable without Lightning",
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
        return parser

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps our errors in a long union-validation message
            cause = _config_error_in(err)
            if cause is None:
                raise
            raise cause from None


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
