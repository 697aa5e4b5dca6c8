"""What every task shares: optimiser and schedule from names and numbers, image logging, checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning import Callback, LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics import MeanMetric

from .. import visualize
from ..backbone import Backbone, Normalization, backbone_normalization
from ..finetuning import FreezeBackbone, ema_callback
from ..writers import PredictionWriter

__all__ = ["BaseTask"]

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULERS = ("cosine", "step", "none")


def _compile_backend(value: bool | str) -> str | None:
    """``--model.compile``: False/None for none, True for inductor, or a torch.compile backend's name."""
    if value is None or value is False:
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str):
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if value not in backends:
            raise ValueError(f"unknown torch.compile backend {value!r}; use true (inductor) or one of {backends}")
        return value
    raise ValueError(f"compile must be true, false or a torch.compile backend name, got {value!r}")


def _to_channels_last(batch: Any) -> Any:
    """``batch`` with every 4-d floating tensor in it (at any depth of tuples, lists, dicts) in channels_last."""
    if isinstance(batch, Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 and batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_channels_last(v) for v in batch)
    return batch


class BaseTask(LightningModule):
    """A LightningModule configured by names and numbers; subclasses build the model and metrics."""

    #: the metric that picks the best checkpoint, and whether higher is better
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def __init__(
        self,
        *,
        num_classes: int,
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        warmup_epochs: int = 0,
        step_size: int = 10,
        gamma: float = 0.1,
        class_names: list[str] | None = None,
        log_images_every_n_epochs: int = 1,
        freeze_backbone_epochs: int = 0,
        backbone_lr_mult: float = 1.0,
        ema_decay: float | None = None,
        channels_last: bool = False,
        compile: bool | str = False,  # noqa: A002 - the switch's name on the command line: --model.compile
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if scheduler.lower() not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if isinstance(freeze_backbone_epochs, bool) or not isinstance(freeze_backbone_epochs, int) or freeze_backbone_epochs < 0:
            raise ValueError(f"freeze_backbone_epochs must be a whole number of epochs >= 0, got {freeze_backbone_epochs!r}")
        if not (math.isfinite(backbone_lr_mult) and backbone_lr_mult > 0):
            raise ValueError(
                f"backbone_lr_mult must be positive, got {backbone_lr_mult}; to keep the backbone fixed, "
                f"set freeze_backbone_epochs to the number of epochs instead"
            )
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (0.999 is usual) or null for no EMA, got {ema_decay}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.pretrained = pretrained
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.log_images_every_n_epochs = log_images_every_n_epochs
        # evaluation losses as metrics: their float sums and counts synchronise exactly on uneven
        # ranks, where Lightning's own epoch mean divides by an integer mean of the counts
        self.eval_losses = torch.nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        self.optim_settings = {
            "optimizer": optimizer.lower(), "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
            "scheduler": scheduler.lower(), "warmup_epochs": warmup_epochs, "step_size": step_size, "gamma": gamma,
        }
        self.freeze_backbone_epochs = freeze_backbone_epochs
        self.backbone_lr_mult = backbone_lr_mult
        self.ema_decay = ema_decay
        self.channels_last = bool(channels_last)
        #: the torch.compile backend the backbone runs through (True: inductor), or None
        self.compile_backend = _compile_backend(compile)

    # -- speed switches (GPU-minded; they run on a CPU too) ------------------------------------
    def setup(self, stage: str) -> None:
        """Put the weights in channels_last and compile the backbone, as the switches ask (once per module)."""
        if self.channels_last and not getattr(self, "_channels_last_hooked", False):
            self.to(memory_format=torch.channels_last)  # 4-d weights only; the rest is unchanged
            # the images too, where they enter the backbone: every task's batches (detection's are batched
            # inside the model), and no batch-transfer hook that a data module's would clash with
            self.backbone_module().register_forward_pre_hook(lambda module, args: _to_channels_last(args))
            self._channels_last_hooked = True
        if self.compile_backend is not None and not getattr(self, "_backbone_compiled", False):
            # the backbone holds nearly all of the compute in every task; Module.compile keeps the
            # state_dict's keys, so checkpoints stay loadable without the switch
            self.backbone_module().compile(backend=self.compile_backend)
            self._backbone_compiled = True

    # -- fine-tuning -------------------------------------------------------------------------
    def backbone_module(self) -> torch.nn.Module:
        """The registry backbone inside this task's model: what freezing and ``backbone_lr_mult`` act on."""
        # found by type, so every task's model is covered wherever it keeps the backbone (a classifier's
        # .backbone, a detector's neck.body); modules() walks depth first, so this is the outermost one
        for module in self.modules():
            if isinstance(module, Backbone):
                return module
        raise RuntimeError(f"{type(self).__name__} holds no registry Backbone to freeze or give its own lr")

    @property
    def backbone_lr(self) -> float:
        """The backbone's base learning rate: ``lr × backbone_lr_mult`` (the schedule scales it like the rest)."""
        return self.optim_settings["lr"] * self.backbone_lr_mult

    def configure_callbacks(self) -> list[Callback]:
        """The fine-tuning callbacks this task's settings ask for (the Trainer adds them; the CLI needs nothing)."""
        # both act on training only; validate, test and predict run the weights they are given
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return []
        callbacks: list[Callback] = []
        if self.freeze_backbone_epochs > 0:
            callbacks.append(FreezeBackbone(self.freeze_backbone_epochs))
        if self.ema_decay is not None:
            callbacks.append(ema_callback(self.ema_decay))
        return callbacks

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """The optimiser over the trainable parameters (the backbone's in a group at ``backbone_lr``) and its schedule."""
        hp = self.optim_settings
        trainable = [p for p in self.parameters() if p.requires_grad]
        params: list[Any] = trainable  # one group, as before the switch existed: older runs' optimiser states still resume
        if self.backbone_lr_mult != 1.0:
            in_backbone = {id(p) for p in self.backbone_module().parameters()}
            # a frozen backbone has no trainable parameters yet: FreezeBackbone adds its group when it unfreezes it
            groups = [
                {"params": [p for p in trainable if id(p) not in in_backbone], "name": "head"},
                {"params": [p for p in trainable if id(p) in in_backbone], "lr": self.backbone_lr, "name": "backbone"},
            ]
            params = [g for g in groups if g["params"]]
        name = hp["optimizer"]
        if name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"], nesterov=hp["momentum"] > 0
            )
        elif name == "adamw":
            opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        else:
            opt = torch.optim.Adam(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        sched = hp["scheduler"]
        if sched == "none":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
        epochs = max(1, self.trainer.max_epochs or 1) if self._trainer is not None else 1
        steps_per_epoch = max(1, total // epochs)
        # at most a third of the run: a large folder sized by steps (train_steps) may run a single epoch
        warmup = min(total - 1, hp["warmup_epochs"] * steps_per_epoch, total // 3)
        step_size = hp["step_size"] * steps_per_epoch
        gamma = hp["gamma"]

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if sched == "cosine":
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            return gamma ** ((step - warmup) // max(1, step_size))

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_eval_loss(self, stage: str, loss: Tensor, weight: float = 1.0, **kwargs: Any) -> None:
        """Log ``<stage>/loss`` (val or test) as the mean over the whole stage, on any number of processes.

        ``loss``: a batch's mean loss with ``weight`` its number of items, or a vector of per-item losses.
        """
        metric = self.eval_losses[stage]
        metric.update(loss.detach(), weight=weight)
        self.log(f"{stage}/loss", metric, on_step=False, on_epoch=True, **kwargs)

    # -- safety ------------------------------------------------------------------------------
    def check_finite(self, loss: Tensor, batch_ids: Sequence[Any] | None = None) -> None:
        """Stop the run on a NaN or infinite loss, naming the batch's images."""
        if not torch.isfinite(loss).all():
            ids = list(batch_ids) if batch_ids is not None else "unknown"
            raise FloatingPointError(
                f"non-finite loss ({loss.detach().float().cpu().tolist()}) at epoch {self.current_epoch}, "
                f"step {self.global_step}, on images {ids}; lower the learning rate, check these images' "
                f"annotations, or resume from the last checkpoint"
            )

    # -- image logging -----------------------------------------------------------------------
    def should_log_images(self, batch_idx: int) -> bool:
        """True for the first validation batch of epochs chosen for image logging (never in sanity checks)."""
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking or batch_idx != 0 or not self.log_images_every_n_epochs:
            return False
        return self.current_epoch % self.log_images_every_n_epochs == 0 and trainer.is_global_zero

    def log_images(
        self,
        key: str,
        images: Tensor | list[np.ndarray],
        captions: list[str] | None = None,
        masks: list[dict[str, np.ndarray]] | None = None,
        boxes: list[dict[str, dict[str, Any]]] | None = None,
    ) -> None:
        """Log images to the run's W&B or TensorBoard loggers (see ``cvtasks.visualize.log_images``)."""
        visualize.log_images(self.loggers, key, images, step=self.global_step, class_names=self.class_names,
                             captions=captions, masks=masks, boxes=boxes, **self.normalization._asdict())

    @property
    def normalization(self) -> Normalization:
        """The mean/std the backbone's published weights expect: what the data normalised images with."""
        return backbone_normalization(self.backbone_name)

    # -- predict -----------------------------------------------------------------------------
    def prediction_writer(self, out_dir: Path) -> PredictionWriter:
        """The callback that writes this task's predictions under ``out_dir`` (the CLI adds it to predict)."""
        raise NotImplementedError(f"{type(self).__name__} does not write predictions")
