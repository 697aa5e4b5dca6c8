"""AlexNet (torchvision parity, the paper's LRN) and LeNet-5 (parameter count); the contract: test_backbone_contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvtasks.backbone import create_classifier
from cvtasks.checks import check_parity, count_parameters
from cvtasks.layers import LocalResponseNorm
from cvtasks.registry import create_backbone
from plugins.alexnet import AlexNet
from plugins.lenet import LeNet5


def test_alexnet_parity() -> None:
    assert check_parity("alexnet").startswith("ok")


# --- local response normalisation (Krizhevsky et al., 2012, Section 3.3) ---------------------


def _lrn_by_hand(a: torch.Tensor, n: int, k: float, alpha: float, beta: float) -> torch.Tensor:
    """b_i = a_i / (k + alpha * sum_{j=max(0,i-n//2)}^{min(N-1,i+n//2)} a_j^2)^beta, one element at a time."""
    b = torch.empty_like(a)
    _, channels, height, width = a.shape
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)  # edges clipped, as the paper
        for y in range(height):
            for x in range(width):
                s = sum(float(a[0, j, y, x]) ** 2 for j in range(lo, hi + 1))
                b[0, i, y, x] = float(a[0, i, y, x]) / (k + alpha * s) ** beta
    return b


@pytest.mark.parametrize("k,alpha,beta", [(2.0, 1e-4, 0.75), (1.0, 0.5, 0.5)])
def test_lrn_matches_the_paper_formula(k: float, alpha: float, beta: float) -> None:
    torch.manual_seed(0)
    a = torch.randn(1, 7, 2, 3, dtype=torch.float64) * 3  # large values so a large alpha matters
    got = LocalResponseNorm(radius=2, alpha=alpha, beta=beta, k=k)(a)
    torch.testing.assert_close(got, _lrn_by_hand(a, 5, k, alpha, beta))
    # torch's own LRN divides alpha by the window size n
    torch.testing.assert_close(got, nn.LocalResponseNorm(5, alpha=alpha * 5, beta=beta, k=k)(a))


def test_alexnet_lrn_places_and_configures_lrn() -> None:
    model = create_backbone("alexnet_lrn", lrn_size=3, lrn_k=1.5, lrn_alpha=1e-3, lrn_beta=0.5)
    b1, b2, b3 = (list(dict(model.stages[s].named_children())) for s in ("block1", "block2", "block3"))
    assert b1 == ["conv1", "lrn", "pool"] and b2 == ["conv2", "lrn", "pool"]  # after ReLU, before the pool
    assert not any(isinstance(m, LocalResponseNorm) for m in model.stages["block3"].modules())
    assert isinstance(model.stages["block1"].conv1.act, nn.ReLU)
    lrn = model.stages["block1"].lrn
    assert (lrn.radius, lrn.k, lrn.alpha, lrn.beta) == (1, 1.5, 1e-3, 0.5)
    paper = create_backbone("alexnet_lrn").stages["block2"].lrn
    assert (paper.radius, paper.k, paper.alpha, paper.beta) == (2, 2.0, 1e-4, 0.75)
    with pytest.raises(ValueError, match="odd"):
        AlexNet(lrn=True, lrn_size=4)


def test_alexnet_lrn_loads_torchvision_weights_and_reduces_to_alexnet() -> None:
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.alexnet(weights=None).eval()
    # k=1, alpha=0 makes LRN the identity, so the logits must then be torchvision's
    ours = create_classifier("alexnet_lrn", 1000, lrn_k=1.0, lrn_alpha=0.0).eval()
    ours.load_state_dict(AlexNet.remap_state_dict(ref.state_dict()))
    x = torch.randn(1, 3, 95, 95)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
        paper = create_classifier("alexnet_lrn", 1000).eval()
        paper.load_state_dict(AlexNet.remap_state_dict(ref.state_dict()))
        assert not torch.allclose(paper(x), ref(x))


def test_alexnet_strides_sizes_and_errors() -> None:
    model = AlexNet().eval()
    assert [(f.name, f.channels, f.stride) for f in model.feature_info] == [
        ("pool1", 64, 8), ("pool2", 192, 16), ("pool5", 256, 32)
    ]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert [t.shape[-1] for t in out.values()] == [27, 13, 6]  # the paper's 55 -> 27, 13, 6 grid
    assert model.min_side == 63
    with torch.no_grad():
        assert model(torch.randn(1, 3, 63, 63))["pool5"].shape[-1] == 1
    with pytest.raises(ValueError, match="at least 63x63"):
        model(torch.randn(1, 3, 62, 80))
    with pytest.raises(ValueError, match=r"valid values are \(32,\)"):
        AlexNet(output_stride=16)
    shallow = AlexNet(out_features=["pool1"])
    assert list(shallow.stages) == ["block1"] and shallow.min_side == 15
    with pytest.raises(ValueError, match="pool5"):
        shallow.build_head(10)
    with pytest.raises(ValueError, match="not a torchvision AlexNet"):
        AlexNet.remap_state_dict({"fc.weight": torch.zeros(1)})


def test_alexnet_head_is_torchvision_classifier() -> None:
    head = AlexNet().build_head(5)
    kinds = [type(m) for m in head][2:]  # after the adaptive pool and the flatten
    assert kinds == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]
    assert head.pool.output_size == (6, 6) and head.fc6.in_features == 9216


# --- LeNet-5 --------------------------------------------------------------------------------


def test_lenet5_parameter_count() -> None:
    # One grey input channel, 10 classes, full C3 connections, plain pooling and linear outputs:
    #   C1  6 x (1*5*5 + 1)      =    156
    #   C3 16 x (6*5*5 + 1)      =  2,416
    #   C5 120 x (16*5*5 + 1)    = 48,120
    #   F6 84 x (120 + 1)        = 10,164
    #   out 10 x (84 + 1)        =    850
    #                     total  = 61,706
    model = create_classifier("lenet5", num_classes=10, in_chans=1)
    assert count_parameters(model) == 61_706


def test_lenet5_shapes_activation_and_levels() -> None:
    model = LeNet5(in_chans=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {"s2": (6, 14, 14), "s4": (16, 5, 5), "c5": (120, 1, 1)}
    assert [f.stride for f in model.feature_info] == [2, 8, 32]
    assert isinstance(model.stages["c1"].act, nn.Tanh)
    assert all(isinstance(model.stages[s], nn.AvgPool2d) for s in ("s2", "s4"))
    relu = create_classifier("lenet5", 10, act="relu")
    assert isinstance(relu.backbone.stages["c5"].act, nn.ReLU) and isinstance(relu.head.act, nn.ReLU)
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="unknown activation"):
        LeNet5(act="swishy")
    assert list(LeNet5(out_features=["s2"]).stages) == ["c1", "s2"]


def test_lenet5_head_takes_larger_inputs() -> None:
    model = create_classifier("lenet5", 4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 40)).shape == (2, 4)
