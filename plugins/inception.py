"""The Inception line: GoogLeNet, Inception-v3, Inception-v4 and Inception-ResNet-v2.

All four nets are chains of conv-BN-ReLU units and *Inception modules*: parallel branches
(1x1, 1x1-3x3, 1x1-3x3-3x3 or factorised 1x7/7x1 stacks, pooling-1x1) whose outputs are
concatenated along channels (Szegedy et al. 2015, fig. 2b). One module, ``Branches``, builds
every such block from a table of branches; ``ResidualBranches`` adds Inception-ResNet's scaled
residual connection (Szegedy et al. 2017, fig. 16). Channel counts and strides of the feature
levels are derived from the modules, never typed twice.

Layouts follow the references (torchvision's ``googlenet`` and ``inception_v3``, timm's
``inception_v4`` and ``inception_resnet_v2``): the same stages under the same names, each block's
branches in the reference's order, BatchNorm with TensorFlow's eps=1e-3. Inside a block ours
nests convolutions by branch where a reference names them flatly, so weights are mapped by
position (``remap_state_dict``): both hold the same tensors in forward order.

None of these nets dilates (their spec supports ``output_stride`` 32 only). Their stems use unpadded
('valid') convolutions and poolings, so map sizes are odd (a 299px input gives 147, 71, 35, 17, 8)
and the declared strides (2, 4, 8, 16, 32) are the nominal reductions.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from cvtasks.backbone import INCEPTION_MEAN, INCEPTION_STD, BackboneSpec, GlobalPoolLinear, StagedBackbone
from cvtasks.layers import ConvNormAct, SpatiallySeparableConv
from cvtasks.registry import register_backbone

__all__ = [
    "Branches",
    "ResidualBranches",
    "InceptionNet",
    "GoogLeNet",
    "InceptionV3",
    "InceptionV4",
    "InceptionResNetV2",
]

# TensorFlow's BatchNorm epsilon, kept by every reference of this line (torchvision and timm)
_bn = partial(nn.BatchNorm2d, eps=1e-3)

Kernel = int | tuple[int, int]
#: one convolution of a chain: (out_channels, kernel[, stride[, padding]]); padding None = 'same'
ConvSpec = tuple[Any, ...]


def cbr(in_channels: int, out_channels: int, kernel: Kernel, stride: int = 1, padding: Kernel | None = None) -> ConvNormAct:
    """Conv-BN-ReLU, the unit of every Inception net; ``padding=None`` keeps the size, 0 is 'valid'."""
    return ConvNormAct(in_channels, out_channels, kernel, stride, padding, norm=_bn)


def chain(in_channels: int, *convs: ConvSpec) -> nn.Sequential:
    """A branch of conv-BN-ReLU units given as (out_channels, kernel[, stride[, padding]]) tuples."""
    layers = []
    for spec in convs:
        layers.append(cbr(in_channels, *spec))
        in_channels = spec[0]
    return nn.Sequential(*layers)


def factorized(in_channels: int, out_channels: int, kernel: int, mid_channels: int | None = None) -> nn.Module:
    """A k x k receptive field as k x 1 then 1 x k convolutions (Szegedy et al. 2016, section 3.2)."""
    return SpatiallySeparableConv(in_channels, out_channels, kernel, mid_channels, norm=_bn)  # type: ignore[arg-type]


def split(in_channels: int, out_channels: int, kernel: int = 3) -> Branches:
    """1 x k and k x 1 convolutions side by side on one input (Inception-v3's expanded bank, fig. 7)."""
    return Branches(
        in_channels,
        a=cbr(in_channels, out_channels, (1, kernel)),
        b=cbr(in_channels, out_channels, (kernel, 1)),
    )


def pool_proj(in_channels: int, out_channels: int, pool: str = "avg", count_include_pad: bool = True) -> nn.Sequential:
    """The pooling branch: 3x3 pooling at stride 1 then a 1x1 projection."""
    if pool == "max":  # GoogLeNet; ceil_mode as in torchvision (same size at stride 1)
        layer: nn.Module = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
    else:  # torchvision's v3 averages over the padding too, timm's v4/IRv2 do not
        layer = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=count_include_pad)
    return nn.Sequential(layer, cbr(in_channels, out_channels, 1))


