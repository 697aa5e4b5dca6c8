"""The detector table and its one builder: torchvision's detectors and our YOLO on registry backbones.

``build_detector(name, backbone, num_classes)`` builds the registry backbone, puts the neck that
``DETECTORS[name]`` names on it, and hands the neck to the detector's builder. The families live
in their own files:

- :mod:`.rcnn`: Faster R-CNN (Ren et al., NeurIPS 2015) and Mask R-CNN (He et al., ICCV 2017)
  with an FPN (Lin et al., CVPR 2017) and the RoI poolers of :mod:`.poolers`;
- :mod:`.dense`: RetinaNet (Lin et al., ICCV 2017), FCOS (Tian et al., ICCV 2019), SSD (Liu et
  al., ECCV 2016);
- :mod:`.yolo`: our YOLOX-style detector (Ge et al., arXiv:2107.08430);
- :mod:`.fast_rcnn`: R-CNN (Girshick et al., CVPR 2014) and Fast R-CNN (Girshick, ICCV 2015) on
  selective search's proposals (:mod:`.proposals`), which the data gives them (``proposals=True``).

A new detector (CornerNet, R-FCN, ...) is a new file with a builder (and a neck where the
pyramids of :mod:`.neck` do not fit) plus one line in :data:`DETECTORS`.

Images go in as ``list[Tensor]`` in [0, 1] (the detectors normalise them internally with the
mean/std of the backbone's spec: what its published weights expect); targets are ``list[dict(boxes, labels, masks)]``.

Label convention: our data's labels are 0-based kinds. Faster/Mask R-CNN and SSD classify with a
softmax whose class 0 is background, so :class:`Detector` adds 1 to the labels going in and
subtracts 1 from the labels coming out (``label_offset=1``, the model has ``num_classes + 1``
outputs). RetinaNet, FCOS and YOLO score every class with its own sigmoid and have no background
class, so labels pass through unchanged (``label_offset=0``, ``num_classes`` outputs).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..backbone import Backbone
from ..registry import create_backbone
from . import dense, fast_rcnn, rcnn, rfcn
from .anchors import anchor_sizes
from .cornernet import CornerNet
from .dense import SSDFeatures
from .neck import fpn_neck
from .poolers import ROI_POOLERS, MultiScaleRoIPool, check_roi
from .yolo import YOLODetector

__all__ = [
    "DETECTORS",
    "ROI_POOLERS",
    "DetectorSpec",
    "Detector",
    "MultiScaleRoIPool",
    "SSDFeatures",
    "anchor_sizes",
    "build_detector",
    "detector_keywords",
    "detector_names",
    "freeze_batch_norm",
]


@dataclass(frozen=True)
class DetectorSpec:
    """A DETECTOR= name: its builder, its neck, the finest backbone stride it reads, how it counts labels.

    ``neck(backbone, *, out_channels, strides, min_stride[, min_size], **its keywords)`` returns the
    module the detector runs its backbone through; ``build(neck, num_classes, *, min_size, max_size,
    image_mean, image_std[, roi], **its keywords)`` returns the detector. Both are called with only
    the keywords they declare; a builder that ends in ``**kwargs`` passes them to the class it
    returns (its return annotation), whose keywords are then valid too.
    """

    build: Callable[..., nn.Module]
    neck: Callable[..., nn.Module]
    min_stride: int  # finest backbone level used (build_detector's min_stride overrides it)
    label_offset: int  # 1 where class 0 is background (softmax heads), else 0
    masks: bool = False  # predicts instance masks: InstanceSegmentationTask's detectors
    proposals: bool = False  # classifies external region proposals: each image's come in with it (R-CNN, Fast R-CNN)


# One line per detector; `make help` reads the names from these lines. The necks start at stride 4
# for the R-CNNs (FPN's P2) and at stride 8 for the single-stage detectors (RetinaNet's P3).
DETECTORS: dict[str, DetectorSpec] = {
    "faster_rcnn": DetectorSpec(rcnn.faster_rcnn, fpn_neck("maxpool"), min_stride=4, label_offset=1),
    "mask_rcnn": DetectorSpec(rcnn.mask_rcnn, fpn_neck("maxpool"), min_stride=4, label_offset=1, masks=True),
    "retinanet": DetectorSpec(dense.retinanet, fpn_neck("p6p7"), min_stride=8, label_offset=0),
    "fcos": DetectorSpec(dense.fcos, fpn_neck("p6p7"), min_stride=8, label_offset=0),
    "ssd": DetectorSpec(dense.ssd, dense.ssd_features, min_stride=8, label_offset=1),
    "yolo": DetectorSpec(YOLODetector, fpn_neck("none"), min_stride=8, label_offset=0),
    "fast_rcnn": DetectorSpec(fast_rcnn.fast_rcnn, fpn_neck("none"), min_stride=4, label_offset=1, proposals=True),
    "rcnn": DetectorSpec(fast_rcnn.rcnn, fast_rcnn.crop_features, min_stride=4, label_offset=1, proposals=True),
    "rfcn": DetectorSpec(rfcn.rfcn, fpn_neck("maxpool"), min_stride=4, label_offset=1),
    "cornernet": DetectorSpec(CornerNet, fpn_neck("none"), min_stride=4, label_offset=0),
}

# what build_detector fills itself: never a detector_kwargs key
_FILLED = frozenset({"backbone", "neck", "num_classes", "out_channels", "strides", "min_stride", "min_size",
                     "max_size", "image_mean", "image_std", "roi", "frozen_bn_eps"})


def detector_names(masks: bool | None = None) -> tuple[str, ...]:
    """The DETECTORS names in table order: all, or only those with (``masks=True``) or without masks."""
    return tuple(n for n, s in DETECTORS.items() if masks is None or s.masks == masks)


def _detector_spec(name: str) -> DetectorSpec:
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}") from None


def _named(fn: Callable[..., Any]) -> list[str]:
    """The keywords ``fn`` declares by name, except the ones build_detector fills."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds and p.name not in _FILLED]


