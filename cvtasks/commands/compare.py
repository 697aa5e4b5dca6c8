"""The model-comparison chart: each net's task metric against its GFLOPs per image, circle area by parameters.

Three sources of points, one chart:
- runs (``RUN [RUN ...]``): our own runs of one task; y is the task's headline figure from metrics.json
  (its monitored metric on the test split: test/acc, test/miou, test/map), x the whole model's
  multiply-adds per image at the run's input size, the area its parameter count;
- ``--reference imagenet``: the registry's nets with published ImageNet figures, no training:
  torchvision's weights' metadata (top-1, GFLOPs, parameters) where the reference is torchvision's,
  else the top-1 quoted at registration (``published_top1``), with our GFLOPs and parameters at the
  net's input size, drawn hollow;
- ``--train --backbones 'a b c' <fit arguments>``: one normal run per backbone (``<name>-<backbone>``,
  W&B group ``<name>``; run again, finished ones are kept and interrupted ones continue from
  last.ckpt, with the fit arguments kept in ``runs/<name>/train.json``), then the chart of those runs.

Writes ``runs/<name>/compare.png`` with ``compare.md`` (the table) and ``compare.json`` beside it
(``--out PATH.png`` writes the same three there too), prints the table and, with a W&B logger config
(``--logger configs/logger/wandb.yaml``), logs the chart as an interactive plotly figure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from ..charts import Chart, ChartPoint, log_chart, markdown_table, write_chart
from ..runs import RunFolder, slug
from .cv import check_backbone_flag, fit_or_resume, flag_value, refuse_own_flags

#: fit flags that compare sets for each backbone's run itself
OWN_FLAGS = ("--group", "--ckpt_path")
REFERENCES = ("imagenet",)
#: data settings that may differ between runs on the same data (the input size shows in GFLOPs)
DATA_SETTINGS_OF_NO_CONSEQUENCE = {"batch_size", "num_workers", "img_size", "predict_dir"}
CHART_FILE = "compare.png"
#: what --train trained the comparison's runs with: a later --train must use the same fit arguments
TRAIN_FILE = "train.json"


class RunStopped(RuntimeError):
    """A backbone's training run ended without its final figures; ``status`` is its exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# -- our runs ------------------------------------------------------------------------------------
def headline_metric(task_class: type) -> str:
    """The figure a run is charted by: its task's monitored metric on the test split (test/acc, test/miou, test/map)."""
    return "test/" + task_class.monitor.split("/", 1)[-1]


