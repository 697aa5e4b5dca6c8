"""The LightningCLI of fit/validate/test/predict: run folders, early name checks, loggers kept in the run, final figures.

Commands beyond Lightning's subcommands live in ``cvtasks/commands/``; the run folder's layout in
``cvtasks/runs.py``; the callbacks this CLI adds in ``cvtasks/callbacks.py`` and, for predict, the
task's own prediction writer (``cvtasks/writers.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from .backbone import backbone_normalization
from .callbacks import RunConfigSaver, StepCheckpoint
from .data.base import AUTO_SIZE, SplitDataModule
from .registry import get_backbone_entry
from .runs import RunFolder, metrics_table, slug
from .tasks.base import BaseTask
from .weights import from_checkpoint

__all__ = ["CvtasksCLI"]

#: where each logger writes, by class_path: the run folder's logs/, tensorboard/ or wandb/
LOGGER_PATHS = {
    "cvtasks.loggers.AutoWandbLogger": "wandb",
    "lightning.pytorch.loggers.WandbLogger": "wandb",
    "lightning.pytorch.loggers.CSVLogger": "csv",
    "lightning.pytorch.loggers.TensorBoardLogger": "tensorboard",
}


def _backbone_mean(backbone: str) -> list[float]:
    """The mean that ``backbone``'s published weights expect (linked into the data module)."""
    return list(backbone_normalization(backbone).mean)


def _backbone_std(backbone: str) -> list[float]:
    """The std that ``backbone``'s published weights expect (linked into the data module)."""
    return list(backbone_normalization(backbone).std)


def _backbone_stride(backbone: str) -> int:
    """The coarsest stride of ``backbone`` (img_size auto picks a multiple of it)."""
    return get_backbone_entry(backbone).spec.native_stride


def _backbone_min_size(backbone: str) -> int:
    """The smallest input side ``backbone`` is meant for (img_size auto picks no less)."""
    return get_backbone_entry(backbone).spec.min_input_size


def steps_per_epoch(train_items: int, batch_size: int, world_size: int = 1, accumulate: int = 1,
                    limit_batches: int | float = 1.0) -> int:
    """Optimiser steps in one epoch: each process's share of the items (padded to equal, as DDP does) in batches.

    ``limit_batches`` is the Trainer's ``limit_train_batches`` (a count, or a fraction of the batches).
    """
    batches = math.ceil(math.ceil(train_items / max(1, world_size)) / batch_size)
    batches = min(batches, limit_batches) if isinstance(limit_batches, int) else int(batches * limit_batches)
    return max(1, math.ceil(batches / max(1, accumulate)))


def epochs_for_steps(train_steps: int, epoch_steps: int, max_epochs: int | None) -> int:
    """The whole epochs that reach ``train_steps`` optimiser steps: at least one, at most ``max_epochs``.

    A small folder runs many epochs to get its steps; a large one runs the one epoch that holds them,
    not a fixed count of epochs multiplied by its size; a tiny one stops at ``max_epochs``.
    """
    if train_steps < 1:
        raise ValueError(f"train_steps must be a positive number of optimiser steps (or null for trainer.max_epochs), got {train_steps}")
    epochs = max(1, math.ceil(train_steps / max(1, epoch_steps)))
    return epochs if max_epochs is None or max_epochs < 0 else min(epochs, max(1, max_epochs))


@rank_zero_only
def _announce(lines: list[str]) -> None:
    """Print what a fit will do, once (rank zero), before it starts."""
    print("\n".join(f"cvtasks: {line}" for line in lines), flush=True)


