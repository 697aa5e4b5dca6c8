"""Xception: depthwise separable convolutions all the way (Chollet, CVPR 2017).

"Extreme Inception": if cross-channel and spatial correlations can be mapped separately, an
Inception module becomes a depthwise convolution followed by a pointwise one (no non-linearity
between them, Sec. 4.7 found it better). 36 such convolutions form 14 residual modules in three
flows (Fig. 5): entry (downsampling to stride 16), middle (eight identical modules at 728
channels), exit (down to stride 32, then separable convolutions to 1536 and 2048 channels).

Levels: ``stem`` (stride 2), ``entry1`` and ``entry2`` (the first two entry modules, strides 4 and
8), ``middle`` (the third entry module and the middle flow, stride 16) and ``exit`` (stride 32).
A level is the module's output (the residual sum; timm's features tap the ReLU that the next
module applies to it). ``output_stride`` 8 or 16 turn the last strides into dilation, as
DeepLabV3+ does with its Xception (Chen et al. 2018).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Iterable, Mapping

from torch import Tensor, nn

from cvtasks.backbone import INCEPTION_MEAN, INCEPTION_STD, BackboneSpec, StagedBackbone
from cvtasks.layers import SUPPORTED_OUTPUT_STRIDES, DepthwiseSeparableConv, dilation_plan
from cvtasks.registry import register_backbone

__all__ = ["Xception", "XceptionBlock", "separable_conv"]


def separable_conv(in_channels: int, out_channels: int, dilation: int = 1) -> DepthwiseSeparableConv:
    """3x3 depthwise, 1x1 pointwise, batch norm: no norm or activation between the two (Sec. 4.7)."""
    return DepthwiseSeparableConv(in_channels, out_channels, 3, dilation=dilation, act=None, act_between=False)


class XceptionBlock(nn.Module):
    """``reps`` x (ReLU, separable conv + BN), then 3x3 max pooling when strided, plus a (1x1 projected) shortcut.

    ``grow_first``: the first convolution widens to ``out_channels`` (entry and middle flows);
    otherwise the last one does (the exit module). A module without ``start_with_relu`` follows
    the stem's ReLU directly. ``stride`` is the natural stride; ``pool_stride`` the one used (1
    when dilation replaces it, keeping the layout of the weights).
    """

    def __init__(self, in_channels: int, out_channels: int, reps: int, stride: int = 1, *,
                 start_with_relu: bool = True, grow_first: bool = True, dilation: int = 1,
                 pool_stride: int | None = None) -> None:
        super().__init__()
        pool_stride = stride if pool_stride is None else pool_stride
        if out_channels != in_channels or stride != 1:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=pool_stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_channels)
        else:
            self.skip = None
        widths = [in_channels] + ([out_channels] * reps if grow_first else [in_channels] * (reps - 1) + [out_channels])
        layers: list[tuple[str, nn.Module]] = []
        for i in range(reps):
            if i or start_with_relu:
                # not in place on the module's input: the shortcut still needs it
                layers.append((f"act{i + 1}", nn.ReLU(inplace=i > 0)))
            layers.append((f"sep{i + 1}", separable_conv(widths[i], widths[i + 1], dilation)))
        if stride != 1:
            # kept undilated when its stride goes: torch cannot pad a dilated pooling window to 'same' size
            layers.append(("pool", nn.MaxPool2d(3, pool_stride, padding=1)))
        self.rep = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        out = self.rep(x)
        out += x if self.skip is None else self.skipbn(self.skip(x))
        return out


# modules of Fig. 5: (in, out, separable convs, stride, start_with_relu, grow_first, level)
_BLOCKS = (
    (64, 128, 2, 2, False, True, "entry1"),
    (128, 256, 2, 2, True, True, "entry2"),
    (256, 728, 2, 2, True, True, "middle"),
    *[(728, 728, 3, 1, True, True, "middle")] * 8,
    (728, 1024, 2, 2, True, False, "exit"),
)


class Xception(StagedBackbone):
    """Xception (timm's ``legacy_xception`` layout) as five levels: stem, entry1, entry2, middle, exit."""

    # the Keras weights timm ports expect inputs in [-1, 1]
    spec = BackboneSpec(supported_output_strides=SUPPORTED_OUTPUT_STRIDES, mean=INCEPTION_MEAN, std=INCEPTION_STD)
    first_conv = "stages.stem.conv1.weight"
    head_prefixes = ("fc.",)

    def __init__(self, *, in_chans: int = 3, out_features: Iterable[str] | None = None,
                 output_stride: int = 32) -> None:
        super().__init__()
        self.output_stride = output_stride
        # the stem's convolutions are unpadded, as in the Keras original
        self.stages["stem"] = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_chans, 32, 3, 2, 0, bias=False),
            bn1=nn.BatchNorm2d(32),
            act1=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(32, 64, 3, bias=False),
            bn2=nn.BatchNorm2d(64),
            act2=nn.ReLU(inplace=True),
        ))
        # one (stride, dilation) for the stem, each module, and the exit flow's last convolutions
        plan = dilation_plan([2] + [b[3] for b in _BLOCKS] + [1], output_stride)
        levels = [("stem", "stem", 64, 2)]
        stage: list[tuple[str, nn.Module]] = []
        total_stride = 2
        for i, ((cin, cout, reps, stride, relu_first, grow_first, level), (used, dilation)) in enumerate(
            zip(_BLOCKS, plan[1:-1]), start=1
        ):
            stage.append((f"block{i}", XceptionBlock(cin, cout, reps, stride, start_with_relu=relu_first,
                                                     grow_first=grow_first, dilation=dilation, pool_stride=used)))
            total_stride *= used
            if i == len(_BLOCKS) or _BLOCKS[i][-1] != level:
                levels.append((level, level, cout, total_stride))
                self.stages[level] = nn.Sequential(OrderedDict(stage))
                stage = []
        exit_dilation = plan[-1][1]
        exit_stage = self.stages["exit"]
        exit_stage.add_module("conv3", separable_conv(1024, 1536, exit_dilation))
        exit_stage.add_module("act3", nn.ReLU(inplace=True))
        exit_stage.add_module("conv4", separable_conv(1536, 2048, exit_dilation))
        exit_stage.add_module("act4", nn.ReLU(inplace=True))
        levels[-1] = ("exit", "exit", 2048, total_stride)
        for m in self.modules():  # timm's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._finish(levels, out_features)

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """timm's flat layout (conv1, block1..block12, conv3/bn3, conv4/bn4, fc) to our five stages."""
        stage_of = {i: level for i, (*_, level) in enumerate(_BLOCKS, start=1)}
        sep = {"conv1": "depthwise", "pointwise": "pointwise"}
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            if k.startswith("fc."):
                out["head." + k] = v
            elif re.fullmatch(r"(?:conv|bn)[12]\..*", k):
                out[f"backbone.stages.stem.{k}"] = v
            elif m := re.fullmatch(r"conv([34])\.(conv1|pointwise)\.(.*)", k):
                out[f"backbone.stages.exit.conv{m.group(1)}.{sep[m.group(2)]}.{m.group(3)}"] = v
            elif m := re.fullmatch(r"bn([34])\.(.*)", k):
                out[f"backbone.stages.exit.conv{m.group(1)}.bn_pw.{m.group(2)}"] = v
            elif (m := re.fullmatch(r"block(\d+)\.(.*)", k)) and int(m.group(1)) in stage_of:
                b, rest = int(m.group(1)), m.group(2)
                ours = f"backbone.stages.{stage_of[b]}.block{b}"
                if r := re.fullmatch(r"rep\.(\d+)\.(.*)", rest):
                    # timm's rep: [ReLU], SeparableConv2d, BatchNorm2d, ReLU, ... : three per conv
                    j = int(r.group(1)) - (1 if _BLOCKS[b - 1][4] else 0)
                    n, kind = divmod(j, 3)
                    tail = r.group(2)
                    if kind == 0:
                        name, tail = tail.split(".", 1)
                        out[f"{ours}.rep.sep{n + 1}.{sep[name]}.{tail}"] = v
                    else:
                        out[f"{ours}.rep.sep{n + 1}.bn_pw.{tail}"] = v
                else:
                    out[f"{ours}.{rest}"] = v  # skip, skipbn
            else:
                out["backbone." + k] = v  # unknown: left for the loader to report
        return out


register_backbone(
    "xception",
    family="xception",
    paper="Chollet, Xception: Deep Learning with Depthwise Separable Convolutions, CVPR 2017",
    reference="timm:legacy_xception",
    input_size=299,
    published_top1=79.0,  # the paper's Table 1: ImageNet, single crop, single model, top-1 0.790
)(Xception)
