"""Dense single-stage detectors: torchvision's RetinaNet, FCOS and SSD on registry backbones.

- RetinaNet (Lin et al., Focal Loss for Dense Object Detection, ICCV 2017): FPN P3-P7, three
  anchor octaves per level, sigmoid scores per class (no background class).
- FCOS (Tian et al., FCOS: Fully Convolutional One-Stage Object Detection, ICCV 2019): anchor-free,
  one point per location; its "anchor" is the level's stride and only sets the regression ranges.
- SSD (Liu et al., SSD: Single Shot MultiBox Detector, ECCV 2016): the backbone's levels from
  stride 8 plus extra stride-2 blocks (:class:`SSDFeatures`, SSD's own neck, no FPN), default
  boxes derived from the strides like RetinaNet's anchors, a softmax whose class 0 is background.
  ``layout="ssd300"`` builds the paper's own VGG-16 layout instead (:class:`SSD300VGGFeatures`:
  L2-normalised conv4_3, fc6/fc7 as convolutions, four extra blocks, SSD300's default boxes), the
  structure of torchvision's ``ssd300_vgg16`` and its COCO weights.

Each builder takes the neck built by ``build_detector`` and its own keywords; the rest go to
torchvision's class unchanged (``score_thresh``, ``nms_thresh``, ...). Anchor sizes follow the
strides (:mod:`.anchors`) and are chosen for small objects (15-50 px shapes in 128 px images).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD

from ..backbone import Backbone
from ..layers import ConvNormAct, group_norm_groups
from .anchors import anchor_generator
from .neck import FeaturePyramidNeck, level_name, select_levels

__all__ = ["SSD_LAYOUTS", "SSD300VGGFeatures", "SSDFeatures", "fcos", "retinanet", "ssd", "ssd_features"]


#: the box losses torchvision's RetinaNet regression head computes (``_utils._box_loss``)
_BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")


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
    anchor_sizes: Sequence[Sequence[float]] | None = None,
    box_loss: str = "l1",
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet on ``neck`` (P3-P7): anchors ``anchor_scale * stride * 2**(i/octaves)``, GroupNorm head.

    ``anchor_sizes``: the sizes per level given outright instead (torchvision's RetinaNet truncates
    its octave sizes to whole pixels, 32, 40, 50, ...; its COCO weights were trained with those).
    ``box_loss``: the box regression loss, l1 (the paper's smooth-L1 with beta 0) or torchvision's
    smooth_l1, giou (torchvision's RetinaNet v2 trained with it), diou, ciou.
    """
    if anchor_sizes is None:
        gen = anchor_generator(neck.strides, anchor_scale, aspect_ratios, octaves)
    else:
        if len(anchor_sizes) != len(neck.strides):
            raise ValueError(f"anchor_sizes gives {len(anchor_sizes)} levels but the neck has {len(neck.strides)} "
                             f"(strides {neck.strides}); give one list of sizes per level")
        sizes = tuple(tuple(float(a) for a in level) for level in anchor_sizes)
        gen = AnchorGenerator(sizes, (tuple(float(r) for r in aspect_ratios),) * len(sizes))
    head = RetinaNetHead(neck.out_channels, gen.num_anchors_per_location()[0], num_classes,
                         norm_layer=_group_norm(neck.out_channels))
    if box_loss not in _BOX_LOSSES:
        raise ValueError(f"unknown box_loss {box_loss!r}; choose one of {', '.join(_BOX_LOSSES)}")
    head.regression_head._loss_type = box_loss  # noqa: SLF001 - torchvision's only switch for it
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


