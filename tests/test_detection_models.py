"""The feature-pyramid neck, the RoIPool pooler and the detector builders (torchvision's detectors
on registry backbones): shapes, strides, anchors from strides, label conventions, train and eval."""

from __future__ import annotations

import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.ops import roi_pool
from torchvision.ops.poolers import LevelMapper

from cvtasks import list_backbones
from cvtasks.backbone import Backbone, FeatureInfo
from cvtasks.detection.poolers import pyramid_scale
from cvtasks.detection import (DETECTORS, Detector, FeaturePyramidNeck, MultiScaleRoIPool, anchor_sizes, build_detector,
                               detector_keywords)
from conftest import TinyNet

K = 3  # object classes in these tests
S = 64  # image side




pytestmark = pytest.mark.usefixtures("one_thread")


class TokenNet(Backbone):
    """A ViT-like backbone: one stride-16 level returned as a token sequence with a class token."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 16, stride=16)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.feature_info = [FeatureInfo("tokens", dim, 16)]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        t = self.proj(x).flatten(2).transpose(1, 2)
        return {"tokens": torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)}


def _targets(n: int = 2, masks: bool = False) -> list[dict[str, Tensor]]:
    out = []
    for i in range(n):
        t = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [34.0, 30.0, 60.0, 62.0]]), "labels": torch.tensor([0, K - 1])}
        if masks:
            m = torch.zeros(2, S, S, dtype=torch.uint8)
            m[0, 6:28, 4:30] = 1
            m[1, 30:62, 34:60] = 1
            t["masks"] = m
        out.append(t)
    return out


def test_neck_takes_levels_by_stride_and_adds_the_pool_level() -> None:
    neck = FeaturePyramidNeck(TinyNet(), out_channels=16, extra="maxpool")
    assert neck.strides == [4, 8, 16, 32, 64]
    assert neck.level_names == ["p2", "p3", "p4", "p5", "p6"]
    assert neck.feature_levels == ["p2", "p3", "p4", "p5"]
    out = neck(torch.randn(2, 3, S, S))
    assert isinstance(out, OrderedDict) and list(out) == neck.level_names
    for s, v in zip(neck.strides, out.values()):
        assert v.shape == (2, 16, S // s, S // s)


def test_neck_p6p7_and_chosen_strides() -> None:
    neck = FeaturePyramidNeck(TinyNet(), out_channels=8, strides=(8, 16, 32), extra="p6p7")
    assert neck.strides == [8, 16, 32, 64, 128]
    out = neck(torch.randn(1, 3, 128, 128))
    assert [v.shape[-1] for v in out.values()] == [16, 8, 4, 2, 1]
    with pytest.raises(ValueError, match=r"no feature level at strides \[3\]"):
        FeaturePyramidNeck(TinyNet(), strides=(3, 8))
    with pytest.raises(ValueError, match="extra"):
        FeaturePyramidNeck(TinyNet(), extra="p8")


def test_single_level_backbone_gets_a_simple_pyramid() -> None:
    neck = FeaturePyramidNeck(TokenNet(), out_channels=16, extra="maxpool")
    assert neck.simple is not None and neck.strides == [8, 16, 32, 64]
    out = neck(torch.randn(2, 3, S, S))
    assert [tuple(v.shape) for v in out.values()] == [(2, 16, S // s, S // s) for s in (8, 16, 32, 64)]


def test_anchor_sizes_follow_strides() -> None:
    assert anchor_sizes([4, 8, 16], 4.0) == ((16.0,), (32.0,), (64.0,))
    sizes = anchor_sizes([8, 16], 2.0, octaves=3)
    assert sizes[0] == pytest.approx((16.0, 16.0 * 2 ** (1 / 3), 16.0 * 2 ** (2 / 3)))
    rcnn = build_detector("faster_rcnn", "_tinynet", K, min_size=S, neck_channels=16)
    gen = rcnn.model.rpn.anchor_generator
    assert [s[0] for s in gen.sizes] == [4.0 * s for s in rcnn.model.backbone.strides]


def test_roi_pool_assigns_levels_like_level_mapper() -> None:
    torch.manual_seed(0)
    feats = OrderedDict((f"p{k}", torch.randn(2, 4, 128 // 2**k, 128 // 2**k)) for k in (2, 3, 4, 5))
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 120.0, 110.0]]), torch.tensor([[30.0, 40.0, 90.0, 80.0]])]
    pool = MultiScaleRoIPool(list(feats), 3, canonical_scale=56, canonical_level=4)
    out = pool(feats, boxes, [(128, 128), (128, 128)])
    assert out.shape == (3, 4, 3, 3)
    levels = LevelMapper(2, 5, 56, 4)(boxes)
    assert len(set(levels.tolist())) > 1  # the case spans several levels
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    maps = list(feats.values())
    for r, lvl in enumerate(levels.tolist()):
        expected = roi_pool(maps[lvl], rois[r : r + 1], 3, 1.0 / 2 ** (lvl + 2))
        torch.testing.assert_close(out[r : r + 1], expected)


def test_roi_pool_scales_hold_when_the_batch_is_padded_far_below_the_images() -> None:
    # a 38 px tall image padded to 64 (size_divisible 32): its stride-4 map is 16 tall, and 16/38
    # rounds to stride 2; the map covers at least the image and less than twice it, so stride 4
    assert [pyramid_scale(16, h) for h in (38, 33, 64)] == [0.25, 0.25, 0.25]
    assert pyramid_scale(32, 97) == 0.25 and pyramid_scale(8, 64) == 0.125 and pyramid_scale(64, 64) == 1.0
    feats = OrderedDict(p2=torch.randn(1, 4, 16, 16))
    boxes = [torch.tensor([[4.0, 4.0, 36.0, 30.0]])]
    out = MultiScaleRoIPool(["p2"], 3)(feats, boxes, [(38, 64)])
    expected = roi_pool(feats["p2"], torch.tensor([[0.0, 4.0, 4.0, 36.0, 30.0]]), 3, 0.25)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_detector_trains_and_predicts(name: str) -> None:
    torch.manual_seed(0)
    det = build_detector(name, "_tinynet", K, min_size=S, neck_channels=16)
    images = [torch.rand(3, S, S), torch.rand(3, S, S)]
    # R-CNN and Fast R-CNN classify proposals given with the images: here boxes near and far from the objects
    proposals = [torch.tensor([[2.0, 4.0, 32.0, 30.0], [30.0, 30.0, 62.0, 60.0], [0.0, 0.0, 16.0, 40.0]])] * 2
    extra = {"proposals": proposals} if DETECTORS[name].proposals else {}
    det.train()
    losses = det(images, _targets(masks=DETECTORS[name].masks), **extra)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in det.model.backbone.body.parameters())
    det.eval()
    with torch.no_grad():
        out = det(images, **extra)
    assert len(out) == 2
    for o in out:
        assert o["boxes"].shape[1:] == (4,) and len(o["scores"]) == len(o["labels"]) == len(o["boxes"])
        if len(o["labels"]):
            assert 0 <= int(o["labels"].min()) and int(o["labels"].max()) < K
        if DETECTORS[name].masks:
            assert o["masks"].shape[1:] == (1, S, S)


def test_roi_pool_option_builds_two_stage_detectors_with_roipool() -> None:
    det = build_detector("mask_rcnn", "_tinynet", K, roi="pool", min_size=S, neck_channels=16)
    assert isinstance(det.model.roi_heads.box_roi_pool, MultiScaleRoIPool)
    assert isinstance(det.model.roi_heads.mask_roi_pool, MultiScaleRoIPool)
    det.train()
    losses = det([torch.rand(3, S, S)], _targets(1, masks=True))
    assert torch.isfinite(sum(losses.values()))


@pytest.mark.parametrize(
    ("name", "offset"), [("faster_rcnn", 1), ("mask_rcnn", 1), ("ssd", 1), ("retinanet", 0), ("fcos", 0), ("yolo", 0)]
)
def test_label_conventions(name: str, offset: int) -> None:
    det = build_detector(name, "_tinynet", K, min_size=S, neck_channels=16)
    assert det.label_offset == offset
    if name.endswith("rcnn"):
        assert det.model.roi_heads.box_predictor.cls_score.out_features == K + 1
    elif name == "ssd":
        assert det.model.head.classification_head.num_columns == K + 1
    else:
        assert det.model.head.classification_head.num_classes == K if name != "yolo" else det.model.num_classes == K


class _Recorder(nn.Module):
    """Stands in for a torchvision detector: records the targets it gets, returns fixed detections."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> object:
        if self.training:
            self.seen = targets
            return {"loss": torch.tensor(0.0)}
        return [{"boxes": torch.zeros(2, 4), "scores": torch.ones(2), "labels": torch.tensor([1, 3])}]


