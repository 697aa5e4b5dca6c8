"""AlexNet (Krizhevsky, Sutskever & Hinton, NeurIPS 2012), as torchvision builds it, and with the paper's LRN.

torchvision's AlexNet is the single-tower version of Krizhevsky's "One weird trick" paper (2014):
64/192/384/256/256 filters, no local response normalisation. ``alexnet`` is exactly that (checked
against torchvision); ``alexnet_lrn`` adds the paper's local response normalisation after the
ReLU of conv1 and conv2, before their max pools (Section 3.3), and loads the same weights.

Levels are the three overlapping 3x3/2 max pools: ``pool1`` (stride 8: conv1's stride 4 times the
pool's 2), ``pool2`` (16) and ``pool5`` (32). The pools and conv1 do not pad, so the net takes no
input below 63x63 (pool5 is then 1x1), and the declared strides match the maps' sizes within the
conformance checks' tolerance from 95x95 on (pool5 2x2), the spec's ``min_input_size``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping

from torch import Tensor, nn

from cvtasks.backbone import BackboneSpec, StagedBackbone
from cvtasks.layers import ConvNormAct, LocalResponseNorm
from cvtasks.registry import register_backbone
from cvtasks.layers import min_input_side
from plugins.vgg import FullyConnectedHead

__all__ = ["AlexNet"]

_PAPER = "Krizhevsky, Sutskever & Hinton, ImageNet Classification with Deep Convolutional Neural Networks, NeurIPS 2012"

#: torchvision's ``features`` / ``classifier`` indices of the layers holding weights, and ours
_TV_KEYS = {
    "features.0": "backbone.stages.block1.conv1.conv",
    "features.3": "backbone.stages.block2.conv2.conv",
    "features.6": "backbone.stages.block3.conv3.conv",
    "features.8": "backbone.stages.block3.conv4.conv",
    "features.10": "backbone.stages.block3.conv5.conv",
    "classifier.1": "head.fc6",
    "classifier.4": "head.fc7",
    "classifier.6": "head.fc8",
}


class AlexNet(StagedBackbone):
    """AlexNet's five convolutions in three blocks, each block closed by an overlapping 3x3/2 max pool.

    ``lrn=True`` adds local response normalisation after conv1's and conv2's ReLU; ``lrn_size`` is
    the paper's n (channels in the window), ``lrn_k``, ``lrn_alpha``, ``lrn_beta`` its k, alpha, beta.
    No dilated variant: ``output_stride`` must be 32.
    """

    spec = BackboneSpec(min_input_size=95)
    first_conv = "stages.block1.conv1.conv.weight"
    head_prefixes = ("classifier.",)

    def __init__(
        self,
        *,
        in_chans: int = 3,
        out_features: Iterable[str] | None = None,
        output_stride: int = 32,
        lrn: bool = False,
        lrn_size: int = 5,
        lrn_k: float = 2.0,
        lrn_alpha: float = 1e-4,
        lrn_beta: float = 0.75,
    ) -> None:
        super().__init__()
        if lrn and (lrn_size < 1 or lrn_size % 2 == 0):
            raise ValueError(f"lrn_size must be an odd number of channels (the paper's n=5), got {lrn_size}")
        self.lrn = lrn

        def conv(cin: int, cout: int, k: int, stride: int = 1) -> ConvNormAct:
            return ConvNormAct(cin, cout, k, stride, padding=k // 2, norm=None, act="relu", bias=True)

        def norm() -> list[tuple[str, nn.Module]]:
            return [("lrn", LocalResponseNorm((lrn_size - 1) // 2, lrn_alpha, lrn_beta, lrn_k))] if lrn else []

        def pool() -> tuple[str, nn.Module]:
            # overlapping pooling, z=3 s=2 (Section 3.4)
            return ("pool", nn.MaxPool2d(kernel_size=3, stride=2))

        # conv1's padding is 2, not 11 // 2: torchvision's choice (55x55 maps from 224x224)
        self.stages["block1"] = nn.Sequential(
            OrderedDict([("conv1", ConvNormAct(in_chans, 64, 11, 4, padding=2, norm=None, act="relu", bias=True)),
                         *norm(), pool()])
        )
        self.stages["block2"] = nn.Sequential(OrderedDict([("conv2", conv(64, 192, 5)), *norm(), pool()]))
        self.stages["block3"] = nn.Sequential(
            OrderedDict([("conv3", conv(192, 384, 3)), ("conv4", conv(384, 256, 3)), ("conv5", conv(256, 256, 3)), pool()])
        )
        levels = [("block1", "pool1", 64, 8), ("block2", "pool2", 192, 16), ("block3", "pool5", 256, 32)]
        self._finish(levels, out_features)
        self.min_side = min_input_side(self.stages)

    def build_head(self, num_classes: int, dropout: float = 0.5) -> nn.Module:
        """torchvision's AlexNet classifier: 6x6 adaptive average pool, dropout before fc6 and fc7, fc8."""
        last = self.feature_info[-1]
        if last.name != "pool5":
            raise ValueError(
                f"AlexNet's classifier reads pool5, but this backbone was built with out_features "
                f"{self.feature_names}; build it with out_features=None to classify"
            )
        return FullyConnectedHead(last.name, last.channels, num_classes, pool_size=6, dropout=dropout, dropout_first=True)

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map torchvision's ``features.N.*`` / ``classifier.N.*`` keys to ours."""
        out: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            layer, _, param = key.rpartition(".")
            if layer not in _TV_KEYS:
                raise ValueError(f"unexpected key {key!r}: not a torchvision AlexNet state_dict")
            out[f"{_TV_KEYS[layer]}.{param}"] = value
        return out


register_backbone(
    "alexnet", family="alexnet", paper=_PAPER, reference="torchvision:alexnet", input_size=224, lrn=False
)(AlexNet)
# LRN changes the outputs, so there is no reference to compare logits with; torchvision's
# alexnet weights still load (LRN has no parameters). Top-1: the paper's Table 2, one CNN, 40.7%
# top-1 error on the ILSVRC-2012 validation set.
register_backbone(
    "alexnet_lrn", family="alexnet", paper=_PAPER, reference="", input_size=224,
    published_params="60M (paper, section 1: '60 million parameters')", published_top1=59.3, lrn=True
)(AlexNet)
