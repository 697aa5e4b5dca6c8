"""ResNet family plugins: parity with torchvision/timm, dilation, truncation, loading (the contract: test_backbone_contract)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from cvtasks.backbone import create_classifier
from cvtasks.checks import check_parity, count_parameters
from cvtasks.registry import create_backbone, get_backbone_entry, list_backbones
from plugins.resnet import ResNet, wide_resnet_cifar

# the biggest nets, plus resnet101 and wide_resnet50_2 (over 40M parameters), to keep the default run short
SLOW = {"resnet152", "resnext101_32x8d", "wide_resnet101_2", "resnetv2_101", "resnet101", "wide_resnet50_2"}
# the registered names come from the registry (the contract test checks each against the docs)
NAMES = sorted(n for n in list_backbones() if get_backbone_entry(n).module == "plugins.resnet")
WITH_REFERENCE = [n for n in NAMES if ":" in get_backbone_entry(n).reference]


def _params(names: list[str]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _save_torchvision(name: str, path: Path, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    ref = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    torch.save(ref.state_dict(), path)
    return ref


@pytest.mark.parametrize("name", _params(WITH_REFERENCE))
def test_parity(name: str) -> None:
    note = check_parity(name)
    assert note.startswith("ok"), note


@pytest.mark.parametrize(("name", "depth", "k", "published_millions"), [
    ("wrn28_10", 28, 10, 36.5),
    ("wrn40_4", 40, 4, 8.9),
])
def test_wrn_parameter_counts_match_the_paper(name: str, depth: int, k: int, published_millions: float) -> None:
    # Zagoruyko & Komodakis, Table: WRN-28-10 36.5M, WRN-40-4 8.9M parameters on CIFAR-10
    model = create_classifier(name, num_classes=10)
    assert round(count_parameters(model) / 1e6, 1) == published_millions
    built = wide_resnet_cifar(depth, k)
    assert count_parameters(built) == count_parameters(model.backbone)


def test_wrn_layout_dropout_and_bad_depth() -> None:
    model = create_backbone("wrn40_4", dropout=0.3).eval()
    assert [(f.name, f.channels, f.stride) for f in model.feature_info] == [
        ("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 4)]
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules()) == 18  # one per block
    out = model(torch.randn(1, 3, 32, 32))
    assert out["layer3"].shape == (1, 256, 8, 8)
    with pytest.raises(ValueError, match="6n\\+4"):
        wide_resnet_cifar(27, 10)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        create_backbone("wrn28_10", output_stride=16)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnetv2_50"])
def test_output_stride_shapes(name: str, output_stride: int) -> None:
    model = create_backbone(name, output_stride=output_stride).eval()
    assert model.output_stride == output_stride
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    expected = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": min(16, output_stride),
                "layer4": min(32, output_stride)}
    assert {f.name: f.stride for f in model.feature_info} == expected
    for name_, stride in expected.items():
        assert out[name_].shape[-1] == 64 // stride, name_


def test_dilation_matches_torchvision_replace_stride_with_dilation(tmp_path: Path) -> None:
    # DeepLabV3's dilated ResNet is torchvision's replace_stride_with_dilation: same weights, same features
    ref = _save_torchvision("resnet50", tmp_path / "r50.pt", replace_stride_with_dilation=[False, True, True])
    ours = create_backbone("resnet50", output_stride=8, pretrained=str(tmp_path / "r50.pt")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        got = ours(x)["layer4"]
    assert got.shape == y.shape
    torch.testing.assert_close(got, y, rtol=1e-4, atol=1e-4)


def test_unsupported_output_stride_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"\(8, 16, 32\)"):
        create_backbone("resnet18", output_stride=4)


def test_out_features_truncates_the_build(tmp_path: Path) -> None:
    _save_torchvision("resnet18", tmp_path / "r18.pt")
    full = create_backbone("resnet18", pretrained=str(tmp_path / "r18.pt")).eval()
    cut = create_backbone("resnet18", out_features=["layer2"], pretrained=str(tmp_path / "r18.pt")).eval()
    assert list(cut.stages) == ["stem", "pool", "layer1", "layer2"]  # layer3/layer4 were never built
    assert [f.name for f in cut.feature_info] == ["layer2"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = cut(x)
        assert list(out) == ["layer2"]
        torch.testing.assert_close(out["layer2"], full(x)["layer2"])
    assert count_parameters(cut) < count_parameters(full) / 4
    with pytest.raises(ValueError, match="valid names are"):
        create_backbone("resnet18", out_features=["layer5"])


def test_in_chans_1_sums_pretrained_first_conv(tmp_path: Path) -> None:
    ref = _save_torchvision("resnet18", tmp_path / "r18.pt")
    model = create_backbone("resnet18", in_chans=1, pretrained=str(tmp_path / "r18.pt"))
    weight = model.state_dict()[ResNet.first_conv]
    assert weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(weight, ref.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.stages.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)


@pytest.mark.parametrize(("file_of", "into"), [
    ("resnet34", "resnet18"),   # more blocks per stage, identical shapes: must not load as a subset
    ("resnet18", "resnet50"),   # basic blocks into bottlenecks
    ("resnext50_32x4d", "resnet50"),  # grouped conv shapes differ
])
def test_wrong_variant_file_is_a_clear_error(tmp_path: Path, file_of: str, into: str) -> None:
    _save_torchvision(file_of, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="variant"):
        create_backbone(into, pretrained=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="variant"):
        create_classifier(into, num_classes=1000, pretrained=str(tmp_path / "w.pt"))


def test_timm_se_file_into_plain_resnet_is_rejected(tmp_path: Path) -> None:
    import timm

    torch.save(timm.create_model("seresnet50", pretrained=False).state_dict(), tmp_path / "se.pt")
    with pytest.raises(ValueError, match="variant"):
        create_backbone("resnet50", pretrained=str(tmp_path / "se.pt"))
    create_backbone("seresnet50", pretrained=str(tmp_path / "se.pt"))  # the right variant loads


@pytest.mark.parametrize(("name", "last"), [("resnet18", "bn2"), ("resnet50", "bn3"), ("resnetv2_50", "conv3")])
def test_zero_init_residual(name: str, last: str) -> None:
    model = create_backbone(name, zero_init_residual=True)
    blocks = [m for m in model.modules() if hasattr(m, "last_norm")]
    assert len(blocks) == sum(get_backbone_entry(name).defaults["layers"])
    assert all(getattr(b, last).weight.abs().sum() == 0 for b in blocks)
    plain = create_backbone(name)
    assert all(getattr(b, last).weight.abs().sum() > 0 for b in plain.modules() if hasattr(b, "last_norm"))


def test_bad_architecture_keywords_are_named() -> None:
    with pytest.raises(ValueError, match="block='bottleneck'"):
        create_backbone("resnet18", groups=32)
    with pytest.raises(ValueError, match="block="):
        create_backbone("resnet18", block="dense")