def max_pool(kernel: int = 3, stride: int = 2, ceil_mode: bool = False) -> nn.MaxPool2d:
    """An unpadded max pooling (the papers' 'valid' reduction, or GoogLeNet's ceil-mode one)."""
    return nn.MaxPool2d(kernel, stride=stride, ceil_mode=ceil_mode)


def out_channels_of(module: nn.Module, in_channels: int) -> int:
    """Channels that ``module`` produces from ``in_channels`` (pooling keeps them)."""
    if isinstance(module, Branches):
        return module.out_channels
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Sequential):
        for child in module:
            in_channels = out_channels_of(child, in_channels)
    return in_channels


def stride_of(module: nn.Module) -> int:
    """The spatial reduction of ``module`` (branches of a block share it)."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        s = module.stride
        return int(s[0] if isinstance(s, tuple) else s)
    if isinstance(module, Branches):
        return stride_of(module.branch(0))
    return math.prod(stride_of(child) for child in module.children())


class Branches(nn.Module):
    """Parallel branches applied to one input, outputs concatenated along channels (an Inception module).

    Branches are children under the given names, in the given order (the order of the output
    channels). ``out_channels`` is derived from them.
    """

    def __init__(self, in_channels: int, **branches: nn.Module) -> None:
        super().__init__()
        if not branches:
            raise ValueError("Branches needs at least one branch")
        for name, branch in branches.items():
            self.add_module(name, branch)
        self.branch_names = tuple(branches)
        self.in_channels = in_channels
        self.out_channels = sum(out_channels_of(b, in_channels) for b in branches.values())

    def branch(self, index: int) -> nn.Module:
        """The branch at position ``index``."""
        return self._modules[self.branch_names[index]]  # type: ignore[return-value]

    def concat(self, x: Tensor) -> Tensor:
        """Every branch on ``x``, concatenated."""
        return torch.cat([self._modules[n](x) for n in self.branch_names], 1)  # type: ignore[misc]

    def forward(self, x: Tensor) -> Tensor:
        return self.concat(x)


class ResidualBranches(Branches):
    """Inception-ResNet block: branches concatenated, a 1x1 linear projection, scaled, added to the input.

    Scaling the residual by 0.1-0.3 keeps very wide residual nets from dying early in training
    (Szegedy et al. 2017, section 3.3); the last block of the net has no ReLU.
    """

    def __init__(self, in_channels: int, scale: float, relu: bool = True, **branches: nn.Module) -> None:
        super().__init__(in_channels, **branches)
        self.conv2d = nn.Conv2d(self.out_channels, in_channels, 1)  # with bias, no BN (as in the reference)
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.scale = scale
        self.out_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        # the sum is a fresh tensor, so the in-place ReLU is safe
        return self.act(torch.add(x, self.conv2d(self.concat(x)), alpha=self.scale))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


Layout = list[tuple[str, nn.Module]]

# The valid-padded nets (v3, v4, Inception-ResNet-v2) take inputs from 75px (``smallest_input``,
# their last map is then 1x1), but only from 139px are all map sizes within the conformance checks'
# 1.5x of the declared strides (75px gives a 1px last map, an apparent stride of 75): their spec
# declares 139.
_VALID_PADDED_MIN = 139


class InceptionNet(StagedBackbone):
    """Shared body of the Inception nets: a chain of named stages from ``layout``, levels from ``levels``.

    These nets do not dilate: only ``output_stride=32`` is supported.
    """

    #: stage names whose outputs are the feature levels, fine to coarse
    levels: ClassVar[tuple[str, ...]] = ()
    #: the reference's init: normal std of convs and linears (None: PyTorch's default)
    init_std: ClassVar[float | None] = None
    #: dropout before the classifier, as in the paper/reference
    default_dropout: ClassVar[float] = 0.0
    #: reference keys to ignore when loading (auxiliary classifiers)
    aux_prefixes: ClassVar[tuple[str, ...]] = ()
    reference_kwargs: ClassVar[dict[str, Any]] = {}
    #: the smallest input side the whole net takes (its coarsest map is then 1x1)
    smallest_input: ClassVar[int] = 1

    def __init__(self, *, in_chans: int = 3, out_features: Iterable[str] | None = None, output_stride: int = 32) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"{name}: in_chans must be a positive integer, got {in_chans!r}")
        channels, stride = in_chans, 1
        levels = []
        for stage_name, module in self.layout(in_chans):
            self.stages[stage_name] = module
            channels, stride = out_channels_of(module, channels), stride * stride_of(module)
            if stage_name in self.levels:
                levels.append((stage_name, stage_name, channels, stride))
        self._init_weights(self)
        n_stages = len(self.stages)
        self._finish(levels, out_features)
        self._whole = len(self.stages) == n_stages

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self._whole and min(x.shape[-2:]) < self.smallest_input:
            raise ValueError(
                f"{type(self).__name__} takes inputs of at least {self.smallest_input}x{self.smallest_input} "
                f"pixels (its stem and reductions do not pad), got {tuple(x.shape[-2:])}; resize or pad the images"
            )
        return super().forward(x)

    @classmethod
    def layout(cls, in_chans: int) -> Layout:
        """The net's stages as (name, module), input side first."""
        raise NotImplementedError

    @classmethod
    def _init_weights(cls, module: nn.Module) -> None:
        if cls.init_std is None:
            return
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.is_meta:
                # torchvision draws trunc_normal_(std, a=-2, b=2): bounds at 20 or more standard
                # deviations never bite, so the plain normal is the same distribution, 3x faster
                nn.init.normal_(m.weight, mean=0.0, std=cls.init_std)

    def build_head(self, num_classes: int, dropout: float | None = None) -> nn.Module:
        """Global average pooling, dropout as in the paper, and a linear layer ``fc``."""
        last = self.feature_info[-1]
        p = self.default_dropout if dropout is None else dropout
        head = GlobalPoolLinear(last.name, last.channels, num_classes, dropout=p)
        self._init_weights(head)
        return head

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map the reference's state_dict to ours by position: both hold the same tensors in forward order."""
        head = {k: v for k, v in state_dict.items() if k.startswith(cls.head_prefixes)}
        body = {
            k: v for k, v in state_dict.items()
            if not k.startswith(cls.head_prefixes + cls.aux_prefixes)
        }
        with torch.device("meta"):
            own = cls().state_dict()
        # old checkpoints lack BN's batch counters; pair the tensors that matter, then the counters
        ref_keys = [k for k in body if not k.endswith("num_batches_tracked")]
        own_keys = [k for k in own if not k.endswith("num_batches_tracked")]
        if len(ref_keys) != len(own_keys):
            raise ValueError(
                f"{cls.__name__}: the weights hold {len(ref_keys)} backbone tensors, the net has "
                f"{len(own_keys)}; pass the state_dict of the reference model {cls.reference_name()}"
            )
        out: dict[str, Tensor] = {}
        for rk, ok in zip(ref_keys, own_keys):
            if body[rk].shape != own[ok].shape:
                raise ValueError(
                    f"{cls.__name__}: reference tensor {rk} {tuple(body[rk].shape)} does not fit {ok} "
                    f"{tuple(own[ok].shape)}; pass the state_dict of {cls.reference_name()}"
                )
            out["backbone." + ok] = body[rk]
            counter = rk.replace("running_var", "num_batches_tracked")
            if rk.endswith("running_var") and counter in body:
                out["backbone." + ok.replace("running_var", "num_batches_tracked")] = body[counter]
        for k, v in head.items():
            out["head.fc." + k.rsplit(".", 1)[1]] = v
        return out

    @classmethod
    def reference_name(cls) -> str:
        """The reference model whose weights this class loads (for error messages)."""
        return getattr(cls, "_reference", "of the same variant")


