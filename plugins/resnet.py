"""ResNet family: ResNet, pre-activation ResNet, Wide ResNet, ResNeXt and SE-ResNet(X)t.

One backbone class builds every variant from a small table (block kind, blocks per stage, widths,
groups, squeeze-and-excitation, stem). Feature levels, fine to coarse:

- ImageNet layout (7x7 stride-2 stem + max pooling): ``stem`` (stride 2, the stem's output before
  the pooling), ``layer1..layer4`` (strides 4/8/16/32). ``output_stride`` 16 or 8 replaces the
  stride of layer4 (and layer3) by dilation, as DeepLabV3 does (Chen et al., 2017).
- CIFAR layout of Wide ResNets (3x3 stride-1 stem): ``layer1..layer3`` (strides 1/2/4); the stem
  keeps full resolution, so it is not a level of its own.

The state_dict follows torchvision's names inside the stages (``layer1.0.conv1.weight``...);
``remap_state_dict`` converts torchvision's and timm's files (``resnet*``, ``seresnet*`` and the
pre-activation ``resnetv2_*`` layout).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Iterable, Mapping, Sequence

from torch import Tensor, nn

from cvtasks.backbone import INCEPTION_MEAN, INCEPTION_STD, BackboneSpec, StagedBackbone
from cvtasks.layers import ConvNormAct, SqueezeExcite, grouped_conv, make_divisible
from cvtasks.registry import register_backbone

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "wide_resnet_cifar",
]


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """A bias-free convolution with 'same' padding at stride 1 (the norm that follows has the bias)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, dilation * (kernel_size - 1) // 2,
                     dilation, bias=False)


def _se(channels: int) -> SqueezeExcite:
    """Squeeze-and-excitation with reduction 16 (Hu et al.), squeezed width rounded to a multiple of 8 as timm does."""
    return SqueezeExcite(channels, rd_channels=make_divisible(channels / 16, 8))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut, activation after the addition (He et al., 2016)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None, groups: int = 1, width_per_group: int = 64,
                 se: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 3, stride, first_dilation or dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, out, 3, 1, dilation)
        self.bn2 = nn.BatchNorm2d(out)
        self.se = _se(out) if se else None
        self.downsample = (
            nn.Sequential(_conv(in_channels, out, 1, stride), nn.BatchNorm2d(out))
            if stride != 1 or in_channels != out else None
        )

    def last_norm(self) -> nn.Module:
        """The layer zeroed by ``zero_init_residual`` so that the block starts as the identity."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        """conv-BN-ReLU, conv-BN (-SE), add the shortcut, ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, strided: ResNet v1.5), 1x1 expand by 4, with a shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None, groups: int = 1, width_per_group: int = 64,
                 se: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        width = int(planes * width_per_group / 64) * groups  # ResNeXt's cardinality x bottleneck width
        out = planes * self.expansion
        self.conv1 = _conv(in_channels, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = grouped_conv(width, width, 3, groups, stride, first_dilation or dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, out, 1)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.se = _se(out) if se else None
        self.downsample = (
            nn.Sequential(_conv(in_channels, out, 1, stride), nn.BatchNorm2d(out))
            if stride != 1 or in_channels != out else None
        )

    def last_norm(self) -> nn.Module:
        """The layer zeroed by ``zero_init_residual`` so that the block starts as the identity."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        """1x1, 3x3, 1x1 conv-BN(-ReLU) (-SE), add the shortcut, ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def _preact_shortcut(in_channels: int, out: int, stride: int) -> nn.Module | None:
    """A strided 1x1 projection of the pre-activated input where the shape changes, else None."""
    if stride == 1 and in_channels == out:
        return None
    return nn.Sequential(OrderedDict(conv=_conv(in_channels, out, 1, stride)))


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice with a clean identity path (He et al., ECCV 2016); WRN's block with dropout.

    Dropout sits between the two convolutions, after the second BN-ReLU (Zagoruyko & Komodakis, 2016).
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None, groups: int = 1, width_per_group: int = 64,
                 se: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        out = planes * self.expansion
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv(in_channels, planes, 3, stride, first_dilation or dilation)
        self.norm2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = _conv(planes, out, 3, 1, dilation)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _preact_shortcut(in_channels, out, stride)

    def last_norm(self) -> nn.Module:
        """The layer zeroed by ``zero_init_residual``: the last conv (no BN ends a pre-activation branch)."""
        return self.conv2

    def forward(self, x: Tensor) -> Tensor:
        """BN-ReLU-conv twice (dropout between), add the shortcut; no activation after the sum."""
        x_pre = self.relu(self.norm1(x))
        # where the shape changes, the projection sees the pre-activated input, as in the paper's code
        shortcut = x if self.downsample is None else self.downsample(x_pre)
        out = self.relu(self.norm2(self.conv1(x_pre)))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)
        out += shortcut
        return out


