"""Building blocks the lectures describe, written once and shared by every plugin."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "conv_out_size",
    "exporting",
    "receptive_field",
    "min_input_side",
    "check_input_side",
    "SUPPORTED_OUTPUT_STRIDES",
    "dilation_plan",
    "InvertedResidual",
    "transformer_mlp",
    "get_act_layer",
    "get_norm_layer",
    "group_norm_groups",
    "ConvNormAct",
    "SpatiallySeparableConv",
    "DepthwiseSeparableConv",
    "grouped_conv",
    "bilinear_kernel",
    "BilinearUpsample",
    "DepthwisePool",
    "GlobalAvgPool",
    "SpatialPyramidPooling",
    "NearestUnpool",
    "BedOfNailsUnpool",
    "MaxUnpool",
    "LocalResponseNorm",
    "SqueezeExcite",
    "DropPath",
    "make_divisible",
]


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output size of a convolution or pooling: (W - F + 2P)/S + 1, with F the dilated kernel extent."""
    extent = dilation * (kernel - 1) + 1
    return (size - extent + 2 * padding) // stride + 1


def receptive_field(layers: Sequence[tuple[int, int, int]]) -> int:
    """Receptive field of stacked layers given as (kernel, stride, dilation), input side first."""
    rf, jump = 1, 1
    for kernel, stride, dilation in layers:
        rf += dilation * (kernel - 1) * jump
        jump *= stride
    return rf