# --------------------------------------------------------------------------- GoogLeNet

def googlenet_module(cin: int, c1: int, c3_red: int, c3: int, c5_red: int, c5: int, pool: int) -> Branches:
    """GoogLeNet's Inception module (Szegedy et al. 2015, fig. 2b, table 1 columns)."""
    return Branches(
        cin,
        branch1=cbr(cin, c1, 1),
        branch2=chain(cin, (c3_red, 1), (c3, 3)),
        # torchvision's "5x5" branch is a 3x3 (kept so its published weights load); parity needs the same
        branch3=chain(cin, (c5_red, 1), (c5, 3)),
        branch4=pool_proj(cin, pool, "max"),
    )


# table 1 of the paper: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj
_GOOGLENET_MODULES: dict[str, tuple[int, ...]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}
# a max pooling (ceil mode, as torchvision) opens each of these stages of modules
_GOOGLENET_POOLS = {"inception3a": ("maxpool2", 3), "inception4a": ("maxpool3", 3), "inception5a": ("maxpool4", 2)}


class GoogLeNet(InceptionNet):
    """GoogLeNet (Inception-v1) as torchvision builds it: with BatchNorm, without the auxiliary classifiers.

    Levels ``conv1`` (/2), ``conv3`` (/4), ``inception3b`` (/8), ``inception4e`` (/16),
    ``inception5b`` (/32). Does not dilate. The published
    weights expect inputs scaled to [-1, 1] (torchvision's ``transform_input`` does that for it).
    """

    levels = ("conv1", "conv3", "inception3b", "inception4e", "inception5b")
    init_std = 0.01
    default_dropout = 0.2
    head_prefixes = ("fc.",)
    aux_prefixes = ("aux1.", "aux2.")
    first_conv = "stages.conv1.conv.weight"
    # ceil-mode pools run it down to 15px (smallest_input); every level is meaningful from the default 32
    spec = BackboneSpec(mean=INCEPTION_MEAN, std=INCEPTION_STD)
    reference_kwargs = {"aux_logits": False, "init_weights": True, "transform_input": False}
    _reference = "torchvision googlenet"
    smallest_input = 15

    @classmethod
    def layout(cls, in_chans: int) -> Layout:
        """Stem (7x7/2, pool, 1x1, 3x3, pool) then nine Inception modules in three stages."""
        stages: Layout = [
            ("conv1", cbr(in_chans, 64, 7, 2, 3)),
            ("maxpool1", max_pool(3, 2, ceil_mode=True)),
            ("conv2", cbr(64, 64, 1)),
            ("conv3", cbr(64, 192, 3)),
        ]
        cin = 192
        for name, widths in _GOOGLENET_MODULES.items():
            if name in _GOOGLENET_POOLS:
                pool_name, k = _GOOGLENET_POOLS[name]
                stages.append((pool_name, max_pool(k, 2, ceil_mode=True)))
            module = googlenet_module(cin, *widths)
            stages.append((name, module))
            cin = module.out_channels
        return stages


