"""Detection and instance segmentation data: the shapes scenes and COCO-format folders.

Every sample is ``(image, target)``: ``image`` an UNNORMALISED float tensor CxHxW in [0, 1]
(torchvision's detectors normalise inside the model), ``target`` a dict of

    boxes     FloatTensor[N, 4]   xyxy, absolute pixels of the returned image
    labels    Int64Tensor[N]      contiguous 0-based classes (no background class)
    masks     UInt8Tensor[N, H, W] only when the data module has ``with_masks=True``
    image_id  int                 the scene index, or the COCO image id
    iscrowd   Int64Tensor[N]      1 for a COCO crowd region; those appear only in val/test targets (COCO's
                                  evaluation ignores detections on them) and must not reach a loss
    area      FloatTensor[N]      the object's area (COCO's field, scaled with the image)
    proposals FloatTensor[P, 4]   only when the data module has ``proposals=True`` (R-CNN, Fast R-CNN): selective
                                  search's region proposals (xyxy, best ranked first), computed once per image

A batch (``detection_collate``) is ``(list of images, list of targets)``. Boxes and masks move with
the image through albumentations; an object whose box leaves the image or shrinks to nothing is
dropped together with its mask and label (an index label field keeps them in step). Proposals ride
in the same box list behind the objects (their index says which is which), so every flip, scale and
crop moves them exactly as it moves the objects; predict images get theirs computed at predict time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..detection.proposals import selective_search
from .augmentation import DENSE_AUGMENTATIONS, check_dense_augmentation, dense_augmentation_summary
from .base import AUTO_SIZE, DrawnOnce, GeneratedScenes, ImageFolderPredictDataset, SplitDataModule, _predict_collate, read_image
from .coco import CocoIndex, check_image_files, decode_segmentation, load_coco
from .shapes import SHAPE_NAMES, render_scene

__all__ = [
    "COCODetectionDataModule",
    "DetectionSample",
    "ShapesDetectionDataModule",
    "detection_collate",
    "detection_transform",
    "to_image_tensor",
    "transform_sample",
]

Target = dict[str, Any]

# Objects smaller than this after a transform (px^2) or with less than this share of their box left
# inside the image are dropped, not kept as slivers a box regressor cannot learn from.
MIN_BOX_AREA = 4.0
MIN_VISIBILITY = 0.1


def detection_transform(img_size: int, train: bool, augmentation: str = "natural") -> A.Compose:
    """Albumentations pipeline moving boxes (pascal_voc xyxy) and masks with the image.

    Eval: letterbox to img_size x img_size (longest side resized, padded at the bottom/right, so
    box coordinates only scale). Train adds the ``augmentation`` preset's mirrors and quarter turns
    (DENSE_AUGMENTATIONS; ``natural``: a horizontal flip), a random scale with shift (which crops
    objects out of the image or shrinks them) and colour jitter; preset ``none`` adds nothing.
    """
    preset = DENSE_AUGMENTATIONS[check_dense_augmentation(augmentation)]
    ops: list[A.BasicTransform] = [
        A.LongestMaxSize(max_size=img_size),
        A.PadIfNeeded(img_size, img_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
    ]
    if train and preset.augment:
        ops += [
            *preset.symmetry_ops(),
            A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), border_mode=cv2.BORDER_CONSTANT,
                     fill=0, fill_mask=0, p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels", "index"], min_area=MIN_BOX_AREA,
                               min_visibility=MIN_VISIBILITY, min_width=1.0, min_height=1.0)
    return A.Compose(ops, bbox_params=bbox_params)


def to_image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float CxHxW in [0, 1], not normalised (the detectors normalise)."""
    return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255)


class DetectionSample:
    """One image and its objects as numpy arrays, before the transform and the conversion to tensors."""

    def __init__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, *, image_id: int,
                 masks: np.ndarray | None = None, area: np.ndarray | None = None,
                 iscrowd: np.ndarray | None = None, proposals: np.ndarray | None = None) -> None:
        n = len(labels)
        self.image = image
        self.boxes = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(n)
        self.image_id = int(image_id)
        self.masks = None if masks is None else np.asarray(masks, dtype=np.uint8).reshape(n, *image.shape[:2])
        box_area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        self.area = box_area if area is None else np.asarray(area, dtype=np.float64).reshape(n)
        self.iscrowd = np.zeros(n, np.int64) if iscrowd is None else np.asarray(iscrowd, dtype=np.int64).reshape(n)
        #: region proposals (P, 4) xyxy, or None where the detector needs none
        self.proposals = None if proposals is None else np.asarray(proposals, dtype=np.float64).reshape(-1, 4)


