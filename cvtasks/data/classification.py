"""Classification data: the shapes scenes (one shape per image) and a folder of class sub-folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import albumentations as A
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..backbone import IMAGENET_MEAN, IMAGENET_STD
from .base import IMAGE_EXTENSIONS, DrawnOnce, GeneratedScenes, SplitDataModule, normalise, read_image
from .shapes import SHAPE_NAMES, render_scene

__all__ = ["AUGMENTATIONS", "PCALighting", "classification_transform", "ShapesDataModule", "ImageFolderDataModule"]


def _shapes_ops(img_size: int, train: bool) -> list[A.BasicTransform]:
    ops: list[A.BasicTransform] = [A.Resize(img_size, img_size)]
    if train:
        ops += [
            A.Affine(translate_percent=(-0.1, 0.1), scale=(0.85, 1.15), rotate=(-30, 30), border_mode=0, p=0.7),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
            A.HueSaturationValue(10, 20, 10, p=0.3),
        ]
    return ops


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
    # Krizhevsky et al. 2012, section 4.1: the image's shorter side scaled to 256 and its central
    # 256x256 kept; training takes random 224x224 crops of it (translations) and their horizontal
    # reflections, and adds PCA lighting noise; testing takes the central crop. Sizes scale with
    # img_size as 256:224.
    full = round(img_size * 256 / 224)
    ops: list[A.BasicTransform] = [A.SmallestMaxSize(max_size=full), A.CenterCrop(full, full)]
    if train:
        return ops + [A.RandomCrop(img_size, img_size), A.HorizontalFlip(p=0.5), PCALighting(alpha_std=0.1)]
    return ops + [A.CenterCrop(img_size, img_size)]


#: classification augmentation presets: name -> the albumentations ops for (img_size, train)
AUGMENTATIONS: dict[str, Callable[[int, bool], list[A.BasicTransform]]] = {
    "shapes": _shapes_ops,  # shifts, scale, rotation, both flips, colour: the generated shapes' default
    "alexnet": _alexnet_ops,  # the AlexNet paper's recipe: random crops with shifts, flips, PCA lighting
}


def check_augmentation(name: str) -> str:
    """``name`` if it is a preset of AUGMENTATIONS, else a ValueError listing them."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(AUGMENTATIONS)}")
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

        ``augmentation`` names the training preset (AUGMENTATIONS: ``shapes``, ``alexnet``).
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

    def __init__(self, *, root: str, augmentation: str = "shapes", **kwargs) -> None:
        """``root``: the folder; ``augmentation``: the training preset (AUGMENTATIONS: ``shapes``, ``alexnet``)."""
        kwargs.setdefault("img_size", 64)
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

    def num_items(self) -> int:
        return len(self._items)

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
