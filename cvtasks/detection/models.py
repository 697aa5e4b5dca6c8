"""Detector builders: torchvision's detection framework on registry backbones, plus our YOLO.

``build_detector(name, backbone, num_classes)`` puts a feature-pyramid neck on the backbone and
builds the detector from a small table of per-detector choices (which pyramid, which strides, how
anchors follow from the strides, how labels are counted). Everything torchvision has (RPN,
RoIHeads, anchor generators, NMS, the RetinaNet/FCOS/SSD heads and GeneralizedRCNNTransform) is
used as is. Images go in as ``list[Tensor]`` in [0, 1] (the detectors normalise them with
ImageNet's mean/std internally); targets are ``list[dict(boxes, labels, masks)]``.

Label convention: our data's labels are 0-based kinds. Faster/Mask R-CNN and SSD classify with a
softmax whose class 0 is background, so :class:`Detector` adds 1 to the labels going in and
subtracts 1 from the labels coming out (``label_offset=1``, the model has ``num_classes + 1``
outputs). RetinaNet, FCOS and YOLO score every class with its own sigmoid and have no background
class, so labels pass through unchanged (``label_offset=0``, ``num_classes`` outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign, roi_pool
from torchvision.ops.poolers import LevelMapper

from ..backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from ..layers import ConvNormAct
from ..registry import create_backbone
from .neck import FeaturePyramidNeck, level_name, select_levels

__all__ = [
    "DETECTORS",
    "DetectorSpec",
    "Detector",
    "MultiScaleRoIPool",
    "SSDFeatures",
    "anchor_sizes",
    "build_detector",
]


@dataclass(frozen=True)
class DetectorSpec:
    """Per-detector choices: pyramid top, finest stride, anchors from strides, label counting."""

    extra: str  # levels on top of the pyramid (neck.EXTRA_LEVELS)
    min_stride: int  # finest backbone level used
    anchor_scale: float  # anchor side = anchor_scale * stride of its level
    octaves: int  # anchor sizes per level: anchor_scale * stride * 2**(i / octaves), i < octaves
    label_offset: int  # 1 where class 0 is background (softmax heads), else 0
    masks: bool = False  # instance masks (Mask R-CNN)
    two_stage: bool = False  # has RoI pooling (roi="align"|"pool" applies)


# Anchor scales are chosen for small objects (the shapes scenes: 15-50 px in 128 px images):
# R-CNN's RPN follows FPN's one size per level (4x the stride from stride 4); the single-stage
# detectors start at stride 8 with anchors of twice the stride (RetinaNet's three octaves, as in
# Lin et al. 2017), FCOS's "anchor" is its stride (it only sets the regression ranges, Tian et
# al. 2019), SSD's default boxes are derived the same way as RetinaNet's (Liu et al. 2016).
DETECTORS: dict[str, DetectorSpec] = {
    "faster_rcnn": DetectorSpec("maxpool", 4, 4.0, 1, 1, two_stage=True),
    "mask_rcnn": DetectorSpec("maxpool", 4, 4.0, 1, 1, masks=True, two_stage=True),
    "retinanet": DetectorSpec("p6p7", 8, 2.0, 3, 0),
    "fcos": DetectorSpec("p6p7", 8, 1.0, 1, 0),
    "ssd": DetectorSpec("none", 8, 2.0, 1, 1),
    "yolo": DetectorSpec("none", 8, 1.0, 1, 0),
}

ROI_POOLERS = ("align", "pool")

# torchvision's R-CNN sampling sizes are made for 800-1333 px COCO images with dozens of objects;
# small images with a handful of objects need far fewer proposals and sampled RoIs (and a CPU
# thanks us for it). Any of these can be overridden through build_detector's keywords.
_RCNN_SMALL_IMAGE_DEFAULTS: dict[str, Any] = {
    "rpn_pre_nms_top_n_train": 1000,
    "rpn_post_nms_top_n_train": 500,
    "rpn_pre_nms_top_n_test": 500,
    "rpn_post_nms_top_n_test": 300,
    "rpn_batch_size_per_image": 128,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 100,
}


def anchor_sizes(strides: Sequence[int], scale: float, octaves: int = 1) -> tuple[tuple[float, ...], ...]:
    """Anchor sizes per pyramid level, derived from its stride: ``scale * stride * 2**(i/octaves)``."""
    return tuple(tuple(float(scale * s * 2 ** (i / octaves)) for i in range(octaves)) for s in strides)


class MultiScaleRoIPool(MultiScaleRoIAlign):
    """RoIPool (Girshick, Fast R-CNN, ICCV 2015) over a pyramid, with MultiScaleRoIAlign's interface.

    Each box is pooled from the level torchvision's ``LevelMapper`` assigns it to (Eqn. 1 of the
    FPN paper), with ``torchvision.ops.roi_pool`` instead of RoIAlign's bilinear sampling. It
    subclasses MultiScaleRoIAlign only because torchvision's R-CNNs check for that type.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int],
        sampling_ratio: int = 0,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio,
                         canonical_scale=canonical_scale, canonical_level=canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if not feats:
            raise ValueError(f"MultiScaleRoIPool found none of {self.featmap_names} among the features {list(x)}")
        max_h = max(s[0] for s in image_shapes)
        # the pyramid halves the resolution per level, so each scale is a power of two
        scales = [2.0 ** round(math.log2(f.shape[-2] / max_h)) for f in feats]
        k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        mapper = LevelMapper(k_min, k_max, self.canonical_scale, self.canonical_level)
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0
        )
        if len(feats) == 1:
            return roi_pool(feats[0], rois, self.output_size, scales[0])
        levels = mapper(boxes)
        out = rois.new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size), dtype=feats[0].dtype)
        for lvl, (feat, scale) in enumerate(zip(feats, scales)):
            idx = torch.where(levels == lvl)[0]
            out[idx] = roi_pool(feat, rois[idx], self.output_size, scale).to(out.dtype)
        return out


