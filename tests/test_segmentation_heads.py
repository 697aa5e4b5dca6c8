"""Segmentation heads on any backbone (sizes, levels by stride, clear errors) and the dense CRF."""

from __future__ import annotations

import functools
from collections import OrderedDict
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvtasks.backbone import BackboneSpec, StagedBackbone
from cvtasks.crf import DenseCRF
from cvtasks.heads.segmentation import (
    SEGMENTATION_HEADS,
    DeepLabV3Head,
    FCNHead,
    SegmentationModel,
    build_segmentation_head,
    build_segmentation_model,
    crop_or_pad,
    segmentation_backbone_kwargs,
)
from cvtasks.layers import BilinearUpsample
from cvtasks.registry import create_backbone, get_backbone_entry, list_backbones, register_backbone


class _SegTestNet(StagedBackbone):
    """Five conv + 2x2 max-pool stages (strides 2..32), level names unlike VGG's; dilation for OS 16."""

    spec = BackboneSpec(supported_output_strides=(16, 32), exposes_pool_indices=True)

    def __init__(self, *, in_chans: int = 3, out_features=None, output_stride: int = 32, width: int = 8) -> None:
        super().__init__()
        self.output_stride = output_stride
        levels, c, stride = [], in_chans, 1
        for i in range(5):
            dilated = output_stride == 16 and i == 4
            out = width * 2 ** min(i, 3)
            pad = 2 if dilated else 1
            self.stages[f"s{i}"] = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(c, out, 3, padding=pad, dilation=2 if dilated else 1), act=nn.ReLU(inplace=True),
                            pool=nn.Identity() if dilated else nn.MaxPool2d(2, 2))
            )
            c, stride = out, stride if dilated else stride * 2
            levels.append((f"s{i}", f"level_{i}", c, stride))
        self._finish(levels, out_features)

    def forward_with_pool_indices(self, x):
        feats, indices = OrderedDict(), OrderedDict()
        for name, stage in self.stages.items():
            x = stage.act(stage.conv(x))
            size = x.shape
            if isinstance(stage.pool, nn.MaxPool2d):
                x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
                indices[self._level_of_stage.get(name, name)] = (idx, size)
            if name in self._level_of_stage:
                feats[self._level_of_stage[name]] = x
        return feats, indices


class _SegTestPlain(_SegTestNet):
    """The same net without the pool-indices interface."""

    spec = BackboneSpec(supported_output_strides=(16, 32), exposes_pool_indices=False)


register_backbone("_segtest_net", family="_segtest", min_input_size=32)(_SegTestNet)
register_backbone("_segtest_plain", family="_segtest", min_input_size=32)(_SegTestPlain)

BACKBONES = ["_segtest_net"] + [n for n in ("vgg16", "resnet18") if n in list_backbones()]
SMALL = {"fcn32s": {"fc_channels": 32}, "fcn16s": {"fc_channels": 32}, "fcn8s": {"fc_channels": 32},
         "fcn": {}, "deeplabv3": {"channels": 32}, "unpool": {}}


def _model(head: str, backbone: str, num_classes: int = 3, **kw):
    return build_segmentation_model(head, backbone, num_classes, head_kwargs=SMALL[head], **kw)


@functools.lru_cache(maxsize=None)
def _backbone(name: str, head: str):
    """One backbone per (name, what the head asks of it), shared by the size tests (eval mode, no grad)."""
    kw = segmentation_backbone_kwargs(head, name, SMALL[head])
    return create_backbone(name, **kw).eval()


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", list(SEGMENTATION_HEADS))
def test_head_output_has_input_size(head: str, backbone: str) -> None:
    if head == "unpool" and not _backbone(backbone, "fcn32s").spec.exposes_pool_indices:
        pytest.skip(f"{backbone} does not expose max-pool indices")
    torch.manual_seed(0)
    # a backbone that does not dilate to the head's stride (VGG) runs at its own: a documented, warned fallback
    wanted = SEGMENTATION_HEADS[head].needs.output_stride
    warns = wanted is not None and wanted not in get_backbone_entry(backbone).spec.supported_output_strides
    with pytest.warns(UserWarning, match="output_stride") if warns else nullcontext():
        net = _backbone(backbone, head)
    model = SegmentationModel(net, build_segmentation_head(head, net, 3, **SMALL[head])).eval()
    with torch.no_grad():
        for size in ((37, 45), (64, 64)):
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 3, *size), (head, backbone, size)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("head", list(SEGMENTATION_HEADS))
@pytest.mark.filterwarnings("ignore:backbone '_segtest_net' does not support output_stride")
def test_head_trains_with_aux_loss(head: str) -> None:
    model = _model(head, "_segtest_net", aux_head=True).train()
    x, y = torch.randn(2, 3, 35, 41), torch.randint(0, 3, (2, 35, 41))
    out, aux = model.forward_all(x)
    assert out.shape == aux.shape == (2, 3, 35, 41)
    (F.cross_entropy(out, y) + F.cross_entropy(aux, y)).backward()
    assert model.backbone.stages["s0"].conv.weight.grad.abs().sum() > 0


