"""The run folder (cvtasks.runs) and the commands that read it: paths, errors that name the fix, the task back."""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import REPO, run_cli
from cvtasks.commands import COMMANDS, command_help
from cvtasks.data import ShapesDataModule
from cvtasks.registry import list_backbones
from cvtasks.runs import RunFolder
from cvtasks.tasks.classification import ClassificationTask


def _tiny_run(root: Path) -> tuple[RunFolder, ClassificationTask]:
    """A run folder holding a config and a best checkpoint of a tiny classifier, made without the CLI."""
    run = RunFolder.new("tiny", root / "runs")
    dm = ShapesDataModule(num_samples=16, img_size=32, batch_size=8)
    task = ClassificationTask(num_classes=dm.num_classes, class_names=dm.class_names, backbone="_tinynet")
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, dm)
    run.checkpoints_dir.mkdir(parents=True)
    trainer.save_checkpoint(run.best_checkpoint)
    run.config_path.write_text(yaml.safe_dump({"model": {"class_path": "cvtasks.tasks.ClassificationTask",
                                                         "init_args": {"backbone": "_tinynet"}}}))
    return run, task


def test_layout_is_spelled_once(tmp_path: Path) -> None:
    run = RunFolder.new("r1", tmp_path / "runs")
    assert run.name == "r1" and run.runs_dir == tmp_path / "runs"
    assert run.config_path == run.root / "config.yaml"
    assert run.best_checkpoint == run.root / "checkpoints" / "best.ckpt"
    assert run.last_checkpoint == run.root / "checkpoints" / "last.ckpt"
    assert run.metrics_path == run.root / "metrics.json"
    assert run.evaluation_metrics_path("test") == run.root / "test_metrics.json"
    assert run.predictions_dir == run.root / "predictions"
    assert (run.csv_logs_dir.name, run.tensorboard_dir.name, run.wandb_dir.name) == ("logs", "tensorboard", "wandb")
    assert RunFolder.of_checkpoint(run.best_checkpoint) == run
    assert RunFolder.of_checkpoint(tmp_path / "model.ckpt") is None
    name = RunFolder.default_name("cvtasks.tasks.SemanticSegmentationTask", "timm/resnet18")
    assert name.startswith("semanticsegmentation-timm-resnet18-")


def test_missing_runs_and_files_name_the_fix(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match=r"no run 'nope'.*ls .*runs/"):
        RunFolder.from_name("nope", runs)
    (runs / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        RunFolder.from_name("empty", runs)
    (runs / "empty" / "config.yaml").write_text("model: {}\n")
    run = RunFolder.from_name("empty", runs)
    assert RunFolder.from_name(run.root) == run  # a folder's path works as well as its name
    with pytest.raises(FileNotFoundError, match=r"run 'empty' has no metrics.json.*make resume RUN=empty"):
        run.metrics()
    with pytest.raises(FileNotFoundError, match=r"test_metrics.json.*make evaluate RUN=empty"):
        run.metrics("test")
    with pytest.raises(FileNotFoundError, match=r"checkpoints/best.ckpt"):
        run.load_task()
    run.write_metrics({"test/acc": 0.5}, "test")
    assert run.metrics("test") == {"test/acc": 0.5}


def test_load_task_gives_the_best_weights_on_cpu_in_eval_mode(tmp_path: Path) -> None:
    run, trained = _tiny_run(tmp_path)
    assert run.config()["model"]["class_path"] == "cvtasks.tasks.ClassificationTask"
    task = run.load_task()
    assert type(task) is ClassificationTask and not task.training
    assert task.class_names == trained.class_names
    for (name, a), b in zip(task.state_dict().items(), trained.state_dict().values()):
        assert a.device.type == "cpu" and torch.equal(a, b.cpu()), name


def test_every_command_is_a_module_with_main_and_a_line_of_help() -> None:
    help_text = command_help()
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"cvtasks.commands.{module}")
        assert callable(mod.main) and (mod.__doc__ or "").strip(), name
        assert f"  {name} " in help_text


