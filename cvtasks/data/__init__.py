"""Data modules: generated shapes scenes and real data, all yielding the same target formats."""

from .base import SplitDataModule, split_indices
from .classification import ImageFolderDataModule, ShapesDataModule
from .shapes import SHAPE_NAMES, Scene, ShapeInstance, render_scene

__all__ = [
    "SHAPE_NAMES",
    "ImageFolderDataModule",
    "Scene",
    "ShapeInstance",
    "ShapesDataModule",
    "SplitDataModule",
    "render_scene",
    "split_indices",
]
