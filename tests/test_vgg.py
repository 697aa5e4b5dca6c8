"""VGG plugin: parity with torchvision, the config table, pool indices for unpooling (the contract: test_backbone_contract)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvtasks.checks import check_parity
from cvtasks.registry import create_backbone, list_backbones
from plugins.vgg import VGG, VGG_CONFIGS

# every variant is checked; the two smallest on every run, the heavier ones (120M-parameter
# reference models written to disk for parity) under the slow marker
FAST = {"vgg11", "vgg11_bn"}


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in list_backbones("vgg*")]
)
def test_parity(name: str) -> None:
    assert check_parity(name).startswith("ok")


@pytest.mark.parametrize("config,depth", [("A", 11), ("B", 13), ("D", 16), ("E", 19)])
def test_config_table_depth(config: str, depth: int) -> None:
    # the paper counts weight layers: the 3x3 convolutions plus the three fully connected layers
    convs = sum(len(block) for block in VGG_CONFIGS[config])
    assert convs + 3 == depth
    model = VGG(config=config)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("size", [32, 45])
def test_pool_indices_restore_pre_pool_maps(batch_norm: bool, size: int) -> None:
    torch.manual_seed(0)
    model = create_backbone("vgg11_bn" if batch_norm else "vgg11").eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        plain = model(x)
        feats, indices = model.forward_with_pool_indices(x)
    assert model.spec.exposes_pool_indices
    assert list(feats) == list(plain) == [f"pool{i}" for i in range(1, 6)]
    assert list(indices) == list(feats)
    for name, fmap in feats.items():
        torch.testing.assert_close(fmap, plain[name])
        idx, pre_size = indices[name]
        assert isinstance(pre_size, torch.Size) and idx.shape == fmap.shape
        restored = F.max_unpool2d(fmap, idx, 2, 2, output_size=pre_size)
        assert restored.shape == pre_size  # odd sizes (45 -> 22) need output_size to come back
        # the maxima went back where they came from: pooling the restored map gives them again
        torch.testing.assert_close(F.max_pool2d(restored, 2, 2), fmap)
    assert indices["pool1"][1][-2:] == (size, size)


def test_plain_forward_computes_no_indices() -> None:
    model = VGG(config="A")
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and not any(p.return_indices for p in pools)


def test_pool_indices_cover_levels_left_out() -> None:
    model = VGG(config="A", out_features=["pool3"]).eval()
    with torch.no_grad():
        feats, indices = model.forward_with_pool_indices(torch.randn(1, 3, 32, 32))
    assert list(feats) == ["pool3"]
    assert list(indices) == ["pool1", "pool2", "pool3"]  # blocks 4-5 are not even built


def test_out_features_truncates_and_head_needs_pool5() -> None:
    model = VGG(config="A", out_features=["pool3", "pool4"])
    assert list(model.stages) == ["block1", "block2", "block3", "block4"]
    assert [f.stride for f in model.feature_info] == [8, 16]
    with pytest.raises(ValueError, match="pool5"):
        model.build_head(10)
    with pytest.raises(ValueError, match="valid names"):
        VGG(out_features=["conv5"])


def test_bad_output_stride_and_config_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"valid values are \(32,\)"):
        create_backbone("vgg16", output_stride=16)
    with pytest.raises(ValueError, match="Table 1"):
        VGG(config="C")
    assert VGG.spec.supported_output_strides == (32,)


def test_head_is_torchvision_classifier() -> None:
    head = VGG(config="A").build_head(7, dropout=0.3)
    kinds = [type(m) for m in head][2:]  # after the adaptive pool and the flatten
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert isinstance(head.pool, nn.AdaptiveAvgPool2d) and head.pool.output_size == (7, 7)
    assert head.fc6.in_features == 25088 and head.fc8.out_features == 7
    assert head.drop6.p == head.drop7.p == 0.3


def test_remap_rejects_a_foreign_state_dict() -> None:
    sd = {"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": torch.zeros(8)}
    with pytest.raises(ValueError, match="torchvision VGG"):
        VGG.remap_state_dict(sd)


def test_remap_maps_every_torchvision_key() -> None:
    # key names only (a meta-device reference costs no memory)
    import torchvision

    with torch.device("meta"):
        ref = torchvision.models.vgg13_bn(weights=None)
    ref_sd = ref.state_dict()
    mapped = VGG.remap_state_dict(ref_sd)
    with torch.device("meta"):
        ours = VGG(config="B", batch_norm=True)
        head = ours.build_head(1000)
    own = {f"backbone.{k}": v for k, v in ours.state_dict().items()}
    own.update({f"head.{k}": v for k, v in head.state_dict().items()})
    assert len(mapped) == len(ref_sd) and set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)


def test_too_small_input_names_the_minimum() -> None:
    model = VGG(config="A")
    assert model.min_side == 32
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        model.forward_with_pool_indices(torch.randn(1, 3, 64, 16))
    assert VGG(config="A", out_features=["pool2"]).min_side == 4
