"""VGG-11/13/16/19, with and without batch norm (Simonyan & Zisserman, ICLR 2015).

The configurations are the paper's Table 1 columns A, B, D and E: five blocks of 3x3 convolutions,
each closed by a 2x2 max pool. Config C (1x1 convolutions in the last three blocks) is left out
because it has no reference implementation to check against. Each block's pool output is a
feature level (``pool1``..``pool5``, strides 2..32), which is what FCN and the max-unpooling
decoder read; ``forward_with_pool_indices`` also returns the max-pool indices for the latter.

The classifier head (``FullyConnectedHead``) is the fc6-fc7-fc8 stack that AlexNet shares.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvtasks.backbone import BackboneSpec, StagedBackbone
from cvtasks.layers import ConvNormAct, check_input_side, min_input_side
from cvtasks.registry import register_backbone

__all__ = ["VGG", "FullyConnectedHead", "VGG_CONFIGS"]

_PAPER = "Simonyan & Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition, ICLR 2015"

#: Table 1 of the paper: the output channels of every 3x3 convolution, block by block.
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

_DEPTHS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}

#: torchvision's classifier indices of the three linear layers (Linear, ReLU, Dropout, Linear, ...)
_TV_FC = {0: "fc6", 3: "fc7", 6: "fc8"}


class FullyConnectedHead(nn.Sequential):
    """AlexNet's and VGG's classifier: adaptive average pooling to a fixed grid, then fc6, fc7, fc8.

    The pooling makes the 4096-wide fc6 accept any input size (torchvision's choice; the papers
    fix the input at 224). ``dropout_first`` puts dropout before fc6 and fc7 (AlexNet as torchvision
    builds it) instead of after the fc6 and fc7 activations (VGG).
    """

    def __init__(
        self,
        feature: str,
        in_channels: int,
        num_classes: int,
        pool_size: int,
        hidden: int = 4096,
        dropout: float = 0.5,
        dropout_first: bool = False,
    ) -> None:
        dims = (in_channels * pool_size * pool_size, hidden, hidden, num_classes)
        layers: list[tuple[str, nn.Module]] = [
            ("pool", nn.AdaptiveAvgPool2d((pool_size, pool_size))),
            ("flatten", nn.Flatten(1)),
        ]
        for i, n in enumerate((6, 7, 8)):
            hidden_layer = n < 8
            if hidden_layer and dropout_first:
                layers.append((f"drop{n}", nn.Dropout(dropout)))
            layers.append((f"fc{n}", nn.Linear(dims[i], dims[i + 1])))
            if hidden_layer:
                layers.append((f"relu{n}", nn.ReLU(inplace=True)))
                if not dropout_first:
                    layers.append((f"drop{n}", nn.Dropout(dropout)))
        super().__init__(OrderedDict(layers))
        self.feature = feature

    def forward(self, feats: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        """Logits from the level ``self.feature`` of a backbone's features dict."""
        x = feats[self.feature]
        for layer in self:
            x = layer(x)
        return x


def _torchvision_layer_names(config: str, batch_norm: bool) -> Iterator[tuple[int, str]]:
    """Pairs (index in torchvision's ``features``, our module path) for every conv and batch norm."""
    index = 0
    for b, widths in enumerate(VGG_CONFIGS[config], start=1):
        for c in range(1, len(widths) + 1):
            yield index, f"stages.block{b}.conv{c}.conv"
            index += 1
            if batch_norm:
                yield index, f"stages.block{b}.conv{c}.bn"
                index += 1
            index += 1  # ReLU
        index += 1  # MaxPool2d