# --------------------------------------------------------------------------- Inception-v3

def v3_block_a(cin: int, pool: int) -> Branches:
    """35x35 module: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (Szegedy et al. 2016, fig. 5)."""
    return Branches(
        cin,
        branch1x1=cbr(cin, 64, 1),
        branch5x5=chain(cin, (48, 1), (64, 5)),
        branch3x3dbl=chain(cin, (64, 1), (96, 3), (96, 3)),
        branch_pool=pool_proj(cin, pool),
    )


def v3_reduction_a(cin: int) -> Branches:
    """35 -> 17 grid reduction: strided convolutions beside a max pooling (fig. 10)."""
    return Branches(
        cin,
        branch3x3=cbr(cin, 384, 3, 2, 0),
        branch3x3dbl=chain(cin, (64, 1), (96, 3), (96, 3, 2, 0)),
        branch_pool=max_pool(),
    )


def v3_block_c(cin: int, c7: int) -> Branches:
    """17x17 module with 7x7 receptive fields factorised into 1x7 and 7x1 convolutions (fig. 6)."""
    return Branches(
        cin,
        branch1x1=cbr(cin, 192, 1),
        branch7x7=chain(cin, (c7, 1), (c7, (1, 7)), (192, (7, 1))),
        branch7x7dbl=nn.Sequential(cbr(cin, c7, 1), factorized(c7, c7, 7), factorized(c7, 192, 7, c7)),
        branch_pool=pool_proj(cin, 192),
    )