def transform_sample(pipeline: Callable[..., dict] | None, sample: DetectionSample, *,
                     boxes_from_masks: bool = False) -> tuple[torch.Tensor, Target]:
    """Apply an albumentations pipeline to a sample; returns the image tensor and the target dict.

    boxes_from_masks: replace each box by the box around its transformed mask and drop objects whose
    mask is gone. A clipped box is not the box around the clipped mask (cut an L shape and the box keeps
    its full height), so training with masks uses this, as YOLOv5's segment2box does; eval keeps the
    annotated boxes, only scaled.
    """
    image, boxes, masks, proposals = sample.image, sample.boxes, sample.masks, sample.proposals
    n = len(sample.labels)
    keep = np.arange(n)
    if pipeline is not None:
        # proposals ride behind the objects in the one box list (index >= n, label -1): one transform moves both
        extra = np.zeros((0, 4)) if proposals is None else proposals
        args: dict[str, Any] = {"image": image, "bboxes": np.concatenate([boxes, extra]),
                                "labels": np.concatenate([sample.labels, np.full(len(extra), -1)]),
                                "index": np.arange(n + len(extra))}
        if masks is not None and len(keep):  # albumentations cannot stack an empty list of masks
            args["masks"] = masks
        out = pipeline(**args)
        image = out["image"]
        index = np.asarray(out["index"], dtype=np.int64).reshape(-1)
        moved = np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4)
        keep, boxes = index[index < n], moved[index < n]
        if proposals is not None:
            proposals = moved[index >= n]
        if masks is not None:
            masks = np.asarray(out["masks"])[keep] if "masks" in out else np.zeros((0, *image.shape[:2]), np.uint8)
    if boxes_from_masks and masks is not None and len(keep):
        present = masks.reshape(len(keep), -1).any(1)
        keep, boxes, masks = keep[present], boxes[present], masks[present]
        for k, m in enumerate(masks):
            cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    old = sample.boxes[keep]
    old_area = (old[:, 2] - old[:, 0]) * (old[:, 3] - old[:, 1])
    new_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # COCO's area is the object's (mask) area, not the box's; scale it as the transform scaled the box.
    area = sample.area[keep] * np.divide(new_area, old_area, out=np.ones_like(new_area), where=old_area > 0)
    target: Target = {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.as_tensor(sample.labels[keep], dtype=torch.int64),
        "image_id": sample.image_id,
        "iscrowd": torch.as_tensor(sample.iscrowd[keep], dtype=torch.int64),
        "area": torch.as_tensor(area, dtype=torch.float32),
    }
    if masks is not None:
        target["masks"] = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
    if proposals is not None:
        target["proposals"] = torch.as_tensor(proposals, dtype=torch.float32).reshape(-1, 4)
    return to_image_tensor(image), target


def detection_collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """(list of image tensors, list of target dicts): images may differ in size, targets in length."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


# -- shapes -------------------------------------------------------------------------------------

class _ShapesDetection(Dataset):
    """Scene i with every visible shape as an object (the same scenes as the other shapes tasks)."""

    def __init__(self, indices: list[int], size: int, seed: int, scene_args: dict[str, Any],
                 min_object_pixels: int, with_masks: bool, train: bool, pipeline: Callable[..., dict] | None,
                 proposals: bool = False) -> None:
        self.indices, self.size, self.seed, self.train = indices, size, seed, train
        self.scene_args = scene_args
        self.min_object_pixels, self.with_masks, self.pipeline = min_object_pixels, with_masks, pipeline
        self.proposals = proposals
        #: scene ``indices[i]`` as arrays, before the transform (drawn once, then kept)
        self.sample: DrawnOnce[DetectionSample] = DrawnOnce(self._draw)

    def __len__(self) -> int:
        return len(self.indices)

    def _draw(self, i: int) -> DetectionSample:
        """Scene ``indices[i]`` as arrays, before the transform."""
        idx = self.indices[i]
        scene = render_scene(idx, self.size, seed=self.seed, **self.scene_args)
        shapes = [s for s in scene.shapes if s.mask.sum() >= self.min_object_pixels]
        h, w = scene.image.shape[:2]
        masks = np.stack([s.mask for s in shapes]) if shapes else np.zeros((0, h, w), bool)
        return DetectionSample(
            scene.image, np.array([s.box for s in shapes], dtype=np.float64).reshape(-1, 4),
            np.array([s.kind for s in shapes], dtype=np.int64), image_id=idx,
            masks=masks if self.with_masks else None, area=masks.reshape(len(shapes), -1).sum(1).astype(np.float64),
            # with the scene, so selective search runs once per scene, not once per epoch
            proposals=selective_search(scene.image) if self.proposals else None,
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        return transform_sample(self.pipeline, self.sample(i), boxes_from_masks=self.train and self.with_masks)


class _ProposalsPredictDataset(ImageFolderPredictDataset):
    """A predict folder whose items also carry ``proposals``: selective search on the image as it is given."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = read_image(self.files[i])
        return {"image": self.transform(img), "path": str(self.files[i]), "orig_size": img.shape[:2],
                "proposals": torch.from_numpy(selective_search(img))}