class CvtasksCLI(LightningCLI):
    """LightningCLI with run folders, early name checks, final evaluation and metrics.json."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            BaseTask,
            SplitDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The run folder's arguments, and the values linked from the data into the model."""
        parser.add_argument("--run_name", type=str | None, default=None, help="run folder name under runs_dir (default: task-backbone-time)")
        parser.add_argument("--runs_dir", type=str, default="runs", help="where run folders live")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=50, help="save last.ckpt this often (0: only at epoch ends)")
        parser.add_argument("--group", type=str | None, default=None,
                            help="a name shared by related runs, e.g. the folds of a cv run (the W&B group)")
        parser.add_argument("--predict_out", type=str | None, default=None, help="predict's output folder (default: runs/<run>/predictions)")
        parser.add_argument("--train_steps", type=int | None, default=None,
                            help="size fit by optimiser steps: the whole epochs that reach this many, at most "
                                 "trainer.max_epochs (null: trainer.max_epochs epochs; the folder configs set it)")
        parser.add_argument("--early_stopping_patience", type=int | None, default=None,
                            help="stop fit when the task's monitored metric (val/acc, val/miou, val/map) has not "
                                 "improved for this many validation checks (null: never)")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        # the data normalises as the backbone's published weights expect (its spec), for every stage
        parser.link_arguments("model.init_args.backbone", "data.init_args.mean", compute_fn=_backbone_mean, apply_on="parse")
        parser.link_arguments("model.init_args.backbone", "data.init_args.std", compute_fn=_backbone_std, apply_on="parse")
        # img_size auto: a multiple of the backbone's stride, no smaller than its smallest input
        parser.link_arguments("model.init_args.backbone", "data.init_args.img_size_step", compute_fn=_backbone_stride, apply_on="parse")
        parser.link_arguments("model.init_args.backbone", "data.init_args.img_size_min", compute_fn=_backbone_min_size, apply_on="parse")

    # -- a run's config wins over its checkpoint's saved hyperparameters -------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as Lightning does, then hold ``ckpt_path`` back where a config is given.

        Right after parsing, Lightning lays a checkpoint's saved hyperparameters over the parsed
        model arguments, so a ``--model.*`` flag given to predict/validate/test (say
        ``draw_score_threshold``) would be silently ignored. A run's config.yaml already holds the
        same hyperparameters; with it (or any config) the command line must win as everywhere
        else. No public hook sits between the two steps, so ``ckpt_path`` is hidden from that one
        and given back in ``before_instantiate_classes``, before anything reads it (the test with
        ``--model.label_smoothing 1.5`` in tests/test_cli.py pins this). A bare ``--ckpt_path``
        keeps Lightning's behaviour.
        """
        super().parse_arguments(parser, args)
        self._held_ckpt_path = None
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("config") and self.config[subcommand].get("ckpt_path"):
            self._held_ckpt_path = self.config[subcommand].ckpt_path
            self.config[subcommand].ckpt_path = None

    def instantiate_classes(self) -> None:
        """Build as Lightning does; with a checkpoint to restore, ``pretrained`` shapes the model but nothing is read.

        validate/test/predict and a resumed fit take every weight from ``ckpt_path``, so they need
        neither the published file nor the network (a run can be evaluated on a machine without the cache).
        """
        ckpt = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        with from_checkpoint() if ckpt else contextlib.nullcontext():
            super().instantiate_classes()

    # -- before anything is built --------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        """Check the backbone name, fill derived sizes, name the run folder and point the loggers into it."""
        cfg = self.config[self.subcommand]
        if getattr(self, "_held_ckpt_path", None):
            cfg.ckpt_path = self._held_ckpt_path
        model_args = cfg.model.init_args
        get_backbone_entry(model_args.backbone)  # an unknown name stops here, before any data is built
        for name in ("train_steps", "early_stopping_patience"):
            if cfg.get(name) is not None and cfg[name] < 1:
                raise ValueError(f"{name} must be at least 1 (or null for none), got {cfg[name]}")
        self._resolve_auto_image_size(cfg)
        self._follow_image_size(cfg)
        self._follow_detector(cfg)
        ckpt = cfg.get("ckpt_path")
        run_name = cfg.run_name
        holder = RunFolder.of_checkpoint(ckpt) if ckpt else None
        if not run_name and holder is not None:
            run_name = holder.name  # validate/test/predict on a run's checkpoint
        if not run_name:
            run_name = RunFolder.default_name(cfg.model.class_path, model_args.backbone)
        cfg.run_name = run_name
        self.run = RunFolder.new(run_name, cfg.runs_dir)
        cfg.trainer.default_root_dir = str(self.run.root)
        self._configure_loggers(cfg)

    def _resolve_auto_image_size(self, cfg: Any) -> None:
        """img_size ``auto`` becomes the number the data module chooses from its images, in the config itself.

        The model may depend on it (a detector's min_size follows it) and config.yaml keeps the number,
        so resume, evaluate and predict use the size the run trained at. The data module is built once
        here to measure its images, then again, with the number, by the CLI.
        """
        self._img_size_note = "given"
        data = cfg.get("data")
        if not data or not data.get("init_args") or data.init_args.get("img_size") != AUTO_SIZE:
            return
        module, _, name = data.class_path.rpartition(".")
        measured = getattr(importlib.import_module(module), name)(**data.init_args.as_dict())
        data.init_args.img_size = measured.img_size
        self._img_size_note = measured.img_size_note

    @staticmethod
    def _follow_image_size(cfg: Any) -> None:
        """A detector's ``min_size``/``max_size`` left null take the data's ``img_size``.

        The data letterboxes to img_size; a detector resizing to anything else would only blur or
        waste pixels, and IMG= or a real-data config changing the one must change the other.
        """
        model_args = cfg.model.init_args
        if "min_size" not in model_args or model_args.min_size is not None:
            return
        img_size = (cfg.data.init_args or {}).get("img_size") if cfg.get("data") else None
        if not img_size:
            raise ValueError("model.min_size is null (follow the data) but the data has no img_size; "
                             "give --model.min_size <pixels>")
        model_args.min_size = int(img_size)
        if model_args.get("max_size") is None:
            model_args.max_size = int(img_size)

    @staticmethod
    def _follow_detector(cfg: Any) -> None:
        """A detection data module's ``proposals`` left null follow the detector: on for those that classify proposals.

        So ``--model.detector fast_rcnn`` alone gets its selective search proposals in every split and
        in predict, and no other detector pays for them.
        """
        data_args = (cfg.data.init_args or {}) if cfg.get("data") else {}
        if "proposals" not in data_args or data_args.get("proposals") is not None:
            return
        from .detection.models import DETECTORS  # only detection configs get here

        spec = DETECTORS.get(cfg.model.init_args.get("detector"))
        data_args["proposals"] = bool(spec is not None and spec.proposals)

    def _configure_loggers(self, cfg: Any) -> None:
        loggers = cfg.trainer.logger
        if loggers in (None, False, True):
            if loggers is True:  # Lightning's default would write lightning_logs/ elsewhere: keep it in the run
                cfg.trainer.logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {}}
                loggers = cfg.trainer.logger
            else:
                return
        for lg in loggers if isinstance(loggers, list) else [loggers]:
            kind = LOGGER_PATHS.get(lg["class_path"] if isinstance(lg, dict) else lg.class_path)
            args = lg["init_args"] if isinstance(lg, dict) else lg.init_args
            setitem = args.__setitem__ if isinstance(args, dict) else lambda k, v: setattr(args, k, v)
            getitem = args.get
            if kind in ("csv", "tensorboard"):  # <run>/logs/, <run>/tensorboard/
                setitem("save_dir", str(self.run.root))
                setitem("name", "")
                setitem("version", (self.run.csv_logs_dir if kind == "csv" else self.run.tensorboard_dir).name)
            elif kind == "wandb":  # W&B adds wandb/ under save_dir itself: <run>/wandb/
                setitem("save_dir", str(self.run.root))
                if not getitem("name"):
                    setitem("name", cfg.run_name)
                if not getitem("id"):
                    setitem("id", slug(cfg.run_name)[:64])
                if cfg.get("group") and not getitem("group"):  # the folds of a cv run side by side in W&B
                    setitem("group", cfg.group)

    # -- the trainer and its callbacks ----------------------------------------------------------
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with the run's callbacks among those it is built with.

        They must be there when the Trainer is built: it adds a default ModelCheckpoint of its
        own unless it is given one, so they go in through ``callbacks=`` with the config's.
        """
        cfg = self.config[self.subcommand]
        callbacks: list[Callback] = []
        if self.subcommand == "fit":
            model: BaseTask = self.model
            callbacks.append(
                ModelCheckpoint(
                    dirpath=self.run.checkpoints_dir, filename=self.run.best_checkpoint.stem, monitor=model.monitor,
                    mode=model.monitor_mode, save_top_k=1, save_last=True, auto_insert_metric_name=False,
                    enable_version_counter=False,
                )
            )
            callbacks.append(StepCheckpoint(self.run, cfg.checkpoint_every_n_steps))
            # the subcommand's own parser (Lightning's SaveConfigCallback is given the same one)
            callbacks.append(RunConfigSaver(self._parser(self.subcommand), cfg, run=self.run))
            if cfg.early_stopping_patience is not None:
                callbacks.append(EarlyStopping(monitor=model.monitor, mode=model.monitor_mode, patience=cfg.early_stopping_patience))
        if self.subcommand == "predict":
            task: BaseTask = self.model  # the task says how its predictions are written
            callbacks.append(task.prediction_writer(Path(cfg.predict_out) if cfg.predict_out else self.run.predictions_dir))
        configured = self.config_init[self.subcommand]["trainer"].get("callbacks")
        configured = [] if configured is None else list(configured) if isinstance(configured, (list, tuple)) else [configured]
        trainer = super().instantiate_trainer(**{"callbacks": [*configured, *callbacks], **kwargs})
        if getattr(self.datamodule, "num_workers", None) == "auto":
            # auto chose knowingly (the fit prints why): training on a CPU keeps every core for torch's
            # threads, which Lightning's advice to add workers (CPUs per device minus one) does not count
            warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers", category=PossibleUserWarning)
        if self.subcommand == "fit":
            self._size_fit(trainer, cfg)
        return trainer

    def _size_fit(self, trainer: Trainer, cfg: Any) -> None:
        """With ``train_steps``, set the epochs that reach it; then say what the fit will do, before it starts."""
        data: SplitDataModule = self.datamodule
        model: BaseTask = self.model
        train, val, test = data.assign_splits()
        epoch_steps = steps_per_epoch(len(train), data.batch_size, trainer.world_size, trainer.accumulate_grad_batches,
                                      trainer.limit_train_batches)
        if cfg.train_steps is not None:
            # the schedule (warm-up, cosine) reads trainer.max_epochs when the optimiser is configured, after this
            cap = trainer.max_epochs
            trainer.fit_loop.max_epochs = epochs_for_steps(cfg.train_steps, epoch_steps, cap)
            sizing = f"train_steps {cfg.train_steps}, at most {cap} epochs"
        else:
            sizing = "trainer.max_epochs; --train_steps N sizes it by steps"
        epochs = trainer.max_epochs
        patience = cfg.early_stopping_patience
        stopping = (f"; stops when {model.monitor} has not improved for {patience} epoch{'s' if patience != 1 else ''}"
                    if patience is not None else "")
        _announce([
            f"data: {len(train)} train / {len(val)} val / {len(test)} test items, {data.num_classes} classes",
            f"img_size {data.img_size} ({self._img_size_note}; IMG= or --data.img_size sets it)",
            f"augmentation {data.augmentation_summary()}",
            "loader workers {} ({}; --data.num_workers sets it)".format(*data.loader_workers(trainer)),
            f"fit: {epochs} epochs x {epoch_steps} steps = {epochs * epoch_steps} steps (batch {data.batch_size}; "
            f"{sizing}){stopping}",
        ])

    # -- after fit: one evaluation of the best checkpoint, on every process of the fit -----------
    def after_fit(self) -> None:
        """Evaluate the best checkpoint on validation and test, write metrics.json and print the table."""
        trainer: Trainer = self.trainer
        if trainer.interrupted:
            if trainer.is_global_zero:
                print(f"run interrupted; continue it with: make resume RUN={self.run.name}")
            return
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt = best if best and Path(best).is_file() else None
        train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and torch.as_tensor(v).numel() == 1}
        # The fit's own trainer, so N devices evaluate as fast as they trained; the evaluation
        # samplers give each image to exactly one process, so the figures equal one process's.
        # Its loggers are held back: the best checkpoint's figures go out once, as final/...
        loggers, trainer.loggers = trainer.loggers, []
        metrics: dict[str, float] = {}
        try:
            for fn in (trainer.validate, trainer.test):
                for res in fn(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False):
                    metrics.update({k: float(v) for k, v in res.items()})
        finally:
            trainer.loggers = loggers
        if not trainer.is_global_zero:
            return
        metrics = {**train_metrics, **metrics}
        self.run.write_metrics(metrics)
        for lg in trainer.loggers:
            lg.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            lg.save()
        print(f"\nfinal metrics (checkpoint {ckpt or 'last weights'}):")
        print(metrics_table(metrics))
        print(f"run folder: {self.run.root}")

    # -- after validate/test: the figures, kept beside the run ------------------------------------
    def after_validate(self) -> None:
        """Keep validate's figures in the run folder."""
        self._write_evaluation("validate")

    def after_test(self) -> None:
        """Keep test's figures in the run folder."""
        self._write_evaluation("test")

    def _write_evaluation(self, subcommand: str) -> None:
        """<run>/<subcommand>_metrics.json: every figure of this evaluation (one process writes it)."""
        trainer: Trainer = self.trainer
        if not trainer.is_global_zero or trainer.interrupted:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        path = self.run.write_metrics(metrics, subcommand)
        print(f"{subcommand} figures written to {path}")
