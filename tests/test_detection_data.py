"""Detection / instance segmentation data: shapes targets, box- and mask-aware transforms, the COCO
folder module (crowd, negatives, bad input before training) and the predict folder."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from cvtasks.data.detection import (
    MIN_BOX_AREA,
    MIN_VISIBILITY,
    COCODetectionDataModule,
    DetectionSample,
    ShapesDetectionDataModule,
    detection_collate,
    detection_transform,
    transform_sample,
)
from cvtasks.data.shapes import SHAPE_NAMES


def _mask_box(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(np.asarray(mask))
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def _check_target(image: torch.Tensor, target: dict, num_classes: int, with_masks: bool) -> None:
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0  # unnormalised: the detectors normalise
    n = len(target["labels"])
    h, w = image.shape[1:]
    boxes = target["boxes"]
    assert boxes.dtype == torch.float32 and boxes.shape == (n, 4)
    assert target["labels"].dtype == torch.int64 and ((0 <= target["labels"]) & (target["labels"] < num_classes)).all()
    assert isinstance(target["image_id"], int)
    assert target["iscrowd"].shape == (n,) and target["area"].shape == (n,)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()  # never degenerate
    assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert ("masks" in target) == with_masks
    if with_masks:
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, h, w)


# -- shapes --------------------------------------------------------------------------------------

def test_shapes_targets_match_the_scene_masks() -> None:
    dm = ShapesDetectionDataModule(num_samples=20, img_size=64, with_masks=True, augment=False)
    assert dm.num_classes == len(SHAPE_NAMES) and dm.class_names == list(SHAPE_NAMES)
    assert dm.category_ids == list(range(1, len(SHAPE_NAMES) + 1))
    dm.setup("fit")
    ds = dm._datasets["fit"]
    total = 0
    for i in range(len(ds)):
        image, target = ds[i]
        _check_target(image, target, dm.num_classes, with_masks=True)
        for box, mask, area in zip(target["boxes"], target["masks"], target["area"], strict=True):
            np.testing.assert_allclose(box.numpy(), _mask_box(mask), atol=1e-4)  # eval: exact
            assert area.item() == pytest.approx(mask.sum().item(), rel=1e-5)
        total += len(target["labels"])
    assert total > len(ds)  # several shapes per scene
    again = ds[3][1]
    assert torch.equal(again["boxes"], ds[3][1]["boxes"])  # deterministic per index


def test_shapes_drop_tiny_occluded_shapes_and_masks_are_optional() -> None:
    def module(min_pixels: int) -> ShapesDetectionDataModule:
        dm = ShapesDetectionDataModule(num_samples=40, img_size=64, augment=False, min_object_pixels=min_pixels)
        dm.setup("fit")
        return dm

    everything = module(1)._datasets["fit"]
    areas = [everything.sample(i).area for i in range(len(everything))]
    smallest = min(a.min() for a in areas if len(a))
    scene = next(i for i, a in enumerate(areas) if len(a) and a.min() == smallest)
    pruned = module(int(smallest) + 1)._datasets["fit"]
    tiny = int((areas[scene] == smallest).sum())
    assert len(pruned.sample(scene).labels) == len(everything.sample(scene).labels) - tiny
    assert all((pruned.sample(i).area > smallest).all() for i in range(len(pruned)))
    image, target = pruned[scene]
    assert "masks" not in target
    _check_target(image, target, 5, with_masks=False)
    with pytest.raises(ValueError, match="min_object_pixels"):
        ShapesDetectionDataModule(min_object_pixels=0)


def test_shapes_loader_batches_are_lists() -> None:
    dm = ShapesDetectionDataModule(num_samples=12, img_size=48, batch_size=3, with_masks=True)
    assert dm.collate_fn is detection_collate
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    for image, target in zip(images, targets, strict=True):
        _check_target(image, target, dm.num_classes, with_masks=True)


# -- transforms ------------------------------------------------------------------------------------

def _sample(with_masks: bool = True) -> DetectionSample:
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    masks = np.zeros((3, 40, 60), np.uint8)
    masks[0, 5:15, 5:25] = 1        # left
    masks[1, 20:30, 40:60] = 1      # right edge
    masks[2, 22:38, 8:20] = 1       # bottom left
    masks[2, 22:26, 8:12] = 0       # not a rectangle
    boxes = np.stack([_mask_box(m) for m in masks])
    return DetectionSample(image, boxes, np.array([0, 1, 2]), image_id=5, masks=masks if with_masks else None,
                           area=masks.reshape(3, -1).sum(1))


def _bbox_params() -> A.BboxParams:
    return detection_transform(64, train=False).processors["bboxes"].params


def test_a_crop_that_removes_a_box_drops_its_mask_and_label() -> None:
    crop = A.Compose([A.Crop(0, 0, 38, 40)], bbox_params=_bbox_params())  # leaves 1 of box 1's 20 columns
    assert _bbox_params().min_visibility == MIN_VISIBILITY and _bbox_params().min_area == MIN_BOX_AREA
    image, target = transform_sample(crop, _sample())
    assert image.shape == (3, 40, 38)
    assert target["labels"].tolist() == [0, 2]
    assert target["masks"].shape == (2, 40, 38)
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        np.testing.assert_allclose(box.numpy(), _mask_box(mask), atol=1e-4)
    assert target["area"].tolist() == pytest.approx([200.0, 176.0])
    everything = A.Compose([A.Crop(0, 0, 4, 4)], bbox_params=_bbox_params())  # no object left: a negative
    image, target = transform_sample(everything, _sample())
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 4, 4) and target["labels"].numel() == 0


def test_masks_and_boxes_stay_aligned_after_flip_and_scale() -> None:
    flip_scale = A.Compose([A.HorizontalFlip(p=1.0), A.Affine(scale=1.2, translate_px=(3, -2), p=1.0)],
                           bbox_params=_bbox_params())
    image, target = transform_sample(flip_scale, _sample())
    assert len(target["labels"]) >= 2
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        np.testing.assert_allclose(box.numpy(), _mask_box(mask), atol=1.0)
    # the flip really happened: the object that touched the right edge now sits on the left
    right = target["labels"].tolist().index(1)
    assert target["boxes"][right, 0] < 10


@pytest.mark.parametrize("seed", range(12))
def test_train_pipeline_keeps_boxes_masks_and_labels_in_step(seed: int) -> None:
    pipeline = detection_transform(64, train=True)
    pipeline.set_random_seed(seed)
    image, target = transform_sample(pipeline, _sample(), boxes_from_masks=True)
    _check_target(image, target, 3, with_masks=True)
    assert image.shape == (3, 64, 64)
    for box, mask, label in zip(target["boxes"], target["masks"], target["labels"], strict=True):
        np.testing.assert_allclose(box.numpy(), _mask_box(mask), atol=1e-6)
        assert label.item() in (0, 1, 2)
    assert target["labels"].unique().numel() == len(target["labels"])  # each object at most once


def test_boxes_from_masks_fit_a_cut_shape_and_drop_vanished_masks() -> None:
    """Clipping an L shape's box keeps its full height; the box around the cut mask does not."""
    sample = _sample()
    sample.masks[0] = 0
    sample.masks[0, 5:10, 5:25] = 1
    sample.masks[0, 5:15, 5:10] = 1  # an L: the full height only in its first 5 columns
    crop = A.Compose([A.Crop(10, 0, 60, 40)], bbox_params=_bbox_params())
    _, clipped = transform_sample(crop, sample)
    _, fitted = transform_sample(crop, sample, boxes_from_masks=True)
    assert clipped["boxes"][0].tolist() == pytest.approx([0.0, 5.0, 15.0, 15.0], abs=1e-4)
    assert fitted["boxes"][0].tolist() == [0.0, 5.0, 15.0, 10.0]
    sample.masks[1] = 0  # a box whose mask has vanished is dropped with it
    _, fitted = transform_sample(None, sample, boxes_from_masks=True)
    assert fitted["labels"].tolist() == [0, 2] and len(fitted["masks"]) == 2


