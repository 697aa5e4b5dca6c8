"""DenseNet-121/161/169/201: dense connectivity (Huang et al., CVPR 2017).

Inside a dense block every layer receives the concatenation of all earlier feature maps and adds
``growth_rate`` new ones (BN-ReLU-1x1 bottleneck to 4k channels, then BN-ReLU-3x3 to k: the
"DenseNet-BC" of Sec. 3). Transitions between blocks halve the channels (compression 0.5) and
the resolution (2x2 average pooling).

Levels: the output of each dense block (strides 4, 8, 16) and, for the last, the block after the
final batch norm and ReLU (stride 32), as torchvision's classifier sees it. DenseNet does not
dilate: its transitions pool, and pooling-free dense blocks at a finer resolution would multiply
the cost of the ever-growing concatenations, so ``output_stride`` is 32 only.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from cvtasks.backbone import StagedBackbone
from cvtasks.registry import register_backbone

__all__ = ["DenseNet", "DenseLayer", "DenseBlock", "Transition"]


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck to ``bn_size * growth_rate``) then BN-ReLU-Conv3x3 to ``growth_rate`` maps."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.0,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient

    def _bottleneck(self, *features: Tensor) -> Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))

    def forward(self, features: list[Tensor]) -> Tensor:
        if self.memory_efficient and any(f.requires_grad for f in features):
            # recompute the concatenation in the backward pass instead of storing one per layer
            # (Pleiss et al. 2017, "Memory-efficient implementation of DenseNets")
            out = cp.checkpoint(self._bottleneck, *features, use_reentrant=False)
        else:
            out = self._bottleneck(*features)
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers, each fed with the concatenation of the input and all earlier outputs."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int = 4,
                 drop_rate: float = 0.0, memory_efficient: bool = False) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(
                in_channels + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient
            )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 to ``out_channels`` (compression) and 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(OrderedDict(
            norm=nn.BatchNorm2d(in_channels),
            relu=nn.ReLU(inplace=True),
            conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
            pool=nn.AvgPool2d(2, 2),
        ))


class DenseNet(StagedBackbone):
    """DenseNet-BC as a stem and four stages ``block1..block4`` (strides 4, 8, 16, 32).

    Stage k is transition k-1 (for k > 1) followed by dense block k; block4 ends with the final
    batch norm and ReLU. ``memory_efficient`` trades compute for memory by checkpointing.
    """

    first_conv = "stages.stem.conv0.weight"
    head_prefixes = ("classifier.",)

    def __init__(
        self,
        *,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        in_chans: int = 3,
        out_features: Iterable[str] | None = None,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        self.stages["stem"] = nn.Sequential(OrderedDict(
            conv0=nn.Conv2d(in_chans, num_init_features, 7, 2, 3, bias=False),
            norm0=nn.BatchNorm2d(num_init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, 2, 1),
        ))
        channels, stride, levels = num_init_features, 4, []
        for i, num_layers in enumerate(block_config, start=1):
            children: list[tuple[str, nn.Module]] = []
            if i > 1:
                children.append((f"transition{i - 1}", Transition(channels, channels // 2)))
                channels, stride = channels // 2, stride * 2
            block = DenseBlock(num_layers, channels, growth_rate, bn_size, drop_rate, memory_efficient)
            children.append((f"denseblock{i}", block))
            channels = block.out_channels
            if i == len(block_config):
                children += [("norm5", nn.BatchNorm2d(channels)), ("relu5", nn.ReLU(inplace=True))]
            self.stages[f"block{i}"] = nn.Sequential(OrderedDict(children))
            levels.append((f"block{i}", f"block{i}", channels, stride))
        for m in self.modules():  # torchvision's initialisation (from the original Lua Torch code)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._finish(levels, out_features)

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's ``features.*`` keys to our stages (old 'norm.1'-style checkpoint keys too)."""
        blocks = [int(m.group(1)) for k in state_dict if (m := re.match(r"features\.denseblock(\d+)\.", k))]
        last = max(blocks, default=4)
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            # checkpoints from before module names lost their dots say 'norm.1' for 'norm1'
            k = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", k)
            if k.startswith("classifier."):
                out["head.fc." + k[len("classifier."):]] = v
            elif m := re.match(r"features\.(conv0|norm0)\.(.*)", k):
                out[f"backbone.stages.stem.{m.group(1)}.{m.group(2)}"] = v
            elif m := re.match(r"features\.denseblock(\d+)\.(.*)", k):
                out[f"backbone.stages.block{m.group(1)}.denseblock{m.group(1)}.{m.group(2)}"] = v
            elif m := re.match(r"features\.transition(\d+)\.(.*)", k):
                i = int(m.group(1))
                out[f"backbone.stages.block{i + 1}.transition{i}.{m.group(2)}"] = v
            elif m := re.match(r"features\.norm5\.(.*)", k):
                out[f"backbone.stages.block{last}.norm5.{m.group(1)}"] = v
            else:
                out["backbone." + k] = v  # unknown: left for the loader to report
        return out


# growth rate k, layers per dense block, stem width (Huang et al., Table 1; DenseNet-161 is k = 48)
_VARIANTS = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
}

for _name, _cfg in _VARIANTS.items():
    register_backbone(
        _name,
        family="densenet",
        paper="Huang et al., Densely Connected Convolutional Networks, CVPR 2017",
        reference=f"torchvision:{_name}",
        input_size=224,
        **_cfg,
    )(DenseNet)