@pytest.mark.parametrize("target,args,expected", [
    ("evaluate", ["RUN=r1", "ARGS=--trainer.devices 2"], "-m cvtasks evaluate r1 --trainer.devices 2"),
    ("predict", ["RUN=r1", "INPUT=imgs", "ARGS=--model.draw_score_threshold 0.3"],
     "-m cvtasks predict-run r1 imgs --model.draw_score_threshold 0.3"),
    ("resume", ["RUN=r1"], "-m cvtasks resume r1"),
])
def test_make_run_targets_name_the_run_only(target: str, args: list[str], expected: str) -> None:
    # -n: print what would run; the run folder's layout is the commands' business, not the Makefile's
    out = subprocess.run(["make", "-n", target, *args], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    line = next(l for l in out.splitlines() if "-m cvtasks" in l).rstrip()
    assert line.endswith(expected) and "runs/" not in line, line


@pytest.mark.slow
def test_evaluate_and_predict_run_read_the_run_folder(workdir: Path) -> None:
    tiny = ["--config", "configs/classification.yaml", "--config", "configs/logger/csv.yaml", "--data.num_samples", "40",
            "--data.img_size", "32", "--data.batch_size", "8", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "1", "--run_name", "r1"]
    proc = run_cli(["fit", *tiny], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = RunFolder.from_name("r1", workdir / "runs")
    assert set(run.metrics()) >= {"val/acc", "test/acc"}
    task = run.load_task()  # a checkpoint written by the CLI (its hyperparameters name the class)
    assert type(task) is ClassificationTask and not task.training and task.class_names[0] == "circle"

    proc = run_cli(["evaluate", "r1", "--trainer.enable_progress_bar", "false"], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert run.metrics("test")["test/acc"] == pytest.approx(run.metrics()["test/acc"])

    images = workdir / "images"
    images.mkdir()
    from PIL import Image

    from cvtasks.data.shapes import render_scene

    for i in range(2):
        Image.fromarray(render_scene(i, 40, single=True).image).save(images / f"img{i}.png")
    proc = run_cli(["predict-run", "r1", str(images)], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(json.loads((run.predictions_dir / "predictions.json").read_text())) == 2
    # a flag after the run overrides its config, as ARGS= does for make predict
    proc = run_cli(["predict-run", "r1", str(images), "--model.label_smoothing", "1.5"], workdir)
    assert proc.returncode == 2 and "label_smoothing must be in [0, 1), got 1.5" in proc.stderr, proc.stderr[-3000:]
    proc = run_cli(["evaluate", "r2"], workdir)
    assert proc.returncode == 2 and "no run 'r2'" in proc.stderr and "ls runs/" in proc.stderr


def test_data_and_detector_normalise_as_the_backbones_weights_expect(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI links data.mean/std from the backbone's spec; detectors take it from the built backbone."""
    from conftest import TinyNet
    from cvtasks.cli import CvtasksCLI
    from cvtasks.registry import register_backbone

    half = (0.5, 0.5, 0.5)
    if "_tinynet_half" not in list_backbones("_tinynet*"):
        register_backbone("_tinynet_half", family="test", spec={"mean": half, "std": half, "min_input_size": 32})(TinyNet)
    monkeypatch.chdir(workdir)
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.num_samples", "9"]
    for backbone, expected in (("_tinynet_half", half), ("_tinynet", (0.485, 0.456, 0.406))):
        cli = CvtasksCLI(["validate", "--config", "configs/classification.yaml", "--model.backbone", backbone,
                          "--data.img_size", "32", *quiet])
        assert cli.datamodule.mean == expected and cli.model.normalization.mean == expected
    cli = CvtasksCLI(["validate", "--config", "configs/detection.yaml", "--model.backbone", "_tinynet_half",
                      "--model.neck_channels", "16", "--data.img_size", "64", *quiet])
    transform = cli.model.model.model.transform
    assert tuple(transform.image_mean) == half and tuple(transform.image_std) == half
