"""The command line as a user meets it: train, run folder, predict, resume, errors, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_cli

TINY = [
    "--config", "configs/classification.yaml",
    "--config", "configs/logger/csv.yaml",
    "--data.num_samples", "40",
    "--data.img_size", "32",
    "--data.batch_size", "8",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def test_fit_writes_run_folder_and_metrics(workdir: Path):
    proc = run_cli(["fit", *TINY, "--trainer.max_epochs", "1", "--run_name", "tiny"], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = workdir / "runs" / "tiny"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["backbone"] == "resnet18"
    assert "num_classes" not in config["model"]["init_args"]  # derived from the data, not typed twice
    hparams = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["num_classes"] == 5 and hparams["class_names"][0] == "circle"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/acc", "val/loss", "test/acc", "test/loss"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("val/acc", "test/acc"))
    assert "final metrics" in proc.stdout and "test/acc" in proc.stdout
    assert (run / "logs" / "metrics.csv").is_file()
    assert not (workdir / "lightning_logs").exists()

    # predict on a folder of images of mixed sizes with that run's checkpoint
    from PIL import Image

    from cvtasks.data.shapes import render_scene

    images = workdir / "images"
    images.mkdir()
    for i, size in enumerate((40, 53, 64)):
        Image.fromarray(render_scene(i, size, single=True).image).save(images / f"img{i}.png")
    proc = run_cli(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
                    "--data.predict_dir", str(images)], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((run / "predictions" / "predictions.json").read_text())
    assert sorted(Path(r["path"]).name for r in records) == ["img0.png", "img1.png", "img2.png"]
    assert all(r["class"] in ("circle", "square", "triangle", "star", "hexagon") and 0 <= r["score"] <= 1 for r in records)
    assert (run / "predictions" / "predictions.csv").read_text().startswith("path,label,class,score")

    # a --model.* flag reaches the model instead of losing to the value saved in the checkpoint
    # (Lightning lays the checkpoint's hyperparameters over the config): this one is out of range
    proc = run_cli(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
                    "--data.predict_dir", str(images), "--model.label_smoothing", "1.5"], workdir)
    assert proc.returncode == 2 and "label_smoothing must be in [0, 1), got 1.5" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model.backbone", "vgg61"], ["unknown backbone 'vgg61'", "make backbones"]),
        (["--config", "configs/data/classification_folder.yaml", "--data.root", "/no/such/folder"], ["/no/such/folder", "does not exist"]),
    ],
)
def test_user_errors_are_one_clear_line(workdir: Path, args, expected):
    proc = run_cli(["fit", *TINY, *args], workdir)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for text in expected:
        assert text in proc.stderr


def test_unknown_backbone_stops_before_data_is_built(workdir: Path):
    # a data folder that does not exist would fail when the data module is built: the name check comes first
    proc = run_cli(["fit", *TINY, "--config", "configs/data/classification_folder.yaml", "--data.root", "/missing",
                    "--model.backbone", "resnet19"], workdir)
    assert proc.returncode == 2 and "unknown backbone 'resnet19'" in proc.stderr and "resnet18" in proc.stderr


def _make(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_make_rejects_unknown_task_and_missing_data():
    proc = _make(["train", "TASK=nosuchtask"])
    assert proc.returncode != 0 and "unknown TASK 'nosuchtask'" in proc.stderr and "classification" in proc.stderr
    proc = _make(["train", "DATA=/no/such/dir"])
    assert proc.returncode != 0 and "DATA folder '/no/such/dir' does not exist" in proc.stderr


def test_make_help_lists_variables_with_defaults():
    out = _make(["help"]).stdout
    for var in ("TASK=classification", "BACKBONE=resnet18", "DATA=", "EPOCHS=", "BATCH=", "IMG=", "DEVICES=",
                "STRATEGY=", "PRECISION=", "LOGGER=wandb", "RUN=", "ARGS=", "AUG="):
        assert var in out
    for target in ("train", "test", "resume", "backbones", "check-backbone", "bench", "baseline"):
        assert f"make {target}" in out


@pytest.mark.slow
def test_killed_run_resumes_from_its_folder(workdir: Path):
    """Kill a run mid-training, resume it from its folder alone; step count and epochs carry on."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "cvtasks", "fit", *TINY, "--data.num_samples", "120", "--trainer.max_epochs", "3",
            "--checkpoint_every_n_steps", "3", "--run_name", "killme"]
    proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = workdir / "runs" / "killme" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)
    assert not (workdir / "runs" / "killme" / "metrics.json").exists()

    resumed = run_cli(["resume", "killme"], workdir)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    final = torch.load(last, map_location="cpu", weights_only=False)
    steps_per_epoch = 11  # 84 training scenes in batches of 8
    assert final["global_step"] == 3 * steps_per_epoch
    assert final["epoch"] >= killed_at["epoch"]
    assert final["optimizer_states"] and final["lr_schedulers"]
    assert (workdir / "runs" / "killme" / "metrics.json").is_file()


