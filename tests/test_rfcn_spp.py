"""R-FCN and SPP-net: the spatial pyramid pooling layer, the SPP classification head, the ``spp`` RoI
pooler, position-sensitive pooling and voting, both detectors through DetectionTask, and their errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torchvision.ops import ps_roi_align, roi_pool
from torchvision.ops.poolers import LevelMapper

from cvtasks.backbone import SpatialPyramidLinear, create_classifier
from cvtasks.data.detection import ShapesDetectionDataModule, detection_collate
from cvtasks.detection import build_detector
from cvtasks.detection.poolers import ROI_POOLERS, MultiScaleSpatialPyramidPool, pooled_features, roi_pooler
from cvtasks.detection.rfcn import PositionSensitiveHead, PositionSensitiveRoIHeads, average_vote, ps_roi_align_by_roi_align
from cvtasks.layers import SpatialPyramidPooling
from cvtasks.tasks.classification import ClassificationTask
from cvtasks.tasks.detection import DetectionTask, InstanceSegmentationTask

K = 3  # object classes in the detector tests
S = 64  # image side

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the SPP layer -------------------------------------------------------------------------------

def test_spp_layer_against_a_hand_computed_pyramid() -> None:
    # value 4*row + col: the max of a block is its bottom-right cell
    x = torch.arange(16.0).view(1, 1, 4, 4)
    x = torch.cat([x, 100 - x], dim=1)  # a second channel whose max is the top-left cell
    out = SpatialPyramidPooling((1, 2, 3))(x)
    # 1x1: the maxima of each channel; 2x2: the four quadrants; 3x3: adaptive bins [0,2), [1,3), [2,4) per side
    expected = [15, 100,
                5, 7, 13, 15, 100, 98, 92, 90,
                5, 6, 7, 9, 10, 11, 13, 14, 15, 100, 99, 98, 96, 95, 94, 92, 91, 90]
    assert out.tolist() == [expected]


def test_spp_levels_are_adaptive_max_pooling_whether_or_not_the_bins_divide_the_map() -> None:
    # where b divides the map the level is a plain max_pool2d (ONNX has it), else adaptive pooling
    torch.manual_seed(0)
    for h, w in ((6, 6), (12, 18), (7, 5), (3, 2)):
        x = torch.randn(2, 3, h, w)
        for b in (1, 2, 3, 6):
            torch.testing.assert_close(SpatialPyramidPooling._level(x, b), torch.nn.functional.adaptive_max_pool2d(x, b))


def test_spp_layer_output_length_does_not_depend_on_the_input_size() -> None:
    spp = SpatialPyramidPooling()  # the classification default {1, 2, 4}
    assert spp.bins == (1, 2, 4) and spp.out_features(8) == 8 * 21
    for h, w in ((5, 7), (13, 11), (2, 2)):  # 2x2: smaller than the 4x4 level, every bin still filled
        assert spp(torch.randn(2, 8, h, w)).shape == (2, 8 * 21)
    for bad in ((), (0, 2), (1, 1), (2.0,)):
        with pytest.raises(ValueError, match="bins"):
            SpatialPyramidPooling(bad)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*own head"):
        spp(torch.randn(2, 10, 8))


# -- the SPP classification head ---------------------------------------------------------------

def test_spp_head_takes_any_input_size_and_trains_on_two() -> None:
    torch.manual_seed(0)
    model = create_classifier("_tinynet", 3, head="spp")
    assert isinstance(model.head, SpatialPyramidLinear) and model.head.fc.in_features == 32 * 21
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for side in (64, 96):  # stride-32 maps of 2x2 and 3x3
        x, y = torch.randn(4, 3, side, side), torch.tensor([0, 1, 2, 0])
        before = model.head.fc.weight.detach().clone()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and not torch.equal(before, model.head.fc.weight)


def test_classification_task_picks_the_spp_head_and_rejects_bad_heads() -> None:
    task = ClassificationTask(num_classes=3, backbone="_tinynet", head="spp", head_kwargs={"bins": [1, 2]})
    assert task.model.head.spp.bins == (1, 2) and task.model.head.fc.in_features == 32 * 5
    assert task(torch.randn(1, 3, 40, 72)).shape == (1, 3)
    assert not isinstance(ClassificationTask(num_classes=3, backbone="_tinynet").model.head, SpatialPyramidLinear)
    with pytest.raises(ValueError, match=r"unknown classification head 'spm'.*\['spp'\]"):
        create_classifier("_tinynet", 3, head="spm")
    with pytest.raises(ValueError, match="need a named head"):
        create_classifier("_tinynet", 3, head_kwargs={"bins": [1]})
    with pytest.raises(ValueError, match=r"takes only 'bins'.*\['levels'\]"):
        create_classifier("_tinynet", 3, head="spp", head_kwargs={"levels": 3})


# -- the spp RoI pooler --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pyramid() -> tuple["OrderedDict[str, Tensor]", list[Tensor]]:
    """Random stride-4 and stride-8 maps of a 128 px image, and boxes of many sizes inside it on two images."""
    g = torch.Generator().manual_seed(0)
    feats = OrderedDict((f"p{k}", torch.randn(2, 4, 128 // 2**k, 128 // 2**k, generator=g)) for k in (2, 3))
    xy = torch.rand(2, 12, 2, generator=g) * 80  # x2, y2 < 120: the RoIs end inside both maps
    wh = 3 + torch.rand(2, 12, 2, generator=g) * 35
    return feats, [torch.cat([xy[i], xy[i] + wh[i]], dim=1) for i in range(2)]


def test_spp_pooler_shape_and_box_head_size() -> None:
    pooler = roi_pooler("spp", ["p2", "p3"], 7)
    assert isinstance(pooler, MultiScaleSpatialPyramidPool) and pooler.spp.bins == (1, 2, 3, 6)
    assert pooled_features(pooler, 16) == 16 * 50 and pooled_features(roi_pooler("align", ["p2"], 7), 16) == 16 * 49
    det = build_detector("faster_rcnn", "_tinynet", K, roi="spp", min_size=S, neck_channels=16, spp_bins=(1, 2, 4))
    assert det.model.roi_heads.box_head.fc6.in_features == 16 * 21


def test_spp_pooler_levels_are_roi_pool_at_each_bin_count(pyramid: tuple) -> None:
    feats, boxes = pyramid
    shapes = [(128, 128)] * 2
    pooler = MultiScaleSpatialPyramidPool(list(feats), (1, 2, 3, 6), canonical_scale=24, canonical_level=3)
    out = pooler(feats, boxes, shapes)
    assert out.shape == (24, 4 * 50)
    levels = LevelMapper(2, 3, 24, 3)(boxes)
    assert len(set(levels.tolist())) == 2  # the boxes span both levels
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    maps = list(feats.values())
    for r, lvl in enumerate(levels.tolist()):
        scale = 1.0 / 2 ** (lvl + 2)
        expected = torch.cat([roi_pool(maps[lvl], rois[r:r + 1], b, scale).flatten(1) for b in (1, 2, 3, 6)], 1)
        torch.testing.assert_close(out[r:r + 1], expected)
        # the 1x1 bin is the max over the RoI's cells (RoIPool rounds the corners to cells)
        x1, y1, x2, y2 = (round(v * scale) for v in rois[r, 1:].tolist())
        img = int(rois[r, 0])
        torch.testing.assert_close(out[r, :4], maps[lvl][img, :, y1:y2 + 1, x1:x2 + 1].amax(dim=(1, 2)))


def test_spp_pooler_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown roi 'warp'.*'spp'"):
        build_detector("faster_rcnn", "_tinynet", K, roi="warp")
    with pytest.raises(ValueError, match=r"least common multiple is at most 12"):
        build_detector("faster_rcnn", "_tinynet", K, roi="spp", min_size=S, neck_channels=16, spp_bins=(1, 5, 7))
    with pytest.raises(ValueError, match=r"spp.*mask head needs a grid.*'align' or 'pool'"):
        InstanceSegmentationTask(num_classes=K, backbone="_tinynet", roi="spp", min_size=S, neck_channels=16)


# -- position-sensitive pooling and voting ------------------------------------------------------

def test_ps_pooling_reads_channel_c_k2_plus_i_k_plus_j() -> None:
    k, n = 3, 2
    # a map constant over space whose channel c*k*k + i*k + j holds 100*c + 10*i + j
    values = torch.tensor([100.0 * c + 10 * i + j for c in range(n) for i in range(k) for j in range(k)])
    maps = values.view(1, -1, 1, 1).expand(1, n * k * k, 8, 8).contiguous()
    head = PositionSensitiveHead(4, n, k, stride=4)
    pooled = head.pool(maps, [torch.tensor([[2.0, 3.0, 25.0, 20.0], [0.0, 0.0, 31.0, 31.0]])])
    assert pooled.shape == (2, n, k, k)
    expected = torch.tensor([[[100.0 * c + 10 * i + j for j in range(k)] for i in range(k)] for c in range(n)])
    torch.testing.assert_close(pooled, expected.expand(2, -1, -1, -1))
    # average voting: the mean over the k*k bins, 100*c + 10*1 + 1 here
    torch.testing.assert_close(average_vote(pooled), torch.tensor([[11.0, 111.0]] * 2))


def test_ps_pooling_for_export_equals_torchvisions_ps_roi_align() -> None:
    # ONNX has no ps_roi_align: a traced or exported R-FCN pools with roi_align and keeps each bin's channel
    torch.manual_seed(0)
    k, n = 3, 5
    maps = torch.randn(2, n * k * k, 16, 20)
    tiny_and_outside = torch.tensor([[3.0, 4.0, 60.0, 50.0], [10.0, 10.0, 10.5, 10.3], [-5.0, -3.0, 20.0, 20.0],
                                     [30.0, 30.0, 31.0, 200.0]])
    other = torch.rand(7, 4) * 100
    other[:, 2:] += other[:, :2]
    for ratio in (2, 0):
        expected = ps_roi_align(maps, [tiny_and_outside, other], k, 1 / 8, ratio)
        torch.testing.assert_close(ps_roi_align_by_roi_align(maps, [tiny_and_outside, other], k, 1 / 8, ratio), expected)
    head = PositionSensitiveHead(4, n, k, stride=8).eval()
    traced = torch.jit.trace(lambda m, b: head.pool(m, [b]), (maps[:1], other), check_trace=False)
    assert "ps_roi_align" not in str(traced.graph)
    torch.testing.assert_close(traced(maps[:1], tiny_and_outside), ps_roi_align(maps[:1], [tiny_and_outside], k, 1 / 8, 2))


def test_ps_pooling_is_position_sensitive() -> None:
    k = 3
    # class 1's top-left bin map is high only in the image's top-left quarter: a RoI there scores
    # high in that bin alone; one in the bottom-right quarter reads nothing from that map
    maps = torch.zeros(1, 2 * k * k, 16, 16)
    maps[0, 1 * k * k + 0, :8, :8] = 9.0
    head = PositionSensitiveHead(4, 2, k, stride=4)
    pooled = head.pool(maps, [torch.tensor([[0.0, 0.0, 30.0, 30.0], [34.0, 34.0, 62.0, 62.0]])])
    assert pooled[0, 1, 0, 0] == pytest.approx(9.0) and pooled[0].sum() == pytest.approx(9.0)
    assert pooled[1].abs().sum() == 0


@pytest.mark.parametrize("k", [7, 3])
def test_rfcn_score_maps_have_the_papers_channel_counts(k: int) -> None:
    kw = {} if k == 7 else {"k": k}
    det = build_detector("rfcn", "_tinynet", K, min_size=S, neck_channels=16, **kw)
    heads = det.model.roi_heads
    assert isinstance(heads, PositionSensitiveRoIHeads) and heads.head.k == k
    assert heads.head.class_maps.out_channels == k * k * (K + 1)  # k^2 (C+1): class 0 is background
    assert heads.head.box_maps.out_channels == 4 * k * k  # class-agnostic boxes
    assert heads.level == "p3" and heads.head.stride == 8
    # the sampling and inference settings are torchvision's RoIHeads', built from FasterRCNN's box_* keywords
    assert heads.fg_bg_sampler.batch_size_per_image == 64 and heads.score_thresh == 0.05


def test_rfcn_errors() -> None:
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=r"rfcn's k .* positive integer"):
            build_detector("rfcn", "_tinynet", K, min_size=S, neck_channels=16, k=bad)
    with pytest.raises(ValueError, match=r"score_stride 64.*strides \[4, 8, 16, 32\]"):
        build_detector("rfcn", "_tinynet", K, min_size=S, neck_channels=16, score_stride=64)
    with pytest.raises(ValueError, match=r"'rfcn' takes no \['bins'\].*score_stride"):
        build_detector("rfcn", "_no_such_backbone", K, bins=(1, 2))


# -- both detectors through DetectionTask --------------------------------------------------------

@pytest.fixture(scope="module")
def scenes() -> tuple[list[Tensor], list[dict]]:
    """Two generated shapes scenes, 64 px, as a collated detection batch."""
    dm = ShapesDetectionDataModule(num_samples=3, img_size=S, augment=False)
    ds = dm.make_dataset([0, 1], "val")
    return detection_collate([ds[0], ds[1]])


@pytest.mark.parametrize(("detector", "extra"), [("rfcn", {}), ("rfcn", {"detector_kwargs": {"k": 3}}),
                                                  ("faster_rcnn", {"roi": "spp"})])
def test_task_trains_and_evaluates(detector: str, extra: dict, scenes: tuple) -> None:
    torch.manual_seed(0)
    task = DetectionTask(num_classes=5, backbone="_tinynet", detector=detector, min_size=S, max_size=S,
                         neck_channels=16, lr=0.01, **extra)
    images, targets = scenes
    task.train()
    loss = task.training_step((images, targets), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert task.model.model.backbone.body.stages["s0"][0].weight.grad.abs().sum() > 0
    task.eval()
    with torch.no_grad():
        preds = task(images)
        task.validation_step((images, targets), 0)
    assert len(preds) == 2
    for p in preds:
        assert p["boxes"].shape == (len(p["scores"]), 4) and len(p["labels"]) == len(p["scores"])
        assert p["boxes"].dtype == torch.float32 and p["labels"].dtype == torch.int64
        if len(p["labels"]):  # 0-based labels, boxes inside the image
            assert 0 <= int(p["labels"].min()) and int(p["labels"].max()) < 5
            assert float(p["boxes"].min()) >= 0 and float(p["boxes"].max()) <= S
            assert bool((p["scores"][:-1] >= p["scores"][1:]).all())
    assert "val/map_50" in task.flatten_map(task.metrics["val_map"].compute(), "val")


def test_make_help_and_docs_name_every_roi_pooler() -> None:
    repo = Path(__file__).resolve().parents[1]
    docs = (repo / "docs" / "detection.md").read_text()
    assert all(f'`roi="{name}"`' in docs for name in ROI_POOLERS)
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    help_text = subprocess.run(["make", "-s", "help"], cwd=repo, capture_output=True, text=True, timeout=60).stdout
    line = next(l for l in help_text.splitlines() if "ROI=" in l)
    assert set(re.search(r"ROI=([a-z |]+)", line).group(1).replace(" ", "").split("|")) == set(ROI_POOLERS)
