"""Semantic segmentation data: the shapes scenes labelled per pixel, and VOC-layout folders.

Every sample is a dict ``{"image": (3, H, W) float normalised, "mask": (H, W) int64, "id": str}``;
mask value 255 means "ignore" (VOC's object borders, and the corners a rotation brings in).
Image and mask go through one albumentations pipeline so that they stay aligned; masks always use
nearest-neighbour interpolation, so no label is ever invented by a resize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..backbone import IMAGENET_MEAN, IMAGENET_STD
from .augmentation import DENSE_AUGMENTATIONS, check_dense_augmentation, dense_augmentation_summary
from .base import AUTO_SIZE, IMAGE_EXTENSIONS, DrawnOnce, GeneratedScenes, SplitDataModule, header_sizes, read_image
from .shapes import SHAPE_NAMES, render_scene

__all__ = [
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "voc_palette",
    "read_mask",
    "save_index_png",
    "check_mask",
    "segmentation_transforms",
    "ShapesSegmentationDataModule",
    "VOCSegmentationDataModule",
]

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> np.ndarray:
    """VOC's colour map (n, 3) uint8: the bits of the label index spread over R, G, B (255 is (224, 224, 192))."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


_PALETTE = voc_palette()


def read_mask(path: str | Path) -> np.ndarray:
    """A label mask (H, W) int64 from a palette PNG, a grey index PNG or a VOC-coloured RGB PNG."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.array(im.convert("RGB") if mode in ("RGB", "RGBA") else im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read mask {str(path)!r} ({exc}); remove or replace the file") from exc
    if arr.ndim == 2:
        return arr.astype(np.int64)
    # an RGB mask drawn in VOC's colours: map each colour back to its index
    code = (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
    pal_code = (_PALETTE[:, 0].astype(np.int64) << 16) | (_PALETTE[:, 1].astype(np.int64) << 8) | _PALETTE[:, 2]
    lookup = {int(c): i for i, c in reversed(list(enumerate(pal_code)))}
    colours, inverse = np.unique(code.ravel(), return_inverse=True)
    unknown = [int(c) for c in colours if int(c) not in lookup]
    if unknown:
        rgb = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in unknown[:3]]
        raise ValueError(
            f"mask {str(path)!r} is an RGB image with colours {rgb} that are not in VOC's palette; "
            f"save masks as index PNGs (one label per pixel) or palette PNGs"
        )
    labels = np.array([lookup[int(c)] for c in colours], dtype=np.int64)
    return labels[inverse].reshape(code.shape)


def save_index_png(mask: np.ndarray, path: str | Path) -> Path:
    """Write a label mask as a palette PNG: pixel values are the labels, viewers show VOC's colours."""
    m = np.asarray(mask)
    if m.min(initial=0) < 0 or m.max(initial=0) > 255:
        raise ValueError(f"labels must be in 0..255 to be saved as a PNG, got {m.min()}..{m.max()}")
    im = Image.fromarray(m.astype(np.uint8), mode="P")
    im.putpalette(_PALETTE.ravel().tolist())
    path = Path(path)
    im.save(path)
    return path


def segmentation_transforms(
    img_size: int,
    train: bool,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.5, 1.0),
    rotate: float = 15.0,
    colour: bool = True,
    normalize: bool = True,
    augmentation: str = "natural",
) -> A.Compose:
    """One pipeline for image and mask: random resized crop, the preset's mirrors, rotation, colour jitter (train); resize (eval).

    ``augmentation`` names the preset (DENSE_AUGMENTATIONS): ``natural`` mirrors left-right, ``safe``
    never, ``aerial`` both ways with quarter turns; ``none`` trains on the evaluation resize.
    Masks use nearest interpolation; areas a rotation brings in get the ignore label 255 (image: 0).
    Call as ``t(image=img, mask=mask)``; with ``normalize`` the image comes out as a normalised
    float (3, H, W) tensor and the mask as an int64 (H, W) tensor, else both stay numpy arrays.
    """
    preset = DENSE_AUGMENTATIONS[check_dense_augmentation(augmentation)]
    ops: list[Any] = []
    if train and preset.augment:
        ops += [
            A.RandomResizedCrop(size=(img_size, img_size), scale=scale, ratio=(0.75, 4 / 3),
                                interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
            *preset.symmetry_ops(),
        ]
        if rotate > 0:
            ops.append(A.Rotate(limit=(-rotate, rotate), interpolation=cv2.INTER_LINEAR,
                                mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
                                fill=0, fill_mask=IGNORE_INDEX, p=0.5))
        if colour:
            ops.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5))
    else:
        ops.append(A.Resize(img_size, img_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST))
    if normalize:
        ops.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(ops)


