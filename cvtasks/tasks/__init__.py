"""One LightningModule per task, configured by names and numbers."""

from .base import BaseTask
from .classification import ClassificationTask
from .detection import DetectionTask, InstanceSegmentationTask
from .segmentation import SemanticSegmentationTask

__all__ = ["BaseTask", "ClassificationTask", "DetectionTask", "InstanceSegmentationTask", "SemanticSegmentationTask"]
