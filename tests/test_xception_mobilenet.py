"""Xception and MobileNetV2 plugins: parity, dilation, depthwise-separable savings (the contract: test_backbone_contract)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from cvtasks.backbone import create_classifier
from cvtasks.checks import check_parity, count_parameters
from cvtasks.registry import create_backbone
from cvtasks.layers import InvertedResidual, dilation_plan
from plugins.xception import XceptionBlock, separable_conv

NAMES = ["xception", "mobilenet_v2"]


@pytest.mark.parametrize("name", NAMES)
def test_parity(name: str) -> None:
    assert check_parity(name).startswith("ok")


@pytest.mark.parametrize("width_mult", [0.5, 1.4])
def test_mobilenet_width_mult_matches_torchvision(width_mult: float, tmp_path) -> None:
    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult, num_classes=10).eval()
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    ours = create_classifier("mobilenet_v2", num_classes=10, width_mult=width_mult,
                             pretrained=str(tmp_path / "ref.pt")).eval()
    assert count_parameters(ours) == count_parameters(ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    # make_divisible keeps every width a multiple of 8 and the last layer at least 1280
    widths = [f.channels for f in ours.backbone.feature_info]
    assert all(w % 8 == 0 for w in widths) and widths[-1] == max(1280, round(1280 * width_mult / 8) * 8)


def test_dilation_plan() -> None:
    strides = [2, 2, 2, 1, 2, 1, 2, 1]  # cumulative 2, 4, 8, 8, 16, 16, 32, 32
    assert dilation_plan(strides, 32) == [(s, 1) for s in strides]
    # the layer that loses its stride keeps the old dilation, later ones take the new
    assert dilation_plan(strides, 16) == [(2, 1), (2, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (1, 2)]
    assert dilation_plan(strides, 8) == [(2, 1), (2, 1), (2, 1), (1, 1), (1, 1), (1, 2), (1, 2), (1, 4)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_keeps_weights_and_resolution(name: str, output_stride: int) -> None:
    torch.manual_seed(0)
    plain = create_backbone(name)
    dilated = create_backbone(name, output_stride=output_stride)
    dilated.load_state_dict(plain.state_dict())  # same layout: the weights of one serve the other
    assert dilated.output_stride == output_stride
    assert [f.stride for f in dilated.feature_info] == [min(f.stride, output_stride) for f in plain.feature_info]
    with torch.no_grad():
        out = dilated.eval()(torch.randn(1, 3, 64, 64))
    assert out[dilated.feature_names[-1]].shape[-1] >= 64 // output_stride - 1
    assert any(m.dilation[0] > 1 for m in dilated.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", NAMES)
def test_bad_output_stride_names_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match=r"\(8, 16, 32\)"):
        create_backbone(name, output_stride=4)


def _separable_weights(dw: nn.Conv2d, pw: nn.Conv2d) -> tuple[int, int, int, int]:
    k, c, m = dw.kernel_size[0], dw.in_channels, pw.out_channels
    assert dw.groups == c and dw.bias is None and pw.bias is None
    return dw.weight.numel() + pw.weight.numel(), k, c, m


def test_xception_separable_conv_saves_parameters() -> None:
    sep = separable_conv(728, 728)
    n, k, c, m = _separable_weights(sep.depthwise, sep.pointwise)
    assert n == k * k * c + c * m  # depthwise k²C plus pointwise CM
    full = nn.Conv2d(c, m, k, bias=False).weight.numel()
    assert full == k * k * c * m
    assert n / full == pytest.approx(1 / m + 1 / k**2)  # ~ 1/9 for 3x3 (Chollet, Sec. 2)
    # a middle-flow module: three such convolutions, nothing else but BN
    block = XceptionBlock(728, 728, 3)
    convs = sum(p.numel() for name, p in block.named_parameters() if "bn" not in name)
    assert convs == 3 * n


def test_mobilenet_block_separable_part_saves_parameters() -> None:
    # the depthwise 3x3 and the linear projection of an inverted residual (expansion 6)
    block = InvertedResidual(32, 64, expand_channels=192, residual=False)
    n, k, c, m = _separable_weights(block.dw.conv, block.project.conv)
    assert (k, c, m) == (3, 192, 64)
    assert n == k * k * c + c * m
    assert n / (k * k * c * m) == pytest.approx(1 / m + 1 / k**2)  # 0.127 of a full 3x3 convolution
    # and the backbone really is built of them
    model = create_backbone("mobilenet_v2")
    depthwise = [mod for mod in model.modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1]
    assert len(depthwise) == 17 and all(d.groups == d.in_channels == d.out_channels for d in depthwise)
