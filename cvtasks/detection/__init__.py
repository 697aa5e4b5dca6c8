"""Object detection and instance segmentation models on registry backbones."""

from .models import DETECTORS, Detector, MultiScaleRoIPool, anchor_sizes, build_detector
from .neck import FeaturePyramidNeck, SimplePyramid
from .yolo import YOLODetector

__all__ = [
    "DETECTORS",
    "Detector",
    "FeaturePyramidNeck",
    "MultiScaleRoIPool",
    "SimplePyramid",
    "YOLODetector",
    "anchor_sizes",
    "build_detector",
]