def v3_reduction_b(cin: int) -> Branches:
    """17 -> 8 grid reduction."""
    return Branches(
        cin,
        branch3x3=chain(cin, (192, 1), (320, 3, 2, 0)),
        branch7x7x3=chain(cin, (192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2, 0)),
        branch_pool=max_pool(),
    )


def v3_block_e(cin: int) -> Branches:
    """8x8 module with expanded filter banks: 1x3 and 3x1 side by side (fig. 7)."""
    return Branches(
        cin,
        branch1x1=cbr(cin, 320, 1),
        branch3x3=nn.Sequential(cbr(cin, 384, 1), split(384, 384)),
        branch3x3dbl=nn.Sequential(cbr(cin, 448, 1), cbr(448, 384, 3), split(384, 384)),
        branch_pool=pool_proj(cin, 192),
    )


class InceptionV3(InceptionNet):
    """Inception-v3 as torchvision builds it, without the auxiliary classifier.

    Levels ``Conv2d_2b_3x3`` (/2), ``Conv2d_4a_3x3`` (/4), ``Mixed_5d`` (/8), ``Mixed_6e`` (/16),
    ``Mixed_7c`` (/32); a 299px input gives 147, 71, 35, 17 and 8px maps. Does not dilate.
    The published weights expect inputs in [-1, 1].
    """

    levels = ("Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c")
    init_std = 0.1
    default_dropout = 0.5
    head_prefixes = ("fc.",)
    aux_prefixes = ("AuxLogits.",)
    first_conv = "stages.Conv2d_1a_3x3.conv.weight"
    spec = BackboneSpec(min_input_size=_VALID_PADDED_MIN, mean=INCEPTION_MEAN, std=INCEPTION_STD)
    reference_kwargs = {"aux_logits": False, "init_weights": True, "transform_input": False}
    _reference = "torchvision inception_v3"
    smallest_input = 75

    @classmethod
    def layout(cls, in_chans: int) -> Layout:
        """Unpadded stem, three 35x35, four 17x17 and two 8x8 modules with two reductions between."""
        return [
            ("Conv2d_1a_3x3", cbr(in_chans, 32, 3, 2, 0)),
            ("Conv2d_2a_3x3", cbr(32, 32, 3, 1, 0)),
            ("Conv2d_2b_3x3", cbr(32, 64, 3)),
            ("maxpool1", max_pool()),
            ("Conv2d_3b_1x1", cbr(64, 80, 1)),
            ("Conv2d_4a_3x3", cbr(80, 192, 3, 1, 0)),
            ("maxpool2", max_pool()),
            ("Mixed_5b", v3_block_a(192, 32)),
            ("Mixed_5c", v3_block_a(256, 64)),
            ("Mixed_5d", v3_block_a(288, 64)),
            ("Mixed_6a", v3_reduction_a(288)),
            ("Mixed_6b", v3_block_c(768, 128)),
            ("Mixed_6c", v3_block_c(768, 160)),
            ("Mixed_6d", v3_block_c(768, 160)),
            ("Mixed_6e", v3_block_c(768, 192)),
            ("Mixed_7a", v3_reduction_b(768)),
            ("Mixed_7b", v3_block_e(1280)),
            ("Mixed_7c", v3_block_e(2048)),
        ]


