"""CornerNet: corner pooling, the Gaussian radius and heatmaps, the focal and pull/push losses on
hand-computed cases, decoding ideal predictions back to boxes, the detector's keywords and its
training and evaluation through DetectionTask."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from conftest import check_outcomes, overfit_detector, two_object_image
from cvtasks.data.detection import ShapesDetectionDataModule
from cvtasks.detection import build_detector, detector_keywords
from cvtasks.detection.cornernet import (CORNERS, CornerNet, _running_max_by_doubling, corner_focal_loss, corner_heatmaps,
                                         corner_pool, decode_corners, gaussian_radius, pull_push_loss)
from cvtasks.tasks.detection import DetectionTask

K = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _map(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), len(rows[0]))


def test_corner_pooling_when_traced_equals_cummax_at_any_size() -> None:
    # ONNX has no cummax: a traced CornerNet takes running maxima of shifted copies instead
    torch.manual_seed(0)
    for side in (1, 5, 37, 130):
        x = torch.randn(1, 2, side, side + 3)
        for dim in (2, 3):
            torch.testing.assert_close(_running_max_by_doubling(x, dim), x.cummax(dim).values)
    vertical, horizontal = torch.randn(2, 1, 2, 9, 11).unbind(0)
    traced = torch.jit.trace(lambda v, h: corner_pool(v, h, "top_left"), (vertical, horizontal), check_trace=False)
    assert "cummax" not in str(traced.graph)
    other = torch.randn(2, 1, 2, 21, 6)
    torch.testing.assert_close(traced(other[0], other[1]), corner_pool(other[0], other[1], "top_left"))


def test_corner_pooling_hand_computed() -> None:
    vertical = _map([[1, 0, 2], [0, 3, 0], [2, 1, 0]])
    horizontal = _map([[0, 1, 0], [4, 0, 1], [0, 0, 2]])
    # top-left: max of `vertical` at and below + max of `horizontal` at and right of each place
    #   [[2, 3, 2], [2, 3, 0], [2, 1, 0]] + [[1, 1, 0], [4, 1, 1], [2, 2, 2]]
    assert corner_pool(vertical, horizontal, "top_left").view(3, 3).tolist() == [[3, 4, 2], [6, 4, 1], [4, 3, 2]]
    # bottom-right: at and above + at and left
    #   [[1, 0, 2], [1, 3, 2], [2, 3, 2]] + [[0, 1, 1], [4, 4, 4], [0, 0, 2]]
    assert corner_pool(vertical, horizontal, "bottom_right").view(3, 3).tolist() == [[1, 1, 3], [5, 7, 6], [2, 3, 4]]
    # the gradient reaches only the maxima: the bottom-right corner of the map sees the whole
    # `vertical` column 2 above it (max 2, at the top) and the whole `horizontal` row 2 (max 2, its own place)
    v, h = vertical.clone().requires_grad_(), horizontal.clone().requires_grad_()
    corner_pool(v, h, "bottom_right")[0, 0, 2, 2].backward()
    assert v.grad.view(3, 3).tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert h.grad.view(3, 3).tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="unknown corner 'top_right'"):
        corner_pool(vertical, horizontal, "top_right")


def test_gaussian_radius_keeps_the_iou_in_the_worst_case() -> None:
    w = torch.tensor([10.0, 4.0, 12.5, 20.0, 3.0])
    h = torch.tensor([10.0, 4.0, 12.5, 5.0, 30.0])
    t = 0.3
    r = gaussian_radius(w, h, t)
    assert r[0] == pytest.approx((40 - math.sqrt(480)) / 8)  # a 10-cell square: both corners inward binds
    for i in range(len(w)):
        box = torch.tensor([[0.0, 0.0, w[i], h[i]]])
        d = float(r[i])
        moved = torch.tensor([[d, d, w[i] - d, h[i] - d], [-d, -d, w[i] + d, h[i] + d], [d, d, w[i] + d, h[i] + d]])
        ious = box_iou(box, moved)[0]
        assert float(ious.min()) == pytest.approx(t, abs=1e-4)  # the worst of the three moves is exactly t
        assert bool((ious >= t - 1e-4).all())


def test_corner_heatmaps_peak_at_corners_with_gaussian_bumps() -> None:
    cells = torch.tensor([[2, 3], [6, 1]])
    heat = corner_heatmaps(cells, torch.tensor([1, 1]), torch.tensor([1, 0]), K, (5, 8))
    assert heat.shape == (K, 5, 8) and heat[0].sum() == 0 and heat[2].sum() == 0
    assert heat[1, 3, 2] == 1 and heat[1, 1, 6] == 1 and int(heat.eq(1).sum()) == 2
    sigma = 3 / 6  # radius 1: diameter 3, sigma = diameter / 6
    assert float(heat[1, 3, 3]) == pytest.approx(math.exp(-1 / (2 * sigma**2)))
    assert float(heat[1, 4, 3]) == pytest.approx(math.exp(-2 / (2 * sigma**2)))
    assert heat[1, 3, 4] == 0 and heat[1, 1, 5] == 0  # beyond the radius; radius 0 is the peak alone


def test_focal_loss_hand_computed() -> None:
    target = _map([[1.0, 0.5], [0.0, 0.0]])
    logits = _map([[math.log(3), 0.0], [0.0, -math.log(3)]])  # p = 0.75, 0.5, 0.5, 0.25
    expected = -(
        (1 - 0.75) ** 2 * math.log(0.75)  # the positive: (1 - p)^2 log p
        + (1 - 0.5) ** 4 * 0.5**2 * math.log(0.5)  # near the corner: (1 - y)^4 p^2 log(1 - p)
        + 0.5**2 * math.log(0.5)
        + 0.25**2 * math.log(0.75)
    )
    assert float(corner_focal_loss(logits, target)) == pytest.approx(expected, rel=1e-5)
    # two positives: the sum is divided by 2; none: by 1
    two = _map([[1.0, 1.0], [0.0, 0.0]])
    logits = torch.zeros(1, 1, 2, 2)
    assert float(corner_focal_loss(logits, two)) == pytest.approx(-(0.25 * math.log(0.5)) * 4 / 2, rel=1e-5)
    assert float(corner_focal_loss(logits, torch.zeros(1, 1, 2, 2))) == pytest.approx(-(0.25 * math.log(0.5)) * 4)


def test_pull_push_loss_hand_computed() -> None:
    # objects' means 0.5 and 2: pull (0.25 + 0.25 + 0 + 0) / 2; they are over the margin apart, no push
    pull, push = pull_push_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert float(pull) == pytest.approx(0.25) and float(push) == 0
    # means 0 and 0.75: pull (0.0625 + 0.0625) / 2; push 2 x max(0, 1 - 0.75) / (2 x 1)
    pull, push = pull_push_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5]))
    assert float(pull) == pytest.approx(0.0625) and float(push) == pytest.approx(0.25)
    # three objects, means 0, 0.5, 3: the pairs (0, 0.5) push by 0.5 each way, the others not
    pull, push = pull_push_loss(torch.tensor([0.0, 0.5, 3.0]), torch.tensor([0.0, 0.5, 3.0]))
    assert float(pull) == 0 and float(push) == pytest.approx(2 * 0.5 / 6)
    _, push = pull_push_loss(torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.5]), margin=2.0)
    assert float(push) == pytest.approx(2 * 1.5 / 2)
    pull, push = pull_push_loss(torch.tensor([1.0]), torch.tensor([3.0]))
    assert float(pull) == pytest.approx(2.0) and float(push) == 0  # one object: nothing to push
    pull, push = pull_push_loss(torch.zeros(0), torch.zeros(0))
    assert float(pull) == 0 and float(push) == 0


BOXES = torch.tensor([[4.3, 6.1, 30.7, 28.2], [34.0, 30.0, 100.0, 127.0], [50.0, 40.0, 70.0, 60.0]])
LABELS = torch.tensor([0, 2, 2])


def _ideal(det: CornerNet, boxes: Tensor, labels: Tensor, size: tuple[int, int],
           embeddings: tuple[list[float], list[float]] | None = None) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Head outputs that say exactly ``boxes``: target heatmaps as logits, true offsets, embeddings 1, 2, ...
    per object (the background's 0 pairs with none of them)."""
    cells, offsets, radii = det._corner_cells(boxes, size)
    out = {}
    for k, corner in enumerate(CORNERS):
        heat = corner_heatmaps(cells[k], labels, radii, K, size)
        embed, offset = torch.zeros(1, *size), torch.zeros(1, 2, *size)
        for n, (x, y) in enumerate(cells[k].tolist()):
            embed[0, y, x] = float(n + 1) if embeddings is None else embeddings[k][n]
            offset[0, :, y, x] = offsets[k, n]
        out[corner] = (torch.logit(heat.clamp(1e-6, 1 - 1e-6))[None], embed, offset)
    return out


