"""The augmentation presets of the detection and segmentation data: which mirrors and turns keep a label.

Each task keeps its own scale, shift and colour jitter (detection.detection_transform,
segmentation.segmentation_transforms); a preset says which symmetries of the images are added to
them, by kind of data. Classification has its own table (classification.AUGMENTATIONS), with its own
default: a mirror changes the class of a digit or a letter, the whole image's label, while the class
of a pixel or of an object in a photo survives it, so detection and segmentation folders default to
``natural`` and classification folders to ``safe``.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A

__all__ = ["DENSE_AUGMENTATIONS", "DensePreset", "check_dense_augmentation", "dense_augmentation_summary"]


@dataclass(frozen=True)
class DensePreset:
    """What a detection or segmentation preset adds to the task's scale, shift and colour jitter."""

    description: str
    horizontal_flip: bool = False
    vertical_flip: bool = False
    quarter_turns: bool = False
    #: False: no training augmentation at all (the evaluation resize only)
    augment: bool = True

    def symmetry_ops(self) -> list[A.BasicTransform]:
        """The mirrors and quarter turns of this preset, in the order the pipelines apply them."""
        ops: list[A.BasicTransform] = []
        if self.horizontal_flip:
            ops.append(A.HorizontalFlip(p=0.5))
        if self.vertical_flip:
            ops.append(A.VerticalFlip(p=0.5))
        if self.quarter_turns:
            ops.append(A.RandomRotate90(p=1.0))
        return ops


#: detection and segmentation presets by kind of data; ``natural`` is their default (see the module's docstring)
DENSE_AUGMENTATIONS: dict[str, DensePreset] = {
    "natural": DensePreset("Photos: left-right mirrors, random scale and shift, colour jitter", horizontal_flip=True),
    "safe": DensePreset("Any kind of image: random scale and shift, colour jitter; no mirror (text, digits, signs)"),
    "aerial": DensePreset("Overhead views (satellite, aerial, microscopy): both mirrors and quarter turns, random "
                          "scale and shift, colour jitter", horizontal_flip=True, vertical_flip=True, quarter_turns=True),
    "none": DensePreset("No augmentation: images resized as for evaluation", augment=False),
}


def check_dense_augmentation(name: str) -> str:
    """``name`` if it is a preset of DENSE_AUGMENTATIONS, else a ValueError listing them."""
    if name not in DENSE_AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r} for detection and segmentation; choose one of "
                         f"{sorted(DENSE_AUGMENTATIONS)} (what each does: README, 'Train on your own folder')")
    return name


def dense_augmentation_summary(name: str, augment: bool) -> str:
    """The preset's name and what it does, or ``off`` when the data module's augment is false."""
    return f"{name}: {DENSE_AUGMENTATIONS[name].description}" if augment else "off"