class PreActBottleneck(nn.Module):
    """Full pre-activation bottleneck: (BN-ReLU-conv) x 3 with 1x1/3x3/1x1 kernels (He et al., ECCV 2016)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None, groups: int = 1, width_per_group: int = 64,
                 se: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        out = planes * self.expansion
        self.downsample = _preact_shortcut(in_channels, out, stride)
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv(in_channels, width, 1)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = grouped_conv(width, width, 3, groups, stride, first_dilation or dilation)
        self.norm3 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, out, 1)
        self.relu = nn.ReLU(inplace=True)

    def last_norm(self) -> nn.Module:
        """The layer zeroed by ``zero_init_residual``: the last conv (no BN ends a pre-activation branch)."""
        return self.conv3

    def forward(self, x: Tensor) -> Tensor:
        """BN-ReLU-conv three times, add the shortcut; no activation after the sum."""
        x_pre = self.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(x_pre)
        out = self.conv1(x_pre)
        out = self.conv2(self.relu(self.norm2(out)))
        out = self.conv3(self.relu(self.norm3(out)))
        out += shortcut
        return out


_BLOCKS: dict[tuple[str, bool], type[nn.Module]] = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneck,
}

_STEMS = ("imagenet", "cifar")

# timm's pre-activation layout: stages.<i>.blocks.<j>.* and a final norm
_TIMM_V2_STAGE = re.compile(r"^stages\.(\d+)\.blocks\.(.*)$")


class ResNet(StagedBackbone):
    """Residual network of any registered variant: stem, then stages of residual blocks.

    Keywords: ``layers`` (blocks per stage), ``block`` ('basic' or 'bottleneck'), ``preact``
    (pre-activation units, He et al. ECCV 2016), ``widths`` (planes per stage), ``groups`` and
    ``width_per_group`` (ResNeXt's cardinality and bottleneck width; Wide ResNet doubles the
    latter), ``se`` (squeeze-and-excitation), ``stem`` ('imagenet' or 'cifar'), ``stem_width``,
    ``dropout`` (inside pre-activation basic blocks, WRN), ``zero_init_residual``, and the contract's
    ``in_chans``, ``out_features``, ``output_stride``.
    """

    spec = BackboneSpec(supported_output_strides=(8, 16, 32))
    first_conv = "stages.stem.conv.weight"
    head_prefixes = ("fc.", "head.")

    def __init__(
        self,
        *,
        layers: Sequence[int],
        block: str = "bottleneck",
        preact: bool = False,
        widths: Sequence[int] = (64, 128, 256, 512),
        groups: int = 1,
        width_per_group: int = 64,
        se: bool = False,
        stem: str = "imagenet",
        stem_width: int = 64,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        in_chans: int = 3,
        out_features: Iterable[str] | None = None,
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        block_cls = self._check_args(layers, block, preact, widths, groups, width_per_group, se, stem, dropout,
                                     in_chans)
        cifar = stem == "cifar"
        output_stride = output_stride or self.spec.native_stride  # the spec checked it (Backbone.__new__)
        self.output_stride = output_stride

        # plan every stage (channels, stride, dilation) before building, so that stages after the
        # deepest requested level are never built
        levels: list[tuple[str, str, int, int]] = []
        plan: list[tuple[str, int, int, int, int]] = []  # (stage, planes, stride, dilation, first_dilation)
        current = 1 if cifar else 2
        if not cifar:
            levels.append(("stem", "stem", stem_width, current))
            current *= 2  # the max pooling after the stem
        dilation = 1
        for i, planes in enumerate(widths):
            stride, first_dilation = (1 if i == 0 else 2), dilation
            if current * stride > output_stride:
                dilation, stride = dilation * stride, 1
            current *= stride
            name = f"layer{i + 1}"
            plan.append((name, planes, stride, dilation, first_dilation))
            levels.append((name, name, planes * block_cls.expansion, current))
        names = [lv[1] for lv in levels]
        wanted = list(out_features) if out_features is not None else names
        bad = [n for n in wanted if n not in names]
        if bad or not wanted:
            raise ValueError(f"ResNet has no feature levels {bad or wanted}; valid names are {names}")
        last = max(names.index(n) for n in wanted)
        last_stage = levels[last][0]

        if cifar:
            self.stages["stem"] = ConvNormAct(in_chans, stem_width, 3, norm=None, act=None, bias=False)
        elif preact:
            # the pre-activation stem is a bare conv: the first unit's BN-ReLU follows it
            self.stages["stem"] = ConvNormAct(in_chans, stem_width, 7, 2, padding=3, norm=None, act=None, bias=False)
        else:
            self.stages["stem"] = ConvNormAct(in_chans, stem_width, 7, 2, padding=3)
        if last_stage != "stem" and not cifar:
            # a stage of its own, so that the stem level is the stride-2 map and layer1[0] a block
            self.stages["pool"] = nn.MaxPool2d(3, 2, 1)
        in_ch = stem_width
        for i, (name, planes, stride, dil, first_dil) in enumerate(plan):
            if last_stage == "stem":
                break
            mods: list[tuple[str, nn.Module]] = []
            for j in range(layers[i]):
                mods.append((str(j), block_cls(
                    in_ch, planes, stride=stride if j == 0 else 1, dilation=dil,
                    first_dilation=first_dil if j == 0 else dil, groups=groups,
                    width_per_group=width_per_group, se=se, dropout=dropout,
                )))
                in_ch = planes * block_cls.expansion
            if preact and i == len(plan) - 1:
                # pre-activation units leave the sum un-normalised: the net ends with BN-ReLU
                mods += [("norm", nn.BatchNorm2d(in_ch)), ("act", nn.ReLU(inplace=True))]
            self.stages[name] = nn.Sequential(OrderedDict(mods))
            if name == last_stage:
                break
        self._finish(levels, wanted)
        self._init_weights(zero_init_residual)

    @classmethod
    def spec_for(cls, **kwargs: Any) -> BackboneSpec:
        """The CIFAR layout downsamples only 2**(stages-1) times in all: its one stride, nothing to dilate."""
        if kwargs.get("stem") == "cifar" and kwargs.get("layers"):
            return replace(cls.spec, supported_output_strides=(2 ** (len(kwargs["layers"]) - 1),))
        return cls.spec

    @staticmethod
    def _check_args(layers: Sequence[int], block: str, preact: bool, widths: Sequence[int], groups: int,
                    width_per_group: int, se: bool, stem: str, dropout: float, in_chans: int) -> type[nn.Module]:
        """Validate the architecture keywords, naming the bad input and the fix; return the block class."""
        if (block, bool(preact)) not in _BLOCKS:
            raise ValueError(f"block={block!r} is not a ResNet block; choose 'basic' or 'bottleneck'")
        if stem not in _STEMS:
            raise ValueError(f"stem={stem!r} is not a ResNet stem; choose one of {_STEMS}")
        if len(layers) != len(widths) or not layers or any(n < 1 for n in layers):
            raise ValueError(f"layers={tuple(layers)} must give a positive block count for each of the "
                             f"{len(widths)} widths {tuple(widths)}")
        if block == "basic" and (groups != 1 or width_per_group != 64):
            raise ValueError("groups and width_per_group (ResNeXt, wide ResNet) need block='bottleneck'")
        if se and preact:
            raise ValueError("se=True is implemented for post-activation blocks (SE-ResNet); use preact=False")
        if dropout and not (preact and block == "basic"):
            raise ValueError("dropout inside the block is Wide ResNet's pre-activation basic block; "
                             "use block='basic', preact=True, or dropout=0")
        if in_chans < 1:
            raise ValueError(f"in_chans must be at least 1, got {in_chans}")
        return _BLOCKS[(block, bool(preact))]

    def _init_weights(self, zero_init_residual: bool) -> None:
        """He init for convolutions, unit BN; optionally zero the last layer of every residual branch."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # each residual branch starts at zero, so every block starts as the identity: Goyal et al.,
            # "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017 (torchvision cites
            # a 0.2-0.3% top-1 gain)
            for m in self.modules():
                if isinstance(m, tuple(_BLOCKS.values())):
                    nn.init.zeros_(m.last_norm().weight)

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map a torchvision/timm ``resnet*`` (or timm ``resnetv2_*``) state_dict to the Classifier layout."""
        if any(_TIMM_V2_STAGE.match(k) for k in state_dict):
            return cls._remap_timm_v2(state_dict)
        table = (("conv1.", "backbone.stages.stem.conv."), ("bn1.", "backbone.stages.stem.bn."),
                 ("fc.", "head.fc."))
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            for old, new in table:
                if k.startswith(old):
                    out[new + k[len(old):]] = v
                    break
            else:  # layer1..layer4 keep their names; anything foreign is reported by the loader
                out["backbone." + (k if k.startswith("stages.") else f"stages.{k}")] = v
        return out

    @staticmethod
    def _remap_timm_v2(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """timm's ResNetV2 layout: stem.conv, stages.<i>.blocks.<j>, norm, head.fc (a 1x1 conv)."""
        last = max(int(m.group(1)) for m in map(_TIMM_V2_STAGE.match, state_dict) if m) + 1
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            m = _TIMM_V2_STAGE.match(k)
            if m:
                out[f"backbone.stages.layer{int(m.group(1)) + 1}.{m.group(2)}"] = v
            elif k.startswith("stem."):
                out["backbone.stages." + k] = v
            elif k.startswith("norm."):
                out[f"backbone.stages.layer{last}.{k}"] = v
            elif k.startswith("head.fc."):
                out[k] = v.flatten(1) if k.endswith("weight") else v
            else:
                out["backbone." + k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Reject a state_dict (our layout) with blocks this variant lacks, instead of loading a subset."""
        # keys of stages we did not build (out_features) are expected to be left over; keys inside
        # built stages that we lack mean a deeper or different variant (resnet34's file in resnet18)
        own = self.state_dict()
        built = tuple(f"stages.{name}." for name in self.stages)
        foreign = [k for k in state_dict if k not in own and k.startswith(built)]
        if foreign:
            raise ValueError(
                f"the pretrained weights hold layers this {type(self).__name__} ({self.describe()}) lacks, "
                f"e.g. {foreign[:3]}; the file is another variant's state_dict: pass the reference "
                f"model of the same variant"
            )
        return state_dict

    def describe(self) -> str:
        """A short summary of the architecture: blocks per stage and block kind."""
        counts: list[int] = []
        for name, stage in self.stages.items():
            if name.startswith("layer"):
                counts.append(sum(1 for k in stage._modules if k.isdigit()))
        first = next((m for m in self.modules() if isinstance(m, tuple(_BLOCKS.values()))), None)
        return f"{type(first).__name__ if first is not None else 'no'} blocks {counts}"


def _wrn_cifar(depth: int, widen_factor: int) -> dict[str, Any]:
    """The WRN-depth-k architecture keywords: 3 groups of (depth-4)/6 pre-activation basic blocks."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
    if widen_factor < 1:
        raise ValueError(f"WRN widen_factor k must be at least 1, got {widen_factor}")
    n = (depth - 4) // 6
    return dict(block="basic", preact=True, layers=(n, n, n), stem="cifar", stem_width=16,
                widths=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor))