class SSDFeatures(nn.Module):
    """SSD's feature extractor on a registry backbone: its levels from ``min_stride`` on, then extra
    stride-2 blocks (1x1 reduce, 3x3 stride 2, as in Liu et al., SSD, ECCV 2016) up to ``num_levels``.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_levels: int = 6,
        strides: Sequence[int] | None = None,
        min_stride: int = 8,
        extra_channels: int = 256,
    ) -> None:
        super().__init__()
        self.body = backbone
        infos = select_levels(backbone.feature_info, strides, min_stride)
        self.in_levels = [f.name for f in infos]
        if len(infos) > num_levels:
            infos = infos[:num_levels]
            self.in_levels = self.in_levels[:num_levels]
        channels = [f.channels for f in infos]
        self.strides = [f.stride for f in infos]
        self.extras = nn.ModuleList()
        prev = channels[-1]
        while len(channels) < num_levels:
            self.extras.append(
                nn.Sequential(
                    ConvNormAct(prev, extra_channels // 2, 1),
                    ConvNormAct(extra_channels // 2, extra_channels, 3, stride=2),
                )
            )
            channels.append(extra_channels)
            self.strides.append(self.strides[-1] * 2)
            prev = extra_channels
        #: channels per level: torchvision's SSD reads this list to build its head
        self.out_channels = channels
        self.level_names = [level_name(s) for s in self.strides]

    def forward(self, x: Tensor) -> "dict[str, Tensor]":
        feats = self.body(x)
        maps = [feats[n] for n in self.in_levels]
        y = maps[-1]
        for block in self.extras:
            y = block(y)
            maps.append(y)
        return dict(zip(self.level_names, maps))


class Detector(nn.Module):
    """One interface over every detector: 0-based labels in and out, torchvision's call convention.

    ``forward(images, targets)`` returns the dict of losses in training and, in eval mode, a list
    of dicts (boxes xyxy in the input images' pixels, scores, labels 0-based, and masks (N,1,H,W)
    probabilities for Mask R-CNN). Targets' boxes without area (x2 <= x1 or y2 <= y1, which
    torchvision rejects) are dropped with their labels and masks.
    """

    def __init__(self, name: str, model: nn.Module, num_classes: int, label_offset: int, masks: bool) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.num_classes = num_classes
        self.label_offset = label_offset
        self.masks = masks

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

    def forward(self, images: list[Tensor], targets: list[dict[str, Any]] | None = None) -> Any:
        if self.training:
            if targets is None:
                raise ValueError(f"{self.name} in training mode needs targets (list of dicts with boxes, labels)")
            return self.model(list(images), self._prepare(targets))
        outputs = self.model(list(images))
        if self.label_offset:
            outputs = [{**o, "labels": o["labels"] - self.label_offset} for o in outputs]
        return outputs


def _group_norm(channels: int) -> partial:
    """GroupNorm with 32 groups where the width allows (Wu & He 2018), fewer otherwise."""
    return partial(nn.GroupNorm, math.gcd(32, channels))


def _rcnn(spec: DetectorSpec, body: Backbone, num_classes: int, common: dict[str, Any], opts: dict[str, Any]) -> nn.Module:
    roi = opts.pop("roi")
    canonical_scale = opts.pop("canonical_scale", 224)
    # the box head's width: 1024 in torchvision, for 91 COCO classes; a few classes need far less
    representation_size = opts.pop("representation_size", 256)
    mask_layers = opts.pop("mask_layers", 4)
    neck = FeaturePyramidNeck(body, out_channels=opts.pop("neck_channels"), strides=opts.pop("strides"),
                              min_stride=opts.pop("min_stride"), extra=spec.extra)
    sizes = anchor_sizes(neck.strides, opts.pop("anchor_scale"), spec.octaves)
    ratios = (tuple(opts.pop("aspect_ratios")),) * len(sizes)
    pooler = partial(MultiScaleRoIAlign, sampling_ratio=2) if roi == "align" else MultiScaleRoIPool
    c = neck.out_channels
    model_kwargs: dict[str, Any] = {
        **_RCNN_SMALL_IMAGE_DEFAULTS,
        "rpn_anchor_generator": AnchorGenerator(sizes, ratios),
        "box_roi_pool": pooler(featmap_names=neck.feature_levels, output_size=7, canonical_scale=canonical_scale),
        # head and predictor given together: torchvision's default predictor assumes 1024 features
        "box_head": TwoMLPHead(c * 7 * 7, representation_size),
        "box_predictor": FastRCNNPredictor(representation_size, num_classes + 1),
        **common,
        **opts,
    }
    if spec.masks:
        # likewise its default mask predictor assumes a 256-wide mask head
        model_kwargs.setdefault(
            "mask_roi_pool", pooler(featmap_names=neck.feature_levels, output_size=14, canonical_scale=canonical_scale)
        )
        model_kwargs.setdefault("mask_head", MaskRCNNHeads(c, [c] * mask_layers, 1))
        model_kwargs.setdefault("mask_predictor", MaskRCNNPredictor(c, c, num_classes + 1))
        return MaskRCNN(neck, None, **model_kwargs)
    return FasterRCNN(neck, None, **model_kwargs)


def _retinanet(spec: DetectorSpec, body: Backbone, num_classes: int, common: dict[str, Any], opts: dict[str, Any]) -> nn.Module:
    neck = FeaturePyramidNeck(body, out_channels=opts.pop("neck_channels"), strides=opts.pop("strides"),
                              min_stride=opts.pop("min_stride"), extra=spec.extra)
    sizes = anchor_sizes(neck.strides, opts.pop("anchor_scale"), spec.octaves)
    gen = AnchorGenerator(sizes, (tuple(opts.pop("aspect_ratios")),) * len(sizes))
    head = RetinaNetHead(neck.out_channels, gen.num_anchors_per_location()[0], num_classes,
                         norm_layer=_group_norm(neck.out_channels))
    return RetinaNet(neck, num_classes, anchor_generator=gen, head=head, **{**common, **opts})


class _FCOSHead(FCOSHead):
    """torchvision's FCOS head with GroupNorm fitted to the width (its own hard-codes 32 groups)."""

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4) -> None:
        nn.Module.__init__(self)  # skip FCOSHead.__init__, which would build GroupNorm(32, C)
        norm = _group_norm(in_channels)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs, norm_layer=norm)
        self.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=norm)


