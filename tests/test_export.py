"""The export command: every task and detector exported, checked against PyTorch, and predicted with.

Runs are made in-process once per module (a tiny backbone, one training step, the run folder's
config and best checkpoint, as fit leaves them); one classification run goes through the real CLI.
"""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from PIL import Image

from conftest import REPO, run_cli
from cvtasks.__main__ import main as cvtasks_main
from cvtasks.data.shapes import render_scene
from cvtasks.export import Tolerances, exported_model, match_detections, task_export, validation_loader
from cvtasks.runs import RunFolder

# one xdist worker for the module: its runs and exports are made once and shared by its tests
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("export_runs")]

S = 64
DETECTION = {"backbone": "_tinynet", "min_size": S, "max_size": S, "neck_channels": 16}
SHAPES_DETECTION = ("cvtasks.data.detection.ShapesDetectionDataModule", {"num_samples": 16, "img_size": S, "batch_size": 4})
#: run name -> (task class, its arguments, data class, its arguments)
RUNS: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "classification": ("cvtasks.tasks.classification.ClassificationTask", {"backbone": "_tinynet"},
                       "cvtasks.data.classification.ShapesDataModule", {"num_samples": 24, "img_size": 32, "batch_size": 4}),
    "segmentation": ("cvtasks.tasks.segmentation.SemanticSegmentationTask",
                     {"backbone": "_tinynet", "head": "fcn8s", "head_kwargs": {"fc_channels": 16}},
                     "cvtasks.data.segmentation.ShapesSegmentationDataModule", {"num_samples": 24, "img_size": S, "batch_size": 4}),
    "faster_rcnn": ("cvtasks.tasks.detection.DetectionTask", {**DETECTION, "detector": "faster_rcnn"}, *SHAPES_DETECTION),
    "mask_rcnn": ("cvtasks.tasks.detection.InstanceSegmentationTask", {**DETECTION, "detector": "mask_rcnn"},
                  SHAPES_DETECTION[0], {**SHAPES_DETECTION[1], "with_masks": True}),
    "fcos": ("cvtasks.tasks.detection.DetectionTask", {**DETECTION, "detector": "fcos"}, *SHAPES_DETECTION),
    "ssd": ("cvtasks.tasks.detection.DetectionTask", {**DETECTION, "detector": "ssd"}, *SHAPES_DETECTION),
    # an untrained YOLO scores about 1e-4 everywhere: a low threshold leaves it detections to compare
    "yolo": ("cvtasks.tasks.detection.DetectionTask", {**DETECTION, "detector": "yolo", "detector_kwargs": {"score_thresh": 1e-5}},
             *SHAPES_DETECTION),
    # an untrained R-FCN scores its boxes within 1e-8 of each other too: which of them NMS and the cap of 100 keep
    # was float noise (a fresh clone failed so once); without NMS and with room for every box, all are compared
    "rfcn": ("cvtasks.tasks.detection.DetectionTask",
             {**DETECTION, "detector": "rfcn", "detector_kwargs": {"box_nms_thresh": 1.0, "box_detections_per_img": 1500}},
             *SHAPES_DETECTION),
    "spp": ("cvtasks.tasks.detection.DetectionTask", {**DETECTION, "detector": "faster_rcnn", "roi": "spp"}, *SHAPES_DETECTION),
    # an untrained CornerNet's corner pairs score within 1e-7 of each other, and float noise decides which of two
    # such boxes NMS keeps (a fresh clone failed so once); without NMS the check compares every pair
    "cornernet": ("cvtasks.tasks.detection.DetectionTask",
                  {**DETECTION, "detector": "cornernet", "detector_kwargs": {"nms_thresh": 1.0}}, *SHAPES_DETECTION),
    # the proposal detectors take the data's selective-search proposals as the file's second input
    "fast_rcnn": ("cvtasks.tasks.detection.DetectionTask", {**DETECTION, "detector": "fast_rcnn"},
                  SHAPES_DETECTION[0], {**SHAPES_DETECTION[1], "proposals": True}),
    "rcnn": ("cvtasks.tasks.detection.DetectionTask",
             {**DETECTION, "detector": "rcnn", "detector_kwargs": {"crop_size": 32, "max_proposals": 64}},
             SHAPES_DETECTION[0], {**SHAPES_DETECTION[1], "proposals": True}),
}


