"""`python -m cvtasks compare`: the chart of runs and of published ImageNet figures, its table, W&B, training first, errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO
from cvtasks.__main__ import main as cvtasks_main
from cvtasks.backbone import create_classifier
from cvtasks.charts import plotly_figure
from cvtasks.commands.compare import imagenet_chart, publish, runs_chart
from cvtasks.registry import get_backbone_entry, list_backbones, register_backbone
from cvtasks.runs import RunFolder

NUM_CLASSES, SIZE = 3, 32
FIGURES = {"lenet5": 0.25, "_tinynet": 0.75}


def _write_run(runs_dir: Path, name: str, backbone: str, test_acc: float, task: str = "classification") -> RunFolder:
    """A run folder as fit leaves it: config.yaml, metrics.json and a best.ckpt holding a real task of this backbone."""
    run = RunFolder.new(name, runs_dir)
    run.root.mkdir(parents=True)
    class_path = {"classification": "cvtasks.tasks.classification.ClassificationTask",
                  "segmentation": "cvtasks.tasks.segmentation.SemanticSegmentationTask",
                  "detection": "cvtasks.tasks.detection.DetectionTask"}[task]
    task_args = {"min_size": SIZE, "max_size": SIZE} if task == "detection" else {}
    config = {"model": {"class_path": class_path, "init_args": {"backbone": backbone, "lr": 0.001, **task_args}},
              "data": {"class_path": "cvtasks.data.classification.ShapesDataModule",
                       "init_args": {"img_size": SIZE, "num_samples": 30, "batch_size": 8}}}
    run.config_path.write_text(yaml.safe_dump(config))
    run.write_metrics({"test/acc": test_acc, "val/acc": test_acc + 0.1, "test/map": test_acc, "test/loss": 1.0})
    if task != "segmentation":  # the segmentation run only needs to be refused beside the others
        model = run.task_class()(num_classes=NUM_CLASSES, backbone=backbone, **task_args)
        run.checkpoints_dir.mkdir()
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                    "pytorch-lightning_version": lightning.__version__}, run.best_checkpoint)
    return run


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs of two backbones (and one of another task) on the same data."""
    root = tmp_path_factory.mktemp("runs")
    for backbone, acc in FIGURES.items():
        _write_run(root, f"cls-{backbone}", backbone, acc)
    _write_run(root, "cls-lenet5-again", "lenet5", 0.5)
    _write_run(root, "seg-lenet5", "lenet5", 0.5, task="segmentation")
    _write_run(root, "det-lenet5", "lenet5", 0.5, task="detection")
    (root / "cmp-old").mkdir()
    (root / "cmp-old" / "train.json").write_text(json.dumps({"fit_args": ["--config", "c.yaml"], "backbones": ["lenet5"]}))
    return root


def _whole_model(backbone: str) -> tuple[float, int]:
    """The classifier the task builds, counted independently: GFLOPs (multiply-adds) and parameters at SIZE."""
    model = create_classifier(backbone, NUM_CLASSES).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, SIZE, SIZE))
    return counter.get_total_flops() / 2e9, sum(p.numel() for p in model.parameters())