def test_resume_without_run_is_clear(workdir: Path):
    proc = run_cli(["resume", "nothing-here"], workdir)
    assert proc.returncode == 2 and "no run to resume" in proc.stderr


def test_backbones_command_lists_registry(workdir: Path):
    proc = run_cli(["backbones", "resnet1*"], workdir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "family", "params", "(M)"]
    row = next(l for l in lines if l.startswith("resnet18 "))
    assert "11.69" in row and "1.81" in row and "layer4:512@32" in row and "torchvision:resnet18" in row


def test_check_backbone_command(workdir: Path):
    proc = run_cli(["check-backbone", "resnet18"], workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference parity" in proc.stdout and "FAILED" not in proc.stdout


def test_real_data_config_turns_augmentation_back_on(workdir):
    # the shapes default switches augmentation off; a VOC folder given with DATA= must not inherit that
    proc = run_cli(["fit", "--config", "configs/segmentation.yaml", "--config", "configs/data/segmentation_folder.yaml",
                    "--data.root", "/some/voc", "--print_config"], workdir, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = proc.stdout[proc.stdout.index("\ndata:"):]
    assert "VOCSegmentationDataModule" in data and "augment: true" in data


@pytest.mark.slow
def test_coco_folder_trains_and_predicts_with_its_own_category_ids(workdir: Path):
    # the user's path for real instance data: DATA=<COCO folder>, then predict on its images
    from test_detection_data import _coco_folder

    root = _coco_folder(workdir / "coco", extra_images=4)
    run = workdir / "runs" / "coco"
    proc = run_cli(["fit", "--config", "configs/instance_segmentation.yaml",
                    "--config", "configs/data/instance_segmentation_folder.yaml", "--data.root", str(root),
                    "--config", "configs/logger/csv.yaml", "--data.img_size", "64", "--data.batch_size", "2",
                    "--data.split", "[0.5, 0.25, 0.25]", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", "--run_name", "coco"], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test/map_50", "test/segm_map_50", "val/ap_nine", "val/segm_ap_three"} <= set(metrics)
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert model["min_size"] == model["max_size"] == 64  # left null in the config: the data's img_size

    # one epoch on noise scores everything below torchvision's 0.05: a flag lowers the threshold
    proc = run_cli(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
                    "--data.predict_dir", str(root / "images"),
                    "--model.detector_kwargs", "{mask_layers: 2, box_score_thresh: 0.0}"], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = run / "predictions"
    assert sorted(p.name for p in out.glob("*.png")) == [f"im{i}.png" for i in range(8)]
    results = json.loads((out / "predictions.json").read_text())
    # the file's ids, not labels (which classes a minute's training predicts is the machine's business)
    assert results and {r["category_id"] for r in results} <= {3, 9}
    assert all(len(r["bbox"]) == 4 and r["segmentation"]["size"] for r in results)


def test_detector_size_follows_the_data_unless_given():
    from jsonargparse import Namespace

    from cvtasks.cli import CvtasksCLI

    def cfg(min_size, max_size, img_size):
        return Namespace(model=Namespace(init_args=Namespace(min_size=min_size, max_size=max_size)),
                         data=Namespace(init_args={"img_size": img_size}))

    c = cfg(None, None, 512)
    CvtasksCLI._follow_image_size(c)
    assert (c.model.init_args.min_size, c.model.init_args.max_size) == (512, 512)
    c = cfg(None, 700, 512)
    CvtasksCLI._follow_image_size(c)
    assert (c.model.init_args.min_size, c.model.init_args.max_size) == (512, 700)
    c = cfg(96, None, 512)  # given: kept
    CvtasksCLI._follow_image_size(c)
    assert (c.model.init_args.min_size, c.model.init_args.max_size) == (96, None)
    with pytest.raises(ValueError, match="--model.min_size"):
        CvtasksCLI._follow_image_size(cfg(None, None, None))