def _load(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _make_run(runs: Path, name: str) -> RunFolder:
    """A run folder as fit leaves it (config.yaml, checkpoints/best.ckpt), after one training step."""
    task_path, task_args, data_path, data_args = RUNS[name]
    torch.manual_seed(0)
    dm = _load(data_path)(**data_args)
    task = _load(task_path)(num_classes=dm.num_classes, class_names=dm.class_names, **task_args)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, dm)
    run = RunFolder.new(name, runs)
    run.checkpoints_dir.mkdir(parents=True)
    trainer.save_checkpoint(run.best_checkpoint)
    config = {"trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False},
              "model": {"class_path": task_path, "init_args": task_args},
              "data": {"class_path": data_path, "init_args": data_args}}
    run.config_path.write_text(yaml.safe_dump(config))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's runs folder; each run is made the first time a test asks for it."""
    return tmp_path_factory.mktemp("export") / "runs"


def _run(runs: Path, name: str) -> RunFolder:
    run = RunFolder.new(name, runs)
    return run if run.best_checkpoint.is_file() else _make_run(runs, name)


def _export(runs: Path, name: str, *args: str) -> int:
    return cvtasks_main(["export", name, "--runs_dir", str(runs), *args])


def _entries(run: RunFolder, fmt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    sidecar = json.loads((run.export_dir / "model.json").read_text())
    report = json.loads((run.export_dir / "report.json").read_text())
    return sidecar, {**report["formats"][fmt], "entry": sidecar["formats"][fmt]}


# -- every task and detector, as ONNX ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(RUNS))
def test_onnx_export_passes_its_check_for_every_task_and_detector(runs: Path, name: str, capsys: pytest.CaptureFixture) -> None:
    run = _run(runs, name)
    assert _export(runs, name) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "parity on" in out and "passed" in out and "pytorch" in out
    sidecar, report = _entries(run, "onnx")
    task = run.load_task()
    assert sidecar["class_names"] == task.class_names and sidecar["kind"] == task_export(task).kind
    assert sidecar["input"]["dtype"] == "float32" and sidecar["outputs"] and sidecar["preprocess"]
    entry = report["entry"]
    assert entry["parity_passed"] and (run.export_dir / entry["file"]).is_file() and entry["format"] == "onnx"
    assert report["parity"]["passed"] and report["parity"]["samples"] == _val_size(run)
    if name not in ("classification", "segmentation"):
        # torchvision's detectors are beyond torch.export: the TorchScript-based ONNX exporter takes them, and says so
        assert "dynamo=False" in entry["exporter"] and "torch.export cannot trace" in entry["exporter_order"]
        assert report["parity"]["figures"]["n_detections"] > 0  # something was compared
        assert sidecar["score_threshold"] == task.draw_score_threshold
        assert entry["fixed_size"] is None  # any image size, as predict feeds them
    pytorch, exported = report["metrics"]["pytorch"], report["metrics"]["exported"]
    assert task.monitor in pytorch and set(pytorch) == set(exported)
    assert all(abs(pytorch[k] - exported[k]) < 1e-3 for k in pytorch)


def _val_size(run: RunFolder) -> int:
    from cvtasks.export import build_datamodule

    dm = build_datamodule(run, run.load_task())
    dm.setup("validate")
    return len(dm.val_indices)


def test_fcn_segmentation_is_fixed_size_and_says_why(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run(runs, "segmentation")
    if not (run.export_dir / "model.json").is_file():
        assert _export(runs, "segmentation") == 0
    entry = json.loads((run.export_dir / "model.json").read_text())["formats"]["onnx"]
    # FCN's crops depend on the input's size in Python: no exporter keeps other sizes, and model.json says so
    assert entry["fixed_size"] == [S, S] and f"{S + 32}x{S + 64}" in entry["fixed_size_reason"]
    images = tmp_path / "odd"
    images.mkdir()
    Image.fromarray(render_scene(0, 80).image).save(images / "big.png")
    code = cvtasks_main(["predict-run", "segmentation", str(images), "--runs_dir", str(runs), "--backend", "onnx"])
    assert code == 2  # refused with the size it takes, not a wrong mask
    assert f"takes only {S}x{S} images" in capsys.readouterr().err


# -- the other formats ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "fmt"), [("classification", "torchscript"), ("classification", "exported_program"),
                                           ("yolo", "exported_program")])
