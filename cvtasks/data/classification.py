"""Classification data: the shapes scenes (one shape per image) and a folder of class sub-folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..backbone import IMAGENET_MEAN, IMAGENET_STD
from .base import AUTO_SIZE, IMAGE_EXTENSIONS, DrawnOnce, GeneratedScenes, SplitDataModule, header_sizes, normalise, read_image
from .shapes import SHAPE_NAMES, render_scene

__all__ = ["AUGMENTATIONS", "AffineAndMirrors", "PCALighting", "classification_transform", "describe_augmentation",
           "ShapesDataModule", "ImageFolderDataModule"]


class AffineAndMirrors(A.ImageOnlyTransform):
    """albumentations' Affine (shift, per-axis scale, turn; black corners) then each mirror, in one warp.

    ``A.Affine(translate_percent=translate, scale=scale, rotate=rotate, border_mode=0, p=affine_p)``
    followed by ``A.HorizontalFlip(p=mirror_p)`` and ``A.VerticalFlip(p=mirror_p)`` draw the same
    images, but run three transforms' Python and, where the affine applies, a warp and a copy per
    mirror. Here the mirrors are composed into the affine's 2x3 matrix and the image is warped once
    (mirrors alone are an exact flip; nothing drawn, the image is passed on as it is). A shapes item
    is drawn in half the time (58 against 112 us; docs/benchmarks.md, "The data path").
    """

    def __init__(self, translate: tuple[float, float] = (-0.1, 0.1), scale: tuple[float, float] = (0.85, 1.15),
                 rotate: tuple[float, float] = (-30.0, 30.0), affine_p: float = 0.7, mirror_p: float = 0.5,
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        self.translate, self.scale, self.rotate = tuple(translate), tuple(scale), tuple(rotate)
        self.affine_p, self.mirror_p = affine_p, mirror_p

    def get_params(self) -> dict[str, Any]:
        r = self.py_random
        move = r.random() < self.affine_p
        return {
            "move": move,
            "shift": (r.uniform(*self.translate), r.uniform(*self.translate)) if move else (0.0, 0.0),
            "zoom": (r.uniform(*self.scale), r.uniform(*self.scale)) if move else (1.0, 1.0),
            "angle": r.uniform(*self.rotate) if move else 0.0,
            "hflip": r.random() < self.mirror_p,
            "vflip": r.random() < self.mirror_p,
        }

    @staticmethod
    def matrix(height: int, width: int, shift: tuple[float, float], zoom: tuple[float, float], angle: float,
               hflip: bool, vflip: bool) -> np.ndarray:
        """The 2x3 map from input to output pixel centres: scale and turn (degrees, counter-clockwise as shown)
        about the image's centre, shift by fractions of the width and height, then mirror."""
        cx, cy = (width - 1) / 2, (height - 1) / 2
        a = np.deg2rad(angle)
        cos, sin = np.cos(a), np.sin(a)
        # y points down: a counter-clockwise turn on screen is (x, y) -> (x cos + y sin, -x sin + y cos)
        linear = np.array([[cos, sin], [-sin, cos]]) @ np.diag(zoom)
        offset = np.array([cx + shift[0] * width, cy + shift[1] * height]) - linear @ np.array([cx, cy])
        m = np.concatenate([linear, offset[:, None]], axis=1)
        if hflip:
            m[0] = -m[0]
            m[0, 2] += width - 1
        if vflip:
            m[1] = -m[1]
            m[1, 2] += height - 1
        return m

    def apply(self, img: np.ndarray, move: bool, shift: tuple[float, float], zoom: tuple[float, float], angle: float,
              hflip: bool, vflip: bool, **params: Any) -> np.ndarray:
        if not move:
            if hflip or vflip:
                return cv2.flip(img, -1 if hflip and vflip else 1 if hflip else 0)
            return img
        h, w = img.shape[:2]
        return cv2.warpAffine(img, self.matrix(h, w, shift, zoom, angle, hflip, vflip), (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("translate", "scale", "rotate", "affine_p", "mirror_p")


def _shapes_ops(img_size: int, train: bool) -> list[A.BasicTransform]:
    """Generated shapes: shifts, scales, rotations up to 30 degrees, both flips, colour jitter (a shape has no up)."""
    ops: list[A.BasicTransform] = [A.Resize(img_size, img_size)]
    if train:
        ops += [
            AffineAndMirrors(translate=(-0.1, 0.1), scale=(0.85, 1.15), rotate=(-30, 30), affine_p=0.7, mirror_p=0.5),
            A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
            A.HueSaturationValue(10, 20, 10, p=0.3),
        ]
    return ops


def _safe_ops(img_size: int, train: bool) -> list[A.BasicTransform]:
    """Any kind of image: small shifts, scales and turns (10 degrees), brightness and contrast; no flip, so no class changes."""
    ops: list[A.BasicTransform] = [A.Resize(img_size, img_size)]
    if train:
        # edges replicated, not filled: a scan's white paper and a digit's black ground both continue
        ops += [
            A.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-10, 10), border_mode=cv2.BORDER_REPLICATE, p=0.8),
            A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
        ]
    return ops