def _fcos(spec: DetectorSpec, body: Backbone, num_classes: int, common: dict[str, Any], opts: dict[str, Any]) -> nn.Module:
    neck = FeaturePyramidNeck(body, out_channels=opts.pop("neck_channels"), strides=opts.pop("strides"),
                              min_stride=opts.pop("min_stride"), extra=spec.extra)
    sizes = anchor_sizes(neck.strides, opts.pop("anchor_scale"), 1)
    opts.pop("aspect_ratios")  # FCOS is anchor-free: one point per location
    gen = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
    num_convs = opts.pop("num_convs", 4)
    head = _FCOSHead(neck.out_channels, num_classes, num_convs)
    return FCOS(neck, num_classes, anchor_generator=gen, head=head, **{"score_thresh": 0.05, **common, **opts})


def _ssd(spec: DetectorSpec, body: Backbone, num_classes: int, common: dict[str, Any], opts: dict[str, Any]) -> nn.Module:
    size = common.pop("min_size")
    common.pop("max_size")
    num_levels = opts.pop("num_levels", None)
    min_stride = opts.pop("min_stride")
    if num_levels is None:  # SSD300's six levels, fewer where the image is too small for them
        num_levels = max(1, min(6, int(math.log2(max(size, min_stride) / min_stride)) + 1))
    feats = SSDFeatures(body, num_levels=num_levels, strides=opts.pop("strides"), min_stride=min_stride,
                        extra_channels=opts.pop("neck_channels"))
    scale = opts.pop("anchor_scale")
    ratios = [[2]] + [[2, 3]] * max(0, len(feats.strides) - 3) + [[2]] * min(2, len(feats.strides) - 1)
    box_scales = [scale * s / size for s in feats.strides]
    box_scales.append(box_scales[-1] * 2)
    opts.pop("aspect_ratios")
    gen = DefaultBoxGenerator(ratios, scales=box_scales, steps=feats.strides)
    return SSD(feats, gen, (size, size), num_classes + 1, **{**common, **opts})


