"""EfficientNet-B0..B7: compound scaling in code, parity with torchvision (the contract: test_backbone_contract)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import efficientnet as tv_efficientnet

from cvtasks.backbone import create_classifier
from cvtasks.checks import check_parity, count_parameters
from cvtasks.layers import DropPath
from cvtasks.registry import create_backbone, get_backbone_entry, list_backbones
from plugins.efficientnet import VARIANTS, scale_stages

NAMES = [f"efficientnet_b{i}" for i in range(8)]
SLOW = {f"efficientnet_b{i}" for i in range(4, 8)}
PARAMS = [n if n not in SLOW else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]
# torchvision's published counts (1000 classes)
PUBLISHED = {
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}
RESOLUTION = dict(zip(NAMES, (224, 240, 260, 300, 380, 456, 528, 600)))


def test_all_variants_registered_with_their_resolution() -> None:
    assert set(NAMES) <= set(list_backbones("efficientnet_b*"))
    for name in NAMES:
        assert get_backbone_entry(name).input_size == RESOLUTION[name]


@pytest.mark.parametrize("name", NAMES)
def test_scaling_rule_matches_torchvision_tables(name: str) -> None:
    cfg = VARIANTS[name]
    ref, last_channel = tv_efficientnet._efficientnet_conf(
        name, width_mult=cfg["width_mult"], depth_mult=cfg["depth_mult"]
    )
    ours = scale_stages(cfg["width_mult"], cfg["depth_mult"])
    assert last_channel is None  # torchvision too takes 4x the last width
    assert [(s.expand_ratio, s.kernel, s.stride, s.in_channels, s.out_channels, s.repeats) for s in ours] == [
        (r.expand_ratio, r.kernel, r.stride, r.input_channels, r.out_channels, r.num_layers) for r in ref
    ]


@pytest.mark.parametrize("name", PARAMS)
def test_scaling_rule_gives_published_parameter_count(name: str) -> None:
    model = create_classifier(name, num_classes=1000)
    assert count_parameters(model) == PUBLISHED[name]


def test_depth_and_width_grow_with_the_variant() -> None:
    depths = [sum(s.repeats for s in scale_stages(v["width_mult"], v["depth_mult"])) for v in VARIANTS.values()]
    widths = [scale_stages(v["width_mult"], v["depth_mult"])[-1].out_channels for v in VARIANTS.values()]
    assert depths == sorted(depths) and depths[0] == 16 and depths[-1] == 55
    assert widths == sorted(widths) and widths[0] == 320 and widths[-1] == 640


@pytest.mark.parametrize("name", PARAMS)
def test_parity(name: str) -> None:
    assert check_parity(name).startswith("ok")


@pytest.mark.parametrize("name,eps,momentum", [("efficientnet_b0", 1e-5, 0.1), ("efficientnet_b5", 1e-3, 0.01)])
def test_batch_norm_settings_follow_torchvision(name: str, eps: float, momentum: float) -> None:
    norms = [m for m in create_backbone(name, out_features=["stage1"]).modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == eps and m.momentum == momentum for m in norms)


def test_stochastic_depth_grows_linearly_and_acts_only_in_training() -> None:
    model = create_backbone("efficientnet_b0")
    probs = [m.p for m in model.modules() if isinstance(m, DropPath)]
    # only residual blocks carry it; block i of 16 drops with 0.2 * i / 16
    assert probs == sorted(probs) and 0 < probs[0] and probs[-1] == pytest.approx(0.2 * 14 / 16)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x)["stage5"], model(x)["stage5"]
    torch.testing.assert_close(a, b)
    model.train()
    torch.manual_seed(0)
    deepest = [m for m in model.modules() if isinstance(m, DropPath)][-1]  # p = 0.175
    y = torch.randn(256, 8, 2, 2)
    dropped = (deepest(y) == 0).flatten(1).all(1).float().mean().item()
    assert 0.05 < dropped < 0.35


def test_squeeze_excite_reduces_the_block_input_by_four() -> None:
    block = create_backbone("efficientnet_b0").stages.stage2.mbconv2[0]  # 16 -> 24, expanded to 96
    assert block.se.fc1.in_channels == 96 and block.se.fc1.out_channels == 16 // 4
    assert isinstance(block.se.act, nn.SiLU)