def test_detector_shifts_labels_in_and_out_and_drops_degenerate_boxes() -> None:
    det = Detector("faster_rcnn", _Recorder(), num_classes=K, label_offset=1, masks=False)
    det.train()
    t = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0], [3.0, 3.0, 3.0, 9.0]]), "labels": torch.tensor([0, 2])}
    det([torch.rand(3, 8, 8)], [t])
    assert det.model.seen[0]["labels"].tolist() == [1]  # 0 -> 1; the zero-width box is gone
    assert det.model.seen[0]["boxes"].shape == (1, 4)
    det.eval()
    assert det([torch.rand(3, 8, 8)])[0]["labels"].tolist() == [0, 2]
    det.train()
    with pytest.raises(ValueError, match="outside 0..2"):
        det([torch.rand(3, 8, 8)], [{"boxes": torch.zeros(1, 4) + torch.tensor([0, 0, 1, 1]), "labels": torch.tensor([K])}])


def test_builder_rejects_bad_choices() -> None:
    with pytest.raises(ValueError, match="unknown detector 'yolov9'"):
        build_detector("yolov9", "_tinynet", K)
    with pytest.raises(ValueError, match="unknown roi"):
        build_detector("faster_rcnn", "_tinynet", K, roi="warp")
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("faster_rcnn", "_tinynet", 0)
    with pytest.raises(ValueError, match="needs instance masks"):
        det = build_detector("mask_rcnn", "_tinynet", K, min_size=S, neck_channels=16)
        det([torch.rand(3, S, S)], _targets(1))


