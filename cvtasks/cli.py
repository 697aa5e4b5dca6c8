"""The command line: LightningCLI for fit/validate/test/predict, plus backbones, check-backbone and resume."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .data.base import SplitDataModule
from .registry import PluginLoadError, UnknownBackboneError, get_backbone_entry
from .tasks.base import BaseTask

__all__ = ["CvtasksCLI", "main", "metrics_table"]

USER_ERRORS = (UnknownBackboneError, PluginLoadError, FileNotFoundError, ValueError, FloatingPointError)
LOGGER_PATHS = {
    "cvtasks.loggers.AutoWandbLogger": "wandb",
    "lightning.pytorch.loggers.WandbLogger": "wandb",
    "lightning.pytorch.loggers.CSVLogger": "csv",
    "lightning.pytorch.loggers.TensorBoardLogger": "tensorboard",
}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config to runs/<run>/config.yaml (what `make resume` reads back)."""

    def __init__(self, *args: Any, run_dir: str = "", **kwargs: Any) -> None:
        super().__init__(*args, save_to_log_dir=False, **kwargs)
        self.run_dir = run_dir

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.run_dir:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self.parser.save(self.config, os.path.join(self.run_dir, "config.yaml"), skip_none=False, overwrite=True)


class StepCheckpoint(Callback):
    """Saves last.ckpt every ``every_n_steps`` optimiser steps, atomically, so a killed run loses little."""

    def __init__(self, dirpath: str, every_n_steps: int) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.every_n_steps <= 0 or trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        tmp = self.dirpath / "last.ckpt.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # the full state: resume needs the optimiser
        if trainer.is_global_zero:  # rename so that last.ckpt is never half-written
            os.replace(tmp, self.dirpath / "last.ckpt")
        trainer.strategy.barrier()


