"""The building blocks against the properties the lectures state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvtasks import layers as L


def nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("w,f,p,s,expected", [(227, 11, 0, 4, 55), (32, 5, 0, 1, 28), (224, 3, 1, 1, 224), (224, 7, 3, 2, 112), (7, 3, 0, 2, 3)])
def test_conv_out_size_formula_matches_torch(w, f, p, s, expected):
    assert L.conv_out_size(w, f, s, p) == expected
    out = nn.Conv2d(1, 1, f, s, p)(torch.zeros(1, 1, w, w))
    assert out.shape[-1] == expected


def test_conv_out_size_with_dilation():
    out = nn.Conv2d(1, 1, 3, 1, 0, dilation=4)(torch.zeros(1, 1, 20, 20))
    assert L.conv_out_size(20, 3, 1, 0, dilation=4) == out.shape[-1] == 12


def test_conv_parameter_count_is_f2ck_plus_k():
    f, c, k = 5, 3, 16
    assert nparams(nn.Conv2d(c, k, f)) == f * f * c * k + k


def test_grouped_conv_parameter_count():
    k, c, m, g = 3, 64, 128, 8
    assert nparams(L.grouped_conv(c, m, k, groups=g)) == k * k * c * m // g
    with pytest.raises(ValueError, match="divisible"):
        L.grouped_conv(30, 64, 3, groups=8)


def test_depthwise_separable_saving():
    k, c, m = 3, 64, 128
    sep = L.DepthwiseSeparableConv(c, m, k, norm=None, act=None)
    convs = [mod for mod in sep.modules() if isinstance(mod, nn.Conv2d)]
    assert sum(nparams(cv) for cv in convs) == k * k * c + c * m
    full = k * k * c * m
    assert (k * k * c + c * m) / full == pytest.approx(1 / m + 1 / k**2)


def test_spatially_separable_has_k_plus_k_weights():
    sep = L.SpatiallySeparableConv(8, 8, 7, norm=None, act=None)
    convs = [m for m in sep.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.kernel_size) for c in convs] == [(7, 1), (1, 7)]
    assert sep(torch.randn(1, 8, 15, 11)).shape == (1, 8, 15, 11)


@pytest.mark.parametrize("dilations,rf", [((1,), 3), ((1, 2), 7), ((1, 2, 4), 15)])
def test_receptive_field_of_dilated_3x3_stack(dilations, rf):
    assert L.receptive_field([(3, 1, d) for d in dilations]) == rf
    # measured: the gradient of the centre output reaches exactly rf input pixels
    convs = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=d, dilation=d, bias=False) for d in dilations])
    for c in convs:
        nn.init.constant_(c.weight, 1.0)
    x = torch.zeros(1, 1, 41, 41, requires_grad=True)
    convs(x)[0, 0, 20, 20].backward()
    touched = (x.grad[0, 0] != 0).nonzero()
    assert touched[:, 0].max() - touched[:, 0].min() + 1 == rf


def test_receptive_field_with_strides():
    # two 3x3 stride-2 convs: 3 + 2*2 = 7
    assert L.receptive_field([(3, 2, 1), (3, 2, 1)]) == 7


def test_pooling_kinds():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert F.max_pool2d(x, 2).flatten().tolist() == [5, 7, 13, 15]
    assert F.avg_pool2d(x, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    y = torch.randn(2, 6, 3, 3)
    assert L.DepthwisePool(3, "max")(y).shape == (2, 2, 3, 3)
    assert torch.equal(L.DepthwisePool(3, "max")(y)[:, 0], y[:, :3].amax(1))
    assert torch.allclose(L.DepthwisePool(2, "avg")(y)[:, 1], y[:, 2:4].mean(1))
    assert torch.allclose(L.GlobalAvgPool()(y), y.mean((2, 3)))


def test_unpooling_kinds():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    nn_up = L.NearestUnpool(2)(x)
    assert nn_up[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    nails = L.BedOfNailsUnpool(2)(x)
    assert nails[0, 0].tolist() == [[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]]
    # max unpooling puts each value back where the max came from
    src = torch.tensor([[[[1.0, 9.0, 2.0, 0.0], [0.0, 0.0, 0.0, 8.0], [7.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 6.0]]]])
    pooled, idx = F.max_pool2d(src, 2, return_indices=True)
    back = L.MaxUnpool(2)(pooled, idx, output_size=src.shape[-2:])
    assert back[0, 0].tolist() == [[0, 9, 0, 0], [0, 0, 0, 8], [7, 0, 0, 0], [0, 0, 0, 6]]


def test_lrn_matches_hand_computation():
    torch.manual_seed(0)
    a = torch.randn(1, 7, 2, 2)
    r, alpha, beta, k = 2, 1e-2, 0.75, 2.0
    out = L.LocalResponseNorm(r, alpha, beta, k)(a)
    expected = torch.empty_like(a)
    for i in range(7):
        lo, hi = max(0, i - r), min(6, i + r)
        s = (a[:, lo : hi + 1] ** 2).sum(1)
        expected[:, i] = a[:, i] * (k + alpha * s) ** -beta
    assert torch.allclose(out, expected, atol=1e-6)


def test_squeeze_excite_rescales_channels():
    se = L.SqueezeExcite(32, reduction=4)
    assert nparams(se) == 32 * 8 + 8 + 8 * 32 + 32
    x = torch.randn(2, 32, 5, 5)
    y = se(x)
    ratio = y / x
    # one weight per (sample, channel), in (0, 1), shared by every position
    assert torch.allclose(ratio, ratio[..., :1, :1].expand_as(ratio), atol=1e-5)
    assert (ratio > 0).all() and (ratio < 1).all()


def test_transposed_conv_bilinear_init_interpolates():
    up = L.BilinearUpsample(1, 2)
    x = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]] * 4]])
    y = up(x)
    assert y.shape[-1] == 2 * 4 + 2
    inner = y[0, 0, 4, 2:-2]  # away from the borders, values step by half a unit
    assert torch.allclose(inner[1:] - inner[:-1], torch.full_like(inner[1:], 0.5))


def test_conv_norm_act_same_padding_with_dilation():
    block = L.ConvNormAct(3, 8, 3, dilation=4)
    assert block(torch.randn(1, 3, 17, 17)).shape == (1, 8, 17, 17)
    assert [n for n, _ in block.named_children()] == ["conv", "bn", "act"]


def test_unknown_activation_and_norm_names():
    with pytest.raises(ValueError, match="unknown activation"):
        L.get_act_layer("swishy")
    with pytest.raises(ValueError, match="unknown norm"):
        L.get_norm_layer("bnx")


def test_drop_path_only_in_training():
    dp = L.DropPath(0.5)
    x = torch.ones(1000, 4)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = (y[:, 0] != 0).float().mean()
    assert 0.4 < kept < 0.6 and torch.allclose(y[y != 0], torch.full_like(y[y != 0], 2.0))