def _yolo(spec: DetectorSpec, body: Backbone, num_classes: int, common: dict[str, Any], opts: dict[str, Any]) -> nn.Module:
    from .yolo import YOLODetector

    neck = FeaturePyramidNeck(body, out_channels=opts.pop("neck_channels"), strides=opts.pop("strides"),
                              min_stride=opts.pop("min_stride"), extra=spec.extra)
    opts.pop("anchor_scale")
    opts.pop("aspect_ratios")
    return YOLODetector(neck, num_classes, **{**common, **opts})


_BUILDERS = {
    "faster_rcnn": _rcnn,
    "mask_rcnn": _rcnn,
    "retinanet": _retinanet,
    "fcos": _fcos,
    "ssd": _ssd,
    "yolo": _yolo,
}


def build_detector(
    name: str,
    backbone: str | Backbone,
    num_classes: int,
    *,
    roi: str = "align",
    min_size: int = 128,
    max_size: int | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    pretrained: str | None = None,
    neck_channels: int = 256,
    strides: Sequence[int] | None = None,
    min_stride: int | None = None,
    anchor_scale: float | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    **kwargs: Any,
) -> Detector:
    """Build detector ``name`` (see DETECTORS) on a registry backbone (a name or a built Backbone).

    ``num_classes`` counts object classes only (no background). ``roi`` picks RoIAlign or RoIPool
    for the two-stage detectors. ``min_size``/``max_size`` are GeneralizedRCNNTransform's resize
    bounds: set them to the data's image size so nothing is resized needlessly (``max_size``
    defaults to ``min_size * 1333 / 800``, torchvision's ratio). ``strides`` / ``min_stride`` pick
    the backbone levels, ``anchor_scale`` the anchor side per stride (defaults from DETECTORS).
    Other keywords go to the torchvision detector (e.g. ``rpn_batch_size_per_image``,
    ``score_thresh``, ``representation_size``/``mask_layers`` for R-CNN heads, ``num_levels`` for
    SSD) or to :class:`~cvtasks.detection.yolo.YOLODetector`.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    if roi not in ROI_POOLERS:
        raise ValueError(f"unknown roi {roi!r}; choose 'align' (RoIAlign) or 'pool' (RoIPool)")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1 (object classes, no background), got {num_classes}")
    spec = DETECTORS[name]
    if isinstance(backbone, str):
        body = create_backbone(backbone, pretrained=pretrained, **(backbone_kwargs or {}))
    else:
        if backbone_kwargs or pretrained:
            raise ValueError("backbone_kwargs/pretrained apply to a backbone given by name, not to a built one")
        body = backbone
    if not getattr(body, "feature_info", None):
        raise ValueError(f"the backbone {type(body).__name__} declares no feature_info; detectors need its levels")
    common: dict[str, Any] = {
        "min_size": min_size,
        "max_size": max_size if max_size is not None else max(min_size, round(min_size * 1333 / 800)),
        "image_mean": list(image_mean),
        "image_std": list(image_std),
    }
    opts: dict[str, Any] = {
        "neck_channels": neck_channels,
        "strides": strides,
        "min_stride": spec.min_stride if min_stride is None else min_stride,
        "anchor_scale": spec.anchor_scale if anchor_scale is None else anchor_scale,
        "aspect_ratios": aspect_ratios,
        **kwargs,
    }
    if spec.two_stage:
        opts["roi"] = roi
    model = _BUILDERS[name](spec, body, num_classes, common, opts)
    return Detector(name, model, num_classes, spec.label_offset, spec.masks)
