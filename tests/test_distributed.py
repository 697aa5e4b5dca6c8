"""Figures on N processes equal those on one; W&B gets every task's validation images.

Each task trains briefly with DDP on two CPU processes (gloo) through the command line, as a user
runs it, with the default (real, offline) W&B logger. The evaluation splits have an odd number of
items, so a sampler that pads a split with repeats would count an item twice and move every
figure. The same checkpoints are then evaluated here on one process and the figures compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import REPO, run_cli
from cvtasks.cli import CvtasksCLI
from cvtasks.data.base import UnpaddedDistributedSampler

# the tests share their DDP runs (a module fixture): one xdist worker takes them all
pytestmark = pytest.mark.xdist_group("ddp_runs")

# 45 scenes split 27/9/9: val and test are odd, so two ranks see 5 and 4 items
ODD = ["--data.num_samples", "45", "--data.split", "[0.6, 0.2, 0.2]", "--data.batch_size", "4"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
ONE_PROCESS = ["--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.logger", "false", *QUIET]

# After three steps a detector's boxes are near random, and which class scores highest is chance:
# torchvision keeps the top 100 boxes of an image over all classes, which can all be of a class
# the image lacks (recall 0, and then a repeated image would move nothing). Large shapes and every
# class's boxes kept (COCO's evaluation still takes the top 100 per class) make recall reliably > 0.
BIG_SHAPES = ["--data.shape_scale", "[0.3, 0.45]", "--data.max_shapes", "2"]
TASKS = {
    "classification": ["--data.img_size", "32"],
    "segmentation": ["--model.backbone", "resnet18", "--data.img_size", "64", "--model.head_kwargs", "{fc_channels: 64}"],
    "detection": ["--data.img_size", "64", "--model.neck_channels", "32", *BIG_SHAPES,
                  "--model.detector_kwargs", "{box_detections_per_img: 1000}"],
    "instance_segmentation": ["--data.img_size", "64", "--model.neck_channels", "32", *BIG_SHAPES, "--model.detector_kwargs",
                              "{mask_layers: 2, box_batch_size_per_image: 32, box_detections_per_img: 1000}"],
}
# what each task's validation puts into W&B's media folder (masks are separate images)
MEDIA = {
    "classification": ["images/val/samples_*.png"],
    "segmentation": ["images/val/predictions_*.png", "images/mask/val/predictions_*.mask.png"],
    "detection": ["images/val/detections_*.png", "metadata/boxes2D/val/detections_*.boxes2D.json"],
    "instance_segmentation": ["images/val/detections_*.png", "metadata/boxes2D/val/detections_*.boxes2D.json"],
}


def test_unpadded_sampler_gives_each_item_to_exactly_one_rank() -> None:
    data = list(range(11))
    shares = [list(UnpaddedDistributedSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for s in shares for i in s) == data
    assert [len(s) for s in shares] == [len(UnpaddedDistributedSampler(data, 3, r)) for r in range(3)] == [4, 4, 3]


def _evaluate_one_process(subcommand: str, run: Path, workdir: Path) -> dict[str, float]:
    """The run's best checkpoint evaluated in this process, on one device: every logged figure."""
    cli = CvtasksCLI([subcommand, "--config", str(run / "config.yaml"), "--ckpt_path",
                      str(run / "checkpoints" / "best.ckpt"), "--runs_dir", str(workdir / "one"), *ONE_PROCESS])
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def _close(a: dict[str, float], b: dict[str, float]) -> list[str]:
    return [f"{k}: {a[k]} != {b[k]}" for k in sorted(a) if abs(a[k] - b[k]) > 1e-6 * max(1.0, abs(b[k]))]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """A task's run trained with DDP on two processes and the default W&B logger (offline), made once."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(task: str) -> tuple[Path, Path]:
        if task not in made:
            workdir = tmp_path_factory.mktemp(task)
            (workdir / "configs").symlink_to(REPO / "configs")
            proc = run_cli(["fit", "--config", f"configs/{task}.yaml", "--config", "configs/logger/wandb.yaml",
                            "--config", "configs/trainer/ddp_cpu.yaml", *ODD, *TASKS[task], *QUIET,
                            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--run_name", "ddp"], workdir)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, out[-4000:]
            assert "distributed_backend=gloo" in out and "All distributed processes registered" in out
            made[task] = (workdir, workdir / "runs" / "ddp")
        return made[task]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_ddp_fit_and_evaluation_equal_one_process_and_images_reach_wandb(task: str, ddp_run) -> None:
    workdir, run = ddp_run(task)
    two = json.loads((run / "metrics.json").read_text())  # validate and test of best.ckpt on both processes

    torch.manual_seed(0)
    one = {**_evaluate_one_process("validate", run, workdir), **_evaluate_one_process("test", run, workdir)}
    evaluated = {k: v for k, v in two.items() if k.startswith(("val/", "test/"))}
    assert evaluated and set(evaluated) <= set(one), sorted(set(evaluated) - set(one))
    assert not _close(evaluated, one)
    # the validation during the DDP fit (which chose best.ckpt) measured the same
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    monitor = state["monitor"]
    assert abs(float(state["best_model_score"]) - one[monitor]) <= 1e-6, (monitor, state["best_model_score"], one[monitor])
    # figures that a duplicated item would have moved are not degenerate
    sensitive = {"classification": "val/loss", "segmentation": "val/miou", "detection": "val/mar_100",
                 "instance_segmentation": "val/mar_100"}[task]
    assert 0 < one[sensitive], (sensitive, one)
    print(f"{task}: {sensitive} = {one[sensitive]:.4f}")

    # the real W&B logger (offline) holds the validation pictures, with masks and boxes
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 alone logs
    media = runs[0] / "files" / "media"
    for pattern in MEDIA[task]:
        assert list(media.glob(pattern)), (pattern, sorted(str(p.relative_to(media)) for p in media.rglob("*")))
    names = {"circle", "square", "triangle", "star", "hexagon"}
    if task == "classification":  # captions live in the run's history
        assert b"/ true " in next(runs[0].glob("*.wandb")).read_bytes()
    if "detection" in task:
        boxes = json.loads(next(media.glob(MEDIA[task][1])).read_text())
        assert set(boxes["class_labels"].values()) == names
        assert {b["box_caption"] for b in boxes["box_data"]} <= names | {f"{n} {s / 100:.2f}" for n in names for s in range(101)}


@pytest.mark.slow
def test_evaluate_and_predict_on_two_processes_count_each_image_once(ddp_run, tmp_path: Path) -> None:
    from PIL import Image

    from cvtasks.data.shapes import render_scene

    workdir, run = ddp_run("classification")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):  # odd, so a padding sampler would predict one image twice
        Image.fromarray(render_scene(i, 32, single=True).image).save(images / f"img{i}.png")
    ckpt = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), *QUIET]
    # what make evaluate / make predict run with DEVICES=2 STRATEGY=ddp
    two = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    proc = run_cli(["test", *ckpt, *two], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((run / "test_metrics.json").read_text())
    proc = run_cli(["predict", *ckpt, *two, "--data.predict_dir", str(images), "--predict_out", str(tmp_path / "two")], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = json.loads((tmp_path / "two" / "predictions.json").read_text())

    one = _evaluate_one_process("test", run, workdir)
    assert {"test/loss", "test/acc"} <= set(figures) and not _close(figures, one)
    CvtasksCLI(["predict", *ckpt, *ONE_PROCESS, "--runs_dir", str(workdir / "one"), "--data.predict_dir", str(images), "--predict_out", str(tmp_path / "one")])
    expected = json.loads((tmp_path / "one" / "predictions.json").read_text())
    assert len(expected) == 5 and [r["path"] for r in predicted] == [r["path"] for r in expected]
    assert [r["label"] for r in predicted] == [r["label"] for r in expected]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(expected, predicted))
