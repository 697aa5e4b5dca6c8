"""EfficientNet-B0..B7: one searched base net grown by compound scaling (Tan & Le, ICML 2019).

B0 is a table of MBConv stages (MobileNetV2's inverted residual with squeeze-and-excitation and
SiLU). B1..B7 are *not* separate tables: depth, width and resolution grow together (Sec. 3.3,
d = alpha^phi, w = beta^phi, r = gamma^phi; the released variants round these coefficients), and
``scale_stages`` applies them in code to the one B0 table: channels times the width coefficient
rounded to a multiple of 8, repeats times the depth coefficient rounded up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Mapping

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
from plugins.mobilenet import LEVEL_OF_ROW, assemble_levels, map_block_key

__all__ = ["EfficientNet", "StageSpec", "scale_stages", "VARIANTS"]


@dataclass(frozen=True)
class StageSpec:
    """One row of the MBConv table: expansion ratio, kernel, stride, channels in/out, repeats."""

    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int


# EfficientNet-B0 (Tan & Le, Table 1, stages 2-8): expand, kernel, stride, in, out, repeats
_B0 = (
    StageSpec(1, 3, 1, 32, 16, 1),
    StageSpec(6, 3, 2, 16, 24, 2),
    StageSpec(6, 5, 2, 24, 40, 2),
    StageSpec(6, 3, 2, 40, 80, 3),
    StageSpec(6, 5, 1, 80, 112, 3),
    StageSpec(6, 5, 2, 112, 192, 4),
    StageSpec(6, 3, 1, 192, 320, 1),
)


def scale_stages(width: float, depth: float, base: tuple[StageSpec, ...] = _B0) -> list[StageSpec]:
    """Compound scaling of the B0 table: widths x ``width`` rounded to 8, repeats x ``depth`` rounded up."""
    return [
        StageSpec(
            s.expand_ratio, s.kernel, s.stride,
            make_divisible(s.in_channels * width, 8), make_divisible(s.out_channels * width, 8),
            int(math.ceil(s.repeats * depth)),
        )
        for s in base
    ]


# width, depth and resolution coefficients and dropout per variant (Tan & Le's released configs).
# torchvision's B5-B7 use TensorFlow's batch-norm settings (eps 1e-3, momentum 0.01), B0-B4 PyTorch's.
_COEFFS = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}
_TF_BN = ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7")
VARIANTS: dict[str, dict[str, float]] = {
    name: dict(width_mult=w, depth_mult=d, dropout=p,
               norm_eps=1e-3 if name in _TF_BN else 1e-5, norm_momentum=0.01 if name in _TF_BN else 0.1)
    for name, (w, d, _, p) in _COEFFS.items()
}


class EfficientNet(StagedBackbone):
    """EfficientNet as five levels ``stage1..stage5`` (strides 2..32) over the scaled MBConv table.

    stage1 holds the stem and MBConv row 1, stage5 rows 6-7 and the 1x1 convolution to 4x the
    last width. Stochastic depth grows linearly to ``stochastic_depth_prob`` over the blocks (training only).
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
        depth_mult: float = 1.0,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
        norm_eps: float = 1e-5,
        norm_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if width_mult <= 0 or depth_mult <= 0:
            raise ValueError(
                f"efficientnet: width_mult and depth_mult must be positive, got {width_mult}, {depth_mult}"
            )
        if not 0 <= stochastic_depth_prob < 1:
            raise ValueError(f"efficientnet: stochastic_depth_prob must be in [0, 1), got {stochastic_depth_prob}")
        self.output_stride = output_stride
        self.dropout = dropout
        norm = partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum)
        stages = scale_stages(width_mult, depth_mult)
        total_blocks = sum(s.repeats for s in stages)
        strides = [2] + [s.stride if i == 0 else 1 for s in stages for i in range(s.repeats)]
        plan = iter(dilation_plan(strides, output_stride))
        stem_stride, _ = next(plan)

        stem = ConvNormAct(in_chans, stages[0].in_channels, 3, stem_stride, norm=norm, act="silu")
        rows: list[tuple[str, nn.Module, int, int]] = []
        total_stride, block_id = stem_stride, 0
        for row, spec in enumerate(stages, start=1):
            blocks = []
            for i in range(spec.repeats):
                stride, dilation = next(plan)
                total_stride *= stride
                cin = spec.in_channels if i == 0 else spec.out_channels
                blocks.append(InvertedResidual(
                    cin, spec.out_channels,
                    expand_channels=make_divisible(cin * spec.expand_ratio, 8),
                    residual=(spec.stride if i == 0 else 1) == 1 and cin == spec.out_channels,
                    kernel_size=spec.kernel, stride=stride, dilation=dilation, act="silu",
                    se_channels=max(1, cin // 4),  # SE squeezes to a quarter of the block's *input*
                    drop_path=stochastic_depth_prob * block_id / total_blocks, norm=norm,
                ))
                block_id += 1
            rows.append((f"mbconv{row}", nn.Sequential(*blocks), spec.out_channels, total_stride))
        conv_head = ConvNormAct(stages[-1].out_channels, 4 * stages[-1].out_channels, 1, norm=norm, act="silu")
        assemble_levels(self, stem, rows, conv_head, out_features)

    def build_head(self, num_classes: int, dropout: float | None = None) -> nn.Module:
        """Global average pooling, the variant's dropout and a linear layer, as the paper's classifier."""
        head = super().build_head(num_classes, dropout=self.dropout if dropout is None else dropout)
        init_range = 1.0 / math.sqrt(num_classes)  # torchvision's uniform init of the classifier
        nn.init.uniform_(head.fc.weight, -init_range, init_range)
        nn.init.zeros_(head.fc.bias)
        return head

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's ``features.{row}.{block}.block.{i}`` layout to ours (rows grouped into five levels)."""
        rows = {int(k.split(".")[1]) for k in state_dict if k.startswith("features.")}
        last = max(rows, default=0)
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            m = re.fullmatch(r"features\.(\d+)\.(.*)", k)
            row = int(m.group(1)) if m else -1
            if k.startswith("classifier."):  # Dropout, Linear
                out["head.fc." + k.split(".", 2)[2]] = v
            elif row == 0:
                out[f"backbone.stages.stage1.stem.{map_block_key(m.group(2), ('conv', 'bn'))}"] = v
            elif row == last:
                out[f"backbone.stages.stage5.conv_head.{map_block_key(m.group(2), ('conv', 'bn'))}"] = v
            elif 1 <= row <= len(LEVEL_OF_ROW) and (b := re.fullmatch(r"(\d+)\.block\.(.*)", m.group(2))):
                expands = any(key.startswith(f"features.{row}.{b.group(1)}.block.3.") for key in state_dict)
                parts = _MBCONV_PARTS if expands else _MBCONV_PARTS[1:]
                ours = f"stages.stage{LEVEL_OF_ROW[row - 1]}.mbconv{row}.{b.group(1)}"
                out[f"backbone.{ours}.{map_block_key(b.group(2), parts)}"] = v
            else:
                out["backbone." + k] = v  # unknown: left for the loader to report
        return out


# torchvision's MBConv Sequential, position by position ('*': a Conv2dNormActivation)
_MBCONV_PARTS = ("expand*", "dw*", "se", "project*")

for _name, _cfg in VARIANTS.items():
    register_backbone(
        _name,
        family="efficientnet",
        paper="Tan & Le, EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks, ICML 2019",
        reference=f"torchvision:{_name}",
        input_size=_COEFFS[_name][2],
        **_cfg,
    )(EfficientNet)
