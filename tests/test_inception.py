"""Inception plugins: parity with torchvision/timm, map sizes, input limits, weight mapping (the contract: test_backbone_contract)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cvtasks.checks import check_parity
from cvtasks.registry import create_backbone, get_backbone_entry, list_backbones
from plugins.inception import GoogLeNet, InceptionNet, InceptionResNetV2, InceptionV3, InceptionV4

NAMES = ["googlenet", "inception_v3", "inception_v4", "inception_resnet_v2"]
HEAVY = {"inception_v4", "inception_resnet_v2"}  # 43M / 56M parameters: parity writes them to disk
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in NAMES]
CLASSES = {"googlenet": GoogLeNet, "inception_v3": InceptionV3, "inception_v4": InceptionV4,
           "inception_resnet_v2": InceptionResNetV2}


def _meta(name: str, **kw: object) -> InceptionNet:
    """The backbone on the meta device: shapes without arithmetic, so big nets cost nothing."""
    with torch.device("meta"):
        return create_backbone(name, **kw)


def test_registered_with_metadata() -> None:
    assert set(NAMES) <= set(list_backbones())
    for name in NAMES:
        entry = get_backbone_entry(name)
        assert entry.family == "inception" and entry.paper.startswith("Szegedy")
        assert entry.input_size == (224 if name == "googlenet" else 299)


@pytest.mark.parametrize("name", PARAMS)
def test_parity_with_reference(name: str) -> None:
    assert check_parity(name).startswith("ok")


# map sizes at the native input (the papers' figures): odd sizes come from the unpadded stems
NATIVE_MAPS = {
    "googlenet": [112, 56, 28, 14, 7],
    "inception_v3": [147, 71, 35, 17, 8],
    "inception_v4": [147, 73, 35, 17, 8],
    "inception_resnet_v2": [147, 71, 35, 17, 8],
}
CHANNELS = {
    "googlenet": [64, 192, 480, 832, 1024],
    "inception_v3": [64, 192, 288, 768, 2048],
    "inception_v4": [64, 160, 384, 1024, 1536],
    "inception_resnet_v2": [64, 192, 320, 1088, 1536],
}


@pytest.mark.parametrize("name", NAMES)
def test_native_map_sizes_and_declared_levels(name: str) -> None:
    model = _meta(name)
    size = get_backbone_entry(name).input_size
    out = model(torch.empty(1, 3, size, size, device="meta"))
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 32]
    assert [f.channels for f in model.feature_info] == CHANNELS[name]
    assert [v.shape[1] for v in out.values()] == CHANNELS[name]
    assert [v.shape[-1] for v in out.values()] == NATIVE_MAPS[name]


@pytest.mark.parametrize("name", NAMES)
def test_smallest_input_and_clear_error_below(name: str) -> None:
    model = _meta(name).eval()  # batch statistics of a 1x1 map would be undefined
    n = type(model).smallest_input
    out = model(torch.empty(1, 3, n, n, device="meta"))
    assert list(out.values())[-1].shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match=f"at least {n}x{n}"):
        model(torch.empty(1, 3, n - 1, n + 20, device="meta"))


def test_no_dilation() -> None:
    with pytest.raises(ValueError, match=r"valid values are \(32,\)"):
        create_backbone("inception_v3", output_stride=16)
    assert InceptionV3.spec.supported_output_strides == (32,)


def test_out_features_stops_early_and_validates() -> None:
    model = _meta("inception_v3", out_features=["Conv2d_4a_3x3", "Mixed_5d"])
    assert list(model.stages)[-1] == "Mixed_5d"
    out = model(torch.empty(1, 3, 40, 40, device="meta"))  # truncated: the whole-net minimum does not apply
    assert list(out) == ["Conv2d_4a_3x3", "Mixed_5d"]
    with pytest.raises(ValueError, match="valid names"):
        create_backbone("googlenet", out_features=["Mixed_5d"])


@pytest.mark.parametrize("in_chans", [1, 5])
def test_in_chans(in_chans: int) -> None:
    model = _meta("inception_resnet_v2", in_chans=in_chans)
    assert model.state_dict()[model.first_conv].shape[1] == in_chans
    with pytest.raises(ValueError, match="in_chans"):
        create_backbone("googlenet", in_chans=0)


def _tv_state_dict(name: str, **kw: object) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None, init_weights=False, **kw).state_dict()


def test_remap_drops_aux_heads_and_tolerates_missing_bn_counters() -> None:
    # torchvision's published googlenet weights carry the two auxiliary classifiers
    ref = _tv_state_dict("googlenet", aux_logits=True)
    assert any(k.startswith("aux1.") for k in ref)
    ref = {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    mapped = GoogLeNet.remap_state_dict(ref)
    own = {"backbone." + k for k in _meta("googlenet").state_dict() if not k.endswith("num_batches_tracked")}
    assert set(mapped) == own | {"head.fc.weight", "head.fc.bias"}


def test_remap_of_wrong_weights_names_the_reference() -> None:
    with pytest.raises(ValueError, match="torchvision inception_v3"):
        InceptionV3.remap_state_dict(_tv_state_dict("googlenet", aux_logits=False))


def test_head_dropout_follows_the_papers() -> None:
    expected = {"googlenet": 0.2, "inception_v3": 0.5, "inception_v4": 0.2, "inception_resnet_v2": 0.2}
    for name, p in expected.items():
        head = _meta(name).build_head(10)
        assert head.dropout.p == p and head.fc.in_features == CHANNELS[name][-1]


def test_residual_block_is_scaled_and_last_has_no_relu() -> None:
    full = _meta("inception_resnet_v2")
    scales = [b.scale for b in full.stages["repeat"]] + [b.scale for b in full.stages["repeat_2"]]
    assert set(scales) == {0.17, 0.20}
    assert isinstance(full.stages["block8"].act, torch.nn.Identity)
    assert isinstance(full.stages["repeat_2"][0].act, torch.nn.ReLU)