# --------------------------------------------------------------------------- Inception-v4 and Inception-ResNet-v2

def _avg_proj(cin: int, cout: int) -> nn.Sequential:
    # timm's v4 and IRv2 average over real pixels only at the borders
    return pool_proj(cin, cout, count_include_pad=False)


def v4_stem(in_chans: int) -> Layout:
    """Inception-v4's stem up to 35x35x384 (Szegedy et al. 2017, fig. 3)."""
    return [
        ("Conv2d_1a_3x3", cbr(in_chans, 32, 3, 2, 0)),
        ("Conv2d_2a_3x3", cbr(32, 32, 3, 1, 0)),
        ("Conv2d_2b_3x3", cbr(32, 64, 3)),
        ("Mixed_3a", Branches(64, maxpool=max_pool(), conv=cbr(64, 96, 3, 2, 0))),
        ("Mixed_4a", Branches(
            160,
            branch0=chain(160, (64, 1), (96, 3, 1, 0)),
            branch1=chain(160, (64, 1), (64, (1, 7)), (64, (7, 1)), (96, 3, 1, 0)),
        )),
        ("Mixed_5a", Branches(192, conv=cbr(192, 192, 3, 2, 0), maxpool=max_pool())),
    ]


def v4_block_a(cin: int = 384) -> Branches:
    """Inception-A, 35x35 (fig. 4)."""
    return Branches(
        cin,
        branch0=cbr(cin, 96, 1),
        branch1=chain(cin, (64, 1), (96, 3)),
        branch2=chain(cin, (64, 1), (96, 3), (96, 3)),
        branch3=_avg_proj(cin, 96),
    )


def reduction_a(cin: int, k: int, l: int, m: int, n: int) -> Branches:
    """Reduction-A, 35 -> 17, with the filter counts k, l, m, n of table 1 (fig. 7)."""
    return Branches(
        cin,
        branch0=cbr(cin, n, 3, 2, 0),
        branch1=chain(cin, (k, 1), (l, 3), (m, 3, 2, 0)),
        branch2=max_pool(),
    )


def v4_block_b(cin: int = 1024) -> Branches:
    """Inception-B, 17x17, with 7x7 factorised (fig. 5)."""
    return Branches(
        cin,
        branch0=cbr(cin, 384, 1),
        branch1=chain(cin, (192, 1), (224, (1, 7)), (256, (7, 1))),
        branch2=nn.Sequential(cbr(cin, 192, 1), factorized(192, 224, 7, 192), factorized(224, 256, 7, 224)),
        branch3=_avg_proj(cin, 128),
    )


def v4_reduction_b(cin: int = 1024) -> Branches:
    """Reduction-B, 17 -> 8 (fig. 8)."""
    return Branches(
        cin,
        branch0=chain(cin, (192, 1), (192, 3, 2, 0)),
        branch1=chain(cin, (256, 1), (256, (1, 7)), (320, (7, 1)), (320, 3, 2, 0)),
        branch2=max_pool(),
    )


def v4_block_c(cin: int = 1536) -> Branches:
    """Inception-C, 8x8, with expanded 1x3/3x1 banks (fig. 6)."""
    return Branches(
        cin,
        branch0=cbr(cin, 256, 1),
        branch1=nn.Sequential(cbr(cin, 384, 1), split(384, 256)),
        branch2=nn.Sequential(cbr(cin, 384, 1), factorized(384, 512, 3, 448), split(512, 256)),
        branch3=_avg_proj(cin, 256),
    )