def _to_sample(out: dict[str, np.ndarray], item_id: str) -> dict[str, Any]:
    image = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))).float()
    mask = torch.from_numpy(np.ascontiguousarray(out["mask"])).long()
    return {"image": image, "mask": mask, "id": item_id}


class _ShapesSegmentation(Dataset):
    """Scene i with its per-pixel kind labels (drawn once, then kept)."""

    def __init__(self, indices: list[int], size: int, seed: int, scene_args: dict[str, Any], transform: A.Compose) -> None:
        self.indices, self.size, self.seed, self.scene_args, self.transform = indices, size, seed, scene_args, transform
        self.scene: DrawnOnce[tuple[np.ndarray, np.ndarray]] = DrawnOnce(self._draw)

    def __len__(self) -> int:
        return len(self.indices)

    def _draw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (H, W, 3) uint8 and mask (H, W) uint8 of item i."""
        s = render_scene(self.indices[i], self.size, seed=self.seed, **self.scene_args)
        return s.image, s.semantic_mask().astype(np.uint8)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask = self.scene(i)
        return _to_sample(self.transform(image=image, mask=mask), f"scene{self.indices[i]}")


class ShapesSegmentationDataModule(GeneratedScenes, SplitDataModule):
    """Generated shapes scenes; every pixel is labelled with its shape's kind + 1, 0 is background."""

    def __init__(self, *, num_samples: int = 1000, render_size: int | None = None, max_shapes: int = 4,
                 shape_scale: tuple[float, float] = (0.08, 0.2), **kwargs: Any) -> None:
        """``num_samples`` scenes in all, rendered at ``render_size`` (default img_size) with 1..max_shapes shapes
        whose circumradius is drawn from ``shape_scale`` (fractions of the image size)."""
        kwargs.setdefault("img_size", 96)
        super().__init__(**kwargs)
        self.init_scenes(num_samples, render_size, max_shapes=max_shapes, shape_scale=shape_scale)

    @property
    def num_classes(self) -> int:
        return len(SHAPE_NAMES) + 1

    @property
    def class_names(self) -> list[str]:
        return ["background", *SHAPE_NAMES]

    def make_dataset(self, indices: list[int], stage: str) -> Dataset:
        train = stage == "fit" and self.augment
        return _ShapesSegmentation(indices, self.render_size, self.seed, self.scene_args,
                                   segmentation_transforms(self.img_size, train, mean=self.mean, std=self.std))


class _VOCSegmentation(Dataset):
    """Image/mask file pairs, checked on read: same size, labels in range or 255."""

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, transform: A.Compose) -> None:
        self.pairs, self.num_classes, self.transform = pairs, num_classes, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img_path, mask_path = self.pairs[i]
        image = read_image(img_path)
        mask = read_mask(mask_path)
        check_mask(mask, image.shape[:2], self.num_classes, mask_path, img_path)
        return _to_sample(self.transform(image=image, mask=mask.astype(np.uint8)), img_path.stem)


def check_mask(mask: np.ndarray, image_size: Sequence[int], num_classes: int, mask_path: Path, img_path: Path) -> None:
    """Raise naming the file when a mask's size differs from its image's or a label is out of range."""
    if tuple(mask.shape[:2]) != tuple(image_size):
        raise ValueError(
            f"mask {str(mask_path)!r} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {str(img_path)!r} is "
            f"{image_size[1]}x{image_size[0]}; masks must have their image's size"
        )
    bad = np.unique(mask[(mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))])
    if bad.size:
        raise ValueError(
            f"mask {str(mask_path)!r} has labels {bad[:5].tolist()} outside 0..{num_classes - 1} (and 255 = ignore); "
            f"fix the mask or set num_classes (data.num_classes, or one line per class in labels.txt)"
        )