def test_eval_pipeline_letterboxes_without_moving_the_origin() -> None:
    image, target = transform_sample(detection_transform(30, train=False), _sample(with_masks=False))
    assert image.shape == (3, 30, 30)
    assert image[:, 20:, :].abs().sum() == 0  # padding at the bottom (40x60 -> 20x30)
    np.testing.assert_allclose(target["boxes"][0].numpy(), [2.5, 2.5, 12.5, 7.5], atol=1e-4)
    assert target["area"][0].item() == pytest.approx(200 / 4)


# -- COCO folders ----------------------------------------------------------------------------------

def _coco_folder(root: Path, *, annotations: list[dict] | None = None, extra_images: int = 0) -> Path:
    """A tiny COCO folder: 4 images (one without objects), polygons, RLE, a crowd region, ids 3 and 9."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(4 + extra_images):
        h, w = (48, 64) if i % 2 == 0 else (64, 48)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        images.append({"id": 100 + i, "file_name": f"im{i}.png", "height": h, "width": w})
    if annotations is None:
        from pycocotools import mask as mask_utils

        crowd = np.zeros((48, 64), np.uint8)
        crowd[30:46, 40:60] = 1
        rle = mask_utils.encode(np.asfortranarray(crowd))
        annotations = [
            {"id": 1, "image_id": 100, "category_id": 9, "bbox": [4, 4, 20, 10], "area": 200,
             "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]], "iscrowd": 0},
            {"id": 2, "image_id": 100, "category_id": 3, "bbox": [40, 30, 20, 16], "area": 320,
             "segmentation": {"size": [48, 64], "counts": rle["counts"].decode()}, "iscrowd": 1},
            {"id": 3, "image_id": 101, "category_id": 3, "bbox": [10, 20, 30, 30], "area": 900,
             "segmentation": [[10, 20, 40, 20, 40, 50, 10, 50]], "iscrowd": 0},
            {"id": 4, "image_id": 103, "category_id": 9, "bbox": [0, 0, 48, 64], "area": 3072,
             "segmentation": [[0, 0, 48, 0, 48, 64, 0, 64]], "iscrowd": 0},
        ]
    (root / "annotations.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}],
    }))
    return root


def _by_id(dataset) -> dict[int, tuple[torch.Tensor, dict]]:
    return {t["image_id"]: (img, t) for img, t in (dataset[i] for i in range(len(dataset)))}


def test_coco_module_crowd_negatives_and_category_ids(tmp_path: Path) -> None:
    root = _coco_folder(tmp_path / "coco")
    dm = COCODetectionDataModule(root=str(root), img_size=64, with_masks=True, augment=False, split=(1, 1, 0))
    assert dm.num_classes == 2 and dm.class_names == ["three", "nine"] and dm.category_ids == [3, 9]
    dm.setup("fit")
    fit = _by_id(dm.make_dataset(list(range(4)), "fit"))
    val = _by_id(dm.make_dataset(list(range(4)), "val"))
    # training never sees the crowd region; evaluation keeps it flagged, as COCO does
    assert fit[100][1]["labels"].tolist() == [1]
    assert val[100][1]["labels"].tolist() == [1, 0] and val[100][1]["iscrowd"].tolist() == [0, 1]
    assert fit[102][1]["boxes"].shape == (0, 4) and fit[102][1]["masks"].shape == (0, 64, 64)  # a negative
    for image, target in list(fit.values()) + list(val.values()):
        _check_target(image, target, 2, with_masks=True)
        assert image.shape == (3, 64, 64)
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            np.testing.assert_allclose(box.numpy(), _mask_box(mask), atol=1.0)
    # 64x48 image 101 is letterboxed without scaling; its polygon mask is 30x30
    assert fit[101][1]["boxes"].tolist() == [[10.0, 20.0, 40.0, 50.0]] and fit[101][1]["masks"].sum() == 900
    images, targets = detection_collate([fit[100], fit[102]])
    assert len(images) == 2 and targets[1]["labels"].numel() == 0


def test_coco_module_missing_image_fails_in_setup(tmp_path: Path) -> None:
    root = _coco_folder(tmp_path / "coco")
    (root / "images" / "im2.png").unlink()
    dm = COCODetectionDataModule(root=str(root))
    with pytest.raises(FileNotFoundError, match=r"im2\.png"):
        dm.setup("fit")


def test_coco_module_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        COCODetectionDataModule(root=str(tmp_path / "nowhere"))
    root = _coco_folder(tmp_path / "coco", annotations=[
        {"id": 8, "image_id": 100, "category_id": 5, "bbox": [1, 1, 4, 4]}])
    with pytest.raises(ValueError, match=r"annotations\.json.*annotation 8.*category id 5"):
        COCODetectionDataModule(root=str(root))
    other = _coco_folder(tmp_path / "other", annotations=[])
    (other / "annotations.json").rename(other / "train.json")
    dm = COCODetectionDataModule(root=str(other), annotations="train.json", augment=False)
    dm.setup("fit")
    assert all(t["boxes"].shape == (0, 4) for _, t in _by_id(dm.make_dataset([0, 1, 2, 3], "fit")).values())
    # a JSON size that disagrees with the file is named, not a shape error inside a loss
    data = json.loads((other / "train.json").read_text())
    data["images"][0]["height"] = 50
    (other / "train.json").write_text(json.dumps(data))
    dm = COCODetectionDataModule(root=str(other), annotations="train.json")
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"im0\.png is 48x64.*says 50x64"):
        dm.make_dataset([0], "val")[0]


def test_torchvision_detectors_train_on_the_batches(tmp_path: Path) -> None:
    """The targets (negatives included) go straight into torchvision's Faster/Mask R-CNN losses."""
    from torch import nn
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    root = _coco_folder(tmp_path / "coco")
    dm = COCODetectionDataModule(root=str(root), img_size=64, with_masks=True, batch_size=4, split=(1, 0, 0))
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert any(t["boxes"].numel() == 0 for t in targets)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    backbone.out_channels = 8
    anchors = AnchorGenerator(sizes=((16, 32),), aspect_ratios=((0.5, 1.0, 2.0),))
    torch.manual_seed(0)
    for cls in (FasterRCNN, MaskRCNN):
        model = cls(backbone, num_classes=dm.num_classes + 1, rpn_anchor_generator=anchors,
                    min_size=64, max_size=64, rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
                    box_batch_size_per_image=16)
        model.train()
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()


