"""cvtasks: classic computer-vision tasks on PyTorch Lightning with backbones chosen by name."""

from .backbone import (
    Backbone,
    BackboneRequest,
    BackboneSpec,
    Classifier,
    FeatureInfo,
    StagedBackbone,
    backbone_normalization,
    create_classifier,
)
from .registry import create_backbone, get_backbone_entry, list_backbones, register_backbone

__all__ = [
    "Backbone",
    "BackboneRequest",
    "BackboneSpec",
    "Classifier",
    "FeatureInfo",
    "StagedBackbone",
    "backbone_normalization",
    "create_backbone",
    "create_classifier",
    "get_backbone_entry",
    "list_backbones",
    "register_backbone",
]
__version__ = "0.1.0"
