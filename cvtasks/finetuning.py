"""Fine-tuning callbacks a task adds to its own fit: a frozen-then-trained backbone, an EMA of the weights.

Tasks return them from ``configure_callbacks`` (see ``BaseTask``), so the CLI and the Trainer need
no setting of their own: ``freeze_backbone_epochs``, ``backbone_lr_mult`` and ``ema_decay`` are
keys of the model.
"""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning, EMAWeightAveraging
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["FitEMA", "FreezeBackbone", "ema_callback", "follow_schedule"]


def follow_schedule(trainer: Trainer, optimizer: Optimizer) -> None:
    """Give param groups added after ``configure_optimizers`` the schedule the first group follows.

    LambdaLR keeps one base lr and one factor per group it was built with; a group added later
    would otherwise keep a constant lr while the others warm up and decay.
    """
    for config in trainer.lr_scheduler_configs:
        sched = config.scheduler
        if sched.optimizer is not optimizer or not isinstance(sched, LambdaLR):
            continue
        groups = optimizer.param_groups
        # a resumed run restores base_lrs from the checkpoint, but the factors from __init__ (one per original group)
        while len(sched.lr_lambdas) < len(groups):
            sched.lr_lambdas.append(sched.lr_lambdas[0])
        for group in groups[len(sched.base_lrs):]:
            group.setdefault("initial_lr", group["lr"])
            sched.base_lrs.append(group["initial_lr"])
        for group, base, factor in zip(groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in groups]


class FreezeBackbone(BaseFinetuning):
    """Freeze the task's backbone for the first ``epochs`` epochs, then train it at lr × ``backbone_lr_mult``.

    While frozen its parameters take no gradient and its BatchNorm layers stay in eval mode, so
    they normalise with (and keep) the statistics they were loaded with; a pretrained backbone is
    not disturbed while the freshly initialised head learns.
    """

    def __init__(self, epochs: int) -> None:
        super().__init__()
        if epochs < 1:
            raise ValueError(f"FreezeBackbone needs at least 1 epoch, got {epochs}")
        self.epochs = epochs

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Freeze for fit only: the callback stays on the Trainer for the validate and test that follow a fit."""
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        """Freeze the backbone before ``configure_optimizers`` leaves its parameters out."""
        self.freeze(pl_module.backbone_module(), train_bn=False)

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """From epoch ``epochs`` on: unfreeze the backbone and add it to the optimiser at the backbone's lr."""
        if epoch < self.epochs:
            return
        backbone = pl_module.backbone_module()
        self.make_trainable(backbone)
        for module in backbone.modules():
            if isinstance(module, _BatchNorm):
                module.train(pl_module.training)
        # by identity: BaseFinetuning.filter_on_optimizer compares values (torch.equal), so a backbone
        # BatchNorm weight of ones would be taken for a head's one and silently left out
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in backbone.parameters() if id(p) not in present]
        if params:  # absent on a resumed run, whose groups BaseFinetuning restored from the checkpoint
            optimizer.add_param_group({"params": params, "lr": pl_module.backbone_lr, "name": "backbone"})
        follow_schedule(pl_module.trainer, optimizer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Unfreeze when due; while frozen, keep the backbone's BatchNorm layers in eval mode."""
        super().on_train_epoch_start(trainer, pl_module)
        if trainer.current_epoch < self.epochs:
            # Lightning keeps each module's mode across validation, so setting it once per epoch holds
            for module in pl_module.backbone_module().modules():
                if isinstance(module, _BatchNorm):
                    module.eval()


class FitEMA(EMAWeightAveraging):
    """Lightning's EMA of the weights, with its average dropped when the fit ends.

    The callback stays on the Trainer after ``fit``; keeping the final average would make a later
    ``validate``/``test`` on a checkpoint swap that stale average in for the checkpoint's weights,
    and loading the checkpoint would restore its raw weights (``current_model_state``) instead of
    the averaged ``state_dict`` that evaluation is meant to use.
    """

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Release the average after fit (the module already holds it: ``on_train_end`` copied it in)."""
        if stage == "fit":
            self._average_model = None

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Outside fit, keep the checkpoint's state_dict (the average) in the module, and say nothing."""
        if self._average_model is not None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def ema_callback(decay: float, **kwargs: Any) -> FitEMA:
    """Lightning's EMA of the weights (buffers too): validation runs on it, and checkpoints save it as state_dict."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
    return FitEMA(decay=decay, **kwargs)

