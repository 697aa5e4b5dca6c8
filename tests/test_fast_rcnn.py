"""R-CNN and Fast R-CNN on external proposals: selective search, the proposals' path through the data
and the task (train, eval, predict), the recall measure, the errors, and the CLI's switch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from cvtasks.data.detection import DetectionSample, ShapesDetectionDataModule, detection_transform, transform_sample
from cvtasks.data.shapes import render_scene
from cvtasks.detection import DETECTORS, build_detector
from cvtasks.detection.fast_rcnn import ImageWarp
from cvtasks.detection.proposals import box_iou, proposal_recall, selective_search, similarity
from cvtasks.tasks.detection import DetectionTask

S = 64

pytestmark = pytest.mark.usefixtures("one_thread")


# -- selective search ------------------------------------------------------------------------------

def _rectangles() -> tuple[np.ndarray, np.ndarray]:
    """A grey image with three solid rectangles of distinct colours, and their boxes (xyxy, exclusive ends)."""
    img = np.full((96, 128, 3), 128, np.uint8)
    boxes = np.array([[8, 10, 40, 50], [60, 20, 110, 44], [30, 62, 90, 90]], np.float64)
    for (x1, y1, x2, y2), colour in zip(boxes.astype(int), [(220, 30, 30), (30, 200, 40), (40, 40, 210)]):
        img[y1:y2, x1:x2] = colour
    return img, boxes


def test_selective_search_proposes_each_rectangle_and_is_deterministic() -> None:
    img, boxes = _rectangles()
    props = selective_search(img)
    assert props.dtype == np.float32 and props.ndim == 2 and props.shape[1] == 4 and len(props) > 3
    assert (box_iou(boxes, props).max(axis=1) >= 0.9).all()
    assert len(np.unique(props, axis=0)) == len(props)  # duplicates dropped
    assert (props[:, :2] >= 0).all() and (props[:, 2] <= 128).all() and (props[:, 3] <= 96).all()
    np.testing.assert_array_equal(props, selective_search(img))
    assert len(selective_search(img, max_proposals=3)) == 3
    with pytest.raises(ValueError, match="RGB image"):
        selective_search(img[..., 0])


def test_similarity_on_hand_computed_histograms() -> None:
    ci, cj = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])  # intersection 0.5
    ti, tj = np.array([1.0, 0.0]), np.array([0.0, 1.0])  # intersection 0
    # two 10-px regions whose joint box is 4x5 = 20 px (fills it exactly) in a 100-px image
    s = similarity(ci, cj, ti, tj, 10, 10, (0, 0, 2, 5), (2, 0, 4, 5), 100)
    assert s == pytest.approx(0.5 + 0.0 + (1 - 20 / 100) + 1.0)
    # the same regions far apart: the joint box is 10x5 = 50 px, 30 of them empty
    s_far = similarity(ci, cj, ti, tj, 10, 10, (0, 0, 2, 5), (8, 0, 10, 5), 100)
    assert s_far == pytest.approx(s - 30 / 100)


def test_proposal_recall_on_a_hand_case() -> None:
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([[0, 0, 4, 4]])]
    props = [np.array([[0, 0, 10, 12], [21, 21, 29, 29]]),  # IoU 0.83 and 0.64
             np.array([[0, 0, 4, 10]])]  # IoU 0.4
    assert proposal_recall(props, truth) == pytest.approx(2 / 3)
    assert proposal_recall(props, truth, iou=0.7) == pytest.approx(1 / 3)
    assert proposal_recall([np.zeros((0, 4)), props[1]], truth) == 0.0
    with pytest.raises(ValueError, match="one proposal list per image"):
        proposal_recall(props[:1], truth)


# -- the data --------------------------------------------------------------------------------------

def test_proposals_move_with_the_image_through_flips_and_resizes() -> None:
    img = np.zeros((40, 80, 3), np.uint8)
    sample = DetectionSample(img, np.array([[10.0, 5.0, 30.0, 25.0]]), np.array([1]), image_id=3,
                             proposals=np.array([[10.0, 5.0, 30.0, 25.0], [40.0, 0.0, 80.0, 20.0]]))
    # eval: letterbox 80x40 -> 160x80, objects and proposals scale by 2 alike
    _, target = transform_sample(detection_transform(160, train=False), sample)
    torch.testing.assert_close(target["boxes"], torch.tensor([[20.0, 10.0, 60.0, 50.0]]))
    torch.testing.assert_close(target["proposals"], torch.tensor([[20.0, 10.0, 60.0, 50.0], [80.0, 0.0, 160.0, 40.0]]))
    assert target["labels"].tolist() == [1]  # the proposals are not objects
    # a flip (forced) mirrors both in the 80-px-wide image
    import albumentations as A

    flip = A.Compose([A.HorizontalFlip(p=1.0)], bbox_params=detection_transform(80, False).processors["bboxes"].params)
    _, target = transform_sample(flip, sample)
    torch.testing.assert_close(target["boxes"], torch.tensor([[50.0, 5.0, 70.0, 25.0]]))
    torch.testing.assert_close(target["proposals"], torch.tensor([[50.0, 5.0, 70.0, 25.0], [0.0, 0.0, 40.0, 20.0]]))
    # without proposals the target has none
    plain = DetectionSample(img, sample.boxes, sample.labels, image_id=3)
    assert "proposals" not in transform_sample(detection_transform(80, False), plain)[1]


@pytest.fixture(scope="module")
def shapes() -> ShapesDetectionDataModule:
    """Six tiny scenes with proposals (two per split), set up for fitting."""
    dm = ShapesDetectionDataModule(num_samples=6, img_size=S, batch_size=2, num_workers=0, proposals=True,
                                   split=(0.34, 0.33, 0.33))
    dm.setup("fit")
    return dm


def test_scenes_carry_proposals_computed_once(shapes: ShapesDetectionDataModule) -> None:
    train = shapes._datasets["fit"]
    _, target = train[0]
    assert target["proposals"].ndim == 2 and target["proposals"].shape[1] == 4 and len(target["proposals"])
    first = train.sample(0).proposals
    train[0]
    assert train.sample(0).proposals is first and len(train.sample) == 1  # kept with the scene, not searched again
    # the proposals are the scene's own: selective search on its image
    scene = render_scene(train.indices[0], S, seed=shapes.seed, **shapes.scene_args)
    np.testing.assert_array_equal(first, selective_search(scene.image))
    plain = ShapesDetectionDataModule(num_samples=6, img_size=S, num_workers=0)
    plain.setup("fit")
    assert "proposals" not in plain._datasets["fit"][0][1]


def test_coco_images_get_their_proposals_once_and_scaled(tmp_path: Path) -> None:
    from cvtasks.data.detection import COCODetectionDataModule
    from test_detection_data import _coco_folder

    dm = COCODetectionDataModule(root=str(_coco_folder(tmp_path / "coco")), img_size=128, num_workers=0,
                                 proposals=True, augment=False, split=(1.0, 0.0, 0.0))
    dm.setup("fit")
    data = dm._datasets["fit"]
    image, target = data[0]
    raw = selective_search(np.asarray(Image.open(tmp_path / "coco" / "images" / data.index.images[data.rows[0]].file_name)))
    # letterboxed to 128 px: the image's longest side (64) doubles, and so does every proposal
    assert image.shape[-2:] == (128, 128)
    torch.testing.assert_close(target["proposals"], torch.from_numpy(raw) * 2)
    data[0]
    assert len(data.proposals) == 1  # searched once, kept


# -- the detectors through the task ----------------------------------------------------------------

@pytest.mark.parametrize("detector", ["fast_rcnn", "rcnn"])
def test_train_eval_and_predict_through_the_task(detector: str, shapes: ShapesDetectionDataModule, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = DetectionTask(num_classes=shapes.num_classes, class_names=shapes.class_names, backbone="_tinynet",
                         detector=detector, min_size=S, max_size=S, neck_channels=16, lr=0.01)
    assert task.model.proposals and DETECTORS[detector].proposals
    batch = next(iter(shapes.train_dataloader()))
    task.train()
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.model.backbone.body.parameters())
    task.eval()
    images, targets = next(iter(shapes.val_dataloader()))
    with torch.no_grad():
        out = task(images, proposals=[t["proposals"] for t in targets])
    assert len(out) == len(images)
    for o in out:
        assert o["boxes"].shape[1:] == (4,) and len(o["scores"]) == len(o["labels"]) == len(o["boxes"])
        assert len(o["labels"]) == 0 or 0 <= int(o["labels"].min()) <= int(o["labels"].max()) < shapes.num_classes
    with torch.no_grad():
        task.validation_step((images, targets), 0)
    assert "map_50" in task.metrics["val_map"].compute()
    # predict: a folder of two images of their own sizes, proposals searched at predict time
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate((S, S + 16)):
        Image.fromarray(render_scene(i, size).image).save(folder / f"img{i}.png")
    shapes.predict_dir = str(folder)
    batch = next(iter(shapes.predict_dataloader()))
    assert [len(p) > 0 for p in batch["proposals"]] == [True, True]
    with torch.no_grad():
        records = task.predict_step(batch, 0)
    assert [Path(r["path"]).name for r in records] == ["img0.png", "img1.png"]
    assert all(len(r["boxes"]) == len(r["scores"]) for r in records)
    if len(records[1]["boxes"]):
        assert float(records[1]["boxes"][:, 2].max()) <= S + 16  # in the image's own pixels


def test_a_detector_without_its_proposals_names_the_fix(shapes: ShapesDetectionDataModule) -> None:
    det = build_detector("fast_rcnn", "_tinynet", 3, min_size=S, neck_channels=16)
    det.eval()
    with pytest.raises(ValueError, match="proposals=True"):
        det([torch.rand(3, S, S)])
    with pytest.raises(ValueError, match="one per image"):
        det([torch.rand(3, S, S)] * 2, proposals=[torch.zeros(0, 4)])
    task = DetectionTask(num_classes=3, backbone="_tinynet", detector="rcnn", min_size=S, max_size=S, lr=0.01)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1]), "image_id": 7}]
    with pytest.raises(ValueError, match=r"images \[7\].*--data.proposals true"):
        task.training_step(([torch.rand(3, S, S)], targets), 0)
    with pytest.raises(ValueError, match="--data.proposals true"):
        task.predict_step({"image": [torch.rand(3, S, S)], "path": ["x.png"]}, 0)
    # an image with no proposal at all is scored as one whole-image region, not an error
    det.train()
    losses = det([torch.rand(3, S, S)], targets, proposals=[torch.zeros(0, 4)])
    assert all(torch.isfinite(v) for v in losses.values())


def test_rcnn_warps_each_box_out_of_the_image() -> None:
    image = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()  # value = column
    crops = ImageWarp(8, 0.0)({"image": image}, [torch.tensor([[4.0, 0.0, 12.0, 16.0]])], [(16, 16)])
    assert crops.shape == (1, 1, 8, 8)
    # columns 4..12 resampled to 8: the crop reads the box's columns, at their centres
    torch.testing.assert_close(crops[0, 0, 0], torch.arange(4.0, 12.0))
    wide = ImageWarp(8, 0.25)({"image": image}, [torch.tensor([[6.0, 6.0, 10.0, 10.0]])], [(16, 16)])
    torch.testing.assert_close(wide[0, 0, 0], torch.arange(4.0, 12.0))  # context: the box is the middle half
    with pytest.raises(ValueError, match="context"):
        ImageWarp(8, 0.5)


def test_fast_rcnn_pools_with_roipool_unless_told() -> None:
    from cvtasks.detection import MultiScaleRoIPool

    assert isinstance(build_detector("fast_rcnn", "_tinynet", 3, min_size=S).model.roi_heads.box_roi_pool, MultiScaleRoIPool)
    aligned = build_detector("fast_rcnn", "_tinynet", 3, min_size=S, roi="align").model.roi_heads.box_roi_pool
    assert not isinstance(aligned, MultiScaleRoIPool)


def test_the_cli_turns_proposals_on_for_the_detectors_that_read_them() -> None:
    from jsonargparse import Namespace

    from cvtasks.cli import CvtasksCLI

    def cfg(detector: str, proposals: bool | None) -> Namespace:
        return Namespace(model=Namespace(init_args=Namespace(detector=detector)),
                         data=Namespace(init_args=Namespace(img_size=S, proposals=proposals)))

    for detector, expected in (("fast_rcnn", True), ("rcnn", True), ("faster_rcnn", False)):
        c = cfg(detector, None)
        CvtasksCLI._follow_detector(c)
        assert c.data.init_args.proposals is expected
    c = cfg("faster_rcnn", True)  # given: kept
    CvtasksCLI._follow_detector(c)
    assert c.data.init_args.proposals is True


@pytest.mark.slow
def test_fast_rcnn_fits_and_predicts_from_the_command_line(workdir: Path) -> None:
    proc = run_cli(["fit", "--config", "configs/detection.yaml", "--config", "configs/logger/csv.yaml",
                    "--model.detector", "fast_rcnn", "--data.num_samples", "9", "--data.img_size", "64",
                    "--data.batch_size", "3", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", "--run_name", "frcnn"], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = workdir / "runs" / "frcnn"
    assert "test/map_50" in json.loads((run / "metrics.json").read_text())
    images = workdir / "images"
    images.mkdir()
    Image.fromarray(render_scene(0, 80).image).save(images / "a.png")
    proc = run_cli(["predict-run", "frcnn", str(images)], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "predictions" / "a.png").is_file()


# -- the lecture's comparison ----------------------------------------------------------------------

def test_rcnn_benchmark_times_every_detector_and_reads_given_runs(tmp_path: Path) -> None:
    from benchmarks import rcnn as bench

    run = tmp_path / "frcnn"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    (run / "metrics.json").write_text(json.dumps({"val/map_50": 0.75, "test/map_50": 0.5}))
    text = bench.main(["--backbone", "_tinynet", "--images", "2", "--repeats", "1", "--recall-scenes", "2",
                       "--runs", f"fast_rcnn={run}"])
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    # every detector without masks in the table has its row, R-CNN (also at the paper's warp) and Fast R-CNN first
    assert len(rows) - 1 == len(bench.lineup())
    assert list(rows)[1:7] == ["R-CNN (`rcnn`)", "R-CNN, the paper's 227 px warp (`rcnn:crop_size=227`)",
                               "SPP-net pooling (`faster_rcnn:roi=spp`)", "Fast R-CNN (`fast_rcnn`)",
                               "Faster R-CNN (`faster_rcnn`)", "R-FCN (`rfcn`)"]  # the lecture's order
    assert all(any(f"`{n}`" in r or r.startswith(f"| {n} |") for r in rows.values()) for n, s in DETECTORS.items() if not s.masks)
    fast = [c.strip() for c in rows["Fast R-CNN (`fast_rcnn`)"].split("|")[1:-1]]
    assert float(fast[1]) > 0 and fast[4] == "1.00x" and fast[6:] == ["0.750", "0.500"]  # proposals timed apart; the run's mAP
    assert [c.strip() for c in rows["Faster R-CNN (`faster_rcnn`)"].split("|")[1:-1]][1] == "0.000"  # its own RPN
    assert "rcnn:crop_size=227 / fast_rcnn at test" in text and "recall on 2 validation scenes" in text
    with pytest.raises(SystemExit, match="NAME=RUN"):
        bench.main(["--runs", "fast_rcnn"])