def test_fcn_picks_levels_by_stride_and_follows_the_paper() -> None:
    net = create_backbone("_segtest_net")
    head = build_segmentation_head("fcn8s", net, 4, fc_channels=16, fc_kernel=7)
    assert head.coarse == "level_4" and head.skips == ["level_3", "level_2"]  # strides 32, 16, 8
    assert head.fc6.kernel_size == (7, 7) and head.fc7.out_channels == 16
    for conv in head.score_skips:  # zero-initialised skip scores (Long et al., sec. 4.2)
        assert conv.weight.abs().sum() == 0 and conv.bias.abs().sum() == 0
    assert all(isinstance(u, BilinearUpsample) and u.weight.requires_grad for u in head.up2)
    assert head.up_final.factor == 8 and not head.up_final.weight.requires_grad
    assert build_segmentation_head("fcn32s", net, 4, fc_channels=16).up_final.factor == 32
    assert FCNHead(net, 4, num_skips=0).fc6.out_channels == 4096  # the paper's width by default


def test_upsampling_is_centred() -> None:
    """Transposed-conv bilinear upsampling cropped by factor//2 interpolates coarse pixel centres exactly."""
    for f in (2, 8, 32):
        up = BilinearUpsample(1, f)
        ramp = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 6, 6).contiguous()
        row = crop_or_pad(up(ramp), f // 2, (6 * f, 6 * f))[0, 0, 3 * f]
        expected = (torch.arange(6 * f) - f / 2 + 0.5) / f
        assert torch.allclose(row[f:-f], expected[f:-f], atol=1e-5), f


def test_missing_level_is_a_clear_error() -> None:
    coarse_only = create_backbone("_segtest_net", out_features=["level_4"])
    with pytest.raises(ValueError, match=r"fcn16s.*stride 16.*_segtest_net"):
        build_segmentation_head("fcn16s", coarse_only, 3, backbone_name="_segtest_net")
    build_segmentation_head("fcn32s", coarse_only, 3)  # the coarsest level is enough for FCN-32s


def test_unpool_needs_pool_indices() -> None:
    with pytest.raises(ValueError, match=r"unpool.*exposes_pool_indices.*_segtest_plain"):
        build_segmentation_model("unpool", "_segtest_plain", 3)


def test_unknown_head() -> None:
    with pytest.raises(ValueError, match="unknown segmentation head 'fcn4s'.*fcn8s"):
        build_segmentation_model("fcn4s", "_segtest_net", 3)


def test_head_kwargs_the_head_does_not_take() -> None:
    # e.g. the FCN config's {dropout: 0} left in place while --model.head switches to unpool
    with pytest.raises(ValueError, match=r"head 'fcn8s' takes no \['dropuot'\].*'dropout'"):
        build_segmentation_model("fcn8s", "_segtest_net", 3, head_kwargs={"dropuot": 0.0})


def test_deeplab_asks_for_output_stride() -> None:
    m16 = build_segmentation_model("deeplabv3", "_segtest_net", 3, head_kwargs={"channels": 16})
    assert m16.backbone.feature_info[-1].stride == 16 and m16.head.aspp.rates == (6, 12, 18)
    assert isinstance(m16.head, DeepLabV3Head)
    with pytest.raises(ValueError, match="output_stride"):
        build_segmentation_model("deeplabv3", "_segtest_net", 3, head_kwargs={"output_stride": 12})
    # a backbone without dilation at 8: warned, built at its own stride, rates scaled to keep the field of view
    with pytest.warns(UserWarning, match="_segtest_net.*output_stride=8"):
        m8 = build_segmentation_model("deeplabv3", "_segtest_net", 3, head_kwargs={"channels": 16, "output_stride": 8})
    assert m8.backbone.feature_info[-1].stride == 32 and m8.head.aspp.rates == (3, 6, 9)


def test_deeplab_trains_with_batch_of_one() -> None:
    model = build_segmentation_model("deeplabv3", "_segtest_net", 3, head_kwargs={"channels": 16}).train()
    model(torch.randn(1, 3, 32, 32)).sum().backward()


def _two_regions(size: int, blur: float, shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dark/bright image split at the middle, and scores whose soft edge sits ``shift`` pixels off."""
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 3, size, size)
    image[..., size // 2 :] = 200
    image = (image + 5 * torch.randn(image.shape, generator=g)).clamp(0, 255)
    truth = torch.zeros(size, size, dtype=torch.long)
    truth[:, size // 2 :] = 1
    p1 = torch.sigmoid((torch.arange(size) - size // 2 + shift) / blur).view(1, 1, 1, size).expand(1, 1, size, size)
    logits = torch.cat([torch.log1p(-p1 + 1e-6), torch.log(p1 + 1e-6)], dim=1)
    return image, logits, truth


def _iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return sum(((pred == c) & (truth == c)).sum().item() / ((pred == c) | (truth == c)).sum().item() for c in (0, 1)) / 2


@pytest.mark.parametrize("size", [32, 80])  # 80: refined on a downsampled grid (max_pixels)
def test_crf_sharpens_a_blurred_boundary(size: int) -> None:
    image, logits, truth = _two_regions(size, blur=size / 10, shift=size // 8)
    before = logits.argmax(1)[0]
    after = DenseCRF(iterations=5)(logits, image).argmax(1)[0]
    assert (before == truth).float().mean() < 0.92  # the shifted edge mislabels a band of columns
    assert (after == truth).float().mean() > 0.97
    assert _iou(after, truth) > _iou(before, truth) + 0.1


def test_crf_checks_shapes() -> None:
    with pytest.raises(ValueError, match="same size"):
        DenseCRF()(torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 8, 9))