_ACTS: dict[str, Callable[..., nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "swish": lambda: nn.SiLU(inplace=True),
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "identity": nn.Identity,
}


def min_input_side(module: nn.Module) -> int:
    """Smallest square input side for which every convolution and pooling of ``module``, in order, keeps a pixel."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]

    def first(v: int | tuple[int, ...]) -> int:
        return v if isinstance(v, int) else v[0]

    side = 1
    while True:
        s = side
        for m in layers:
            s = conv_out_size(s, first(m.kernel_size), first(m.stride), first(m.padding), first(getattr(m, "dilation", 1)))
            if s < 1:
                break
        else:
            return side
        side += 1


def check_input_side(net: str, x: Tensor, min_side: int) -> None:
    """Raise a clear error for an input too small to survive the net's unpadded layers and pools.

    ``net`` names the net in the message (a string, so that TorchScript can compile the check).
    """
    h, w = x.shape[-2], x.shape[-1]
    if h < min_side or w < min_side:
        raise ValueError(
            f"{net} needs inputs of at least {min_side}x{min_side} pixels, got {h}x{w}; "
            f"resize or pad the images (or ask for shallower levels with out_features)"
        )


def get_act_layer(name: str | Callable[..., nn.Module] | None) -> Callable[..., nn.Module]:
    """An activation constructor from its name (so that YAML can name it) or as given."""
    if name is None:
        return nn.Identity
    if callable(name):
        return name
    try:
        return _ACTS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTS)}") from None


def group_norm_groups(channels: int) -> int:
    """GroupNorm's group count: Wu & He's 32 (ECCV 2018) where the width divides by 32, else 1 (a layer norm)."""
    # gcd(32, channels) would keep groups at narrow widths too, but at 16 channels (the tests' YOLO
    # necks) that is one channel per group, and the head no longer learns as fast (measured)
    return 32 if channels % 32 == 0 else 1


def get_norm_layer(name: str | Callable[..., nn.Module] | None) -> Callable[[int], nn.Module]:
    """A normalisation constructor taking the channel count, from its name or as given."""
    if name is None:
        return lambda c: nn.Identity()
    if callable(name):
        return name
    table: dict[str, Callable[[int], nn.Module]] = {
        "bn": nn.BatchNorm2d,
        "batchnorm": nn.BatchNorm2d,
        "gn": lambda c: nn.GroupNorm(group_norm_groups(c), c),
        "ln": lambda c: nn.GroupNorm(1, c),
        "none": lambda c: nn.Identity(),
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown norm layer {name!r}; choose one of {sorted(table)}") from None


class ConvNormAct(nn.Sequential):
    """Convolution, normalisation, activation; padding keeps 'same' size at stride 1 (dilation aware).

    Children are named ``conv``, ``bn``, ``act`` so state_dict keys read like the papers' nets.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int = 1,
        groups: int = 1,
        norm: str | Callable[[int], nn.Module] | None = "bn",
        act: str | Callable[..., nn.Module] | None = "relu",
        bias: bool | None = None,
    ) -> None:
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if padding is None:
            padding = tuple(dilation * (kk - 1) // 2 for kk in k)
        use_bias = norm is None if bias is None else bias
        layers: list[tuple[str, nn.Module]] = [
            ("conv", nn.Conv2d(in_channels, out_channels, k, stride, padding, dilation, groups, bias=use_bias))
        ]
        if norm is not None:
            layers.append(("bn", get_norm_layer(norm)(out_channels)))
        if act is not None:
            layers.append(("act", get_act_layer(act)()))
        super().__init__(OrderedDict(layers))
        self.out_channels = out_channels


class SpatiallySeparableConv(nn.Sequential):
    """A k x k convolution factorised into k x 1 then 1 x k (Inception-v3's factorisation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, mid_channels: int | None = None,
                 norm: str | Callable[[int], nn.Module] | None = "bn",
                 act: str | Callable[..., nn.Module] | None = "relu") -> None:
        mid = mid_channels or out_channels
        p = kernel_size // 2
        super().__init__(
            ConvNormAct(in_channels, mid, (kernel_size, 1), padding=(p, 0), norm=norm, act=act),
            ConvNormAct(mid, out_channels, (1, kernel_size), padding=(0, p), norm=norm, act=act),
        )


class DepthwiseSeparableConv(nn.Module):
    """Depthwise k x k convolution (one filter per channel) followed by a pointwise 1 x 1 one.

    Parameters: k²C + CM against k²CM for the full convolution (biases aside).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        norm: str | None = "bn",
        act: str | None = "relu",
        act_between: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        pad = dilation * (kernel_size - 1) // 2
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride, pad, dilation,
                                   groups=in_channels, bias=bias)
        self.bn_dw = get_norm_layer(norm)(in_channels) if act_between else nn.Identity()
        self.act_dw = get_act_layer(act)() if act_between else nn.Identity()
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.bn_pw = get_norm_layer(norm)(out_channels)
        self.act_pw = get_act_layer(act)()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_dw(self.bn_dw(self.depthwise(x)))
        return self.act_pw(self.bn_pw(self.pointwise(x)))