def test_runs_chart_charts_each_runs_headline_against_its_whole_models_cost(runs_dir: Path, tmp_path: Path) -> None:
    runs = [RunFolder.from_name(f"cls-{b}", runs_dir) for b in FIGURES]
    chart = runs_chart(runs)
    assert chart.metric == "test/acc"  # the classification task's monitor (val/acc) on the test split
    assert "whole model" in chart.x_label and "input size" in chart.x_label
    for point, backbone in zip(chart.points, FIGURES):
        gflops, params = _whole_model(backbone)
        assert point.label == backbone and point.family == get_backbone_entry(backbone).family
        assert point.value == FIGURES[backbone] and point.input_size == SIZE and not point.quoted
        assert point.gflops == pytest.approx(gflops, rel=1e-9) and point.params == params
    assert chart.points[0].gflops != chart.points[1].gflops

    folder = RunFolder.new("cmp", tmp_path)
    written = publish(chart, folder, tmp_path / "docs" / "chart.png", None)
    assert {p.name for p in written} == {"compare.png", "compare.md", "compare.json", "chart.png", "chart.md", "chart.json"}
    with Image.open(folder.root / "compare.png") as png:
        assert png.size[0] > 800 and png.size[1] > 500
    table = (tmp_path / "docs" / "chart.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["_tinynet", "lenet5"]  # best figure first
    assert json.loads((folder.root / "compare.json").read_text())["points"][1]["params"] == chart.points[1].params

    fig = plotly_figure(chart)  # the interactive chart: circle area, not diameter, by parameters
    sizes = {label: size for trace in fig.data for label, size in zip(trace.text, trace.marker.size)}
    assert all(trace.marker.sizemode == "area" for trace in fig.data)
    assert sizes == {p.label: p.params for p in chart.points}


def test_a_detection_run_is_charted_by_its_test_map_and_whole_detector(runs_dir: Path) -> None:
    run = RunFolder.from_name("det-lenet5", runs_dir)
    chart = runs_chart([run])
    [point] = chart.points
    detector = run.load_task()
    assert chart.metric == "test/map" and point.value == 0.5  # the detection task's monitor (val/map), on test
    whole, backbone = (sum(p.numel() for p in m.parameters()) for m in (detector, detector.backbone_module()))
    assert point.params == whole > backbone  # neck and heads counted too
    assert point.gflops > 0


def test_runs_sharing_a_backbone_are_labelled_by_run(runs_dir: Path) -> None:
    chart = runs_chart([RunFolder.from_name(n, runs_dir) for n in ("cls-lenet5", "cls-lenet5-again", "cls-_tinynet")])
    assert [p.label for p in chart.points] == ["cls-lenet5", "cls-lenet5-again", "_tinynet"]


def test_chart_goes_to_wandb_offline_and_not_to_other_loggers(runs_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    chart = runs_chart([RunFolder.from_name(f"cls-{b}", runs_dir) for b in FIGURES])
    folder = RunFolder.new("cmp-wandb", tmp_path)
    publish(chart, folder, None, REPO / "configs" / "logger" / "wandb.yaml")
    [run_dir] = folder.wandb_dir.glob("offline-run-*-cmp-wandb")  # the real W&B, offline, in the comparison's folder
    [plotly_file] = (run_dir / "files" / "media" / "plotly" / "compare").glob("chart_*.plotly.json")
    traces = json.loads(plotly_file.read_text())["data"]
    assert sorted(label for t in traces for label in t["text"]) == sorted(FIGURES)
    [table_file] = (run_dir / "files" / "media" / "table" / "compare").glob("table_*.table.json")
    assert {row[0] for row in json.loads(table_file.read_text())["data"]} == set(FIGURES)

    csv_folder = RunFolder.new("cmp-csv", tmp_path)
    publish(chart, csv_folder, None, REPO / "configs" / "logger" / "csv.yaml")
    assert (csv_folder.root / "compare.png").is_file() and not csv_folder.wandb_dir.exists()


def test_imagenet_reference_charts_every_published_net() -> None:
    from torchvision.models import get_model_weights

    chart = imagenet_chart()
    points = {p.label: p for p in chart.points}
    torchvision_nets = [n for n in list_backbones() if get_backbone_entry(n).reference.startswith("torchvision:")]
    assert torchvision_nets and set(torchvision_nets) <= set(points)
    for name in torchvision_nets:  # torchvision's own figures, read from its weights' metadata
        meta = get_model_weights(get_backbone_entry(name).reference.split(":", 1)[1]).DEFAULT.meta
        point = points[name]
        assert point.value == meta["_metrics"]["ImageNet-1K"]["acc@1"]
        assert (point.gflops, point.params) == (meta["_ops"], meta["num_params"])
        assert not point.quoted and point.source.startswith("torchvision ")
    quoted = {n for n in list_backbones() if get_backbone_entry(n).published_top1 is not None}
    assert {"alexnet_lrn", "inception_v4", "xception", "seresnet50", "resnetv2_50"} <= quoted
    assert {p.label for p in chart.points if p.quoted} == quoted
    assert points["xception"].value == 79.0 and points["xception"].input_size == 299
    assert 8.0 < points["xception"].gflops < 8.8  # ours, at 299 px (Chollet's paper: 8.4 G multiply-adds)
    assert set(points) == set(torchvision_nets) | quoted
    assert "lenet5" in chart.notes[-1] and "wrn28_10" in chart.notes[-1]  # left out, and said so


def test_compare_trains_each_backbone_as_a_run_then_charts_them(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)  # compare in this process, each backbone's fit in its own
    monkeypatch.setenv("WANDB_MODE", "offline")
    tiny = ["--config", "configs/classification.yaml", "--config", "configs/logger/csv.yaml",
            "--data.num_samples", "30", "--data.img_size", "32", "--data.batch_size", "8", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    args = ["compare", "--train", "--backbones", "lenet5 resnet18", "--run_name", "cmp", "--out", "docs/cmp.png", *tiny]
    assert cvtasks_main(args) == 0, capfd.readouterr().err[-3000:]
    runs = [RunFolder.from_name(f"cmp-{b}", workdir / "runs") for b in ("lenet5", "resnet18")]
    for run, backbone in zip(runs, ("lenet5", "resnet18")):  # each a normal run, grouped under the comparison's name
        assert run.config()["model"]["init_args"]["backbone"] == backbone and run.config()["group"] == "cmp"
    data = json.loads((workdir / "docs" / "cmp.json").read_text())
    assert [p["value"] for p in data["points"]] == [run.metrics()["test/acc"] for run in runs]
    assert (workdir / "runs" / "cmp" / "compare.png").is_file()

    kept = {run.name: run.metrics_path.stat().st_mtime_ns for run in runs}
    capfd.readouterr()
    assert cvtasks_main(args) == 0  # the same command again: finished runs are kept, not trained again
    assert "lenet5: cmp-lenet5 is finished (metrics.json), kept" in capfd.readouterr().out
    assert {run.name: run.metrics_path.stat().st_mtime_ns for run in runs} == kept


@pytest.mark.parametrize("args,expected", [
    (["cls-lenet5", "seg-lenet5"], "runs of different tasks cannot share one chart"),
    (["cls-lenet5", "--metric", "test/nope"], "has no 'test/nope' in"),
    (["no-such-run"], "no run 'no-such-run'"),
    ([], "give one of: runs (make compare RUNS="),
    (["cls-lenet5", "--reference", "imagenet"], "got runs and --reference"),
    (["--reference", "cifar"], "unknown reference 'cifar'; choose one of imagenet"),
    (["cls-lenet5", "--trainer.max_epochs", "1"], "fit arguments go with TRAIN=1"),
    (["--train", "--backbones", "lenet5"], "give the fit arguments each backbone's run starts from"),
    (["--train", "--backbones", "lenet5 vgg61", "--config", "configs/classification.yaml"], "unknown backbone 'vgg61'"),
    (["--train", "--backbones", "lenet5", "--config", "c.yaml", "--group", "g"], "compare sets --group for each backbone's run"),
    (["--reference", "imagenet", "--logger", "configs/logger/nope.yaml"], "no logger config 'configs/logger/nope.yaml'"),
    (["--train", "--backbones", "lenet5", "--run_name", "cmp-old", "--config", "c.yaml", "--trainer.max_epochs", "3"],
     "comparison 'cmp-old' trained its runs with the fit arguments '--config c.yaml'"),
])
def test_compare_user_errors_name_the_input_and_the_fix(runs_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> None:
    monkeypatch.chdir(runs_dir.parent)
    assert cvtasks_main(["compare", "--runs_dir", str(runs_dir), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    if "different tasks" in expected:
        assert "ClassificationTask: cls-lenet5" in err and "SemanticSegmentationTask: seg-lenet5" in err


def test_published_top1_is_a_percentage() -> None:
    with pytest.raises(ValueError, match="published_top1 is a top-1 accuracy in percent"):
        register_backbone("_top1_test_net", family="test", published_top1=179.0)


def test_make_compare_passes_each_mode() -> None:
    def line(*variables: str) -> list[str]:
        out = subprocess.run(["make", "-n", "compare", *variables], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
        return " ".join(out.split("\\\n")).split("-m cvtasks compare", 1)[1].split()

    runs = line("RUNS=a b", "LOGGER=csv")
    assert runs[:2] == ["a", "b"] and runs[runs.index("--logger") + 1] == "configs/logger/csv.yaml" and "--train" not in runs
    reference = line("REFERENCE=imagenet", "OUT=docs/compare_imagenet.png")
    assert reference[:4] == ["--reference", "imagenet", "--out", "docs/compare_imagenet.png"]
    train = line("TRAIN=1", "BACKBONES=resnet18 vgg11_bn", "EPOCHS=2", "RUN=cmp")
    assert train[train.index("--backbones") + 1:train.index("--backbones") + 3] == ["'resnet18", "vgg11_bn'"]
    assert train[train.index("--trainer.max_epochs") + 1] == "2" and train[train.index("--run_name") + 1] == "cmp"
