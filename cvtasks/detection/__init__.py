"""Object detection and instance segmentation models on registry backbones.

One file per family (rcnn, dense, yolo), the necks, anchors and RoI poolers they share, and the
table of detectors with its builder (models).
"""

from .anchors import anchor_sizes
from .models import DETECTORS, Detector, DetectorSpec, build_detector, detector_keywords, detector_names
from .neck import FeaturePyramidNeck, SimplePyramid
from .poolers import MultiScaleRoIPool
from .yolo import YOLODetector

__all__ = [
    "DETECTORS",
    "Detector",
    "DetectorSpec",
    "FeaturePyramidNeck",
    "MultiScaleRoIPool",
    "SimplePyramid",
    "YOLODetector",
    "anchor_sizes",
    "build_detector",
    "detector_keywords",
    "detector_names",
]