class PredictionSaver(BasePredictionWriter):
    """Hands predict's records to the task's save_predictions at the end of the epoch."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(write_interval="epoch")
        self.out_dir = Path(out_dir)
        self.written: list[Path] = []

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Any) -> None:
        records = [r for batch in predictions for r in batch]
        if trainer.world_size > 1:  # each rank predicted its own share of the images (no padding): gather them once
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if trainer.is_global_zero:
            # the folder's order, as one process would write it (ranks take every N-th image)
            records.sort(key=lambda r: str(r["path"]))
            self.written = pl_module.save_predictions(records, self.out_dir)
            print(f"wrote predictions for {len(records)} images to {self.out_dir}")


def metrics_table(metrics: dict[str, float]) -> str:
    """A plain two-column table of metric names and values."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    line = "-" * (width + 14)
    rows = [line, f"{'metric':<{width}}  {'value':>10}", line]
    rows += [f"{k:<{width}}  {v:>10.4f}" for k, v in sorted(metrics.items())]
    rows.append(line)
    return "\n".join(rows)


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
        parser.add_argument("--run_name", type=str | None, default=None, help="run folder name under runs_dir (default: task-backbone-time)")
        parser.add_argument("--runs_dir", type=str, default="runs", help="where run folders live")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=50, help="save last.ckpt this often (0: only at epoch ends)")
        parser.add_argument("--predict_out", type=str | None, default=None, help="predict's output folder (default: runs/<run>/predictions)")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Where a config is given, the checkpoint's saved hyperparameters are not laid over it.

        Lightning would overwrite the parsed model arguments with those saved at fit time, so a
        ``--model.*`` flag given to predict/validate/test (say ``draw_score_threshold``) would be
        silently ignored. A run's config.yaml already holds the same hyperparameters; with it (or
        any config) the command line wins as everywhere else. A bare ``--ckpt_path`` keeps
        Lightning's behaviour.
        """
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("config"):
            return
        super()._parse_ckpt_path()

    # -- before anything is built --------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        model_args = cfg.model.init_args
        get_backbone_entry(model_args.backbone)  # an unknown name stops here, before any data is built
        self._follow_image_size(cfg)
        ckpt = cfg.get("ckpt_path")
        run_name = cfg.run_name
        if not run_name and ckpt and Path(ckpt).parent.name == "checkpoints":
            run_name = Path(ckpt).parent.parent.name  # validate/test/predict on a run's checkpoint
        if not run_name:
            task = cfg.model.class_path.rsplit(".", 1)[-1].removesuffix("Task").lower()
            run_name = f"{task}-{_slug(model_args.backbone)}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg.run_name = run_name
        self.run_dir = Path(cfg.runs_dir) / run_name
        cfg.trainer.default_root_dir = str(self.run_dir)
        self._configure_loggers(cfg)

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
            if kind in ("csv", "tensorboard"):
                setitem("save_dir", str(self.run_dir))
                setitem("name", "")
                setitem("version", "logs" if kind == "csv" else "tensorboard")
            elif kind == "wandb":
                setitem("save_dir", str(self.run_dir))
                if not getitem("name"):
                    setitem("name", cfg.run_name)
                if not getitem("id"):
                    setitem("id", _slug(cfg.run_name)[:64])

    # -- the trainer and its callbacks ----------------------------------------------------------
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = self.config[self.subcommand]
        ckpt_dir = self.run_dir / "checkpoints"
        callbacks: list[Callback] = []
        if self.subcommand == "fit":
            model: BaseTask = self.model
            callbacks.append(
                ModelCheckpoint(
                    dirpath=ckpt_dir, filename="best", monitor=model.monitor, mode=model.monitor_mode,
                    save_top_k=1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False,
                )
            )
            callbacks.append(StepCheckpoint(str(ckpt_dir), cfg.checkpoint_every_n_steps))
            callbacks.append(RunConfigSaver(self._parser(self.subcommand), cfg, run_dir=str(self.run_dir)))
        if self.subcommand == "predict":
            callbacks.append(PredictionSaver(cfg.predict_out or str(self.run_dir / "predictions")))
        self._own_callbacks = callbacks
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # ours go in before the Trainer is built, so it adds no default ModelCheckpoint of its own
        return super()._instantiate_trainer(config, [*callbacks, *getattr(self, "_own_callbacks", [])])

    # -- after fit: one evaluation of the best checkpoint, on every process of the fit -----------
    def after_fit(self) -> None:
        trainer: Trainer = self.trainer
        if trainer.interrupted:
            if trainer.is_global_zero:
                print(f"run interrupted; continue it with: make resume RUN={self.run_dir.name}")
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        for lg in trainer.loggers:
            lg.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            lg.save()
        print(f"\nfinal metrics (checkpoint {ckpt or 'last weights'}):")
        print(metrics_table(metrics))
        print(f"run folder: {self.run_dir}")


    # -- after validate/test: the figures, kept beside the run ------------------------------------
    def after_validate(self) -> None:
        self._write_evaluation("validate")

    def after_test(self) -> None:
        self._write_evaluation("test")

    def _write_evaluation(self, subcommand: str) -> None:
        """runs/<run>/<subcommand>_metrics.json: every figure of this evaluation (one process writes it)."""
        trainer: Trainer = self.trainer
        if not trainer.is_global_zero or trainer.interrupted:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / f"{subcommand}_metrics.json"
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"{subcommand} figures written to {path}")


def _backbones_command(argv: list[str]) -> int:
    import argparse

    from .summary import backbone_table

    ap = argparse.ArgumentParser(prog="python -m cvtasks backbones", description="List the registered backbones.")
    ap.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'resnet*' or 'vgg'")
    ap.add_argument("--size", default="224", help="input size for GFLOPs: a number or 'native'")
    ap.add_argument("--no-flops", action="store_true", help="skip building each net to count parameters and FLOPs")
    ns = ap.parse_args(argv)
    print(backbone_table(ns.pattern, size=ns.size, measure=not ns.no_flops))
    return 0


def _check_backbone_command(argv: list[str]) -> int:
    import argparse

    from .checks import check_backbone

    ap = argparse.ArgumentParser(prog="python -m cvtasks check-backbone", description="Run the backbone conformance checks.")
    ap.add_argument("names", nargs="+", help="registered backbone names")
    ap.add_argument("--no-parity", action="store_true", help="skip the reference-parity check")
    ns = ap.parse_args(argv)
    ok = True
    for name in ns.names:
        report = check_backbone(name, parity=not ns.no_parity)
        print(report)
        ok &= report.ok
    return 0 if ok else 1


def _resume_command(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cvtasks resume", description="Continue an interrupted run from its folder.")
    ap.add_argument("run", help="run name (under --runs_dir) or path of a run folder")
    ap.add_argument("--runs_dir", default="runs")
    ns, rest = ap.parse_known_args(argv)
    run_dir = Path(ns.run) if Path(ns.run).is_dir() else Path(ns.runs_dir) / ns.run
    config, last = run_dir / "config.yaml", run_dir / "checkpoints" / "last.ckpt"
    if not config.is_file():
        raise FileNotFoundError(f"no run to resume at {str(run_dir)!r} (no config.yaml); list runs with `ls {ns.runs_dir}`")
    if not last.is_file():
        raise FileNotFoundError(f"run {str(run_dir)!r} has no checkpoints/last.ckpt yet; start it again with make train RUN={run_dir.name}")
    CvtasksCLI(["fit", "--config", str(config), "--run_name", run_dir.name, "--runs_dir", str(run_dir.parent),
                "--ckpt_path", str(last), *rest])
    return 0


COMMANDS = {"backbones": _backbones_command, "check-backbone": _check_backbone_command, "resume": _resume_command}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m cvtasks`."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in COMMANDS:
            return COMMANDS[args[0]](args[1:])
        CvtasksCLI(None if argv is None else args)
        return 0
    except USER_ERRORS as exc:
        if os.environ.get("CVTASKS_DEBUG"):
            raise
        print(f"cvtasks: error: {exc}", file=sys.stderr)
        return 2