def _named(prefix: str, first: str, blocks: Sequence[nn.Module]) -> Layout:
    """Name consecutive blocks as TensorFlow-slim does: Mixed_5b, Mixed_5c, ..."""
    return [(f"{prefix}{chr(ord(first) + i)}", b) for i, b in enumerate(blocks)]


class InceptionV4(InceptionNet):
    """Inception-v4 as timm builds it (stem, 4 x A, reduction A, 7 x B, reduction B, 3 x C).

    Levels ``Conv2d_2b_3x3`` (/2), ``Mixed_3a`` (/4), ``Mixed_5e`` (/8), ``Mixed_6h`` (/16),
    ``Mixed_7d`` (/32), named as in TensorFlow-slim. Does not dilate. Dropout before the classifier is the paper's 0.2
    (keep 0.8, fig. 9); timm defaults to none, which changes nothing in evaluation.
    """

    levels = ("Conv2d_2b_3x3", "Mixed_3a", "Mixed_5e", "Mixed_6h", "Mixed_7d")
    default_dropout = 0.2
    head_prefixes = ("last_linear.",)
    first_conv = "stages.Conv2d_1a_3x3.conv.weight"
    spec = BackboneSpec(min_input_size=_VALID_PADDED_MIN, mean=INCEPTION_MEAN, std=INCEPTION_STD)
    _reference = "timm inception_v4"
    smallest_input = 75

    @classmethod
    def layout(cls, in_chans: int) -> Layout:
        """The stem, then the A, B and C modules with the two reductions (fig. 9)."""
        return [
            *v4_stem(in_chans),
            *_named("Mixed_5", "b", [v4_block_a() for _ in range(4)]),
            ("Mixed_6a", reduction_a(384, 192, 224, 256, 384)),
            *_named("Mixed_6", "b", [v4_block_b() for _ in range(7)]),
            ("Mixed_7a", v4_reduction_b()),
            *_named("Mixed_7", "b", [v4_block_c() for _ in range(3)]),
        ]


def irv2_block_a(scale: float, cin: int = 320) -> ResidualBranches:
    """Inception-ResNet-A (Block35), 35x35 (fig. 16)."""
    return ResidualBranches(
        cin, scale,
        branch0=cbr(cin, 32, 1),
        branch1=chain(cin, (32, 1), (32, 3)),
        branch2=chain(cin, (32, 1), (48, 3), (64, 3)),
    )


def irv2_block_b(scale: float, cin: int = 1088) -> ResidualBranches:
    """Inception-ResNet-B (Block17), 17x17 (fig. 17)."""
    return ResidualBranches(
        cin, scale,
        branch0=cbr(cin, 192, 1),
        branch1=chain(cin, (128, 1), (160, (1, 7)), (192, (7, 1))),
    )


def irv2_block_c(scale: float, relu: bool = True, cin: int = 2080) -> ResidualBranches:
    """Inception-ResNet-C (Block8), 8x8 (fig. 19)."""
    return ResidualBranches(
        cin, scale, relu,
        branch0=cbr(cin, 192, 1),
        branch1=chain(cin, (192, 1), (224, (1, 3)), (256, (3, 1))),
    )


