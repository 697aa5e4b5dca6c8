"""The run folder: the one place that knows where a run keeps its config, checkpoints, figures and outputs.

    runs/<run>/config.yaml              the resolved config (what resume, evaluate and predict read back)
    runs/<run>/checkpoints/best.ckpt    best by the task's monitored metric
    runs/<run>/checkpoints/last.ckpt    the latest full state (resume continues from it)
    runs/<run>/metrics.json             the final figures, written after fit
    runs/<run>/validate_metrics.json    written by the validate subcommand (test_metrics.json: test)
    runs/<run>/predictions/             predict's default output folder
    runs/<run>/export/                  the exported model, its model.json and the parity report.json (export)
    runs/<run>/logs/ tensorboard/ wandb/  the CSV, TensorBoard and W&B loggers' folders

The CLI, the Makefile's targets (through the commands) and every command go through `RunFolder`,
so a new command reads a run without spelling its layout again.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .tasks.base import BaseTask

__all__ = ["RunFolder", "metrics_table", "slug"]

#: the subcommands whose figures are kept beside the run, as <stage>_metrics.json
EVALUATION_STAGES = ("validate", "test")


def slug(text: str) -> str:
    """``text`` reduced to characters safe in a folder name and a logger's run id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def _inside(*parts: str, doc: str) -> property:
    """A read-only path property: ``parts`` joined under the run's root."""
    return property(lambda self: self.root.joinpath(*parts), doc=doc)