def _documents_ops(img_size: int, train: bool) -> list[A.BasicTransform]:
    """Scans, digits, text: shifts, scales, turns up to 10 degrees and a slant (shear); never a flip (b/d, 2/5) or a large turn (6/9)."""
    ops: list[A.BasicTransform] = [A.Resize(img_size, img_size)]
    if train:
        ops += [
            A.Affine(translate_percent=(-0.1, 0.1), scale=(0.85, 1.15), rotate=(-10, 10), shear=(-12, 12),
                     border_mode=cv2.BORDER_REPLICATE, p=0.9),
            A.RandomBrightnessContrast(0.25, 0.25, p=0.5),
        ]
    return ops


def _natural_ops(img_size: int, train: bool) -> list[A.BasicTransform]:
    """Photos: random resized crops, left-right mirrors, colour jitter; evaluation takes the centre crop of the resized image."""
    if train:
        return [
            A.RandomResizedCrop(size=(img_size, img_size), scale=(0.35, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
        ]
    return [A.SmallestMaxSize(max_size=img_size), A.CenterCrop(img_size, img_size)]


def _aerial_ops(img_size: int, train: bool) -> list[A.BasicTransform]:
    """Overhead views (satellite, aerial, microscopy): both flips and any rotation, scales, colour; such images have no up."""
    ops: list[A.BasicTransform] = [A.Resize(img_size, img_size)]
    if train:
        ops += [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=1.0),
            # the corners a turn brings in are mirrored ground, not black
            A.Affine(rotate=(-45, 45), scale=(0.9, 1.1), border_mode=cv2.BORDER_REFLECT_101, p=0.7),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]
    return ops


def _none_ops(img_size: int, train: bool) -> list[A.BasicTransform]:
    """No augmentation: every image resized to img_size, for training as for evaluation."""
    return [A.Resize(img_size, img_size)]


class PCALighting(A.ImageOnlyTransform):
    """AlexNet's lighting noise: one colour shift per image along the principal components of ImageNet's RGB pixels.

    Krizhevsky et al. 2012, section 4.1: to each pixel add ``[p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T``, where
    ``p_i, l_i`` are the eigenvectors and eigenvalues of the 3x3 covariance of the training set's RGB
    values and ``a_i ~ N(0, alpha_std)`` is drawn once per image. The eigen-decomposition is ImageNet's
    (pixels in [0, 1]; the figures fb.resnet.torch published). albumentations' FancyPCA differs: it
    decomposes each image's own pixels and scales each pixel's deviation, so the shift is not one colour.
    """

    EIGENVALUES = np.array([0.2175, 0.0188, 0.0045])
    EIGENVECTORS = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

    def __init__(self, alpha_std: float = 0.1, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.alpha_std = alpha_std

    def get_params(self) -> dict[str, Any]:
        return {"alpha": self.random_generator.normal(0.0, self.alpha_std, 3)}

    def apply(self, img: np.ndarray, alpha: np.ndarray, **params: Any) -> np.ndarray:
        shift = self.EIGENVECTORS @ (alpha * self.EIGENVALUES)
        if img.dtype == np.uint8:
            return np.clip(img.astype(np.float32) + 255.0 * shift.astype(np.float32), 0, 255).round().astype(np.uint8)
        return np.clip(img + shift.astype(img.dtype), 0.0, 1.0)


def _alexnet_ops(img_size: int, train: bool) -> list[A.BasicTransform]:
    """The AlexNet paper's recipe: rescale 256:224, random crops and left-right mirrors, PCA lighting; evaluation the centre crop."""
    # Krizhevsky et al. 2012, section 4.1: the image's shorter side scaled to 256 and its central
    # 256x256 kept; training takes random 224x224 crops of it (translations) and their horizontal
    # reflections, and adds PCA lighting noise; testing takes the central crop. Sizes scale with
    # img_size as 256:224.
    full = round(img_size * 256 / 224)
    ops: list[A.BasicTransform] = [A.SmallestMaxSize(max_size=full), A.CenterCrop(full, full)]
    if train:
        return ops + [A.RandomCrop(img_size, img_size), A.HorizontalFlip(p=0.5), PCALighting(alpha_std=0.1)]
    return ops + [A.CenterCrop(img_size, img_size)]


#: classification augmentation presets: name -> the albumentations ops for (img_size, train); each
#: builder's docstring is the one line printed when a run starts. The folder default is ``safe``: a
#: mirror or a large turn changes the class of a digit, a letter or a left/right sign, so a preset
#: that never changes a class is the only sensible default for a folder of unknown kind.
AUGMENTATIONS: dict[str, Callable[[int, bool], list[A.BasicTransform]]] = {
    "safe": _safe_ops,
    "natural": _natural_ops,
    "documents": _documents_ops,
    "digits": _documents_ops,  # the same preset under the name a user of digit scans looks for
    "aerial": _aerial_ops,
    "none": _none_ops,
    "shapes": _shapes_ops,  # the generated shapes' default
    "alexnet": _alexnet_ops,  # the AlexNet paper's recipe: random crops with shifts, flips, PCA lighting
}


def describe_augmentation(name: str) -> str:
    """One line saying what the preset ``name`` does (its builder's docstring)."""
    return (AUGMENTATIONS[check_augmentation(name)].__doc__ or name).strip().splitlines()[0]


def check_augmentation(name: str) -> str:
    """``name`` if it is a preset of AUGMENTATIONS, else a ValueError listing them."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(AUGMENTATIONS)} "
                         f"(what each does: README, 'Train on your own folder')")
    return name


def classification_transform(
    img_size: int,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augmentation: str = "shapes",
) -> Callable[[np.ndarray], torch.Tensor]:
    """The ``augmentation`` preset's albumentations pipeline for training (or evaluation), then mean/std."""
    pipeline = A.Compose(AUGMENTATIONS[check_augmentation(augmentation)](img_size, train))

    def apply(image: np.ndarray) -> torch.Tensor:
        return normalise(pipeline(image=image)["image"], mean, std)

    return apply


class _ShapesClassification(Dataset):
    """Scene i: one shape; the label is its kind."""

    def __init__(self, indices: list[int], size: int, seed: int, transform: Callable) -> None:
        self.indices, self.size, self.seed, self.transform = indices, size, seed, transform
        self.scene: DrawnOnce[tuple[np.ndarray, int]] = DrawnOnce(self._draw)

    def _draw(self, i: int) -> tuple[np.ndarray, int]:
        """Image (H, W, 3) uint8 and kind of item i."""
        scene = render_scene(self.indices[i], self.size, seed=self.seed, single=True)
        return scene.image, scene.shapes[0].kind

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, kind = self.scene(i)
        return self.transform(image), kind


class ShapesDataModule(GeneratedScenes, SplitDataModule):
    """Generated shapes, one per image, labelled by kind; nothing is read from disk."""

    def __init__(self, *, num_samples: int = 3000, render_size: int | None = None, augmentation: str = "shapes",
                 **kwargs) -> None:
        """``num_samples`` scenes in all (split by ratio or k-fold); rendered at ``render_size`` (default img_size).

        ``augmentation`` names the training preset (AUGMENTATIONS; ``shapes`` by default).
        """
        kwargs.setdefault("img_size", 64)
        super().__init__(**kwargs)
        self.augmentation = check_augmentation(augmentation)
        self.init_scenes(num_samples, render_size)

    @property
    def num_classes(self) -> int:
        return len(SHAPE_NAMES)

    @property
    def class_names(self) -> list[str]:
        return list(SHAPE_NAMES)

    def make_dataset(self, indices: list[int], stage: str) -> Dataset:
        train = stage == "fit" and self.augment
        return _ShapesClassification(indices, self.render_size, self.seed,
                                     classification_transform(self.img_size, train, self.mean, self.std, self.augmentation))

    def predict_transform(self, image: np.ndarray) -> torch.Tensor:
        return classification_transform(self.img_size, False, self.mean, self.std, self.augmentation)(image)

    def augmentation_summary(self) -> str:
        """The preset's name and what it does (``off`` with augment false)."""
        return f"{self.augmentation}: {describe_augmentation(self.augmentation)}" if self.augment else "off"


class _FileClassification(Dataset):
    def __init__(self, items: list[tuple[Path, int]], transform: Callable) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.transform(read_image(path)), label


class ImageFolderDataModule(SplitDataModule):
    """Real images laid out as ``root/<class name>/<image>``; classes are the sub-folders, sorted."""

    def __init__(self, *, root: str, augmentation: str = "safe", **kwargs) -> None:
        """``root``: the folder; ``augmentation``: the training preset (AUGMENTATIONS; ``safe`` changes no class).

        ``img_size`` defaults to ``auto``: the images' median longer side (see SplitDataModule.resolve_img_size).
        """
        kwargs.setdefault("img_size", AUTO_SIZE)
        super().__init__(**kwargs)
        self.augmentation = check_augmentation(augmentation)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"DATA folder {str(self.root)!r} does not exist; pass a folder with one sub-folder of images per class"
            )
        self._classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self._items = [
            (f, label)
            for label, name in enumerate(self._classes)
            for f in sorted((self.root / name).rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
        ]
        if not self._items:
            raise FileNotFoundError(
                f"DATA folder {str(self.root)!r} holds no images in class sub-folders; lay it out as "
                f"{self.root}/<class name>/<image>.jpg"
            )
        if len(self._classes) < 2:
            raise ValueError(f"DATA folder {str(self.root)!r} has {len(self._classes)} class sub-folder(s); classification needs at least 2")
        self.resolve_img_size()

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of an even sample of the folder's images, read from their headers."""
        return header_sizes([path for path, _ in self._items])

    def num_items(self) -> int:
        return len(self._items)

    @property
    def items(self) -> list[tuple[Path, int]]:
        """Every image of the folder with its label, in item order (what the split indices index)."""
        return list(self._items)

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict" and not self._datasets:
            self._verify_images()
        super().setup(stage)

    def _verify_images(self) -> None:
        """Open every image's header now, so a corrupt file stops the run before training starts."""
        for path, _ in self._items:
            try:
                with Image.open(path) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise ValueError(f"cannot read image {str(path)!r} ({exc}); remove or replace the file") from exc

    def make_dataset(self, indices: list[int], stage: str) -> Dataset:
        train = stage == "fit" and self.augment
        return _FileClassification([self._items[i] for i in indices],
                                   classification_transform(self.img_size, train, self.mean, self.std, self.augmentation))

    def predict_transform(self, image: np.ndarray) -> torch.Tensor:
        return classification_transform(self.img_size, False, self.mean, self.std, self.augmentation)(image)

    def augmentation_summary(self) -> str:
        """The preset's name and what it does (``off`` with augment false)."""
        return f"{self.augmentation}: {describe_augmentation(self.augmentation)}" if self.augment else "off"