class InceptionResNetV2(InceptionNet):
    """Inception-ResNet-v2 as timm builds it: 10 x A, 20 x B, 9 x C residual Inception blocks.

    Levels ``conv2d_2b`` (/2), ``conv2d_4a`` (/4), ``repeat`` (/8, after the A blocks),
    ``repeat_1`` (/16, after the B blocks), ``conv2d_7b`` (/32), named as timm names them. The
    residuals are scaled by 0.17, 0.10 and 0.20 (section 3.3). Does not dilate. Dropout before the classifier is the paper's 0.2
    (keep 0.8, fig. 15); timm defaults to none, which changes nothing in evaluation.
    """

    levels = ("conv2d_2b", "conv2d_4a", "repeat", "repeat_1", "conv2d_7b")
    default_dropout = 0.2
    head_prefixes = ("classif.",)
    first_conv = "stages.conv2d_1a.conv.weight"
    spec = BackboneSpec(min_input_size=_VALID_PADDED_MIN, mean=INCEPTION_MEAN, std=INCEPTION_STD)
    _reference = "timm inception_resnet_v2"
    smallest_input = 75

    @classmethod
    def layout(cls, in_chans: int) -> Layout:
        """Inception-v3's stem, a 35x35 mixed block, then the three residual stages with reductions."""
        return [
            ("conv2d_1a", cbr(in_chans, 32, 3, 2, 0)),
            ("conv2d_2a", cbr(32, 32, 3, 1, 0)),
            ("conv2d_2b", cbr(32, 64, 3)),
            ("maxpool_3a", max_pool()),
            ("conv2d_3b", cbr(64, 80, 1)),
            ("conv2d_4a", cbr(80, 192, 3, 1, 0)),
            ("maxpool_5a", max_pool()),
            ("mixed_5b", Branches(
                192,
                branch0=cbr(192, 96, 1),
                branch1=chain(192, (48, 1), (64, 5)),
                branch2=chain(192, (64, 1), (96, 3), (96, 3)),
                branch3=_avg_proj(192, 64),
            )),
            ("repeat", nn.Sequential(*[irv2_block_a(0.17) for _ in range(10)])),
            ("mixed_6a", reduction_a(320, 256, 256, 384, 384)),
            ("repeat_1", nn.Sequential(*[irv2_block_b(0.10) for _ in range(20)])),
            ("mixed_7a", Branches(
                1088,
                branch0=chain(1088, (256, 1), (384, 3, 2, 0)),
                branch1=chain(1088, (256, 1), (288, 3, 2, 0)),
                branch2=chain(1088, (256, 1), (288, 3), (320, 3, 2, 0)),
                branch3=max_pool(),
            )),
            ("repeat_2", nn.Sequential(*[irv2_block_c(0.20) for _ in range(9)])),
            ("block8", irv2_block_c(1.0, relu=False)),
            ("conv2d_7b", cbr(2080, 1536, 1)),
        ]


_PAPER_V1 = "Szegedy et al., Going Deeper with Convolutions, CVPR 2015"
_PAPER_V3 = "Szegedy et al., Rethinking the Inception Architecture for Computer Vision, CVPR 2016"
_PAPER_V4 = ("Szegedy et al., Inception-v4, Inception-ResNet and the Impact of Residual Connections on "
             "Learning, AAAI 2017")

# name: (class, paper, reference, native input size); each class's spec says the rest
_VARIANTS: dict[str, tuple[type[InceptionNet], str, str, int]] = {
    "googlenet": (GoogLeNet, _PAPER_V1, "torchvision:googlenet", 224),
    "inception_v3": (InceptionV3, _PAPER_V3, "torchvision:inception_v3", 299),
    "inception_v4": (InceptionV4, _PAPER_V4, "timm:inception_v4", 299),
    "inception_resnet_v2": (InceptionResNetV2, _PAPER_V4, "timm:inception_resnet_v2", 299),
}

# ImageNet top-1 (%) for the nets whose reference (timm's) carries none: the Inception-v4 paper's
# Table 2, single crop, single model (top-1 error 20.0% and 19.9% on the ILSVRC-2012 validation set)
_PUBLISHED_TOP1 = {"inception_v4": 80.0, "inception_resnet_v2": 80.1}

for _name, (_cls, _paper, _ref, _size) in _VARIANTS.items():
    register_backbone(_name, family="inception", paper=_paper, reference=_ref, input_size=_size,
                      published_top1=_PUBLISHED_TOP1.get(_name))(_cls)
