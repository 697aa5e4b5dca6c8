"""The backbone contract, checked for every registered name (in the style of timm's test_models.py).

Parametrised by name from ``list_backbones()``, so a new plugin is checked with no edit here and a
failure names the net. Shapes are checked on the meta device (no arithmetic, so the biggest nets
cost only their build), at the smallest input each net's spec declares. What needs real numbers
(in_chans adaptation, a training step, saving and loading) runs in ``check_backbone``.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from cvtasks.backbone import Backbone, BackboneRequest, BackboneSpec, StagedBackbone, backbone_normalization
from cvtasks.checks import check_backbone, count_parameters
from cvtasks.heads.segmentation import build_segmentation_model, segmentation_backbone_kwargs
from cvtasks.registry import create_backbone, get_backbone_entry, list_backbones, register_backbone

# the built-in plugins only: names that other test modules register come and go with them
NAMES = [n for n in list_backbones() if get_backbone_entry(n).module.startswith("plugins.")]
# docs/backbones.md's table, generated from the registry by benchmarks/backbone_docs.py
DOCUMENTED = json.loads((Path(__file__).resolve().parents[1] / "docs" / "backbones.json").read_text())
# check_backbone builds a net seven times and trains a step: beyond this size that costs seconds per
# net, and a smaller sibling of the same class runs the same code (the shapes of all are checked here)
HEAVY_PARAMS = 30_000_000


@functools.lru_cache(maxsize=None)
def _meta(name: str, output_stride: int | None = None) -> Backbone:
    """The backbone on the meta device: shapes without arithmetic (kept: the slow marks reuse them)."""
    kw = {} if output_stride is None else {"output_stride": output_stride}
    with torch.device("meta"):
        return create_backbone(name, **kw).eval()


def _check_forward(model: Backbone, size: int) -> None:
    """Output names, channels and map sizes against ``feature_info``; strides never decrease."""
    with torch.no_grad():
        out = model(torch.empty(1, 3, size, size, device="meta"))
    assert list(out) == model.feature_names
    prev = 0
    for info in model.feature_info:
        fmap = out[info.name]
        assert fmap.shape[1] == info.channels, info
        assert info.stride >= prev, model.feature_info
        prev = info.stride
        # unpadded stems and ceil-mode pools round the maps: within 1.5x of input/stride
        assert info.stride / 1.5 <= size / fmap.shape[-1] <= info.stride * 1.5, (info, tuple(fmap.shape))


def test_registered_names_are_the_documented_ones() -> None:
    # a variant dropped from a plugin's table, or registered without a docs row, shows here
    missing, stale = sorted(set(NAMES) - set(DOCUMENTED)), sorted(set(DOCUMENTED) - set(NAMES))
    assert not missing, f"not in docs/backbones.json: {missing}; run make docs ARGS=\"--pattern '<name>'\" for each"
    assert not stale, f"docs/backbones.json lists nets no plugin registers: {stale}; remove their rows (make docs)"
    for name in NAMES:
        entry = get_backbone_entry(name)
        assert entry.family and entry.paper, name


@pytest.mark.parametrize("name", NAMES)
def test_contract(name: str) -> None:
    entry = get_backbone_entry(name)
    spec = entry.spec
    model = _meta(name)
    assert isinstance(model, Backbone) and isinstance(spec, BackboneSpec)
    assert model.spec == spec, "the registry's spec (read without building) differs from the built net's"
    if isinstance(model, StagedBackbone):
        assert model.min_side <= spec.min_input_size, "the spec's min_input_size is below what the layers take"
    _check_forward(model, spec.min_input_size)  # the declared minimum is accepted
    assert model.feature_info[-1].stride == spec.native_stride
    for stride in spec.supported_output_strides:
        dilated = _meta(name, stride)
        assert max(f.stride for f in dilated.feature_info) == stride == dilated.output_stride
        _check_forward(dilated, spec.min_input_size)
    assert backbone_normalization(name) == (spec.mean, spec.std) and len(spec.mean) == 3
    documented = DOCUMENTED.get(name)
    assert documented, f"{name} is not in docs/backbones.json; run make docs ARGS=\"--pattern '{name}'\""
    assert documented["levels"] == " ".join(f"{f.name}:{f.channels}@{f.stride}" for f in model.feature_info)
    assert documented["output_stride"] == "/".join(map(str, spec.supported_output_strides))


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_output_stride_is_refused_naming_the_valid_ones(name: str) -> None:
    spec = get_backbone_entry(name).spec
    bad = next(s for s in (4, 8, 16, 32, 2) if s not in spec.supported_output_strides)
    valid = re.escape(str(spec.supported_output_strides))
    with pytest.raises(ValueError, match=rf"output_stride={bad} .*valid values are {valid}"):
        create_backbone(name, output_stride=bad)


def _conformance_params() -> list[object]:
    params = []
    for name in NAMES:
        heavy = count_parameters(_meta(name)) > HEAVY_PARAMS
        params.append(pytest.param(name, marks=pytest.mark.slow) if heavy else name)
    return params


@pytest.mark.parametrize("name", _conformance_params())
def test_check_backbone(name: str, one_thread: None) -> None:
    report = check_backbone(name, parity=False, shapes=False)  # the shapes are test_contract's
    assert report.ok, str(report)


def test_deeplab_on_a_backbone_that_cannot_dilate_warns_and_falls_back() -> None:
    # the CIFAR WRNs end at stride 4: DeepLabV3's request for 16 is a documented fallback, not an error
    with pytest.warns(UserWarning, match=r"wrn40_4.*output_stride=16"):
        model = build_segmentation_model("deeplabv3", "wrn40_4", num_classes=3, head_kwargs={"channels": 8})
    assert model.backbone.feature_info[-1].stride == 4 and model.head.aspp.rates == (24, 48, 72)


def test_wrn28_10_deeplab_builds() -> None:
    """The issue's case: build_segmentation_model('deeplabv3', 'wrn28_10', num_classes=3) raised."""
    with pytest.warns(UserWarning, match="wrn28_10"):
        assert segmentation_backbone_kwargs("deeplabv3", "wrn28_10") == {}