def test_other_formats_are_exported_and_checked(runs: Path, name: str, fmt: str, capsys: pytest.CaptureFixture) -> None:
    run = _run(runs, name)
    assert _export(runs, name, "--format", fmt, "--limit", "2") == 0, capsys.readouterr().err
    sidecar, report = _entries(run, fmt)
    assert report["parity"]["passed"] and report["parity"]["samples"] == 2
    entry = report["entry"]
    if name == "yolo":  # torch.export cannot take a detector: a TorchScript file instead, said everywhere
        assert entry["format"] == "torchscript" and entry["file"] == "model.pt"
        assert entry["fallbacks"][0]["exporter"] == "torch.export.export" and "torchscript" in entry["note"]
        assert "torchscript file instead" in capsys.readouterr().out
    else:
        assert entry["format"] == fmt and entry["fallbacks"] == []
    assert (run.export_dir / entry["file"]).is_file()


# -- a failed check -----------------------------------------------------------------------------------

def test_failed_check_exits_nonzero_and_names_the_worst_sample(runs: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"  # a run of its own: the export it breaks is not the other tests'
    run = _make_run(runs, "classification")
    assert _export(runs, "classification", "--limit", "3") == 0
    # the classifier's bias (the only 5-vector in the file) moved: every logit of class 0 off by 0.5
    path = run.export_dir / "model.onnx"
    model = onnx.load(str(path))
    bias = next(t for t in model.graph.initializer if list(t.dims) == [5])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 0.5
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(path))
    capsys.readouterr()
    assert _export(runs, "classification", "--check_only") == 1
    err = capsys.readouterr().err
    assert "differs from PyTorch" in err and "worst is validation sample" in err and "|logit difference| 0.5" in err
    _, report = _entries(run, "onnx")
    assert not report["entry"]["parity_passed"] and not report["parity"]["passed"] and "metrics" not in report
    # a failed export is never used for predictions
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(render_scene(0, 32, single=True).image).save(images / "a.png")
    assert cvtasks_main(["predict-run", "classification", str(images), "--runs_dir", str(runs), "--backend", "onnx"]) == 2
    assert "failed its parity check" in capsys.readouterr().err


