"""DetectionTask and InstanceSegmentationTask: construction from names, training step, non-finite
losses, the COCO figures they log, a fast_dev_run on the shapes scenes, and predict's outputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision

from cvtasks.data.detection import ShapesDetectionDataModule
from cvtasks.tasks.detection import DetectionTask, InstanceSegmentationTask

NAMES = ["circle", "square", "triangle"]
S = 64

pytestmark = pytest.mark.usefixtures("one_thread")

def _task(cls: type = DetectionTask, **kw: object) -> DetectionTask:
    args = dict(num_classes=3, class_names=NAMES, backbone="_tinynet", min_size=S, max_size=S,
                neck_channels=16, lr=0.01)
    return cls(**{**args, **kw})

def _batch(masks: bool = False) -> tuple[list[torch.Tensor], list[dict]]:
    targets = []
    for i in range(2):
        t = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [34.0, 30.0, 60.0, 62.0]]), "labels": torch.tensor([0, 2]),
             "image_id": 100 + i, "iscrowd": torch.tensor([0, 0])}
        if masks:
            m = torch.zeros(2, S, S, dtype=torch.uint8)
            m[0, 6:28, 4:30] = 1
            m[1, 30:62, 34:60] = 1
            t["masks"] = m
        targets.append(t)
    return [torch.rand(3, S, S), torch.rand(3, S, S)], targets

def test_task_builds_from_names_and_rejects_wrong_detector() -> None:
    task = _task(detector="retinanet")
    assert task.model.name == "retinanet" and task.hparams.detector == "retinanet"
    with pytest.raises(ValueError, match="InstanceSegmentationTask"):
        _task(detector="mask_rcnn")
    with pytest.raises(ValueError, match="does not take detector 'yolo'"):
        _task(InstanceSegmentationTask, detector="yolo")
    with pytest.raises(ValueError, match="unknown roi"):
        _task(roi="crop")
    with pytest.raises(ValueError, match="needs min_size"):  # null in a config is the CLI's to fill
        _task(min_size=None)

def test_training_step_and_non_finite_loss_names_the_images(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task()
    task.train()
    loss = task.training_step(_batch(), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    monkeypatch.setattr(task.model, "forward", lambda images, targets: {"loss_a": torch.tensor(float("nan"))})
    with pytest.raises(FloatingPointError, match=r"\[100, 101\]"):
        task.training_step(_batch(), 0)

def test_crowd_regions_are_not_training_targets() -> None:
    task = _task()
    _, targets = _batch()
    targets[0]["iscrowd"] = torch.tensor([1, 0])
    kept = task._train_targets(targets)
    assert kept[0]["labels"].tolist() == [2] and kept[0]["boxes"].shape == (1, 4)
    assert kept[1]["labels"].tolist() == [0, 2]

def _map_result(iou_type: object, masks: bool) -> dict[str, torch.Tensor]:
    metric = MeanAveragePrecision(iou_type=iou_type, class_metrics=True, backend="faster_coco_eval")
    boxes = torch.tensor([[4.0, 6.0, 30.0, 28.0], [34.0, 30.0, 60.0, 62.0]])
    m = torch.zeros(2, S, S, dtype=torch.bool)
    m[0, 6:28, 4:30] = True
    m[1, 30:62, 34:60] = True
    pred = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    tgt = {"boxes": boxes, "labels": torch.tensor([0, 2])}
    if masks:
        pred["masks"], tgt["masks"] = m, m
    metric.update([pred], [tgt])
    return metric.compute()

def test_logged_figures_detection() -> None:
    out = _task().flatten_map(_map_result("bbox", False), "val")
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"):
        assert f"val/{key}" in out
    # class 0 found, class 2 missed (predicted as class 1): per-class AP under the class names
    assert out["val/ap_circle"] == pytest.approx(1.0) and out["val/ap_triangle"] == pytest.approx(0.0)
    assert out["val/map_50"] == pytest.approx(0.5)
    assert not any("segm" in k for k in out)

def test_logged_figures_instance_segmentation() -> None:
    task = _task(InstanceSegmentationTask)
    out = task.flatten_map(_map_result(("bbox", "segm"), True), "test")
    assert out["test/map_50"] == pytest.approx(0.5) and out["test/segm_map_50"] == pytest.approx(0.5)
    assert out["test/segm_ap_circle"] == pytest.approx(1.0)
    assert "test/segm_map_small" in out and "test/bbox_map" not in out

@pytest.mark.slow
@pytest.mark.parametrize(("cls", "detector"), [(DetectionTask, "faster_rcnn"), (DetectionTask, "yolo"),
                                               (InstanceSegmentationTask, "mask_rcnn")])
def test_fast_dev_run_on_shapes(cls: type, detector: str) -> None:
    masks = cls is InstanceSegmentationTask
    dm = ShapesDetectionDataModule(num_samples=12, img_size=S, batch_size=4, with_masks=masks)
    task = cls(num_classes=dm.num_classes, class_names=dm.class_names, backbone="_tinynet", detector=detector,
               min_size=S, max_size=S, neck_channels=16, lr=0.01)
    trainer = L.Trainer(fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(task, dm)
    keys = set(trainer.callback_metrics)
    assert {"train/loss", "val/map", "val/map_50", "val/map_75"} <= keys
    assert any(k.startswith("val/ap_") for k in keys)
    assert ("val/segm_map" in keys) == masks

@pytest.mark.parametrize("cls", [DetectionTask, InstanceSegmentationTask])
def test_predict_writes_drawn_images_and_coco_results(cls: type, tmp_path: Path) -> None:
    task = _task(cls, draw_score_threshold=0.0)
    task.eval()
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(2):
        p = folder / f"img{i}.png"
        Image.fromarray(np.full((S, S + 8, 3), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    with torch.no_grad():
        records = task.predict_step({"image": [torch.rand(3, S, S + 8)] * 2, "path": paths}, 0)
    assert len(records) == 2 and records[0]["path"] == paths[0]
    # fixed detections so the JSON content is known
    for r in records:
        r["boxes"] = torch.tensor([[2.0, 3.0, 12.0, 23.0]])
        r["scores"] = torch.tensor([0.7])
        r["labels"] = torch.tensor([2])
        if cls is InstanceSegmentationTask:
            m = torch.zeros(1, S, S + 8, dtype=torch.bool)
            m[0, 3:23, 2:12] = True
            r["masks"] = m
    out = tmp_path / "out"
    written = task.prediction_writer(out).write(records)
    assert (out / "img0.png").is_file() and (out / "img1.png").is_file() and out / "predictions.json" in written
    drawn = np.asarray(Image.open(out / "img0.png"))
    assert drawn.shape == (S, S + 8, 3) and (drawn != 0).any()  # the box was drawn on a black image
    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == 2
    assert results[0]["category_id"] == 3  # label 2 -> id 3 (label + 1) without a data module
    assert results[0]["bbox"] == pytest.approx([2.0, 3.0, 10.0, 20.0])
    assert ("segmentation" in results[0]) == (cls is InstanceSegmentationTask)
    # with a data module that has category ids, those are written
    task.prediction_writer(out).write(records, datamodule=SimpleNamespace(category_ids=[7, 9, 11]))
    assert json.loads((out / "predictions.json").read_text())[0]["category_id"] == 11

@pytest.mark.parametrize("cls", [DetectionTask, InstanceSegmentationTask])
def test_validation_images_reach_wandb_with_named_boxes(cls: type, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wandb

    from cvtasks.loggers import AutoWandbLogger

    made: list[dict] = []
    real_image = wandb.Image

    def image(arr: np.ndarray, **kw: object) -> object:
        made.append({"arr": arr, **kw})
        return real_image(arr, **kw)  # wandb itself checks the box and mask format

    monkeypatch.setattr(wandb, "Image", image)
    logger = AutoWandbLogger(mode="offline", save_dir=str(tmp_path), name="t", id="t1")  # the real one, offline
    monkeypatch.setattr(cls, "loggers", property(lambda self: [logger]))
    task = _task(cls, draw_score_threshold=0.5)
    _, targets = _batch(masks=True)
    images = [torch.zeros(3, S, S)] * 2  # black, so whatever is painted shows
    pred = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([0, 1]),
            "scores": torch.tensor([0.9, 0.2]), "masks": targets[0]["masks"][:, None].float()}
    task._log_samples(images, [pred, pred], targets)

    logger.experiment.finish()
    media = next((tmp_path / "wandb").glob("offline-run-*")) / "files" / "media"
    assert len(made) == 2  # two pictures, identical here, so W&B stores one file of each kind
    assert list(media.glob("images/val/detections_*.png")) and list(media.glob("metadata/boxes2D/val/*.boxes2D.json"))
    boxes = made[0]["boxes"]
    shown = boxes["prediction"]["box_data"]
    assert [b["box_caption"] for b in shown] == ["circle 0.90"]  # the 0.2 box is under the threshold
    assert shown[0]["position"] == {"minX": 4.0, "minY": 6.0, "maxX": 30.0, "maxY": 28.0}
    assert [b["box_caption"] for b in boxes["ground_truth"]["box_data"]] == ["circle", "triangle"]
    assert boxes["prediction"]["class_labels"] == {0: "circle", 1: "square", 2: "triangle"}
    # instance masks are painted into the picture; plain detection leaves the (black) image alone
    painted = made[0]["arr"][6:28, 4:30].any()
    assert painted == (cls is InstanceSegmentationTask)
    assert not made[0]["arr"][40:, :30].any()