def _proposals_predict_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The predict batch, plus the list of each image's proposals."""
    return {**_predict_collate(items), "proposals": [it["proposals"] for it in items]}


class _DetectionDataModule(SplitDataModule):
    """What the shapes and COCO detection modules share: collate, masks switch, predict images."""

    collate_fn = staticmethod(detection_collate)

    def __init__(self, *, with_masks: bool = False, proposals: bool | None = None, augmentation: str = "natural",
                 **kwargs: Any) -> None:
        """``augmentation``: the training preset (DENSE_AUGMENTATIONS: natural, safe, aerial, none)."""
        super().__init__(**kwargs)
        self.with_masks = with_masks
        #: every target (and predict item) carries selective search's ``proposals``; None, left for the CLI
        #: to fill from the detector (on for R-CNN and Fast R-CNN), counts as off
        self.proposals = bool(proposals)
        self.augmentation = check_dense_augmentation(augmentation)

    def augmentation_summary(self) -> str:
        """The preset's name and what it does (``off`` with augment false)."""
        return dense_augmentation_summary(self.augmentation, self.augment)

    @property
    def category_ids(self) -> list[int]:
        """The category id of each label for written predictions: label + 1, COCO's convention (0 is no class)."""
        return [label + 1 for label in range(self.num_classes)]

    def pipeline(self, stage: str) -> A.Compose:
        """The albumentations pipeline for ``stage`` (augmentation only when fitting with augment=True)."""
        return detection_transform(self.img_size, train=stage == "fit" and self.augment, augmentation=self.augmentation)

    def predict_transform(self, image: np.ndarray) -> torch.Tensor:
        """Predict images stay at their own size and unnormalised; the detectors resize and normalise."""
        return to_image_tensor(image)

    def make_predict_dataset(self, folder: str) -> Dataset:
        """The images of ``folder`` for predict, with their proposals when the detector reads them."""
        return (_ProposalsPredictDataset if self.proposals else ImageFolderPredictDataset)(folder, self.predict_transform)

    def predict_dataloader(self) -> DataLoader:
        """The predict images; with proposals, the batch carries them too (``batch["proposals"]``)."""
        loader = super().predict_dataloader()
        if not self.proposals:
            return loader
        return self._loader(loader.dataset, shuffle=False, collate=_proposals_predict_collate, evaluation=True)


class ShapesDetectionDataModule(GeneratedScenes, _DetectionDataModule):
    """Generated shapes scenes with every visible shape as an object (boxes; masks when with_masks)."""

    def __init__(self, *, num_samples: int = 2000, render_size: int | None = None, min_shapes: int = 1,
                 max_shapes: int = 4, shape_scale: tuple[float, float] = (0.08, 0.2), min_object_pixels: int = 8,
                 with_masks: bool = False, **kwargs: Any) -> None:
        """``num_samples`` scenes of ``min_shapes``..``max_shapes`` shapes of circumradius in ``shape_scale``
        (fractions of the image size); shapes with fewer than ``min_object_pixels`` visible pixels
        (occluded) are dropped."""
        kwargs.setdefault("img_size", 128)
        super().__init__(with_masks=with_masks, **kwargs)
        if min_object_pixels < 1:
            raise ValueError(f"min_object_pixels must be at least 1, got {min_object_pixels}")
        self.init_scenes(num_samples, render_size, min_shapes=min_shapes, max_shapes=max_shapes, shape_scale=shape_scale)
        self.min_object_pixels = min_object_pixels

    @property
    def num_classes(self) -> int:
        """The shape kinds (no background class: R-CNN models add it)."""
        return len(SHAPE_NAMES)

    @property
    def class_names(self) -> list[str]:
        """The shape kinds, in label order."""
        return list(SHAPE_NAMES)

    def make_dataset(self, indices: list[int], stage: str) -> Dataset:
        """Scenes ``indices`` for ``stage``."""
        return _ShapesDetection(indices, self.render_size, self.seed, self.scene_args, self.min_object_pixels,
                                self.with_masks, stage == "fit", self.pipeline(stage), self.proposals)


# -- COCO folders --------------------------------------------------------------------------------

