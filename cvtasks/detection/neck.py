"""Feature-pyramid necks: any registry backbone's levels in, a pyramid of equal-width maps out.

The neck wraps the backbone (torchvision's detectors take one module that maps images to an
OrderedDict of feature maps and exposes ``out_channels``), chooses the backbone levels by stride
from its ``feature_info`` (never by name), and merges them top-down with torchvision's
``FeaturePyramidNetwork`` (Lin et al., Feature Pyramid Networks for Object Detection, CVPR 2017).
A backbone with a single level (ViT's stride-16 ``tokens``) gets a simple pyramid instead
(Li et al., Exploring Plain Vision Transformer Backbones for Object Detection, ECCV 2022).

Output levels are named ``p<k>`` for stride ``2**k`` (``p2`` is stride 4), as in the FPN paper.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Sequence

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ..backbone import Backbone, FeatureInfo
from ..layers import group_norm_groups

__all__ = ["EXTRA_LEVELS", "P6_SOURCES", "FeaturePyramidNeck", "SimplePyramid", "fpn_neck", "select_levels", "level_name"]

#: what goes on top of the pyramid: nothing, one max-pooled level (Faster/Mask R-CNN's "pool", used
#: by the RPN only) or two strided convolutions P6, P7 (RetinaNet, FCOS)
EXTRA_LEVELS = ("none", "maxpool", "p6p7")
#: what P6 is computed from: the pyramid's P5 (FCOS, torchvision's RetinaNet v1) or the backbone's
#: coarsest level C5 (the RetinaNet paper, and torchvision's RetinaNet v2)
P6_SOURCES = ("p5", "c5")


def level_name(stride: int) -> str:
    """The pyramid name of a stride: ``p<log2 stride>`` for powers of two, ``s<stride>`` otherwise."""
    k = math.log2(stride)
    return f"p{int(k)}" if k.is_integer() else f"s{stride}"


def select_levels(
    feature_info: Sequence[FeatureInfo], strides: Sequence[int] | None = None, min_stride: int = 4
) -> list[FeatureInfo]:
    """The backbone levels a pyramid uses: the given ``strides``, or every stride >= ``min_stride``.

    Where several levels share a stride the deepest (last declared) one is taken.
    """
    by_stride: dict[int, FeatureInfo] = {}
    for f in feature_info:
        by_stride[f.stride] = f  # later = deeper wins
    available = sorted(by_stride)
    if strides is not None:
        missing = [s for s in strides if s not in by_stride]
        if missing:
            raise ValueError(
                f"the backbone has no feature level at strides {missing}; its levels have strides "
                f"{available}: pick neck strides among those"
            )
        chosen = sorted(set(strides))
    else:
        chosen = [s for s in available if s >= min_stride]
        if not chosen:
            raise ValueError(
                f"the backbone has no feature level with stride >= {min_stride} (its strides are "
                f"{available}); lower min_stride or pass strides explicitly"
            )
    return [by_stride[s] for s in chosen]


def _extra_block(extra: str, channels: int, coarsest_channels: int, p6_from: str = "p5") -> ExtraFPNBlock | None:
    if extra not in EXTRA_LEVELS:
        raise ValueError(f"unknown extra pyramid levels {extra!r}; choose one of {EXTRA_LEVELS}")
    if p6_from not in P6_SOURCES:
        raise ValueError(
            f"unknown p6_from {p6_from!r}; choose 'p5' (the pyramid's P5) or 'c5' (the backbone's coarsest level)"
        )
    if extra == "maxpool":
        return LastLevelMaxPool()
    if extra == "p6p7":
        block = LastLevelP6P7(coarsest_channels if p6_from == "c5" else channels, channels)
        # torchvision infers the source from in == out channels; a backbone whose C5 is as wide as the
        # pyramid would then read P5, so the choice is set, not inferred
        block.use_P5 = p6_from == "p5"
        return block
    return None


def _tokens_to_map(x: Tensor, image_hw: tuple[int, int], stride: int) -> Tensor:
    """A (B, N, C) token sequence (leading class/register tokens allowed) as a (B, C, h, w) map."""
    if x.dim() == 4:
        return x
    h, w = math.ceil(image_hw[0] / stride), math.ceil(image_hw[1] / stride)
    extra = x.shape[1] - h * w
    if x.dim() != 3 or extra < 0:
        raise ValueError(
            f"cannot read a {tuple(x.shape)} feature as a {h}x{w} map at stride {stride}; a backbone "
            f"level must be (B, C, H, W) or a (B, N, C) token sequence"
        )
    return x[:, extra:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-s map to strides s/2, s, 2s by deconv / identity / pool.

    Each scale then gets a 1x1 and a 3x3 convolution to ``out_channels`` (with GroupNorm standing in
    for ViTDet's LayerNorm), so the outputs are what an FPN would give.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, min_stride: int = 4) -> None:
        super().__init__()
        factors = [f for f in (2.0, 1.0, 0.5) if stride / f >= min_stride]
        self.strides = [int(stride / f) for f in factors]
        self.scales = nn.ModuleList()
        for f in factors:
            if f == 2.0:
                resample: nn.Module = nn.Sequential(
                    nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2),
                )
                ch = in_channels // 2
            elif f == 1.0:
                resample, ch = nn.Identity(), in_channels
            else:
                resample, ch = nn.MaxPool2d(2, stride=2), in_channels
            self.scales.append(
                nn.Sequential(
                    resample,
                    nn.Conv2d(ch, out_channels, 1, bias=False),
                    nn.GroupNorm(group_norm_groups(out_channels), out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    nn.GroupNorm(group_norm_groups(out_channels), out_channels),
                )
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        return [scale(x) for scale in self.scales]


class FeaturePyramidNeck(nn.Module):
    """A registry backbone plus a feature pyramid: images in, an OrderedDict ``p<k>`` -> maps out.

    ``strides`` picks the backbone levels (default: every stride >= ``min_stride``); ``extra`` adds
    the levels torchvision's detectors put on top (see EXTRA_LEVELS), P6 computed from ``p6_from``
    (see P6_SOURCES). ``out_channels`` is the width of every output level, as torchvision's detectors read it.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        out_channels: int = 256,
        strides: Sequence[int] | None = None,
        min_stride: int = 4,
        extra: str = "maxpool",
        p6_from: str = "p5",
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"neck out_channels must be positive, got {out_channels}")
        self.body = backbone
        self.out_channels = out_channels
        infos = select_levels(backbone.feature_info, strides, min_stride)
        self.in_levels = [f.name for f in infos]
        block = _extra_block(extra, out_channels, infos[-1].channels, p6_from)
        if len(infos) == 1:
            only = infos[0]
            self.simple: SimplePyramid | None = SimplePyramid(only.channels, out_channels, only.stride, min_stride)
            self.fpn: FeaturePyramidNetwork | None = None
            self.extra_block = block
            base_strides = self.simple.strides
        else:
            self.simple = None
            self.fpn = FeaturePyramidNetwork([f.channels for f in infos], out_channels, extra_blocks=block)
            self.extra_block = None
            base_strides = [f.stride for f in infos]
        top = base_strides[-1]
        extra_strides = {"none": [], "maxpool": [top * 2], "p6p7": [top * 2, top * 4]}[extra]
        #: strides of the output levels, fine to coarse
        self.strides: list[int] = base_strides + extra_strides
        #: output level names, fine to coarse
        self.level_names: list[str] = [level_name(s) for s in self.strides]
        #: the levels made from backbone features (RoI pooling reads these, not the extra ones)
        self.feature_levels: list[str] = self.level_names[: len(base_strides)]
        self._in_stride = infos[0].stride

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        if self.simple is not None:
            single = _tokens_to_map(feats[self.in_levels[0]], (x.shape[-2], x.shape[-1]), self._in_stride)
            maps = self.simple(single)
            if self.extra_block is not None:
                maps, _ = self.extra_block(maps, [single], [str(i) for i in range(len(maps))])
        else:
            assert self.fpn is not None
            picked = OrderedDict((n, feats[n]) for n in self.in_levels)
            maps = list(self.fpn(picked).values())
        return OrderedDict(zip(self.level_names, maps))


