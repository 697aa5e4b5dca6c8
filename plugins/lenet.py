"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, Proc. IEEE 1998), the 32x32 digit recogniser.

C1 (5x5 convolution, 6 maps) - S2 (2x2 subsampling) - C3 (5x5, 16 maps) - S4 (2x2) - C5 (5x5,
120 maps: a convolution, so larger inputs still work) - F6 (84 units) - output. Simplifications of
the paper, all common practice:
- C3 connects every S2 map to every C3 map (the paper's Table I connects each C3 map to 3, 4 or 6
  of them, to break symmetry and save parameters: 1,516 weights instead of 2,416);
- S2/S4 are plain 2x2 average pools (the paper scales the average by a trainable coefficient, adds
  a trainable bias and squashes it: 12 and 32 parameters);
- the activation is plain tanh (the paper's is 1.7159 tanh(2a/3)); ``act="relu"`` is offered;
- the output layer is linear (the paper's Euclidean RBF units compare F6 with fixed bitmaps).

Levels: ``s2`` (6 maps), ``s4`` (16 maps) and ``c5`` (120 maps). The convolutions do not pad, so at
the native 32x32 input the maps are 14, 5 and 1 pixels wide: the declared strides are the
reductions at that size rounded to powers of two (2, 8, 32), not the sampling steps (2, 4, 4),
because heads read a level's stride as input size over map size.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

from torch import Tensor, nn

from cvtasks.backbone import StagedBackbone
from cvtasks.layers import ConvNormAct, get_act_layer
from cvtasks.registry import register_backbone
from cvtasks.layers import min_input_side

__all__ = ["LeNet5", "LeNetHead"]

_PAPER = "LeCun, Bottou, Bengio & Haffner, Gradient-Based Learning Applied to Document Recognition, Proc. IEEE 1998"


class LeNetHead(nn.Sequential):
    """F6 (84 units, activated) and the output layer, on C5's 120 maps (averaged when wider than 1x1)."""

    def __init__(
        self,
        feature: str,
        in_channels: int,
        num_classes: int,
        hidden: int = 84,
        act: str | Callable[..., nn.Module] = "tanh",
        dropout: float = 0.0,
    ) -> None:
        layers: list[tuple[str, nn.Module]] = [
            # a no-op at the native 32x32 input (C5 is 1x1), a global average above it
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten(1)),
            ("f6", nn.Linear(in_channels, hidden)),
            ("act", get_act_layer(act)()),
        ]
        if dropout > 0:  # not in the paper; offered for the classification task's option
            layers.append(("drop", nn.Dropout(dropout)))
        layers.append(("output", nn.Linear(hidden, num_classes)))
        super().__init__(OrderedDict(layers))
        self.feature = feature

    def forward(self, feats: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        """Logits from the level ``self.feature`` of a backbone's features dict."""
        x = feats[self.feature]
        for layer in self:
            x = layer(x)
        return x


class LeNet5(StagedBackbone):
    """LeNet-5's feature extractor: C1, S2, C3, S4, C5 (see the module docstring for the simplifications)."""

    first_conv = "stages.c1.conv.weight"

    def __init__(
        self,
        *,
        in_chans: int = 3,
        out_features: Iterable[str] | None = None,
        output_stride: int = 32,
        act: str | Callable[..., nn.Module] = "tanh",
    ) -> None:
        super().__init__()
        get_act_layer(act)  # an unknown name fails here, naming the valid ones
        self.act = act

        def conv(cin: int, cout: int) -> ConvNormAct:
            return ConvNormAct(cin, cout, 5, padding=0, norm=None, act=act, bias=True)

        self.stages["c1"] = conv(in_chans, 6)
        self.stages["s2"] = nn.AvgPool2d(2)
        self.stages["c3"] = conv(6, 16)  # full connection table (the paper's Table I is sparse)
        self.stages["s4"] = nn.AvgPool2d(2)
        self.stages["c5"] = conv(16, 120)
        self._finish([("s2", "s2", 6, 2), ("s4", "s4", 16, 8), ("c5", "c5", 120, 32)], out_features)
        self.min_side = min_input_side(self.stages)

    def build_head(self, num_classes: int, dropout: float = 0.0) -> nn.Module:
        """F6 (84 units) and the output layer, as the paper (linear instead of RBF outputs)."""
        last = self.feature_info[-1]
        if last.name != "c5":
            raise ValueError(
                f"LeNet-5's classifier reads c5, but this backbone was built with out_features "
                f"{self.feature_names}; build it with out_features=None to classify"
            )
        return LeNetHead(last.name, last.channels, num_classes, act=self.act, dropout=dropout)


register_backbone(
    "lenet5", family="lenet", paper=_PAPER, reference="", input_size=32,
    published_params="60,000 (paper, section II.B; grey input): here +900 full C3, +850 linear output, -44 plain pools, +300 RGB",
    num_classes=10,
)(LeNet5)