def grouped_conv(in_channels: int, out_channels: int, kernel_size: int, groups: int, stride: int = 1,
                 dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    """A grouped convolution (ResNeXt's cardinality): k²CM/g weights instead of k²CM."""
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
    pad = dilation * (kernel_size - 1) // 2
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad, dilation, groups=groups, bias=bias)


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """Weights that make a per-channel transposed convolution a bilinear interpolation (FCN's init)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = filt
    return weight


class BilinearUpsample(nn.ConvTranspose2d):
    """A learnable transposed convolution initialised to bilinear upsampling by ``factor``."""

    def __init__(self, channels: int, factor: int, learnable: bool = True) -> None:
        kernel = 2 * factor - factor % 2
        super().__init__(channels, channels, kernel, stride=factor, padding=0, bias=False)
        with torch.no_grad():
            self.weight.copy_(bilinear_kernel(channels, kernel))
        self.weight.requires_grad_(learnable)
        self.factor = factor


class DepthwisePool(nn.Module):
    """Pooling across channels (max or average over groups of ``k`` neighbouring channels)."""

    def __init__(self, k: int, mode: str = "max") -> None:
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"DepthwisePool mode must be 'max' or 'avg', got {mode!r}")
        self.k, self.mode = k, mode

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if c % self.k:
            raise ValueError(f"DepthwisePool(k={self.k}) needs channels divisible by k, got {c}")
        x = x.view(b, c // self.k, self.k, h, w)
        return x.amax(dim=2) if self.mode == "max" else x.mean(dim=2)


class GlobalAvgPool(nn.Module):
    """Average over all spatial positions: (B, C, H, W) -> (B, C) (or (B, C, 1, 1) with keepdim)."""

    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=self.keepdim)


def exporting() -> bool:
    """A model is being traced (torch.jit.trace) or exported to ONNX: ops that the formats lack take another form."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class SpatialPyramidPooling(nn.Module):
    """SPP-net's pooling (He et al., Spatial Pyramid Pooling in Deep Convolutional Networks, ECCV 2014).

    Each pyramid level splits the map into ``b x b`` bins and max-pools each; the levels are
    flattened and concatenated, bins of one level channel-major ((B, C, b, b).flatten(1)), levels in
    the order of ``bins``. The output has ``C * sum(b**2)`` features whatever the input's height and
    width, so a linear layer after it accepts any input size. The bins follow adaptive pooling
    (bin ``i`` of ``b`` spans ``floor(i*H/b)`` to ``ceil((i+1)*H/b)``), so a map smaller than ``b``
    still fills every bin. The paper's classification nets use {1, 2, 4} (3 levels) and {1, 2, 3, 6};
    its detector {1, 2, 3, 6}.
    """

    def __init__(self, bins: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        bins = tuple(bins)
        if not bins or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bins):
            raise ValueError(f"spatial pyramid bins must be positive integers (bins per side), e.g. (1, 2, 4); got {bins}")
        if len(set(bins)) != len(bins):
            raise ValueError(f"spatial pyramid bins {bins} repeat a level; give each bin count once, e.g. (1, 2, 4)")
        self.bins = bins

    def out_features(self, channels: int) -> int:
        """Length of the output for ``channels``-wide maps: ``channels * sum(b**2)``."""
        return channels * sum(b * b for b in self.bins)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"SpatialPyramidPooling needs (B, C, H, W) maps, got shape {tuple(x.shape)}; a token sequence "
                f"(a transformer's level) has no grid to pool: use the net's own head"
            )
        return torch.cat([self._level(x, b).flatten(1) for b in self.bins], dim=1)

    @staticmethod
    def _level(x: Tensor, b: int) -> Tensor:
        """One level's ``b x b`` bins. Where ``b`` divides the map the adaptive bins are plain windows, and
        max_pool2d (which ONNX has; adaptive pooling to a size it cannot read it has not) gives them exactly."""
        # Python ints: a traced model keeps the window as a constant (RoI pooling's grid has a fixed size)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % b == 0 and w % b == 0:
            return F.max_pool2d(x, (h // b, w // b))
        return F.adaptive_max_pool2d(x, b)


class NearestUnpool(nn.Module):
    """Unpooling by nearest neighbour: every value copied into its s x s block."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)


class BedOfNailsUnpool(nn.Module):
    """Unpooling by 'bed of nails': each value at the top-left of its s x s block, zeros elsewhere."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out = x.new_zeros(b, c, h * self.scale, w * self.scale)
        out[:, :, :: self.scale, :: self.scale] = x
        return out


class MaxUnpool(nn.Module):
    """Max unpooling: values go back to the positions the matching max pooling took them from."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(kernel_size, stride or kernel_size)

    def forward(self, x: Tensor, indices: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        return self.unpool(x, indices, output_size=output_size)


class LocalResponseNorm(nn.Module):
    """AlexNet's local response normalisation across channels.

    b_i = a_i / (k + alpha * sum_{j in [i-r, i+r]} a_j^2) ^ beta, with r the depth radius. Note the
    paper's alpha multiplies the plain sum (torch.nn.LocalResponseNorm divides alpha by the window).
    """

    def __init__(self, radius: int = 2, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__()
        self.radius, self.alpha, self.beta, self.k = radius, alpha, beta, k

    def forward(self, x: Tensor) -> Tensor:
        sq = x.pow(2).unsqueeze(1)  # (B, 1, C, H, W) so the window slides over channels
        sq = F.pad(sq, (0, 0, 0, 0, self.radius, self.radius))
        window = 2 * self.radius + 1
        summed = F.avg_pool3d(sq, (window, 1, 1), stride=1).squeeze(1) * window
        return x / (self.k + self.alpha * summed).pow(self.beta)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without going below 90% (MobileNet's rule)."""
    min_value = min_value or divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channel weights from globally pooled features (Hu et al., 2018).

    Children ``fc1``/``fc2`` are 1x1 convolutions (a linear layer on the pooled vector).
    """

    def __init__(self, channels: int, reduction: int = 16, rd_channels: int | None = None,
                 act: str | Callable[..., nn.Module] = "relu", gate: str | Callable[..., nn.Module] = "sigmoid") -> None:
        super().__init__()
        rd = rd_channels or max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = get_act_layer(act)()
        self.fc2 = nn.Conv2d(rd, channels, 1)
        self.gate = get_act_layer(gate)()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``p`` while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0:
            mask.div_(keep)  # scale the small mask, not the activations: one pass over x
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


# -- blocks shared by several families ------------------------------------------------------

#: the output strides a family that dilates offers (8 and 16 by dilation); a backbone's spec lists its own
SUPPORTED_OUTPUT_STRIDES = (8, 16, 32)


def dilation_plan(strides: Sequence[int], output_stride: int) -> list[tuple[int, int]]:
    """(stride, dilation) for each layer so that the total stride stops at ``output_stride``.

    A stride that would take the net past ``output_stride`` becomes 1 and every later layer is
    dilated by it instead (DeepLab's atrous trick, Chen et al. 2017). The layer that loses its
    stride keeps the dilation it had, as it still works at the finer resolution of its input.
    """
    plan: list[tuple[int, int]] = []
    current, dilation = 1, 1
    for s in strides:
        if current * s > output_stride:
            plan.append((1, dilation))
            dilation *= s
        else:
            plan.append((s, dilation))
            current *= s
    return plan


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise kxk -> (squeeze-excite) -> linear 1x1 projection, plus identity when shapes agree.

    ``expand_channels == in_channels`` skips the expansion (MobileNetV2's t = 1). ``se_channels``
    > 0 adds squeeze-and-excitation after the depthwise convolution (EfficientNet's MBConv).
    ``residual`` says whether the block would keep its shape at its natural stride, so that a
    block whose stride was replaced by dilation keeps the layout (and weights) of the original.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expand_channels: int,
        residual: bool,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        act: str = "relu6",
        se_channels: int = 0,
        drop_path: float = 0.0,
        norm: str | Callable[[int], nn.Module] = "bn",
    ) -> None:
        super().__init__()
        self.expand = (
            ConvNormAct(in_channels, expand_channels, 1, norm=norm, act=act)
            if expand_channels != in_channels
            else None
        )
        self.dw = ConvNormAct(expand_channels, expand_channels, kernel_size, stride, dilation=dilation,
                              groups=expand_channels, norm=norm, act=act)
        self.se = SqueezeExcite(expand_channels, rd_channels=se_channels, act="silu") if se_channels else None
        self.project = ConvNormAct(expand_channels, out_channels, 1, norm=norm, act=None)
        self.residual = residual
        self.drop_path = DropPath(drop_path) if residual and drop_path > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.dw(out)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        if self.residual:
            if self.drop_path is not None:
                out = self.drop_path(out)
            out += x  # in place on the projection's BN output, as the references do
        return out


def transformer_mlp(dim: int, hidden_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """The transformer MLP: Linear, GELU, Dropout, Linear, Dropout (indices 0 and 3 hold weights)."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, dim),
        nn.Dropout(dropout),
    )