def fpn_neck(extra: str) -> Callable[..., FeaturePyramidNeck]:
    """A neck builder for the detector table: FeaturePyramidNeck with ``extra`` levels on top fixed."""
    if extra not in EXTRA_LEVELS:
        raise ValueError(f"unknown extra pyramid levels {extra!r}; choose one of {EXTRA_LEVELS}")

    def build(backbone: Backbone, *, out_channels: int, strides: Sequence[int] | None, min_stride: int) -> FeaturePyramidNeck:
        """FeaturePyramidNeck on ``backbone`` with the table's ``extra`` levels."""
        return FeaturePyramidNeck(backbone, out_channels=out_channels, strides=strides, min_stride=min_stride, extra=extra)

    def build_p6p7(backbone: Backbone, *, out_channels: int, strides: Sequence[int] | None, min_stride: int,
                   p6_from: str = "p5") -> FeaturePyramidNeck:
        """FeaturePyramidNeck on ``backbone`` with P6 (from ``p6_from``: p5 or c5) and P7 on top."""
        return FeaturePyramidNeck(backbone, out_channels=out_channels, strides=strides, min_stride=min_stride,
                                  extra=extra, p6_from=p6_from)

    chosen = build_p6p7 if extra == "p6p7" else build
    chosen.__name__ = chosen.__qualname__ = f"fpn_neck_{extra}"
    return chosen
