"""Dense single-stage detectors: torchvision's RetinaNet, FCOS and SSD on registry backbones.

- RetinaNet (Lin et al., Focal Loss for Dense Object Detection, ICCV 2017): FPN P3-P7, three
  anchor octaves per level, sigmoid scores per class (no background class).
- FCOS (Tian et al., FCOS: Fully Convolutional One-Stage Object Detection, ICCV 2019): anchor-free,
  one point per location; its "anchor" is the level's stride and only sets the regression ranges.
- SSD (Liu et al., SSD: Single Shot MultiBox Detector, ECCV 2016): the backbone's levels from
  stride 8 plus extra stride-2 blocks (:class:`SSDFeatures`, SSD's own neck, no FPN), default
  boxes derived from the strides like RetinaNet's anchors, a softmax whose class 0 is background.

Each builder takes the neck built by ``build_detector`` and its own keywords; the rest go to
torchvision's class unchanged (``score_thresh``, ``nms_thresh``, ...). Anchor sizes follow the
strides (:mod:`.anchors`) and are chosen for small objects (15-50 px shapes in 128 px images).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

from torch import Tensor, nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD

from ..backbone import Backbone
from ..layers import ConvNormAct, group_norm_groups
from .anchors import anchor_generator
from .neck import FeaturePyramidNeck, level_name, select_levels

__all__ = ["SSDFeatures", "fcos", "retinanet", "ssd", "ssd_features"]


def _group_norm(channels: int) -> partial:
    """GroupNorm with the house's group count for this width (``layers.group_norm_groups``)."""
    return partial(nn.GroupNorm, group_norm_groups(channels))


def retinanet(
    neck: FeaturePyramidNeck,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    anchor_scale: float = 2.0,
    octaves: int = 3,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet on ``neck`` (P3-P7): anchors ``anchor_scale * stride * 2**(i/octaves)``, GroupNorm head."""
    gen = anchor_generator(neck.strides, anchor_scale, aspect_ratios, octaves)
    head = RetinaNetHead(neck.out_channels, gen.num_anchors_per_location()[0], num_classes,
                         norm_layer=_group_norm(neck.out_channels))
    own = {"anchor_generator": gen, "head": head}
    return RetinaNet(neck, num_classes, min_size=min_size, max_size=max_size, image_mean=list(image_mean),
                     image_std=list(image_std), **{**own, **kwargs})


class _FCOSHead(FCOSHead):
    """torchvision's FCOS head with GroupNorm fitted to the width (its own hard-codes 32 groups)."""

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4) -> None:
        nn.Module.__init__(self)  # skip FCOSHead.__init__, which would build GroupNorm(32, C)
        norm = _group_norm(in_channels)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs, norm_layer=norm)
        self.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=norm)


def fcos(
    neck: FeaturePyramidNeck,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    anchor_scale: float = 1.0,
    num_convs: int = 4,
    score_thresh: float = 0.05,
    **kwargs: Any,
) -> FCOS:
    """FCOS on ``neck`` (P3-P7): one point per location, a head of ``num_convs`` conv-GN layers per branch.

    ``score_thresh`` 0.05 as the other detectors (torchvision's FCOS keeps only scores over 0.2).
    """
    gen = anchor_generator(neck.strides, anchor_scale, (1.0,))  # anchor-free: one point per location
    own = {"anchor_generator": gen, "head": _FCOSHead(neck.out_channels, num_classes, num_convs)}
    return FCOS(neck, num_classes, min_size=min_size, max_size=max_size, image_mean=list(image_mean),
                image_std=list(image_std), score_thresh=score_thresh, **{**own, **kwargs})


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
        """The chosen backbone levels and the extra ones, by pyramid name, fine to coarse."""
        feats = self.body(x)
        maps = [feats[n] for n in self.in_levels]
        y = maps[-1]
        for block in self.extras:
            y = block(y)
            maps.append(y)
        return dict(zip(self.level_names, maps))


def ssd_features(
    backbone: Backbone,
    *,
    out_channels: int,
    strides: Sequence[int] | None,
    min_stride: int,
    min_size: int,
    num_levels: int | None = None,
) -> SSDFeatures:
    """SSD's neck for the detector table: ``out_channels`` wide extra blocks, up to ``num_levels`` levels.

    By default SSD300's six levels, fewer where a ``min_size`` image is too small for them.
    """
    if num_levels is None:
        num_levels = max(1, min(6, int(math.log2(max(min_size, min_stride) / min_stride)) + 1))
    return SSDFeatures(backbone, num_levels=num_levels, strides=strides, min_stride=min_stride,
                       extra_channels=out_channels)


def ssd(
    neck: SSDFeatures,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    anchor_scale: float = 2.0,
    **kwargs: Any,
) -> SSD:
    """SSD on its own neck: default boxes ``anchor_scale * stride`` per level, ratios 2 (and 3 in the middle levels).

    SSD resizes every image to a ``min_size`` square, so ``max_size`` has no use here.
    """
    del max_size
    n = len(neck.strides)
    # SSD300's ratios: {2} on the first and the last two levels, {2, 3} between
    ratios = [[2]] + [[2, 3]] * max(0, n - 3) + [[2]] * min(2, n - 1)
    box_scales = [anchor_scale * s / min_size for s in neck.strides]
    box_scales.append(box_scales[-1] * 2)
    gen = DefaultBoxGenerator(ratios, scales=box_scales, steps=neck.strides)
    own = {"anchor_generator": gen, "size": (min_size, min_size)}
    return SSD(neck, num_classes=num_classes + 1, image_mean=list(image_mean), image_std=list(image_std),
               **{**own, **kwargs})