def test_min_size_keeps_images_unresized() -> None:
    det = build_detector("faster_rcnn", "_tinynet", K, min_size=S, neck_channels=16)
    batch, _ = det.model.transform([torch.rand(3, S, S)])
    assert batch.image_sizes == [(S, S)]
    assert det.model.transform.image_mean == pytest.approx([0.485, 0.456, 0.406])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "backbone"), [("faster_rcnn", "resnet18"), ("retinanet", "resnet18"),
                                                ("faster_rcnn", "vit_b_16")])
def test_registry_backbones_feed_detectors(name: str, backbone: str) -> None:
    if backbone not in list_backbones():
        pytest.skip(f"{backbone} is not registered")
    det = build_detector(name, backbone, 5, min_size=128, neck_channels=64)
    det.train()
    t = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([4])}]
    losses = det([torch.rand(3, 128, 128)], t)
    assert torch.isfinite(sum(losses.values()))


def test_unknown_detector_keyword_names_the_valid_ones_before_building() -> None:
    # a backbone name that does not exist: the keyword check comes before any building
    with pytest.raises(ValueError, match=r"'fcos' takes no \['aspect_ratios'\].*anchor_scale, num_convs"):
        build_detector("fcos", "_no_such_backbone", K, aspect_ratios=(1.0,))
    with pytest.raises(ValueError, match=r"'faster_rcnn' takes no \['mask_layers'\].*box_score_thresh"):
        build_detector("faster_rcnn", "_no_such_backbone", K, mask_layers=2)
    assert "mask_layers" in detector_keywords("mask_rcnn") and "box_score_thresh" in detector_keywords("mask_rcnn")


def test_detector_keywords_reach_the_neck_or_the_builder() -> None:
    det = build_detector("ssd", "_tinynet", K, min_size=S, neck_channels=16, num_levels=3, score_thresh=0.3)
    assert det.model.backbone.strides == [8, 16, 32] and det.model.score_thresh == 0.3
    det = build_detector("retinanet", "_tinynet", K, min_size=S, neck_channels=16, octaves=2, min_stride=16)
    assert det.model.backbone.strides[0] == 16 and det.model.anchor_generator.num_anchors_per_location()[0] == 2 * 3