class VOCSegmentationDataModule(SplitDataModule):
    """A VOC-layout folder: JPEGImages/, SegmentationClass/ (palette or index PNGs), optional ImageSets.

    Splits come from ``ImageSets/Segmentation/{train,val}.txt`` (and ``test.txt`` if present,
    else val serves as the test set too) when they exist, else by ratio/k-fold. Class names come
    from ``labels.txt`` (one per line) in the root, VOC's 21 names when there are 21 classes,
    else ``class_i``.
    """

    def __init__(self, *, root: str, num_classes: int | None = None, validate: bool = True, augmentation: str = "natural",
                 **kwargs: Any) -> None:
        """``num_classes`` defaults to the lines of labels.txt, else 21; ``validate`` checks every mask before training.

        ``augmentation``: the training preset (DENSE_AUGMENTATIONS: natural, safe, aerial, none);
        ``img_size`` defaults to ``auto``, the images' median longer side (SplitDataModule.resolve_img_size).
        """
        kwargs.setdefault("img_size", AUTO_SIZE)
        super().__init__(**kwargs)
        self.augmentation = check_dense_augmentation(augmentation)
        self.root = Path(root).expanduser()
        images_dir, masks_dir = self.root / "JPEGImages", self.root / "SegmentationClass"
        for d in (images_dir, masks_dir):
            if not d.is_dir():
                raise FileNotFoundError(
                    f"DATA folder {str(self.root)!r} has no {d.name}/; a VOC-layout folder holds JPEGImages/ "
                    f"(images) and SegmentationClass/ (one PNG mask per image, same file stem)"
                )
        labels_file = self.root / "labels.txt"
        self._names: list[str] | None = None
        if labels_file.is_file():
            self._names = [ln.strip() for ln in labels_file.read_text().splitlines() if ln.strip()]
            if num_classes is not None and num_classes != len(self._names):
                raise ValueError(f"num_classes={num_classes} but {str(labels_file)!r} lists {len(self._names)} classes; make them agree")
        self._num_classes = num_classes or (len(self._names) if self._names else len(VOC_CLASSES))
        if not 1 <= self._num_classes <= 255:
            raise ValueError(f"num_classes must be in 1..255 (255 is the ignore label), got {self._num_classes}")
        images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() == ".png"}
        self._ids = sorted(set(images) & set(masks))
        if not self._ids:
            raise FileNotFoundError(
                f"DATA folder {str(self.root)!r}: no image in JPEGImages/ has a mask of the same name in "
                f"SegmentationClass/ ({len(images)} images, {len(masks)} masks)"
            )
        self._pairs = [(images[i], masks[i]) for i in self._ids]
        self.validate = validate
        self._validated = False
        self.resolve_img_size()

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of an even sample of the images, read from their headers."""
        return header_sizes([image for image, _ in self._pairs])

    def augmentation_summary(self) -> str:
        """The preset's name and what it does (``off`` with augment false)."""
        return dense_augmentation_summary(self.augmentation, self.augment)

    def num_items(self) -> int:
        return len(self._pairs)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        if self._names:
            return list(self._names)
        if self._num_classes == len(VOC_CLASSES):
            return list(VOC_CLASSES)
        return [f"class_{i}" for i in range(self._num_classes)]

    def presplit(self) -> tuple[list[int], list[int], list[int]] | None:
        sets = self.root / "ImageSets" / "Segmentation"
        if not ((sets / "train.txt").is_file() and (sets / "val.txt").is_file()):
            return None
        pos = {stem: i for i, stem in enumerate(self._ids)}

        def read(name: str) -> list[int]:
            stems = [ln.split()[0] for ln in (sets / name).read_text().splitlines() if ln.strip()]
            missing = [s for s in stems if s not in pos]
            if missing:
                raise FileNotFoundError(
                    f"{str(sets / name)!r} lists {len(missing)} ids without an image+mask pair, e.g. {missing[:3]}"
                )
            return [pos[s] for s in stems]

        train, val = read("train.txt"), read("val.txt")
        test = read("test.txt") if (sets / "test.txt").is_file() else list(val)
        return train, val, test

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict" and self.validate and not self._validated:
            self.check_files()
        super().setup(stage)

    def check_files(self) -> None:
        """Read every mask now, so a bad one stops the run before training, naming the file."""
        for img_path, mask_path in self._pairs:
            try:
                with Image.open(img_path) as im:
                    w, h = im.size
            except (UnidentifiedImageError, OSError) as exc:
                raise ValueError(f"cannot read image {str(img_path)!r} ({exc}); remove or replace the file") from exc
            check_mask(read_mask(mask_path), (h, w), self._num_classes, mask_path, img_path)
        self._validated = True

    def make_dataset(self, indices: list[int], stage: str) -> Dataset:
        train = stage == "fit" and self.augment
        transform = segmentation_transforms(self.img_size, train, mean=self.mean, std=self.std, augmentation=self.augmentation)
        return _VOCSegmentation([self._pairs[i] for i in indices], self._num_classes, transform)