def _cornernet(**kw: object) -> CornerNet:
    return build_detector("cornernet", "_tinynet", K, neck_channels=16, **{"min_size": 128, **kw}).model


def test_decoding_recovers_boxes_from_ideal_predictions() -> None:
    det = _cornernet()
    out = _ideal(det, BOXES, LABELS, (32, 32))
    (boxes, scores, labels), = decode_corners(*zip(*(out[c] for c in CORNERS)), stride=4)
    order = scores.argsort(descending=True)
    best = order[:3]
    assert scores[best].tolist() == pytest.approx([1.0] * 3, abs=1e-4) and bool((scores[order[3:]] < 0.01).all())
    found = sorted(zip(boxes[best].tolist(), labels[best].tolist()))
    expected = sorted(zip(BOXES.tolist(), LABELS.tolist()))
    for (b, l), (eb, el) in zip(found, expected):
        assert b == pytest.approx(eb, abs=1e-4) and l == el
    # embeddings 0.6 apart do not pair (the threshold is 0.5), 0.4 apart do
    far = _ideal(det, BOXES[:1], LABELS[:1], (32, 32), embeddings=([1.0], [1.6]))
    assert decode_corners(*zip(*(far[c] for c in CORNERS)), stride=4)[0][1].max() < 0.01
    near = _ideal(det, BOXES[:1], LABELS[:1], (32, 32), embeddings=([1.0], [1.4]))
    assert decode_corners(*zip(*(near[c] for c in CORNERS)), stride=4)[0][1].max() == pytest.approx(1.0, abs=1e-4)