def _forwards_to(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """The class a builder's ``**kwargs`` go to (its return annotation), or None without ``**kwargs``."""
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
        return None
    return typing.get_type_hints(fn)["return"]


def _keyword_groups(spec: DetectorSpec) -> list[tuple[str, list[str]]]:
    """Where each detector_kwargs key goes: the neck's keywords first, then the builder's, then those it forwards."""
    neck = _named(spec.neck)
    build = [k for k in _named(spec.build) if k not in neck]
    groups = [(spec.neck.__name__, neck), (spec.build.__name__, build)]
    target = _forwards_to(spec.build)
    if target is not None:
        groups.append((f"{target.__module__.partition('.')[0]} {target.__name__}", [k for k in _named(target) if k not in neck + build]))
    return groups


def detector_keywords(name: str) -> list[str]:
    """The detector_kwargs keys detector ``name`` takes: its neck's, its builder's and what the builder forwards."""
    return [k for _, keys in _keyword_groups(_detector_spec(name)) for k in keys]


def _declared(fn: Callable[..., Any], offered: Mapping[str, Any]) -> dict[str, Any]:
    """The ``offered`` values that ``fn`` declares a keyword for (roi for two-stage builders, say)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in offered.items() if k in params}


def freeze_batch_norm(module: nn.Module, eps: float) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` by torchvision's FrozenBatchNorm2d (same statistics, ``eps``)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=eps)
            if child.affine:
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
            if child.running_mean is not None:
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child, eps)
    return module


class Detector(nn.Module):
    """One interface over every detector: 0-based labels in and out, torchvision's call convention.

    ``forward(images, targets)`` returns the dict of losses in training and, in eval mode, a list
    of dicts (boxes xyxy in the input images' pixels, scores, labels 0-based, and masks (N,1,H,W)
    probabilities for Mask R-CNN). Targets' boxes without area (x2 <= x1 or y2 <= y1, which
    torchvision rejects) are dropped with their labels and masks. A detector with ``proposals``
    also takes ``proposals=``, one (P, 4) xyxy tensor per image in the images' pixels; the others ignore it.
    """

    def __init__(self, name: str, model: nn.Module, num_classes: int, label_offset: int, masks: bool,
                 proposals: bool = False) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.num_classes = num_classes
        self.label_offset = label_offset
        self.masks = masks
        self.proposals = proposals

    def _prepare(self, targets: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
        out = []
        for i, t in enumerate(targets):
            if "boxes" not in t or "labels" not in t:
                raise ValueError(f"target {i} needs 'boxes' and 'labels', got keys {sorted(t)}")
            boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1)
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"target {i} has labels {labels.unique().tolist()} outside 0..{self.num_classes - 1}; "
                    f"labels are 0-based class indices (num_classes={self.num_classes})"
                )
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            item = {"boxes": boxes[keep], "labels": labels[keep] + self.label_offset}
            if self.masks:
                if "masks" not in t:
                    raise ValueError(f"{self.name} needs instance masks: target {i} has no 'masks'")
                item["masks"] = torch.as_tensor(t["masks"], dtype=torch.uint8)[keep]
            out.append(item)
        return out

    def _proposals(self, images: list[Tensor], proposals: list[Any] | None) -> dict[str, Any]:
        """``{"proposals": [...]}`` for a detector that reads them (checked: one per image), else nothing."""
        if not self.proposals:
            return {}
        if proposals is None:
            raise ValueError(
                f"{self.name} classifies region proposals, and none were given: pass proposals= (one (P, 4) xyxy tensor "
                f"per image), or use a data module with proposals=True (the CLI turns it on for {self.name})"
            )
        if len(proposals) != len(images):
            raise ValueError(f"{self.name} got {len(proposals)} proposal lists for {len(images)} images; give one per image")
        return {"proposals": [torch.as_tensor(p, dtype=torch.float32).reshape(-1, 4) for p in proposals]}

    def forward(self, images: list[Tensor], targets: list[dict[str, Any]] | None = None,
                proposals: list[Any] | None = None) -> Any:
        """Losses (training, with targets) or detections with 0-based labels (eval)."""
        extra = self._proposals(list(images), proposals)
        if self.training:
            if targets is None:
                raise ValueError(f"{self.name} in training mode needs targets (list of dicts with boxes, labels)")
            return self.model(list(images), self._prepare(targets), **extra)
        outputs = self.model(list(images), **extra)
        if self.label_offset:
            outputs = [{**o, "labels": o["labels"] - self.label_offset} for o in outputs]
        return outputs


def build_detector(
    name: str,
    backbone: str | Backbone,
    num_classes: int,
    *,
    roi: str | None = None,
    min_size: int = 128,
    max_size: int | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    pretrained: str | None = None,
    neck_channels: int = 256,
    strides: Sequence[int] | None = None,
    min_stride: int | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    frozen_bn_eps: float | None = None,
    **detector_kwargs: Any,
) -> Detector:
    """Build detector ``name`` (see DETECTORS) on a registry backbone (a name or a built Backbone).

    ``num_classes`` counts object classes only (no background). ``roi`` picks RoIAlign or RoIPool
    for the two-stage detectors (the others ignore it; None leaves each its default: RoIAlign, RoIPool
    for Fast R-CNN as in its paper). ``min_size``/``max_size`` are
    GeneralizedRCNNTransform's resize bounds: set them to the data's image size so nothing is
    resized needlessly (``max_size`` defaults to ``min_size * 1333 / 800``, torchvision's ratio).
    ``strides`` / ``min_stride`` pick the backbone levels (``min_stride`` defaults from DETECTORS).
    ``image_mean``/``image_std``: how the detector normalises its [0, 1] images; by default what
    the backbone's published weights expect (its spec), so pretrained weights see their own inputs.
    ``frozen_bn_eps``: a number turns the backbone's BatchNorm layers into torchvision's
    FrozenBatchNorm2d with that eps (statistics and affine fixed: torchvision's detectors fine-tune
    so, as batches of a few large images give poor statistics; the COCO presets set it); None
    keeps them trainable.
    ``detector_kwargs`` go to the detector's neck or builder, whichever declares them (e.g.
    ``anchor_scale``, ``aspect_ratios``, ``representation_size``/``mask_layers`` for the R-CNNs,
    ``num_levels`` for SSD) or on to the torchvision detector (``rpn_batch_size_per_image``,
    ``score_thresh``, ...); :func:`detector_keywords` lists them, and any other is a ValueError.
    """
    spec = _detector_spec(name)
    if roi is not None:
        check_roi(roi)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1 (object classes, no background), got {num_classes}")
    groups = _keyword_groups(spec)
    neck_keys = groups[0][1]
    unknown = sorted(k for k in detector_kwargs if not any(k in keys for _, keys in groups))
    if unknown:
        takes = "; ".join(f"{where}: {', '.join(keys)}" for where, keys in groups if keys)
        raise ValueError(
            f"detector {name!r} takes no {unknown} (from --model.detector_kwargs); it takes ({takes}), besides "
            f"build_detector's own roi, min_size, max_size, neck_channels, strides, min_stride, image_mean, image_std, "
            f"frozen_bn_eps"
        )
    if isinstance(backbone, str):
        body = create_backbone(backbone, pretrained=pretrained, **(backbone_kwargs or {}))
    else:
        if backbone_kwargs or pretrained:
            raise ValueError("backbone_kwargs/pretrained apply to a backbone given by name, not to a built one")
        body = backbone
    if not getattr(body, "feature_info", None):
        raise ValueError(f"the backbone {type(body).__name__} declares no feature_info; detectors need its levels")
    if frozen_bn_eps is not None:
        freeze_batch_norm(body, float(frozen_bn_eps))
    image_mean = body.spec.mean if image_mean is None else image_mean
    image_std = body.spec.std if image_std is None else image_std
    neck = spec.neck(
        body, out_channels=neck_channels, strides=strides, min_stride=spec.min_stride if min_stride is None else min_stride,
        **_declared(spec.neck, {"min_size": min_size}), **{k: v for k, v in detector_kwargs.items() if k in neck_keys},
    )
    model = spec.build(
        neck, num_classes, min_size=min_size,
        max_size=max_size if max_size is not None else max(min_size, round(min_size * 1333 / 800)),
        image_mean=list(image_mean), image_std=list(image_std), **_declared(spec.build, {} if roi is None else {"roi": roi}),
        **{k: v for k, v in detector_kwargs.items() if k not in neck_keys},
    )
    return Detector(name, model, num_classes, spec.label_offset, spec.masks, spec.proposals)