class _CocoDetection(Dataset):
    """Images of a COCO file; crowd regions are left out of training targets and kept (iscrowd=1) for eval."""

    def __init__(self, index: CocoIndex, rows: list[int], images_dir: Path, with_masks: bool, train: bool,
                 pipeline: Callable[..., dict] | None, proposals: bool = False) -> None:
        self.index, self.rows, self.images_dir = index, rows, images_dir
        self.with_masks, self.train, self.pipeline = with_masks, train, pipeline
        #: image ``rows[i]``'s proposals, computed on first use and kept (selective search costs more than decoding)
        self.proposals: DrawnOnce[np.ndarray] | None = DrawnOnce(self._propose) if proposals else None

    def _propose(self, i: int) -> np.ndarray:
        """Selective search on image ``rows[i]``."""
        return selective_search(read_image(self.images_dir / self.index.images[self.rows[i]].file_name))

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int) -> DetectionSample:
        """Image ``rows[i]`` of the file as arrays, before the transform."""
        row = self.rows[i]
        info = self.index.images[row]
        path = self.images_dir / info.file_name
        image = read_image(path)
        if image.shape[:2] != (info.height, info.width):
            raise ValueError(f"image {path} is {image.shape[0]}x{image.shape[1]} (HxW) but {self.index.path} says "
                             f"{info.height}x{info.width}; fix the 'height'/'width' of image id {info.id}")
        objs = [o for o in self.index.objects[row] if not (self.train and o.iscrowd)]
        masks = None
        if self.with_masks:
            masks = np.zeros((len(objs), info.height, info.width), np.uint8)
            for k, o in enumerate(objs):
                masks[k] = decode_segmentation(o.segmentation, info.height, info.width)
        return DetectionSample(
            image, np.array([o.box for o in objs], dtype=np.float64).reshape(-1, 4),
            np.array([o.label for o in objs], dtype=np.int64), image_id=info.id, masks=masks,
            area=np.array([o.area for o in objs], dtype=np.float64), iscrowd=np.array([o.iscrowd for o in objs]),
            proposals=None if self.proposals is None else self.proposals(i),
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        return transform_sample(self.pipeline, self.sample(i), boxes_from_masks=self.train and self.with_masks)


class COCODetectionDataModule(_DetectionDataModule):
    """A folder in COCO format, split by ratio or k-fold like the other data modules.

    Layout::

        <root>/annotations.json     COCO JSON: images, annotations (bbox, segmentation), categories
        <root>/images/<file_name>   every image the JSON lists (file_name may hold sub-folders)

    ``annotations`` overrides the JSON's path (absolute, or relative to root); ``images`` the image
    folder's name. Labels are the categories sorted by id; ``category_ids[label]`` maps back.
    Images without annotations are kept as negatives. ``with_masks=True`` (instance segmentation)
    requires a segmentation (polygons or RLE) on every non-crowd annotation.
    """

    def __init__(self, *, root: str, annotations: str | None = None, images: str = "images",
                 with_masks: bool = False, **kwargs: Any) -> None:
        """Read and check the annotations now (num_classes must be known before setup).

        ``img_size`` defaults to ``auto``: the images' median longer side, from the JSON's sizes
        (see SplitDataModule.resolve_img_size).
        """
        kwargs.setdefault("img_size", AUTO_SIZE)
        super().__init__(with_masks=with_masks, **kwargs)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"COCO data folder {str(self.root)!r} does not exist; pass --data.root <folder> "
                                    "holding annotations.json and images/")
        ann = Path(annotations).expanduser() if annotations else Path("annotations.json")
        self.annotations_path = ann if ann.is_absolute() else self.root / ann
        self.images_dir = self.root / images
        self.index = load_coco(self.annotations_path, require_masks=with_masks)
        self._checked = False
        self.resolve_img_size()

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image, as the JSON gives them."""
        return [(info.height, info.width) for info in self.index.images]

    def num_items(self) -> int:
        """Number of images in the file (annotated or not)."""
        return len(self.index)

    @property
    def num_classes(self) -> int:
        """Number of categories (no background class: R-CNN models add it)."""
        return len(self.index.category_ids)

    @property
    def class_names(self) -> list[str]:
        """Category names in label order."""
        return list(self.index.class_names)

    @property
    def category_ids(self) -> list[int]:
        """The file's category id of each label (write predictions with these)."""
        return list(self.index.category_ids)

    def setup(self, stage: str | None = None) -> None:
        """Check that every image file exists (before any training), then split."""
        if stage != "predict" and not self._checked:
            check_image_files(self.index, self.images_dir)
            self._checked = True
        super().setup(stage)

    def make_dataset(self, indices: list[int], stage: str) -> Dataset:
        """Images ``indices`` of the file for ``stage``; crowd regions only in val/test targets."""
        return _CocoDetection(self.index, indices, self.images_dir, self.with_masks, train=stage == "fit",
                              pipeline=self.pipeline(stage), proposals=self.proposals)