def test_tolerances_and_matching_rules() -> None:
    tol = Tolerances()

    def dets(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
        return {"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64),
                "scores": torch.tensor(scores)}

    ref = dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 1, 2], [0.9, 0.5, 0.1])
    assert match_detections(ref, dets([[20, 20, 30, 30], [0, 0, 10, 10.01], [40, 40, 50, 50]], [1, 0, 2],
                                      [0.5, 0.9, 0.1]), tol).ok  # order does not matter
    assert not match_detections(ref, dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 2, 2],
                                          [0.9, 0.5, 0.1]), tol).ok  # a label changed
    assert not match_detections(ref, dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 1, 2],
                                          [0.9, 0.51, 0.1]), tol).ok  # a score moved by 0.01
    assert not match_detections(ref, dets([[0, 0, 10, 10], [20, 20, 30, 31]], [0, 1], [0.9, 0.5]), tol).ok
    # two nearly equal scores at the bottom traded places at a top-k cut: a swap, not a difference
    swapped = match_detections(ref, dets([[0, 0, 10, 10], [20, 20, 30, 30], [60, 60, 70, 70]], [0, 1, 2],
                                         [0.9, 0.5, 0.1 + 1e-4]), tol)
    assert swapped.ok and "swapped" in swapped.detail
    masks = torch.zeros(3, 1, 20, 20)
    masks[:, :, :10, :10] = 0.9
    moved = masks.clone()
    moved[1, :, 10:, :] = 0.9  # one mask doubled
    assert not match_detections({**ref, "masks": masks}, {**ref, "masks": moved}, tol).ok
    assert match_detections({**ref, "masks": masks}, {**ref, "masks": masks + 1e-6}, tol).ok
    # a pixel PyTorch puts at 0.4999996 may land on either side: float noise, not a different mask
    tiny = torch.zeros(3, 1, 20, 20)
    tiny[:, :, :4, :4] = 0.9
    tiny[:, :, 4, 0] = 0.4999996
    noisy = tiny.clone()
    noisy[:, :, 4, 0] = 0.5000001
    assert match_detections({**ref, "masks": tiny}, {**ref, "masks": noisy}, tol).ok
    noisy[:, :, 5, 0] = 0.9  # a pixel PyTorch is sure of, lost in a 16-pixel mask
    assert not match_detections({**ref, "masks": tiny}, {**ref, "masks": noisy}, tol).ok
    # a detection scored at the detector's threshold, kept by PyTorch and not by the file: float noise at the cut
    at_cut = dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], [0, 1, 2, 0], [0.9, 0.5, 0.1, 0.05 + 1e-7])
    assert not match_detections(at_cut, ref, tol).ok  # without the threshold it is a lost detection
    verdict = match_detections(at_cut, ref, tol, score_cut=0.05)
    assert verdict.ok and "either side of the score threshold 0.05" in verdict.detail
    assert not match_detections(ref, at_cut, tol, score_cut=0.3).ok  # far from the cut: a real difference


# -- predicting with the export ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["classification", "yolo", "mask_rcnn", "fast_rcnn"])
def test_predict_with_the_export_writes_what_pytorch_writes(runs: Path, tmp_path: Path, name: str) -> None:
    run = _run(runs, name)
    if not (run.export_dir / "model.json").is_file() or "onnx" not in json.loads((run.export_dir / "model.json").read_text())["formats"]:
        assert _export(runs, name, "--limit", "2") == 0
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(S, S), (48, 80), (S, 40)]):  # detection takes any size, as the PyTorch path
        Image.fromarray(render_scene(i, max(h, w)).image[:h, :w]).save(images / f"img{i}.png")
    outputs = {}
    for backend in ("pytorch", "onnx"):
        out = tmp_path / backend
        # one image per batch: torchvision pads a batch to its largest image, which moves PyTorch's detections
        # near the padding a little; the export, called on one image at a time, equals PyTorch so
        assert cvtasks_main(["predict-run", name, str(images), "--runs_dir", str(runs), "--backend", backend,
                             "--predict_out", str(out), "--data.batch_size", "1"]) == 0
        outputs[backend] = json.loads((out / "predictions.json").read_text())
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "pytorch").iterdir())
    pytorch, exported = outputs["pytorch"], outputs["onnx"]
    assert len(pytorch) == len(exported) > 0
    if name == "classification":
        assert [r["label"] for r in pytorch] == [r["label"] for r in exported]
        assert np.allclose([r["score"] for r in pytorch], [r["score"] for r in exported], atol=1e-4)
    else:  # COCO results of each image: the same detections, matched one to one as the parity check does
        for image_id in {r["image_id"] for r in pytorch + exported}:
            ref, got = (_detections([r for r in rs if r["image_id"] == image_id]) for rs in (pytorch, exported))
            verdict = match_detections(ref, got, Tolerances())
            assert verdict.ok, f"{name}, image {image_id}: {verdict.detail}"
        if name == "mask_rcnn":
            assert all("segmentation" in r for r in exported)