class _Fixed(nn.Module):
    """Stands in for a corner head: returns the given outputs whatever the features."""

    def __init__(self, outputs: tuple[Tensor, Tensor, Tensor]) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.outputs


def test_eval_maps_ideal_predictions_back_to_the_input_image() -> None:
    # a 64-pixel image resized to 128 inside the model: the boxes come back in the input's pixels
    det = _cornernet().eval()
    out = _ideal(det, BOXES, LABELS, (32, 32))  # the 128-pixel boxes ...
    det.heads = nn.ModuleDict({c: _Fixed(out[c]) for c in CORNERS})
    with torch.no_grad():
        result, = det([torch.rand(3, 64, 64)])
    assert set(result) == {"boxes", "scores", "labels"}
    top = result["scores"] > 0.5
    assert int(top.sum()) == 3
    found = sorted(zip(result["boxes"][top].tolist(), result["labels"][top].tolist()))
    for (b, l), (eb, el) in zip(found, sorted(zip((BOXES / 2).tolist(), LABELS.tolist()))):
        assert b == pytest.approx(eb, abs=1e-3) and l == el  # ... are half as large in the 64-pixel input


def test_keywords_reach_cornernet_and_bad_ones_are_named() -> None:
    assert {"gaussian_iou", "pull_weight", "push_weight", "embed_thresh", "topk"} <= set(detector_keywords("cornernet"))
    det = _cornernet(min_stride=8, gaussian_iou=0.5, topk=20)
    assert det.stride == 8 and det.level == "p3" and det.gaussian_iou == 0.5 and det.topk == 20
    assert _cornernet().stride == 4
    with pytest.raises(ValueError, match=r"'cornernet' takes no \['anchor_scale'\].*gaussian_iou"):
        build_detector("cornernet", "_no_such_backbone", K, anchor_scale=2.0)
    with pytest.raises(ValueError, match="gaussian_iou .* in \\(0, 1\\); got 1.5"):
        _cornernet(gaussian_iou=1.5)
    with pytest.raises(ValueError, match="topk must be at least 1"):
        _cornernet(topk=0)
    with pytest.raises(ValueError, match="embed_thresh and push_margin must be positive"):
        _cornernet(embed_thresh=0.0)
    det.train()
    with pytest.raises(ValueError, match="needs targets"):
        det([torch.rand(3, 64, 64)])