def test_requests_are_checked_before_the_build() -> None:
    spec = BackboneSpec(supported_output_strides=(8, 16, 32))
    assert spec.resolve(BackboneRequest(output_stride=16), backbone="b", asker="head 'h'") == {"output_stride": 16}
    assert spec.resolve(BackboneRequest(output_stride=32), backbone="b", asker="head 'h'") == {}
    plain = BackboneSpec()
    with pytest.raises(ValueError, match=r"detector 'rfcn' needs output_stride=16.*'vgg16'"):
        plain.resolve(BackboneRequest(output_stride=16, strict=True), backbone="vgg16", asker="detector 'rfcn'")
    with pytest.raises(ValueError, match=r"head 'unpool'.*exposes_pool_indices.*'resnet18'.*vgg16"):
        plain.resolve(BackboneRequest(pool_indices=True), backbone="resnet18", asker="head 'unpool'")
    with pytest.raises(ValueError, match="output_stride=12"):
        BackboneRequest(output_stride=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plain.resolve(BackboneRequest(), backbone="b", asker="x") == {}


def test_registration_changes_spec_fields_and_refuses_unknown_ones() -> None:
    class _SpecNet(StagedBackbone):
        spec = BackboneSpec(supported_output_strides=(16, 32))

        def __init__(self, *, in_chans: int = 3, out_features=None, output_stride: int = 32) -> None:
            super().__init__()
            self.stages["s"] = torch.nn.Conv2d(in_chans, 4, 32, stride=32)
            self._finish([("s", "s", 4, 32)], out_features)

    register_backbone("_spec_net", family="_spec", spec={"mean": (0.5,) * 3, "std": (0.5,) * 3})(_SpecNet)
    entry = get_backbone_entry("_spec_net")
    assert entry.spec.mean == (0.5, 0.5, 0.5) and entry.spec.supported_output_strides == (16, 32)
    assert create_backbone("_spec_net").spec == entry.spec  # the built net carries the variant's spec
    with pytest.raises(ValueError, match=r"_spec_net2.*no fields \['means'\].*'mean'"):
        register_backbone("_spec_net2", spec={"means": (0.5,) * 3})
    with pytest.raises(ValueError, match="_spec_net3.*std"):
        register_backbone("_spec_net3", spec={"std": (0.0, 1.0, 1.0)})
    with pytest.raises(TypeError, match="forward_with_pool_indices"):
        type("_NoIndices", (_SpecNet,), {"spec": BackboneSpec(exposes_pool_indices=True)})()
