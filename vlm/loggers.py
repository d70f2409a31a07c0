"""Logger presets: wandb offline unless the user asks for online."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _WandbLogger


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger, offline by default.

    ``offline=None`` (the default) follows ``WANDB_MODE``: online only when ``WANDB_MODE=online``; the
    run directory can be browsed with ``wandb leet RUN_DIR`` and uploaded later with ``wandb sync RUN_DIR``.
    """

    def __init__(
        self,
        project: str = "vlm",
        name: str | None = None,
        save_dir: str = "runs",
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE", "offline").lower() != "online"
        # wandb's service process, started by the first run of a Python process, resolves a relative path
        # against its own working directory: after a chdir (notebooks, tests) the run's transaction log would
        # land in another folder than its files
        save_dir = os.path.abspath(save_dir)
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model, **kwargs)

    @property
    def run_dir(self) -> str:
        """Directory of this run's files (``.../wandb/offline-run-...``)."""
        return self.experiment.dir.rsplit("/files", 1)[0]
