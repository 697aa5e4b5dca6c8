"""The callbacks a fit adds to its run folder: the resolved config, and a last.ckpt saved every few steps."""

from __future__ import annotations

import os
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from .runs import RunFolder

__all__ = ["RunConfigSaver", "StepCheckpoint"]


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config to the run folder's config.yaml (what resume, evaluate and predict read back)."""

    def __init__(self, *args: Any, run: RunFolder, **kwargs: Any) -> None:
        super().__init__(*args, save_to_log_dir=False, **kwargs)
        self.run = run

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write config.yaml, replacing the one a resumed run started from (the same values)."""
        self.run.root.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(self.run.config_path), skip_none=False, overwrite=True)


class StepCheckpoint(Callback):
    """Saves last.ckpt every ``every_n_steps`` optimiser steps, atomically, so a killed run loses little."""

    def __init__(self, run: RunFolder, every_n_steps: int) -> None:
        self.path = run.last_checkpoint
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        """Save the full state when the step count reaches a multiple of ``every_n_steps``."""
        if self.every_n_steps <= 0 or trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the full state: resume needs the optimiser
        if trainer.is_global_zero:  # rename so that last.ckpt is never half-written
            os.replace(tmp, self.path)
        trainer.strategy.barrier()
