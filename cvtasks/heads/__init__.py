"""Task heads built from a backbone's declared feature levels."""

from .segmentation import (
    SEGMENTATION_HEADS,
    SegmentationModel,
    build_segmentation_head,
    build_segmentation_model,
)

__all__ = ["SEGMENTATION_HEADS", "SegmentationModel", "build_segmentation_head", "build_segmentation_model"]