def test_predict_folder_images_keep_their_size_unnormalised(tmp_path: Path) -> None:
    folder = tmp_path / "predict"
    folder.mkdir()
    Image.new("RGB", (50, 30), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (20, 40), (0, 0, 255)).save(folder / "b.jpg")
    dm = ShapesDetectionDataModule(num_samples=10, predict_dir=str(folder), batch_size=2)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["orig_size"] == [(30, 50), (40, 20)]
    assert [tuple(im.shape) for im in batch["image"]] == [(3, 30, 50), (3, 40, 20)]
    assert batch["image"][0][0].min() > 0.99 and batch["image"][0][1:].max() < 0.01  # pure red, in [0, 1]
    assert batch["path"][1].endswith("b.jpg")


@pytest.mark.parametrize(("name", "with_masks"), [("detection_folder", False), ("instance_segmentation_folder", True)])
def test_folder_configs_build_the_coco_module(tmp_path: Path, name: str, with_masks: bool) -> None:
    import importlib

    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "data" / f"{name}.yaml").read_text())["data"]
    module, cls = config["class_path"].rsplit(".", 1)
    root = _coco_folder(tmp_path / "coco")
    dm = getattr(importlib.import_module(module), cls)(root=str(root), **config["init_args"])
    assert dm.with_masks is with_masks and dm.num_classes == 2
    dm.setup("fit")
    _, targets = next(iter(dm.val_dataloader()))
    assert all(("masks" in t) is with_masks for t in targets)