def count_model(model: Any, size: int | tuple[int, int], in_chans: int = 3) -> tuple[float, int]:
    """(GFLOPs, parameters) of one forward pass on one image: multiply-adds, as `make backbones` counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (size, size) if isinstance(size, int) else size
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_chans, h, w))
    # FlopCounterMode counts a multiply-add as 2 FLOPs; papers and torchvision count it once
    return counter.get_total_flops() / 2e9, sum(p.numel() for p in model.parameters())


def _input_size(run: RunFolder, config: dict[str, Any]) -> int | tuple[int, int]:
    """The image size the run trained and was tested at (its data's img_size)."""
    size = ((config.get("data") or {}).get("init_args") or {}).get("img_size")
    if not size:
        raise ValueError(f"run {run.name!r}: {run.config_path} has no data.init_args.img_size, the input size its "
                         f"GFLOPs are counted at; compare runs whose data module resizes to one size")
    return int(size) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def run_point(run: RunFolder, metric: str) -> ChartPoint:
    """A run on the chart: ``metric`` from its metrics.json against its whole model's GFLOPs at its input size."""
    from ..registry import get_backbone_entry

    config = run.config()
    model_args = (config.get("model") or {}).get("init_args") or {}
    metrics = run.metrics()
    if metric not in metrics:
        raise ValueError(f"run {run.name!r} has no {metric!r} in {run.metrics_path}; it has {', '.join(sorted(metrics))}: "
                         f"choose one with --metric (make compare ARGS='--metric NAME')")
    size = _input_size(run, config)
    task = run.load_task()  # the model exactly as trained: head, neck and backbone keywords included
    gflops, params = count_model(task, size, int((model_args.get("backbone_kwargs") or {}).get("in_chans", 3)))
    backbone = str(model_args.get("backbone", "?"))
    return ChartPoint(label=backbone, family=get_backbone_entry(backbone).family or "other", value=float(metrics[metric]),
                      gflops=gflops, params=params, input_size=size if isinstance(size, int) else max(size),
                      source=f"run {run.name}")


def check_one_task(runs: list[RunFolder]) -> type:
    """The task class shared by ``runs``; runs of different tasks are an error naming each task's runs."""
    by_task: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        by_task[(run.config().get("model") or {}).get("class_path", "?")].append(run.name)
    if len(by_task) > 1:
        listing = "; ".join(f"{path.rsplit('.', 1)[-1]}: {', '.join(names)}" for path, names in by_task.items())
        raise ValueError(f"runs of different tasks cannot share one chart (their metrics differ): {listing}. "
                         f"Compare the runs of one task, e.g. make compare RUNS='{' '.join(next(iter(by_task.values())))}'")
    return runs[0].task_class()


def data_differences(runs: list[RunFolder]) -> list[str]:
    """The data settings that differ between ``runs`` (other than batch size, workers and input size)."""
    datas = [run.config().get("data") or {} for run in runs]
    differ = ["class_path"] if len({d.get("class_path") for d in datas}) > 1 else []
    keys = set().union(*((d.get("init_args") or {}).keys() for d in datas)) - DATA_SETTINGS_OF_NO_CONSEQUENCE
    for key in sorted(keys):
        if len({yaml.safe_dump((d.get("init_args") or {}).get(key)) for d in datas}) > 1:
            differ.append(key)
    return differ


def label_points(points: list[ChartPoint], runs: list[RunFolder]) -> list[ChartPoint]:
    """Points labelled by backbone, or by run name where two runs share a backbone."""
    from dataclasses import replace

    labels = [p.label for p in points]
    return [replace(p, label=run.name) if labels.count(p.label) > 1 else p for p, run in zip(points, runs)]


def runs_chart(runs: list[RunFolder], metric: str | None = None) -> Chart:
    """The chart of our ``runs`` (one task): ``metric`` (default: the task's headline) against GFLOPs per image."""
    if not runs:
        raise ValueError("give at least one run: make compare RUNS='<run> <run> ...' (see ls runs/)")
    task_class = check_one_task(runs)
    metric = metric or headline_metric(task_class)
    points = label_points([run_point(run, metric) for run in runs], runs)
    notes = [f"{metric}: the run's final figure (metrics.json: the best checkpoint on the test split)",
             "GFLOPs: the whole model's multiply-adds for one image at the run's input size; params: the whole model's"]
    differ = data_differences(runs)
    if differ:
        notes.append(f"the runs' data differ in {', '.join(differ)}: their figures are not on the same data")
    task = task_class.__name__.removesuffix("Task")
    return Chart(title=f"{task}: {metric} against GFLOPs per image ({len(runs)} runs)", metric=metric,
                 x_label="GFLOPs per image (the whole model's multiply-adds at the run's input size)",
                 y_label=f"{metric} (the run's final figure)", points=tuple(points), notes=tuple(notes))


# -- published ImageNet figures ------------------------------------------------------------------
def _torchvision_point(name: str, family: str, reference: str) -> ChartPoint:
    """The figures torchvision's default weights for ``reference`` carry: top-1, GFLOPs at their crop, parameters."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(reference).DEFAULT
    meta = weights.meta
    crop = weights.transforms().crop_size
    return ChartPoint(label=name, family=family, value=float(meta["_metrics"]["ImageNet-1K"]["acc@1"]),
                      gflops=float(meta["_ops"]), params=int(meta["num_params"]), input_size=int(crop[0]),
                      source=f"torchvision {type(weights).__name__}.{weights.name}")


def imagenet_chart() -> Chart:
    """The registry's nets with published ImageNet-1K top-1: torchvision's metadata, or the quote and our counts."""
    import torch

    from ..backbone import create_classifier
    from ..registry import get_backbone_entry, list_backbones

    points, left_out = [], []
    for name in list_backbones():
        entry = get_backbone_entry(name)
        family = entry.family or "other"
        if entry.reference.startswith("torchvision:"):
            points.append(_torchvision_point(name, family, entry.reference.split(":", 1)[1]))
        elif entry.published_top1 is not None:
            # the net with its documented classifier, as `make backbones` counts it, at the net's own input size;
            # on the meta device: shapes alone, no weights to fill and no arithmetic done
            with torch.device("meta"):
                gflops, params = count_model(create_classifier(name, num_classes=entry.num_classes).eval(), entry.input_size)
            points.append(ChartPoint(label=name, family=family, value=float(entry.published_top1), gflops=gflops,
                                     params=params, input_size=entry.input_size, quoted=True,
                                     source=f"registry's published_top1 ({entry.module})"))
        else:
            left_out.append(name)
    notes = ["top-1 and GFLOPs (multiply-adds) of torchvision's default weights from their metadata, at their crop size",
             "quoted (hollow): the top-1 registered with the net (published_top1, its source cited beside it); "
             "GFLOPs and parameters counted here at the net's input size"]
    if left_out:
        notes.append(f"not charted, no published ImageNet-1K top-1: {', '.join(left_out)}")
    return Chart(title=f"ImageNet-1K: top-1 against GFLOPs per image ({len(points)} registered nets)", metric="top-1 (%)",
                 x_label="GFLOPs per image (multiply-adds at the net's ImageNet input size)",
                 y_label="ImageNet-1K top-1 accuracy (%)", points=tuple(points), notes=tuple(notes))


# -- training the backbones first ----------------------------------------------------------------
def train_backbones(name: str, backbones: list[str], fit_args: list[str], runs_dir: str) -> list[RunFolder]:
    """One normal run per backbone, ``<name>-<backbone>`` in W&B group ``name``: finished ones kept, others (re)trained."""
    from ..registry import get_backbone_entry

    if not backbones:
        raise ValueError("give the backbones to train: make compare TRAIN=1 BACKBONES='resnet18 mobilenet_v2 vgg11_bn'")
    if flag_value(fit_args, "--config") is None:
        raise ValueError("give the fit arguments each backbone's run starts from, e.g. --config configs/classification.yaml "
                         "(make compare TRAIN=1 passes TASK's config)")
    refuse_own_flags(fit_args, OWN_FLAGS, "compare", "backbone's run")
    check_backbone_flag(fit_args)
    for backbone in backbones:
        get_backbone_entry(backbone)  # every name checked before the first run starts
    folder = RunFolder.new(name, runs_dir)
    state_path = folder.root / TRAIN_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"fit_args": fit_args, "backbones": []}
    if state["fit_args"] != fit_args:  # kept runs trained otherwise would not be on the same footing
        raise ValueError(f"comparison {name!r} trained its runs with the fit arguments {' '.join(state['fit_args'])!r}; "
                         f"continue it with the same ones, or start another with a new RUN=")
    state["backbones"] = [*state["backbones"], *(b for b in backbones if b not in state["backbones"])]
    folder.root.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=2))
    runs = []
    for backbone in backbones:
        run = RunFolder.new(f"{name}-{slug(backbone)}", runs_dir)
        if run.metrics_path.is_file():
            print(f"{backbone}: {run.name} is finished (metrics.json), kept", flush=True)
        else:
            # the backbone flag last, so it wins over the one in fit_args (make's BACKBONE=)
            status = fit_or_resume(run, [*fit_args, "--group", name, "--model.backbone", backbone], backbone)
            if status != 0 or not run.metrics_path.is_file():
                raise RunStopped(f"{backbone}'s run {run.name} stopped (exit status {status}); the finished runs are kept: "
                                 f"run the same command again with RUN={name} to continue", status or 1)
        runs.append(run)
    return runs


# -- the chart's outputs -------------------------------------------------------------------------
def check_logger_config(logger_config: Path) -> None:
    """A missing logger config is an error naming the configs to choose from."""
    if not logger_config.is_file():
        raise FileNotFoundError(f"no logger config {str(logger_config)!r}; choose one of configs/logger/*.yaml "
                                f"(make compare LOGGER=wandb|csv|tensorboard)")


def chart_logger(logger_config: Path, folder: RunFolder) -> Any | None:
    """The logger that ``logger_config`` (a configs/logger/*.yaml) describes, kept in ``folder``; None if not W&B's."""
    check_logger_config(logger_config)
    entry = ((yaml.safe_load(logger_config.read_text()) or {}).get("trainer") or {}).get("logger")
    entry = entry[0] if isinstance(entry, list) and entry else entry
    if not isinstance(entry, dict) or "class_path" not in entry:
        return None
    module, _, cls_name = entry["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    from lightning.pytorch.loggers import WandbLogger

    if not issubclass(cls, WandbLogger):  # by type: only W&B shows an interactive chart
        return None
    args = {**(entry.get("init_args") or {}), "save_dir": str(folder.root), "name": folder.name, "id": slug(folder.name)[:64],
            "group": folder.name, "job_type": "compare"}
    return cls(**args)


def publish(chart: Chart, folder: RunFolder, out: Path | None, logger_config: Path | None) -> list[Path]:
    """Write the chart into ``folder`` (and at ``out``), print its table, log it to W&B if the logger config says W&B."""
    written = write_chart(chart, folder.root / CHART_FILE)
    if out is not None:
        written += write_chart(chart, out if out.suffix == ".png" else out / CHART_FILE)
    print(markdown_table(chart))
    print("\nwritten: " + ", ".join(map(str, written)))
    if logger_config is not None:
        logger = chart_logger(logger_config, folder)
        if logger is not None and log_chart(logger, chart, folder.root / CHART_FILE):
            logger.experiment.finish()
            print(f"logged to W&B ({getattr(logger, 'mode', '')}): run {folder.name}, under {folder.wandb_dir}")
        else:
            print(f"{logger_config}: not a W&B logger; the chart is the PNG and the table above")
    return written


def main(argv: list[str]) -> int:
    """``python -m cvtasks compare [RUN ...] | --reference imagenet | --train --backbones 'a b' <fit args>``."""
    ap = argparse.ArgumentParser(prog="python -m cvtasks compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    # with --train every unknown flag and its value are fit arguments: no positional runs to swallow the values
    training = "--train" in argv
    if not training:
        ap.add_argument("runs", nargs="*", help="runs of one task (names under --runs_dir, or run folders)")
    ap.add_argument("--reference", default=None, help=f"chart published figures instead of runs: {', '.join(REFERENCES)}")
    ap.add_argument("--train", action="store_true", help="train --backbones first (the other arguments go to each fit)")
    ap.add_argument("--backbones", default="", help="with --train: the backbones, separated by spaces or commas")
    ap.add_argument("--metric", default=None, help="the runs' figure to chart (default: the task's headline, e.g. test/acc)")
    ap.add_argument("--run_name", default=None, help="the comparison's name: runs/<name>/ (default: compare-<time>)")
    ap.add_argument("--runs_dir", default="runs", help="where run folders live (default: runs)")
    ap.add_argument("--out", type=Path, default=None, help="also write the PNG (and its .md, .json) here, e.g. docs/compare.png")
    ap.add_argument("--logger", type=Path, default=None, help="a logger config; W&B gets the interactive chart "
                                                               "(e.g. configs/logger/wandb.yaml)")
    ns, fit_args = ap.parse_known_args(argv)
    runs_given = [] if training else ns.runs
    modes = [m for m, on in (("runs", bool(runs_given)), ("--reference", ns.reference is not None), ("--train", ns.train)) if on]
    if len(modes) != 1:
        raise ValueError("give one of: runs (make compare RUNS='<run> <run>'), REFERENCE=imagenet, or TRAIN=1 BACKBONES='...'"
                         + (f"; got {' and '.join(modes)}" if modes else ""))
    if fit_args and not ns.train:
        raise ValueError(f"unknown arguments {' '.join(fit_args)}; fit arguments go with TRAIN=1 (--train) only")
    if ns.reference is not None and ns.reference not in REFERENCES:
        raise ValueError(f"unknown reference {ns.reference!r}; choose one of {', '.join(REFERENCES)}")
    if ns.logger is not None:
        check_logger_config(ns.logger)  # before any long work

    stamp = time.strftime("%Y%m%d-%H%M%S")
    if ns.reference:
        folder = RunFolder.new(ns.run_name or f"compare-{ns.reference}-{stamp}", ns.runs_dir)
        chart = imagenet_chart()
    else:
        folder = RunFolder.new(ns.run_name or f"compare-{stamp}", ns.runs_dir)
        if ns.train:
            try:
                runs = train_backbones(folder.name, ns.backbones.replace(",", " ").split(), fit_args, ns.runs_dir)
            except RunStopped as stopped:
                print(f"cvtasks: {stopped}", file=sys.stderr)
                return stopped.status
        else:
            runs = [RunFolder.from_name(r, ns.runs_dir) for r in runs_given]
        chart = runs_chart(runs, ns.metric)
    publish(chart, folder, ns.out, ns.logger)
    return 0