def test_trains_and_evaluates_through_detection_task() -> None:
    torch.manual_seed(0)
    dm = ShapesDetectionDataModule(num_samples=12, img_size=64, batch_size=2, num_workers=0)
    task = DetectionTask(num_classes=dm.num_classes, class_names=dm.class_names, backbone="_tinynet",
                         detector="cornernet", min_size=64, max_size=64, neck_channels=16, lr=0.01)
    trainer = L.Trainer(fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(task, dm)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss_heatmap", "train/loss_pull", "train/loss_push", "train/loss_offset"):
        assert torch.isfinite(metrics[key]), key
    assert {"val/map", "val/map_50"} <= set(metrics)
    images, targets = next(iter(dm.val_dataloader()))
    task.eval()
    with torch.no_grad():
        preds = task(images)
    assert len(preds) == len(images) == 2
    for p, img in zip(preds, images):
        assert set(p) == {"boxes", "scores", "labels"} and p["boxes"].shape[1:] == (4,)
        assert len(p["boxes"]) == len(p["scores"]) == len(p["labels"]) > 0
        assert int(p["labels"].min()) >= 0 and int(p["labels"].max()) < dm.num_classes
        assert bool((p["boxes"][:, 2] > p["boxes"][:, 0]).all()) and bool((p["boxes"][:, 3] > p["boxes"][:, 1]).all())
        assert float(p["boxes"].min()) >= 0
        assert float(p["boxes"][:, 2].max()) <= img.shape[-1] and float(p["boxes"][:, 3].max()) <= img.shape[-2]
    task.train()
    losses = task.model(images, targets)
    assert set(losses) == {"loss_heatmap", "loss_pull", "loss_push", "loss_offset"}
    assert all(torch.isfinite(v) for v in losses.values())


#: overfitting one image: mean of the last five losses over the first five; the IoU of the best
#: detection with the object of its class (0 when its class is neither object's)
OVERFIT_LIMITS = {"loss_ratio": ("<", 0.5), "best_iou": (">", 0.5)}


def overfit_one_image(seed: int = 0, steps: int = 100) -> dict[str, float]:
    """``steps`` Adam steps of CornerNet on one 64-pixel image with two objects, then its best detection."""
    torch.manual_seed(seed)
    det = build_detector("cornernet", "_tinynet", K, min_size=64, neck_channels=16)
    image, target = two_object_image()
    boxes, labels = target["boxes"], target["labels"]
    ratio, out = overfit_detector(det, image, target, steps)
    label = int(out["labels"][0])
    iou = float(box_iou(out["boxes"][:1], boxes[labels == label]).max()) if label in labels.tolist() else 0.0
    return {"loss_ratio": ratio, "best_iou": iou}


def test_overfitting_one_image_finds_an_object() -> None:
    check_outcomes(overfit_one_image(0), OVERFIT_LIMITS)