def _detections(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """COCO results (xywh boxes, category ids) as one image's detections."""
    xywh = torch.tensor([r["bbox"] for r in results], dtype=torch.float32).reshape(-1, 4)
    return {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "labels": torch.tensor([r["category_id"] for r in results], dtype=torch.int64),
            "scores": torch.tensor([r["score"] for r in results], dtype=torch.float32)}


# -- errors and the command line ---------------------------------------------------------------------

def test_user_errors_name_the_input_and_the_fix(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run(runs, "classification")
    assert cvtasks_main(["export", "nope", "--runs_dir", str(runs)]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert _export(runs, "classification", "--format", "tflite") == 2
    err = capsys.readouterr().err
    assert "unknown export format 'tflite'" in err and "onnx, torchscript, exported_program" in err
    assert _export(runs, "classification", "--limit", "0") == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    images = tmp_path / "images"
    images.mkdir()
    assert cvtasks_main(["predict-run", "classification", str(images), "--runs_dir", str(runs), "--backend", "tflite"]) == 2
    assert "unknown backend 'tflite'" in capsys.readouterr().err
    fresh = _make_run(tmp_path / "other", "classification")
    assert cvtasks_main(["predict-run", str(fresh.root), str(images), "--backend", "torchscript"]) == 2
    assert "make export RUN=classification FORMAT=torchscript" in capsys.readouterr().err
    assert _export(runs, "classification", "--exporter", "jit-trace") == 2
    assert "no exporter 'jit-trace' for onnx; choose one of onnx-dynamo, onnx-torchscript" in capsys.readouterr().err
    empty = _load(RUNS["classification"][2])(num_samples=8, img_size=32, split=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="validation split is empty"):
        validation_loader(empty)


def test_dynamo_exporter_on_a_detector_fails_with_its_reason(runs: Path, capsys: pytest.CaptureFixture) -> None:
    _run(runs, "faster_rcnn")
    # asked for the dynamo-based exporter alone: torch.export cannot trace the detector, and the command says why
    assert _export(runs, "faster_rcnn", "--exporter", "onnx-dynamo", "--limit", "1") == 1
    err = capsys.readouterr().err
    assert "no exporter could write DetectionTask as onnx" in err and "torch.export.export" in err
    assert "data-dependent" in err and "Traceback" not in err


def test_an_export_of_an_older_checkpoint_is_flagged(runs: Path) -> None:
    run = _run(runs, "classification")
    path = run.export_dir / "model.json"
    # the module's other tests may have run before this one (xdist need not keep their order), or not; and an
    # export to another format writes the same model.json
    if not path.is_file() or "onnx" not in json.loads(path.read_text())["formats"]:
        assert _export(runs, "classification", "--limit", "2") == 0
    kept = path.read_text()
    sidecar = json.loads(kept)
    sidecar["formats"]["onnx"]["checkpoint_sha256"] = "0" * 64  # as if best.ckpt had moved on since
    path.write_text(json.dumps(sidecar))
    try:
        with pytest.warns(UserWarning, match="exported from an earlier best.ckpt"):
            exported_model(run, run.load_task(), "onnx")
    finally:
        path.write_text(kept)


def test_export_end_to_end_through_the_cli_and_make(workdir: Path) -> None:
    tiny = ["--config", "configs/classification.yaml", "--config", "configs/logger/csv.yaml", "--data.num_samples", "40",
            "--data.img_size", "32", "--data.batch_size", "8", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--run_name", "cli"]
    proc = run_cli(["fit", *tiny], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["export", "cli", "--format", "torchscript"], workdir)  # ONNX is the in-process tests' default
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity on 6 validation samples: passed" in proc.stdout and "val/acc" in proc.stdout
    assert (workdir / "runs" / "cli" / "export" / "model.pt").is_file()
    dry = subprocess.run(["make", "-n", "export", "RUN=cli", "FORMAT=torchscript"], cwd=REPO, capture_output=True,
                         text=True, timeout=60).stdout
    assert "-m cvtasks export cli --format torchscript" in dry