class VGG(StagedBackbone):
    """VGG: five blocks of 3x3 convolutions (+ batch norm) and ReLU, each ending in a 2x2 max pool.

    Levels ``pool1``..``pool5`` are the pool outputs (strides 2, 4, 8, 16, 32). VGG is not
    dilated here: ``output_stride`` must be 32. It exposes its max-pool indices (SegNet's unpooling).
    """

    #: the max-unpooling decoder (SegNet) may call ``forward_with_pool_indices``; pool5 is 1x1 at 32px
    spec = BackboneSpec(exposes_pool_indices=True)
    first_conv = "stages.block1.conv1.conv.weight"
    head_prefixes = ("classifier.",)

    def __init__(
        self,
        *,
        config: str = "D",
        batch_norm: bool = False,
        in_chans: int = 3,
        out_features: Iterable[str] | None = None,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ValueError(f"unknown VGG config {config!r}; choose one of {sorted(VGG_CONFIGS)} (the paper's Table 1)")
        self.config, self.batch_norm = config, batch_norm
        levels = []
        channels, stride = in_chans, 1
        for b, widths in enumerate(VGG_CONFIGS[config], start=1):
            block: list[tuple[str, nn.Module]] = []
            for c, width in enumerate(widths, start=1):
                # bias=True even with batch norm: torchvision's VGG-BN keeps the conv bias
                conv = ConvNormAct(channels, width, 3, norm="bn" if batch_norm else None, act="relu", bias=True)
                block.append((f"conv{c}", conv))
                channels = width
            block.append(("pool", nn.MaxPool2d(kernel_size=2, stride=2)))
            stride *= 2
            self.stages[f"block{b}"] = nn.Sequential(OrderedDict(block))
            levels.append((f"block{b}", f"pool{b}", channels, stride))
        self._pool_levels = {stage: name for stage, name, _, _ in levels}
        self._finish(levels, out_features)
        self.min_side = min_input_side(self.stages)
        self._init_weights()

    def _init_weights(self) -> None:
        """He initialisation for the convolutions, as torchvision does (the paper pre-trained config A instead)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_with_pool_indices(
        self, x: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, torch.Size]]]:
        """Features, plus for every pool that ran its indices and the size of its input.

        ``F.max_unpool2d(y, indices, 2, 2, output_size=size)`` puts ``y`` back where the maxima
        were (SegNet, Badrinarayanan et al., 2017). The indices dict has every built pool, even
        levels left out of ``out_features``.
        """
        check_input_side(self.net_name, x, self.min_side)
        feats: dict[str, Tensor] = OrderedDict()
        indices: dict[str, tuple[Tensor, torch.Size]] = OrderedDict()
        for stage_name, stage in self.stages.items():
            *convs, pool = stage
            for layer in convs:
                x = layer(x)
            size = x.shape
            x, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, return_indices=True)
            level = self._pool_levels[stage_name]
            indices[level] = (idx, size)
            if stage_name in self._level_of_stage:
                feats[level] = x
        return feats, indices

    def build_head(self, num_classes: int, dropout: float = 0.5) -> nn.Module:
        """torchvision's VGG classifier: 7x7 adaptive average pool, fc6 4096, fc7 4096, fc8, dropout after fc6/fc7."""
        last = self.feature_info[-1]
        if last.name != "pool5":
            raise ValueError(
                f"VGG's classifier reads pool5, but this backbone was built with out_features "
                f"{self.feature_names}; build it with out_features=None to classify"
            )
        return FullyConnectedHead(last.name, last.channels, num_classes, pool_size=7, dropout=dropout)

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map torchvision's ``features.N.*`` / ``classifier.N.*`` keys to ours (the variant is read off the file)."""
        conv_idx = {int(k.split(".")[1]) for k, v in state_dict.items() if k.startswith("features.") and v.dim() == 4}
        by_count = {sum(len(b) for b in blocks): name for name, blocks in VGG_CONFIGS.items()}
        config = by_count.get(len(conv_idx))
        if config is None:
            raise ValueError(
                f"the state_dict has {len(conv_idx)} convolutions under 'features.'; torchvision's VGG "
                f"configs have {sorted(by_count)}. Is it a torchvision VGG state_dict?"
            )
        batch_norm = any(k.startswith("features.") and k.endswith("running_mean") for k in state_dict)
        ours = dict(_torchvision_layer_names(config, batch_norm))
        out: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            part, index, rest = key.split(".", 2)
            table = ours if part == "features" else _TV_FC if part == "classifier" else None
            if table is None or int(index) not in table:
                raise ValueError(f"unexpected key {key!r} for a torchvision VGG-{config} state_dict")
            out[("backbone." if part == "features" else "head.") + f"{table[int(index)]}.{rest}"] = value
        return out


for _name, _config in _DEPTHS.items():
    for _bn in (False, True):
        register_backbone(
            _name + ("_bn" if _bn else ""),
            family="vgg",
            paper=_PAPER,
            reference="torchvision:" + _name + ("_bn" if _bn else ""),
            input_size=224,
            config=_config,
            batch_norm=_bn,
        )(VGG)
