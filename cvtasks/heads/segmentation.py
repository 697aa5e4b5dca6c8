"""Semantic segmentation heads on any registry backbone: FCN-32s/16s/8s, torchvision's FCN, DeepLabV3, max-unpooling decoder.

Every head is built from the backbone's declaration alone (``feature_info``: channels and strides),
never from its name, and returns class scores at the input's size for any input size.

- FCN (Long et al., Fully Convolutional Networks for Semantic Segmentation, CVPR 2015): the
  classifier's fc6/fc7 as convolutions on the coarsest level, class scores, transposed
  convolutions initialised to bilinear upsampling; FCN-16s/8s fuse the scores of the levels at
  half and a quarter of the coarsest stride (pool4 and pool3 on VGG).
- FCN as torchvision builds it on a dilated ResNet (``fcn``, its ``fcn_resnet50``): one 3x3
  conv-bn-relu to a quarter of the channels, dropout, 1x1 class scores, bilinear upsampling, on
  the coarsest level at output stride 8; no skips.
- DeepLabV3 (Chen et al., Rethinking Atrous Convolution for Semantic Image Segmentation, 2017):
  atrous spatial pyramid pooling with image pooling on the coarsest level of a dilated backbone.
- Unpool (Badrinarayanan et al., SegNet, TPAMI 2017): the encoder's max-pool indices place the
  decoder's values back where the maxima were, and conv-bn-relu blocks refine them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import Backbone, BackboneRequest, FeatureInfo
from ..layers import SUPPORTED_OUTPUT_STRIDES, BilinearUpsample, ConvNormAct
from ..registry import get_backbone_entry

__all__ = [
    "SEGMENTATION_HEADS",
    "HeadSpec",
    "segmentation_head_spec",
    "FCNHead",
    "DilatedFCNHead",
    "DeepLabV3Head",
    "ASPP",
    "UnpoolDecoder",
    "AuxHead",
    "SegmentationModel",
    "build_segmentation_head",
    "build_segmentation_model",
    "segmentation_backbone_kwargs",
    "crop_or_pad",
]

PoolIndices = Mapping[str, tuple[Tensor, Sequence[int]]]


def crop_or_pad(x: Tensor, offset: int, size: Sequence[int]) -> Tensor:
    """Crop ``x`` to ``size`` starting ``offset`` pixels in; pad (replicating the border) if it falls short."""
    h, w = int(size[0]), int(size[1])
    x = x[..., offset : offset + h, offset : offset + w]
    ph, pw = h - x.shape[-2], w - x.shape[-1]
    if ph > 0 or pw > 0:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


def _name_of(backbone: nn.Module, backbone_name: str | None) -> str:
    return backbone_name or type(backbone).__name__


def _level_at_stride(
    backbone: Backbone, stride: int, head: str, backbone_name: str | None
) -> FeatureInfo:
    """The deepest declared level at ``stride``; a clear error when the backbone has none."""
    found = [f for f in backbone.feature_info if f.stride == stride]
    if not found:
        have = ", ".join(f"{f.name}@{f.stride}" for f in backbone.feature_info)
        raise ValueError(
            f"head {head!r} needs a feature level at stride {stride}, but backbone "
            f"{_name_of(backbone, backbone_name)!r} declares only {have}; choose another head "
            f"(fcn32s and deeplabv3 need only the coarsest level) or another backbone"
        )
    return found[-1]


# ---------------------------------------------------------------------------------------------
# FCN
# ---------------------------------------------------------------------------------------------
class FCNHead(nn.Module):
    """FCN-32s/16s/8s: fc6/fc7 as convolutions, class scores, skip fusion, bilinear-initialised upsampling.

    ``num_skips`` 0/1/2 gives FCN-32s/16s/8s. The skips are the levels at 1/2 and 1/4 of the
    coarsest stride (strides 16 and 8 on a stride-32 backbone), picked by stride, not by name.
    The paper ran fc6 as a 7x7 convolution on pool5 padded by 100 pixels at conv1 and cropped; we
    leave the backbone alone, use 'same' padding, and align each upsampled map by cropping
    ``factor // 2`` pixels (where a bilinear transposed convolution of stride f centres its output).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        num_skips: int = 2,
        fc_channels: int = 4096,
        fc_kernel: int = 1,
        dropout: float = 0.5,
        backbone_name: str | None = None,
    ) -> None:
        super().__init__()
        if num_skips not in (0, 1, 2):
            raise ValueError(f"FCN num_skips must be 0 (32s), 1 (16s) or 2 (8s), got {num_skips}")
        if fc_kernel not in (1, 3, 5, 7):
            raise ValueError(f"FCN fc_kernel must be 1 (default) or an odd size up to 7 (the paper's), got {fc_kernel}")
        head = ("fcn32s", "fcn16s", "fcn8s")[num_skips]
        coarse = backbone.feature_info[-1]
        self.coarse = coarse.name
        self.skips: list[str] = []
        strides = [coarse.stride]
        skip_channels: list[int] = []
        for k in range(1, num_skips + 1):
            want = coarse.stride // (2**k)
            if coarse.stride % (2**k):
                raise ValueError(
                    f"head {head!r} needs levels at 1/{2 ** k} of the coarsest stride, but backbone "
                    f"{_name_of(backbone, backbone_name)!r} ends at stride {coarse.stride}"
                )
            level = _level_at_stride(backbone, want, head, backbone_name)
            self.skips.append(level.name)
            skip_channels.append(level.channels)
            strides.append(want)
        pad = fc_kernel // 2
        self.fc6 = nn.Conv2d(coarse.channels, fc_channels, fc_kernel, padding=pad)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        # the paper zero-initialises the skip score layers so that fine-tuning starts from the coarser net
        self.score_skips = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in skip_channels)
        for conv in self.score_skips:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        # 2x upsampling before each fusion is learned (bilinear init); the final one is fixed bilinear, as the paper
        self.up2 = nn.ModuleList(BilinearUpsample(num_classes, 2) for _ in skip_channels)
        self.final_stride = strides[-1]
        self.up_final = BilinearUpsample(num_classes, self.final_stride, learnable=False)

    def forward(self, feats: Mapping[str, Tensor], size: Sequence[int], pool_indices: PoolIndices | None = None) -> Tensor:
        """Class scores (B, num_classes, *size)."""
        x = self.drop(self.relu(self.fc6(feats[self.coarse])))
        x = self.drop(self.relu(self.fc7(x)))
        score = self.score_fr(x)
        for name, up, score_skip in zip(self.skips, self.up2, self.score_skips):
            skip = score_skip(feats[name])
            score = crop_or_pad(up(score), 1, skip.shape[-2:]) + skip
        return crop_or_pad(self.up_final(score), self.final_stride // 2, size)


# ---------------------------------------------------------------------------------------------
# DeepLabV3
# ---------------------------------------------------------------------------------------------
class _ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pooling, 1x1 conv-bn-relu, upsampling back."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        y = self.conv(x.mean(dim=(2, 3), keepdim=True))
        if self.training and y.shape[0] == 1:
            # batch statistics of one 1x1 map are undefined; use the running ones for a batch of one
            y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)
        else:
            y = self.bn(y)
        return F.interpolate(self.act(y), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3 convs and image pooling, concatenated and projected."""

    def __init__(self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.5) -> None:
        super().__init__()
        branches: list[nn.Module] = [ConvNormAct(in_channels, out_channels, 1)]
        branches += [ConvNormAct(in_channels, out_channels, 3, dilation=int(r)) for r in rates]
        branches.append(_ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = ConvNormAct(len(branches) * out_channels, out_channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.rates = tuple(int(r) for r in rates)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches], dim=1)))


class DeepLabV3Head(nn.Module):
    """DeepLabV3: ASPP on the coarsest level, a 3x3 conv-bn-relu, 1x1 class scores, bilinear upsampling.

    The paper's rates (6, 12, 18) are for output stride 16 and double at 8; on a backbone that is
    not dilated the rates are scaled to its stride (3, 6, 9 at 32) so the field of view stays the same.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        dropout: float = 0.5,
        output_stride: int = 16,
        backbone_name: str | None = None,
    ) -> None:
        super().__init__()
        del output_stride  # consumed by segmentation_backbone_kwargs; the built backbone's stride is what counts
        coarse = backbone.feature_info[-1]
        self.coarse = coarse.name
        scaled = tuple(max(1, round(r * 16 / coarse.stride)) for r in rates)
        self.aspp = ASPP(coarse.channels, channels, scaled, dropout)
        self.conv = ConvNormAct(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Mapping[str, Tensor], size: Sequence[int], pool_indices: PoolIndices | None = None) -> Tensor:
        """Class scores (B, num_classes, *size)."""
        x = self.classifier(self.conv(self.aspp(feats[self.coarse])))
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Max-unpooling decoder
# ---------------------------------------------------------------------------------------------
class UnpoolDecoder(nn.Module):
    """SegNet-like decoder: per pooled level, coarse to fine, max unpooling then conv-bn-relu blocks.

    Each stage unpools with the encoder's indices to the size the pool saw, keeps the level's
    channels for ``convs_per_stage - 1`` 3x3 conv-bn-relu layers and maps to the next finer
    level's channels with the last; a 3x3 convolution gives the class scores. Needs a backbone
    whose spec has ``exposes_pool_indices`` and whose every declared level comes from a max pool.
    """

    needs_pool_indices = True
    backbone_request = BackboneRequest(pool_indices=True)

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        convs_per_stage: int = 2,
        min_channels: int = 32,
        backbone_name: str | None = None,
    ) -> None:
        super().__init__()
        # built outside build_segmentation_model, the head checks its request itself
        backbone.spec.resolve(self.backbone_request, backbone=_name_of(backbone, backbone_name), asker="head 'unpool'")
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be at least 1, got {convs_per_stage}")
        self.backbone_name = _name_of(backbone, backbone_name)
        info = list(backbone.feature_info)
        self.levels = [f.name for f in reversed(info)]
        stages = []
        for i in range(len(info) - 1, -1, -1):
            c = info[i].channels
            # each stage ends with the channels the next (finer) unpooling's indices were taken on
            out = info[i - 1].channels if i > 0 else max(min_channels, c // 2)
            convs = [ConvNormAct(c, c, 3) for _ in range(convs_per_stage - 1)] + [ConvNormAct(c, out, 3)]
            stages.append(nn.Sequential(*convs))
            last = out
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(last, num_classes, 3, padding=1)

    def forward(self, feats: Mapping[str, Tensor], size: Sequence[int], pool_indices: PoolIndices | None = None) -> Tensor:
        """Class scores (B, num_classes, *size) from the coarsest level and the pools' indices."""
        if pool_indices is None:
            raise ValueError("the unpool decoder needs the pool indices from backbone.forward_with_pool_indices(x)")
        x = feats[self.levels[0]]
        for level, stage in zip(self.levels, self.stages):
            if level not in pool_indices:
                raise ValueError(
                    f"backbone {self.backbone_name!r} returned no max-pool indices for level {level!r} "
                    f"(it returned {list(pool_indices)}); the unpool head needs every level to come from a max pool"
                )
            idx, before = pool_indices[level]
            x = stage(F.max_unpool2d(x, idx, 2, 2, output_size=tuple(before)[-2:]))
        x = self.classifier(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x


# ---------------------------------------------------------------------------------------------
# Auxiliary head, model, factory
# ---------------------------------------------------------------------------------------------
class AuxHead(nn.Module):
    """A small classifier on an intermediate level for an auxiliary loss (PSPNet's deep supervision)."""

    def __init__(self, level: FeatureInfo, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.level = level.name
        mid = max(32, level.channels // 4)
        self.conv = ConvNormAct(level.channels, mid, 3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(mid, num_classes, 1)

    def forward(self, feats: Mapping[str, Tensor], size: Sequence[int]) -> Tensor:
        """Class scores (B, num_classes, *size) from the intermediate level."""
        x = self.classifier(self.dropout(self.conv(feats[self.level])))
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class DilatedFCNHead(AuxHead):
    """FCN as torchvision's ``fcn_resnet50``: the auxiliary head's layers on the coarsest level of a dilated backbone.

    A 3x3 conv-bn-relu to a quarter of the channels, dropout, 1x1 class scores, bilinear upsampling
    to the input; the backbone runs at ``output_stride`` 8 (a backbone that does not dilate runs at
    its own stride, with a warning).
    """

    backbone_request = BackboneRequest(output_stride=8)

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        dropout: float = 0.1,
        output_stride: int = 8,
        backbone_name: str | None = None,
    ) -> None:
        del output_stride, backbone_name  # consumed by segmentation_backbone_kwargs; the built backbone's stride counts
        super().__init__(backbone.feature_info[-1], num_classes, dropout)

    def forward(self, feats: Mapping[str, Tensor], size: Sequence[int], pool_indices: PoolIndices | None = None) -> Tensor:
        """Class scores (B, num_classes, *size)."""
        return super().forward(feats, size)


@dataclass(frozen=True)
class HeadSpec:
    """A registered head name: its class, the fixed keywords of the variant, a one-line description, and
    what it asks of the backbone (``needs``; an ``output_stride`` request follows the head's own keyword)."""

    cls: Callable[..., nn.Module]
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    needs: BackboneRequest = BackboneRequest()

    def request(self, name: str, head_kwargs: Mapping[str, Any] | None = None) -> BackboneRequest:
        """What head ``name`` asks of the backbone, given its keywords (DeepLabV3's ``output_stride``)."""
        want = (head_kwargs or {}).get("output_stride")
        if self.needs.output_stride is None or want is None:
            return self.needs
        if int(want) not in SUPPORTED_OUTPUT_STRIDES:
            raise ValueError(
                f"{name} output_stride must be {', '.join(map(str, SUPPORTED_OUTPUT_STRIDES[:-1]))} or "
                f"{SUPPORTED_OUTPUT_STRIDES[-1]}, got {want}"
            )
        return replace(self.needs, output_stride=int(want))


SEGMENTATION_HEADS: dict[str, HeadSpec] = {
    "fcn32s": HeadSpec(FCNHead, {"num_skips": 0}, "FCN-32s: scores of the coarsest level upsampled x32"),
    "fcn16s": HeadSpec(FCNHead, {"num_skips": 1}, "FCN-16s: fuses the scores at 1/2 the coarsest stride (pool4)"),
    "fcn8s": HeadSpec(FCNHead, {"num_skips": 2}, "FCN-8s: fuses the scores at 1/2 and 1/4 the coarsest stride (pool4, pool3)"),
    "fcn": HeadSpec(DilatedFCNHead, {},
                    "FCN as torchvision's fcn_resnet50: 3x3 conv-bn-relu, 1x1 scores on a dilated backbone (output stride 8)",
                    DilatedFCNHead.backbone_request),
    # a backbone that does not dilate to 16 runs it at its own stride, with a warning (rates scaled to it)
    "deeplabv3": HeadSpec(DeepLabV3Head, {}, "DeepLabV3: ASPP with image pooling on a dilated backbone (output stride 16)",
                          BackboneRequest(output_stride=16)),
    "unpool": HeadSpec(UnpoolDecoder, {}, "SegNet-like decoder: max unpooling with the encoder's indices + conv-bn-relu",
                       UnpoolDecoder.backbone_request),
}


def segmentation_head_spec(name: str) -> HeadSpec:
    """The table entry of head ``name``; an unknown name raises listing the valid ones."""
    try:
        return SEGMENTATION_HEADS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown segmentation head {name!r}; choose one of {', '.join(SEGMENTATION_HEADS)}") from None


def build_segmentation_head(name: str, backbone: Backbone, num_classes: int, **kw: Any) -> nn.Module:
    """The head ``name`` (fcn32s, fcn16s, fcn8s, fcn, deeplabv3, unpool) for a built backbone."""
    spec = segmentation_head_spec(name)
    clash = sorted(set(kw) & set(spec.fixed))
    if clash:
        raise ValueError(f"head {name!r} fixes {clash}; pick another head name instead of passing them")
    params = inspect.signature(spec.cls).parameters
    valid = [p for p in params if p not in ("backbone", "num_classes", "backbone_name", *spec.fixed)]
    unknown = sorted(k for k in kw if k not in params)
    if unknown:
        raise ValueError(f"head {name!r} takes no {unknown} (from --model.head_kwargs); it takes {valid}")
    return spec.cls(backbone, num_classes, **spec.fixed, **kw)


def segmentation_backbone_kwargs(
    head: str,
    backbone_name: str,
    head_kwargs: Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Backbone keywords that give what ``head`` asks for, checked against the backbone's spec before it is built.

    DeepLabV3 asks for ``output_stride`` 16 (or its own keyword's 8); a backbone whose spec lacks the
    stride (VGG, the CIFAR WRNs) is built at its own stride with a warning, and DeepLabV3 then scales
    its atrous rates to that stride. The unpool decoder asks for max-pool indices: an error without.
    """
    name = head.lower()
    request = segmentation_head_spec(name).request(name, head_kwargs)
    spec = get_backbone_entry(backbone_name).spec_for(**dict(backbone_kwargs or {}))
    return spec.resolve(request, backbone=backbone_name, asker=f"head {name!r}")


class SegmentationModel(nn.Module):
    """A backbone and a segmentation head (plus an optional auxiliary head): images in, class scores out."""

    def __init__(self, backbone: Backbone, head: nn.Module, aux_head: AuxHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.needs_pool_indices = bool(getattr(head, "needs_pool_indices", False))

    def forward_all(self, x: Tensor, with_aux: bool = True) -> tuple[Tensor, Tensor | None]:
        """Main scores and auxiliary scores (None without an auxiliary head), both at the input's size."""
        size = x.shape[-2:]
        if self.needs_pool_indices:
            feats, indices = self.backbone.forward_with_pool_indices(x)
        else:
            feats, indices = self.backbone(x), None
        out = self.head(feats, size, indices)
        aux = self.aux_head(feats, size) if with_aux and self.aux_head is not None else None
        return out, aux

    def forward(self, x: Tensor) -> Tensor:
        """Class scores (B, num_classes, H, W) at the input's size."""
        return self.forward_all(x, with_aux=False)[0]


def build_segmentation_model(
    head: str,
    backbone: str,
    num_classes: int,
    *,
    backbone_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    aux_head: bool = False,
) -> SegmentationModel:
    """Build registry backbone ``backbone`` with what ``head`` needs, the head, and optionally an auxiliary head.

    The auxiliary head reads the level before the coarsest (pool4 on VGG, layer3 on ResNet).
    """
    kw = {**segmentation_backbone_kwargs(head, backbone, head_kwargs, backbone_kwargs), **dict(backbone_kwargs or {})}
    if pretrained:
        kw["pretrained"] = pretrained
    net = get_backbone_entry(backbone).build(**kw)
    seg_head = build_segmentation_head(head, net, num_classes, backbone_name=backbone, **dict(head_kwargs or {}))
    aux = None
    if aux_head:
        if len(net.feature_info) < 2:
            raise ValueError(f"an auxiliary loss needs an intermediate feature level, but backbone {backbone!r} has one level only")
        aux = AuxHead(net.feature_info[-2], num_classes)
    return SegmentationModel(net, seg_head, aux)