def wide_resnet_cifar(depth: int = 28, widen_factor: int = 10, **kwargs: Any) -> ResNet:
    """WRN-depth-k for 32x32 inputs (Zagoruyko & Komodakis, 2016); ``dropout=0.3`` as in the paper's best runs."""
    return ResNet(**{**_wrn_cifar(depth, widen_factor), **kwargs})


_PAPERS = {
    "resnet": "He et al., Deep Residual Learning for Image Recognition, CVPR 2016",
    "resnetv2": "He et al., Identity Mappings in Deep Residual Networks, ECCV 2016",
    "wide_resnet": "Zagoruyko & Komodakis, Wide Residual Networks, BMVC 2016",
    "resnext": "Xie et al., Aggregated Residual Transformations for Deep Neural Networks, CVPR 2017",
    "seresnet": "Hu et al., Squeeze-and-Excitation Networks, CVPR 2018",
}

_BASIC, _BOTTLENECK = dict(block="basic"), dict(block="bottleneck")
_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# name: (family, reference, architecture keywords, native input size)
_VARIANTS: dict[str, tuple[str, str, dict[str, Any], int]] = {
    "resnet18": ("resnet", "torchvision:resnet18", dict(_BASIC, layers=_DEPTHS[18]), 224),
    "resnet34": ("resnet", "torchvision:resnet34", dict(_BASIC, layers=_DEPTHS[34]), 224),
    "resnet50": ("resnet", "torchvision:resnet50", dict(_BOTTLENECK, layers=_DEPTHS[50]), 224),
    "resnet101": ("resnet", "torchvision:resnet101", dict(_BOTTLENECK, layers=_DEPTHS[101]), 224),
    "resnet152": ("resnet", "torchvision:resnet152", dict(_BOTTLENECK, layers=_DEPTHS[152]), 224),
    "resnetv2_50": ("resnetv2", "timm:resnetv2_50", dict(_BOTTLENECK, layers=_DEPTHS[50], preact=True), 224),
    "resnetv2_101": ("resnetv2", "timm:resnetv2_101", dict(_BOTTLENECK, layers=_DEPTHS[101], preact=True), 224),
    "wide_resnet50_2": ("wide_resnet", "torchvision:wide_resnet50_2",
                        dict(_BOTTLENECK, layers=_DEPTHS[50], width_per_group=128), 224),
    "wide_resnet101_2": ("wide_resnet", "torchvision:wide_resnet101_2",
                         dict(_BOTTLENECK, layers=_DEPTHS[101], width_per_group=128), 224),
    "wrn28_10": ("wide_resnet", "", _wrn_cifar(28, 10), 32),
    "wrn40_4": ("wide_resnet", "", _wrn_cifar(40, 4), 32),
    "resnext50_32x4d": ("resnext", "torchvision:resnext50_32x4d",
                        dict(_BOTTLENECK, layers=_DEPTHS[50], groups=32, width_per_group=4), 224),
    "resnext101_32x8d": ("resnext", "torchvision:resnext101_32x8d",
                         dict(_BOTTLENECK, layers=_DEPTHS[101], groups=32, width_per_group=8), 224),
    "seresnet50": ("seresnet", "timm:seresnet50", dict(_BOTTLENECK, layers=_DEPTHS[50], se=True), 224),
    "seresnext50_32x4d": ("seresnet", "timm:seresnext50_32x4d",
                          dict(_BOTTLENECK, layers=_DEPTHS[50], groups=32, width_per_group=4, se=True), 224),
}

