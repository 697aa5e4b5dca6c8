"""MobileNetV2: inverted residuals with linear bottlenecks (Sandler et al., CVPR 2018).

Each block widens the input with a 1x1 convolution (expansion factor t), filters it with a
depthwise 3x3 convolution and projects it back with a *linear* 1x1 convolution: no activation on
the narrow output, because ReLU on a low-dimensional manifold destroys information (Sec. 3.2).
The residual connection joins the narrow ends, the inverse of ResNet's bottleneck.

The block (``cvtasks.layers.InvertedResidual``) is also EfficientNet's MBConv (with
squeeze-and-excitation and SiLU); both dilate by ``cvtasks.layers.dilation_plan``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Iterable, Mapping, Sequence

from torch import Tensor, nn

from cvtasks.backbone import BackboneSpec, StagedBackbone
from cvtasks.layers import (
    SUPPORTED_OUTPUT_STRIDES,
    ConvNormAct,
    InvertedResidual,
    dilation_plan,
    make_divisible,
)
from cvtasks.registry import register_backbone

__all__ = ["MobileNetV2", "map_block_key", "init_weights", "assemble_levels", "LEVEL_OF_ROW"]

# t (expansion), c (channels), n (repeats), s (stride of the first repeat): Sandler et al., Table 2
_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# MobileNetV2's and EfficientNet's seven-row tables share their strides: the level (stage1..stage5,
# strides 2..32) that each row ends in. A level is the last tensor at its resolution.
LEVEL_OF_ROW = (1, 2, 3, 4, 4, 5, 5)


def assemble_levels(model: StagedBackbone, stem: nn.Module, rows: Sequence[tuple[str, nn.Module, int, int]],
                    conv_head: ConvNormAct, out_features: Iterable[str] | None) -> None:
    """Group the stem, seven (name, blocks, channels, stride) rows and the 1x1 head conv into levels stage1..stage5."""
    if len(rows) != len(LEVEL_OF_ROW):
        raise ValueError(f"expected {len(LEVEL_OF_ROW)} rows of blocks, got {len(rows)}")
    groups: dict[int, list[tuple[str, nn.Module]]] = {k: [] for k in range(1, 6)}
    groups[1].append(("stem", stem))
    info: dict[int, tuple[int, int]] = {}
    for (name, blocks, channels, stride), level in zip(rows, LEVEL_OF_ROW):
        groups[level].append((name, blocks))
        info[level] = (channels, stride)
    groups[5].append(("conv_head", conv_head))
    info[5] = (conv_head.out_channels, info[5][1])
    for k, children in groups.items():
        model.stages[f"stage{k}"] = nn.Sequential(OrderedDict(children))
    init_weights(model)
    model._finish([(f"stage{k}", f"stage{k}", *info[k]) for k in groups], out_features)


class MobileNetV2(StagedBackbone):
    """MobileNetV2 as five stages ``stage1..stage5`` (strides 2..32); ``width_mult`` scales every width.

    Stage k holds the rows of Table 2 that end at stride 2^k; stage1 starts with the stem
    convolution and stage5 ends with the 1x1 convolution to 1280 channels.
    """

    spec = BackboneSpec(supported_output_strides=SUPPORTED_OUTPUT_STRIDES)
    first_conv = "stages.stage1.stem.conv.weight"
    head_prefixes = ("classifier.",)

    def __init__(
        self,
        *,
        in_chans: int = 3,
        out_features: Iterable[str] | None = None,
        output_stride: int = 32,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"mobilenet_v2: width_mult must be positive, got {width_mult!r}")
        self.output_stride = output_stride
        self.dropout = dropout
        stem_channels = make_divisible(32 * width_mult, round_nearest)
        # the last layer never narrows below 1280 (Sec. 5.1: "except for the very last layer")
        last_channels = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        strides = [2] + [s if i == 0 else 1 for _, _, n, s in _SETTING for i in range(n)]
        plan = iter(dilation_plan(strides, output_stride))
        stem_stride, _ = next(plan)

        stem = ConvNormAct(in_chans, stem_channels, 3, stem_stride, act="relu6")
        rows: list[tuple[str, nn.Module, int, int]] = []
        channels, total_stride = stem_channels, stem_stride
        for row, (t, c, n, s) in enumerate(_SETTING, start=1):
            out_channels = make_divisible(c * width_mult, round_nearest)
            blocks = []
            for i in range(n):
                stride, dilation = next(plan)
                total_stride *= stride
                blocks.append(InvertedResidual(
                    channels, out_channels, expand_channels=int(round(channels * t)),
                    residual=(s if i == 0 else 1) == 1 and channels == out_channels,
                    stride=stride, dilation=dilation,
                ))
                channels = out_channels
            rows.append((f"ir{row}", nn.Sequential(*blocks), out_channels, total_stride))
        conv_head = ConvNormAct(channels, last_channels, 1, act="relu6")
        assemble_levels(self, stem, rows, conv_head, out_features)

    def build_head(self, num_classes: int, dropout: float | None = None) -> nn.Module:
        """Global average pooling, dropout (0.2 by default, as torchvision) and a linear layer."""
        head = super().build_head(num_classes, dropout=self.dropout if dropout is None else dropout)
        nn.init.normal_(head.fc.weight, 0, 0.01)  # torchvision's initialisation of the classifier
        nn.init.zeros_(head.fc.bias)
        return head

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's flat ``features.N`` layout to ours (rows of Table 2 grouped into five stages)."""
        where: dict[int, str] = {}
        index = 1
        for row, (_, _, n, _) in enumerate(_SETTING, start=1):
            for b in range(n):
                where[index] = f"stages.stage{LEVEL_OF_ROW[row - 1]}.ir{row}.{b}"
                index += 1
        plain = {0: "stages.stage1.stem", index: "stages.stage5.conv_head"}
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            m = re.fullmatch(r"features\.(\d+)\.(.*)", k)
            i = int(m.group(1)) if m else -1
            if k.startswith("classifier."):  # Dropout, Linear
                out["head.fc." + k.split(".", 2)[2]] = v
            elif i in plain:
                out[f"backbone.{plain[i]}.{map_block_key(m.group(2), ('conv', 'bn'))}"] = v
            elif i in where and m.group(2).startswith("conv."):
                expands = any(key.startswith(f"features.{i}.conv.3.") for key in state_dict)
                parts = _MBV2_PARTS if expands else _MBV2_PARTS[1:]
                out[f"backbone.{where[i]}.{map_block_key(m.group(2)[len('conv.'):], parts)}"] = v
            else:
                out["backbone." + k] = v  # unknown: left for the loader to report
        return out


_CNA = {"0": "conv", "1": "bn"}
# torchvision's block Sequential, position by position; '*' marks a Conv2dNormActivation (conv, bn[, act])
_MBV2_PARTS = ("expand*", "dw*", "project.conv", "project.bn")


def map_block_key(body: str, parts: Sequence[str]) -> str:
    """A key inside a torchvision Sequential ('2.0.weight') to ours ('project.conv.weight') given its parts."""
    idx, tail = body.split(".", 1)
    part = parts[int(idx)]
    if part.endswith("*"):
        sub, tail = tail.split(".", 1)
        part = f"{part[:-1]}.{_CNA[sub]}"
    return f"{part}.{tail}"


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation of MobileNetV2 and EfficientNet: Kaiming (fan out) convolutions, unit BN."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


register_backbone(
    "mobilenet_v2",
    family="mobilenet",
    paper="Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks, CVPR 2018",
    reference="torchvision:mobilenet_v2",
    input_size=224,
)(MobileNetV2)
