"""Data modules: generated shapes scenes and real data, all yielding the same target formats."""

from .base import SplitDataModule, split_indices
from .classification import ImageFolderDataModule, ShapesDataModule
from .detection import COCODetectionDataModule, ShapesDetectionDataModule, detection_collate
from .segmentation import ShapesSegmentationDataModule, VOCSegmentationDataModule
from .shapes import SHAPE_NAMES, Scene, ShapeInstance, render_scene

__all__ = [
    "COCODetectionDataModule",
    "SHAPE_NAMES",
    "ShapesDetectionDataModule",
    "ShapesSegmentationDataModule",
    "VOCSegmentationDataModule",
    "detection_collate",
    "ImageFolderDataModule",
    "Scene",
    "ShapeInstance",
    "ShapesDataModule",
    "SplitDataModule",
    "render_scene",
    "split_indices",
]
