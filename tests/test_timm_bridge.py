"""The timm bridge: ``timm/<model>`` names, feature levels, pretrained files, clear errors.

Reference parity is skipped for the bridge: the backbone *is* timm's model (there is nothing
independent to compare with), and our generic pooling head is not timm's classifier. What can go
wrong is the wrapping, so the tests compare against timm's own features_only model loaded by timm.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from cvtasks.checks import check_backbone
from cvtasks.registry import UnknownBackboneError, create_backbone, get_backbone_entry


def _full_model_file(name: str, tmp_path: Path, **kwargs) -> str:
    torch.manual_seed(0)
    full = timm.create_model(name, pretrained=False, **kwargs)
    path = tmp_path / f"{name}.pt"
    torch.save(full.state_dict(), path)
    return str(path)


def _timm_features(name: str, path: str, **kwargs) -> torch.nn.Module:
    """timm's own features_only model, loading the full-model file itself."""
    return timm.create_model(
        name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs
    ).eval()


def test_resnet18_passes_the_contract_checks() -> None:
    report = check_backbone("timm/resnet18")
    assert report.ok, str(report)
    assert report.results["reference parity"].startswith("skipped")


def test_entry_is_resolved_from_the_wildcard() -> None:
    entry = get_backbone_entry("timm/resnet18")
    assert entry.family == "timm" and entry.defaults["model_name"] == "resnet18"


def test_unknown_timm_name_names_close_ones() -> None:
    with pytest.raises(UnknownBackboneError, match="timm/nonexistent_net"):
        create_backbone("timm/nonexistent_net")
    with pytest.raises(UnknownBackboneError, match="timm/resnet18"):
        create_backbone("timm/resnet_18")


def test_out_features_selects_levels() -> None:
    full = create_backbone("timm/mobilenetv3_small_100")
    assert [f.stride for f in full.feature_info] == [2, 4, 8, 16, 32]
    model = create_backbone("timm/mobilenetv3_small_100", out_features=["blocks_1", "blocks_3"]).eval()
    assert [(f.name, f.channels, f.stride) for f in model.feature_info] == [("blocks_1", 24, 8), ("blocks_3", 48, 16)]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["blocks_1", "blocks_3"]
    assert out["blocks_1"].shape == (1, 24, 8, 8) and out["blocks_3"].shape == (1, 48, 4, 4)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="valid names are"):
        create_backbone("timm/mobilenetv3_small_100", out_features=["layer4"])


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",  # keys kept as they are
        "test_convnext",  # flattened stages: 'stages.0' -> 'stages_0'
        "test_vit",  # the model held as 'model'
        "test_mambaout",  # channels-last features, flattened stages
    ],
)
def test_pretrained_full_model_file(name: str, tmp_path: Path) -> None:
    path = _full_model_file(name, tmp_path)
    ours = create_backbone(f"timm/{name}", pretrained=path).eval()
    ref = _timm_features(name, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, expected = ours(x), ref(x)
    assert len(out) == len(expected)
    channels_last = str(getattr(ref, "output_fmt", "NCHW")).endswith("NHWC")  # timm leaves them so
    for info, exp in zip(ours.feature_info, expected):
        if channels_last:
            exp = exp.permute(0, 3, 1, 2)
        assert out[info.name].shape[1] == info.channels
        torch.testing.assert_close(out[info.name], exp)


def test_pretrained_adapts_the_stem_to_in_chans(tmp_path: Path) -> None:
    path = _full_model_file("resnet18", tmp_path)
    ours = create_backbone("timm/resnet18", in_chans=1, pretrained=path)
    full = torch.load(path)
    torch.testing.assert_close(ours.model.conv1.weight.detach(), full["conv1.weight"].sum(1, keepdim=True))
    assert ours.eval()(torch.randn(1, 1, 32, 32))["layer4"].shape == (1, 512, 1, 1)


def test_output_stride_passes_through_or_fails_clearly() -> None:
    model = create_backbone("timm/resnet18", output_stride=16)
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 16]
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out["layer4"].shape[-1] == 4
    with pytest.raises(ValueError, match="output_stride"):
        create_backbone("timm/test_vit", output_stride=8)
    with pytest.raises(ValueError, match="8, 16 or 32"):
        create_backbone("timm/resnet18", output_stride=4)


def test_out_features_output_equals_the_full_extractor() -> None:
    torch.manual_seed(0)
    full = create_backbone("timm/mobilenetv3_small_100").eval()
    part = create_backbone("timm/mobilenetv3_small_100", out_features=["blocks_1"]).eval()
    part.load_state_dict({k: v for k, v in full.state_dict().items() if k in part.state_dict()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(part(x)["blocks_1"], full(x)["blocks_1"])