class SSD300VGGFeatures(nn.Module):
    """SSD300's own VGG-16 layout (Liu et al., SSD, ECCV 2016, Sec. 3), on a registry VGG-16 without batch norm.

    Levels: conv4_3 (stride 8, L2-normalised per position with a learned per-channel scale
    starting at 20, which the paper takes from ParseNet, Liu et al. 2015), fc7 (stride 16: pool5 turned into a
    3x3 stride-1 pool, fc6 a 3x3 convolution dilated by 6, fc7 a 1x1 one), then four extra blocks
    (1x1 reduce, 3x3: two with stride 2, two unpadded) giving maps of 10, 5, 3 and 1 at 300 px.
    pool3 rounds up (ceil mode) so that conv4_3 is 38x38 at 300 px. The backbone keeps its own
    convolutions (its ImageNet weights stay usable); the pools, fc6, fc7 and the extra blocks are
    this module's. ``default_boxes`` are SSD300's (torchvision's ``ssd300_vgg16``), for 300x300 inputs.
    """

    #: what the SSD builder reads: SSD300's aspect ratios per level, box scales (relative to 300) and steps
    default_boxes = {
        "aspect_ratios": [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        "scales": [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        "steps": [8, 16, 32, 64, 100, 300],
    }
    #: the input side the layout is made for
    size = 300

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.body = backbone
        blocks = self._vgg16_blocks(backbone)
        self.blocks = [name for name, _ in blocks]
        self.scale_weight = nn.Parameter(torch.full((512,), 20.0))
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.pool4 = nn.MaxPool2d(2, 2)
        self.pool5 = nn.MaxPool2d(3, 1, padding=1)
        self.fc6 = nn.Conv2d(512, 1024, 3, padding=6, dilation=6)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        # (in, reduced, out, stride, padding) of conv8_2 .. conv11_2
        plan = [(1024, 256, 512, 2, 1), (512, 128, 256, 2, 1), (256, 128, 256, 1, 0), (256, 128, 256, 1, 0)]
        self.extras = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, mid, 1), nn.ReLU(inplace=True),
                          nn.Conv2d(mid, c_out, 3, stride=stride, padding=pad), nn.ReLU(inplace=True))
            for c_in, mid, c_out, stride, pad in plan
        )
        for m in [self.fc6, self.fc7, *self.extras.modules()]:
            if isinstance(m, nn.Conv2d):  # the paper's (and torchvision's) xavier initialisation
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.0)
        #: channels per level: torchvision's SSD reads this list to build its head
        self.out_channels = [512, 1024, 512, 256, 256, 256]
        self.strides = list(self.default_boxes["steps"])
        self.level_names = ["conv4_3", "fc7", "conv8_2", "conv9_2", "conv10_2", "conv11_2"]

    @staticmethod
    def _vgg16_blocks(backbone: Backbone) -> list[tuple[str, nn.Module]]:
        """The five conv blocks of a VGG-16 backbone (each a Sequential of convolutions ending in its pool)."""
        stages = getattr(backbone, "stages", None)
        blocks = list(stages.items()) if isinstance(stages, nn.ModuleDict) else []
        widths = [[m.out_channels for m in block.modules() if isinstance(m, nn.Conv2d)] for _, block in blocks]
        norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())  # noqa: SLF001
        vgg16 = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
        pooled = all(isinstance(b, nn.Sequential) and isinstance(b[-1], nn.MaxPool2d) for _, b in blocks)
        if widths != vgg16 or norms or not pooled:
            raise ValueError(
                f"layout 'ssd300' is SSD300's VGG-16 layout: it needs backbone vgg16 (five blocks of 3x3 convolutions "
                f"without batch norm, each ending in a max pool), but {type(backbone).__name__} has conv widths "
                f"{widths or 'none'}{' and batch norm' if norms else ''}; use --model.backbone vgg16, or layout 'levels'"
            )
        return blocks

    def _convs(self, block: str, x: Tensor) -> Tensor:
        """The convolutions of one VGG block, without the block's own pool (SSD300 pools its own way)."""
        for layer in list(self.body.stages[block])[:-1]:
            x = layer(x)
        return x

    def forward(self, x: Tensor) -> "dict[str, Tensor]":
        """conv4_3 (L2-normalised, scaled), fc7 and the four extra levels, fine to coarse."""
        b1, b2, b3, b4, b5 = self.blocks
        x = self.body.stages[b2](self.body.stages[b1](x))
        conv4_3 = self._convs(b4, self.pool3(self._convs(b3, x)))
        x = self.pool5(self._convs(b5, self.pool4(conv4_3)))
        x = F.relu(self.fc7(F.relu(self.fc6(x), inplace=True)), inplace=True)
        maps = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(conv4_3), x]
        for block in self.extras:
            x = block(x)
            maps.append(x)
        return dict(zip(self.level_names, maps))


#: SSD's necks: the backbone's own levels plus stride-2 blocks (any backbone), or SSD300's VGG-16 layout
SSD_LAYOUTS = ("levels", "ssd300")


def ssd_features(
    backbone: Backbone,
    *,
    out_channels: int,
    strides: Sequence[int] | None,
    min_stride: int,
    min_size: int,
    num_levels: int | None = None,
    layout: str = "levels",
) -> SSDFeatures | SSD300VGGFeatures:
    """SSD's neck for the detector table: ``out_channels`` wide extra blocks, up to ``num_levels`` levels.

    By default SSD300's six levels, fewer where a ``min_size`` image is too small for them.
    ``layout="ssd300"``: the paper's VGG-16 layout (:class:`SSD300VGGFeatures`) for 300x300 inputs
    (``min_size`` 300), whose levels and default boxes are fixed.
    """
    if layout not in SSD_LAYOUTS:
        raise ValueError(f"unknown SSD layout {layout!r}; choose one of {SSD_LAYOUTS}")
    if layout == "ssd300":
        if min_size != SSD300VGGFeatures.size:
            raise ValueError(
                f"layout 'ssd300' is made for 300x300 inputs (its unpadded last blocks, steps and box scales), "
                f"got min_size {min_size}: set --model.min_size 300 (SSD resizes every image to it)"
            )
        if strides is not None or num_levels is not None:
            raise ValueError(
                "layout 'ssd300' fixes its levels (conv4_3, fc7 and four extra blocks): drop strides and num_levels"
            )
        return SSD300VGGFeatures(backbone)
    if num_levels is None:
        num_levels = max(1, min(6, int(math.log2(max(min_size, min_stride) / min_stride)) + 1))
    return SSDFeatures(backbone, num_levels=num_levels, strides=strides, min_stride=min_stride,
                       extra_channels=out_channels)


def ssd(
    neck: SSDFeatures | SSD300VGGFeatures,
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

    SSD resizes every image to a ``min_size`` square, so ``max_size`` has no use here. A neck with
    ``default_boxes`` of its own (SSD300's layout) uses those, and ``anchor_scale`` has no use.
    """
    del max_size
    fixed = getattr(neck, "default_boxes", None)
    if fixed is not None:
        ratios, box_scales, steps = fixed["aspect_ratios"], fixed["scales"], fixed["steps"]
    else:
        n = len(neck.strides)
        # SSD300's ratios: {2} on the first and the last two levels, {2, 3} between
        ratios = [[2]] + [[2, 3]] * max(0, n - 3) + [[2]] * min(2, n - 1)
        box_scales = [anchor_scale * s / min_size for s in neck.strides]
        box_scales.append(box_scales[-1] * 2)
        steps = neck.strides
    gen = DefaultBoxGenerator([list(r) for r in ratios], scales=list(box_scales), steps=list(steps))
    own = {"anchor_generator": gen, "size": (min_size, min_size)}
    return SSD(neck, num_classes=num_classes + 1, image_mean=list(image_mean), image_std=list(image_std),
               **{**own, **kwargs})