@dataclass(frozen=True)
class RunFolder:
    """One run's folder, ``<runs_dir>/<name>/``; its paths exist only once the run writes them."""

    root: Path

    # file and folder names: spelled here and nowhere else
    CONFIG = "config.yaml"
    CHECKPOINTS = "checkpoints"
    BEST = "best.ckpt"
    LAST = "last.ckpt"
    METRICS = "metrics.json"
    PREDICTIONS = "predictions"
    EXPORT = "export"
    CSV_LOGS = "logs"
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"

    # -- finding a run -------------------------------------------------------------------------
    @classmethod
    def new(cls, name: str, runs_dir: str | Path = "runs") -> RunFolder:
        """The folder a run named ``name`` writes to (it need not exist yet)."""
        return cls(Path(runs_dir) / name)

    @classmethod
    def from_name(cls, run: str | Path, runs_dir: str | Path = "runs") -> RunFolder:
        """An existing run, by name (under ``runs_dir``) or by the path of its folder."""
        given = Path(run)
        # a name is looked for under runs_dir first; a path (relative or absolute) is taken as it is
        candidates = [given] if given.is_absolute() else [Path(runs_dir) / given, given]
        for root in candidates:
            if (root / cls.CONFIG).is_file():
                return cls(root)
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is not None:
            raise FileNotFoundError(
                f"{str(folder)!r} is not a run folder (no {cls.CONFIG}; runs write it when fit starts); "
                f"list the runs with `ls {runs_dir}/`")
        raise FileNotFoundError(
            f"no run {str(run)!r} (looked for the folder {str(candidates[0])!r}); list the runs with "
            f"`ls {runs_dir}/` and pass one of their names or a run folder's path")

    @classmethod
    def of_checkpoint(cls, ckpt_path: str | Path) -> RunFolder | None:
        """The run that holds ``ckpt_path`` (``<run>/checkpoints/x.ckpt``), or None for a checkpoint elsewhere."""
        parent = Path(ckpt_path).parent
        return cls(parent.parent) if parent.name == cls.CHECKPOINTS else None

    @staticmethod
    def default_name(task_class_path: str, backbone: str) -> str:
        """``<task>-<backbone>-<time>``, e.g. ``classification-resnet18-20250101-120000``."""
        task = task_class_path.rsplit(".", 1)[-1].removesuffix("Task").lower()
        return f"{task}-{slug(backbone)}-{time.strftime('%Y%m%d-%H%M%S')}"

    # -- paths ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The run's name: its folder's name."""
        return self.root.name

    @property
    def runs_dir(self) -> Path:
        """The folder that holds this run and its siblings."""
        return self.root.parent

    # each a property: the layout reads as this table (names spelled in the constants above)
    config_path = _inside(CONFIG, doc="The resolved config, saved when fit starts.")
    checkpoints_dir = _inside(CHECKPOINTS, doc="Where best.ckpt and last.ckpt live.")
    best_checkpoint = _inside(CHECKPOINTS, BEST, doc="The checkpoint with the best monitored figure.")
    last_checkpoint = _inside(CHECKPOINTS, LAST, doc="The latest full training state.")
    metrics_path = _inside(METRICS, doc="The final figures written after fit.")
    predictions_dir = _inside(PREDICTIONS, doc="predict's default output folder.")
    export_dir = _inside(EXPORT, doc="The exported model, model.json and report.json (the export command).")
    csv_logs_dir = _inside(CSV_LOGS, doc="The CSV logger's folder.")
    tensorboard_dir = _inside(TENSORBOARD, doc="The TensorBoard logger's folder.")
    # W&B itself adds wandb/ under its save_dir, which the CLI sets to the run folder
    wandb_dir = _inside(WANDB, doc="The W&B logger's folder.")

    def evaluation_metrics_path(self, subcommand: str) -> Path:
        """``validate_metrics.json`` or ``test_metrics.json``: the figures of that subcommand's last run."""
        if subcommand not in EVALUATION_STAGES:
            raise ValueError(f"no metrics file for {subcommand!r}; choose one of {', '.join(EVALUATION_STAGES)}")
        return self.root / f"{subcommand}_{self.METRICS}"

    # -- contents ------------------------------------------------------------------------------
    def require(self, path: Path, fix: str) -> Path:
        """``path`` if it is a file, else a FileNotFoundError naming the run, the missing file and ``fix``."""
        if not path.is_file():
            raise FileNotFoundError(f"run {self.name!r} has no {path.relative_to(self.root)} "
                                    f"(looked in {str(self.root)!r}); {fix}")
        return path

    def config(self) -> dict[str, Any]:
        """The resolved config as a dict (the same keys as ``python -m cvtasks fit --print_config``)."""
        self.require(self.config_path, f"it is written when fit starts: train it with make train RUN={self.name}")
        return yaml.safe_load(self.config_path.read_text()) or {}

    def metrics(self, subcommand: str | None = None) -> dict[str, float]:
        """The final figures of fit (metrics.json), or those of the last ``validate``/``test`` run."""
        if subcommand is None:
            path, fix = self.metrics_path, (f"it is written when fit ends; continue the run with make resume RUN={self.name}")
        else:
            path = self.evaluation_metrics_path(subcommand)
            fix = f"run make evaluate RUN={self.name}" if subcommand == "test" else f"run python -m cvtasks validate --config {self.config_path}"
        self.require(path, fix)
        return json.loads(path.read_text())

    def write_metrics(self, metrics: dict[str, float], subcommand: str | None = None) -> Path:
        """Write metrics.json (after fit) or ``<subcommand>_metrics.json``, sorted by name."""
        path = self.metrics_path if subcommand is None else self.evaluation_metrics_path(subcommand)
        self.root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        return path

    def task_class(self) -> type[BaseTask]:
        """The task class named by the config's ``model.class_path``."""
        from .tasks.base import BaseTask

        class_path = (self.config().get("model") or {}).get("class_path")
        if not class_path or "." not in class_path:
            raise ValueError(f"{self.config_path} has no model.class_path; it was not written by cvtasks' fit")
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseTask)):
            raise ValueError(f"{self.config_path}: model.class_path {class_path!r} is not a cvtasks task")
        return cls

    def load_task(self, checkpoint: str | Path | None = None) -> BaseTask:
        """The run's task with the best checkpoint's weights (or ``checkpoint``'s), on CPU, in eval mode."""
        ckpt = Path(checkpoint) if checkpoint else self.require(
            self.best_checkpoint, f"it is written after the first validation; train longer or resume with make resume RUN={self.name}")
        cls = self.task_class()  # imported first: Lightning only builds classes already imported
        # pretrained=None: the checkpoint holds every weight, so nothing is fetched or read again
        task = cls.load_from_checkpoint(ckpt, map_location="cpu", pretrained=None)
        return task.eval()


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