# the CIFAR WRNs have no reference implementation; Zagoruyko & Komodakis give their sizes (Table 4)
_PUBLISHED = {"wrn28_10": "36.5M (paper, Table 4)", "wrn40_4": "8.9M (paper, Table 4)"}

# ImageNet top-1 (%) for the nets whose reference (timm's) carries none. SE nets: the SENet paper's
# Table 2, single 224 crop (top-1 error 23.29% and 21.10%). Pre-activation ResNets: the paper reports
# no 50- or 101-layer ImageNet figure, so timm's weights' documented ones (resnetv2_50.a1h_in1k and
# resnetv2_101.a1h_in1k in timm's results/results-imagenet.csv, evaluated at 288 px)
_PUBLISHED_TOP1 = {"seresnet50": 76.71, "seresnext50_32x4d": 78.90, "resnetv2_50": 81.4, "resnetv2_101": 83.0}

# timm's ResNetV2 weights expect inputs in [-1, 1] (its pretrained_cfg); the others ImageNet's normalisation
_SPEC_CHANGES = {"resnetv2": {"mean": INCEPTION_MEAN, "std": INCEPTION_STD}}

for _name, (_family, _reference, _arch, _size) in _VARIANTS.items():
    register_backbone(_name, family=_family, paper=_PAPERS[_family], reference=_reference, input_size=_size,
                      spec=_SPEC_CHANGES.get(_family), published_params=_PUBLISHED.get(_name, ""),
                      published_top1=_PUBLISHED_TOP1.get(_name), num_classes=10 if _name in _PUBLISHED else 1000,
                      **_arch)(ResNet)