def test_detector_names_come_from_the_table_everywhere() -> None:
    from cvtasks.tasks.detection import DetectionTask, InstanceSegmentationTask

    assert set(DetectionTask.detectors) | set(InstanceSegmentationTask.detectors) == set(DETECTORS)
    assert set(InstanceSegmentationTask.detectors) == {n for n, s in DETECTORS.items() if s.masks}
    repo = Path(__file__).resolve().parents[1]
    # the docs' table of defaults names no detector the table lacks (a new one need not be documented there first)
    docs = (repo / "docs" / "detection.md").read_text().split("## Detectors and their defaults")[1].split("\n#")[0]
    rows = [l.split("|")[1].strip() for l in docs.splitlines() if l.startswith("| ") and not l.startswith("| detector")]
    documented = {n.strip() for row in rows for n in row.split("/")}
    assert documented and documented <= set(DETECTORS)
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    line = next(l for l in subprocess.run(["make", "-s", "help"], cwd=repo, capture_output=True, text=True,
                                          timeout=60).stdout.splitlines() if "DETECTOR=" in l)
    assert all(n in line for n in DETECTORS)


def test_the_options_torchvisions_coco_detectors_need() -> None:
    """P6 from C5, anchor sizes given outright, the box loss, frozen batch norm: what the COCO presets set."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    det = build_detector("retinanet", "_tinynet", K, min_size=S, neck_channels=16, p6_from="c5",
                         anchor_sizes=[[8, 10], [16, 20], [32, 40], [64, 80], [128, 160]], box_loss="giou", frozen_bn_eps=0.0)
    neck = det.model.backbone
    assert neck.fpn.extra_blocks.p6.in_channels == 32 and not neck.fpn.extra_blocks.use_P5  # TinyNet's C5 is 32 wide
    assert det.model.anchor_generator.sizes[1] == (16.0, 20.0) and det.model.head.regression_head._loss_type == "giou"
    norms = [m for m in neck.body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) and m.eps == 0.0 for m in norms)
    det.eval()
    with torch.no_grad():
        assert len(det([torch.rand(3, S, S)])) == 1
    with pytest.raises(ValueError, match=r"unknown p6_from 'p4'; choose 'p5'.*or 'c5'"):
        build_detector("fcos", "_tinynet", K, min_size=S, neck_channels=16, p6_from="p4")
    with pytest.raises(ValueError, match=r"anchor_sizes gives 2 levels but the neck has 5"):
        build_detector("retinanet", "_tinynet", K, min_size=S, neck_channels=16, anchor_sizes=[[8], [16]])
    with pytest.raises(ValueError, match=r"unknown box_loss 'iou'; choose one of l1, smooth_l1, giou"):
        build_detector("retinanet", "_tinynet", K, min_size=S, neck_channels=16, box_loss="iou")


def test_ssd300_layout_is_the_papers_vgg16_and_refuses_what_it_cannot_take() -> None:
    det = build_detector("ssd", "vgg16", K, min_size=300, layout="ssd300").eval()
    neck = det.model.backbone
    assert neck.out_channels == [512, 1024, 512, 256, 256, 256] and neck.fc6.dilation == (6, 6)
    with torch.no_grad():
        maps = neck(torch.rand(1, 3, 300, 300))
    assert [m.shape[-1] for m in maps.values()] == [38, 19, 10, 5, 3, 1]  # pool3 rounds up: 75 -> 38
    with pytest.raises(ValueError, match=r"layout 'ssd300' is made for 300x300 inputs.*--model.min_size 300"):
        build_detector("ssd", "vgg16", K, min_size=128, layout="ssd300")
    with pytest.raises(ValueError, match=r"needs backbone vgg16.*_TinyNet|needs backbone vgg16.*TinyNet"):
        build_detector("ssd", "_tinynet", K, min_size=300, layout="ssd300")
    with pytest.raises(ValueError, match=r"layout 'ssd300' fixes its levels.*drop strides and num_levels"):
        build_detector("ssd", "vgg16", K, min_size=300, layout="ssd300", num_levels=4)
    with pytest.raises(ValueError, match=r"unknown SSD layout 'ssd512'"):
        build_detector("ssd", "_tinynet", K, min_size=S, layout="ssd512")
