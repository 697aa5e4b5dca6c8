"""Cross-check of torchmetrics' MeanAveragePrecision (faster_coco_eval backend, the one the detection
tasks log) against pycocotools' COCOeval on a small hand-made set: two classes, matches at several
IoUs, misses, false positives (one on an image with no objects) and a crowd region whose detections
COCO ignores. Box and mask (segm) evaluation, overall and per class."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

pytest.importorskip("faster_coco_eval")
from torchmetrics.detection import MeanAveragePrecision  # noqa: E402

H, W = 48, 64  # not square, so a swapped height/width shows

# Per image: ground truths (label, xyxy box, iscrowd) and predictions (label, xyxy box, score).
GROUND_TRUTH = [
    [(0, (5, 5, 25, 25), 0), (1, (30, 10, 60, 40), 0)],
    [(0, (10, 10, 30, 40), 0), (0, (35, 0, 64, 48), 1), (1, (0, 30, 20, 48), 0)],
    [],
    [(1, (20, 20, 40, 40), 0)],
]
PREDICTIONS = [
    [(0, (6, 5, 25, 26), 0.9), (0, (40, 30, 60, 45), 0.8), (1, (31, 12, 58, 40), 0.7), (1, (30, 10, 45, 25), 0.3)],
    [(0, (14, 4, 32, 40), 0.6), (0, (40, 5, 55, 20), 0.95), (0, (50, 30, 60, 40), 0.5)],
    [(1, (5, 5, 20, 20), 0.85)],
    [],
]
STAT_NAMES = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
              "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def _mask(box: tuple[int, int, int, int]) -> np.ndarray:
    """An L-shaped mask filling `box` less its top-right quarter, so mask IoU differs from box IoU."""
    x1, y1, x2, y2 = box
    m = np.zeros((H, W), dtype=np.uint8)
    m[y1:y2, x1:x2] = 1
    m[y1:(y1 + y2) // 2, (x1 + x2) // 2:x2] = 0
    return m


def _rle(m: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(m))


def _torchmetrics(iou_type: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
    metric = MeanAveragePrecision(iou_type=iou_type, backend="faster_coco_eval", class_metrics=True)
    preds, target = [], []
    for gts, dets in zip(GROUND_TRUTH, PREDICTIONS, strict=True):
        preds.append({
            "boxes": torch.tensor([d[1] for d in dets], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([d[2] for d in dets], dtype=torch.float32),
            "labels": torch.tensor([d[0] for d in dets], dtype=torch.int64),
            "masks": torch.from_numpy(np.stack([_mask(d[1]) for d in dets]) if dets
                                      else np.zeros((0, H, W), np.uint8)).bool(),
        })
        masks = np.stack([_mask(g[1]) for g in gts]) if gts else np.zeros((0, H, W), np.uint8)
        target.append({
            "boxes": torch.tensor([g[1] for g in gts], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([g[0] for g in gts], dtype=torch.int64),
            "iscrowd": torch.tensor([g[2] for g in gts], dtype=torch.int64),
            "area": torch.tensor([float(m.sum()) for m in masks], dtype=torch.float32),
            "masks": torch.from_numpy(masks).bool(),
        })
    metric.update(preds, target)
    return metric.compute()


def _cocoeval(iou_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pycocotools' stats, per-class AP and per-class AR@100 for the same set."""
    images = [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in range(len(GROUND_TRUTH))]
    anns, ann_id = [], 1  # COCOeval treats annotation id 0 as "unmatched"
    for image_id, gts in enumerate(GROUND_TRUTH):
        for label, (x1, y1, x2, y2), crowd in gts:
            m = _mask((x1, y1, x2, y2))
            anns.append({"id": ann_id, "image_id": image_id, "category_id": label, "iscrowd": crowd,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(m.sum()), "segmentation": _rle(m)})
            ann_id += 1
    results = []
    for image_id, dets in enumerate(PREDICTIONS):
        for label, (x1, y1, x2, y2), score in dets:
            r = {"image_id": image_id, "category_id": label, "score": score}
            if iou_type == "bbox":
                r["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                r["segmentation"] = _rle(_mask((x1, y1, x2, y2)))
            results.append(r)
    gt = COCO()
    gt.dataset = {"info": {}, "images": images, "annotations": anns,
                  "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # T x R x K at area "all", 100 detections
    recall = ev.eval["recall"][:, :, 0, -1]  # T x K
    ap = [precision[:, :, k][precision[:, :, k] > -1].mean() for k in range(precision.shape[2])]
    ar = [recall[:, k][recall[:, k] > -1].mean() for k in range(recall.shape[1])]
    return np.asarray(ev.stats), np.asarray(ap), np.asarray(ar)


def _check(result: dict[str, torch.Tensor], prefix: str, iou_type: str) -> None:
    stats, ap, ar = _cocoeval(iou_type)
    # The set must exercise the metric: not perfect, not zero, and IoU 0.5 vs 0.75 must differ.
    assert 0.1 < stats[0] < 0.9 and stats[1] > stats[2]
    for name, ref in zip(STAT_NAMES, stats, strict=True):
        assert result[prefix + name].item() == pytest.approx(ref, abs=1e-6), f"{prefix}{name}"
    assert result["classes"].tolist() == [0, 1]
    np.testing.assert_allclose(result[prefix + "map_per_class"].numpy(), ap, atol=1e-6)
    np.testing.assert_allclose(result[prefix + "mar_100_per_class"].numpy(), ar, atol=1e-6)


def test_bbox_map_matches_cocoeval() -> None:
    """Detection: iou_type bbox."""
    _check(_torchmetrics("bbox"), "", "bbox")


def test_bbox_and_segm_map_match_cocoeval() -> None:
    """Instance segmentation: both figures from one metric object, as the instance task logs them."""
    result = _torchmetrics(("bbox", "segm"))
    _check(result, "bbox_", "bbox")
    _check(result, "segm_", "segm")


def test_crowd_region_is_ignored_not_false_positive() -> None:
    """The two detections inside image 1's crowd box must not count: marking it non-crowd lowers AP."""
    base = _torchmetrics("bbox")["map_per_class"][0].item()
    saved = GROUND_TRUTH[1][1]
    GROUND_TRUTH[1][1] = (saved[0], saved[1], 0)
    try:
        no_crowd = _torchmetrics("bbox")["map_per_class"][0].item()
    finally:
        GROUND_TRUTH[1][1] = saved
    assert no_crowd != pytest.approx(base, abs=1e-3)


def test_segm_alone_drops_images_without_objects() -> None:
    """Known torchmetrics 1.9 pitfall, kept here so the advice stays true: with iou_type="segm" alone the
    images without ground truth are left out, so false positives there are not counted (AP too high).
    The instance task must therefore use iou_type=("bbox", "segm"), checked exact above."""
    segm_alone = _torchmetrics("segm")["map_per_class"][1].item()
    _, ap, _ = _cocoeval("segm")
    assert segm_alone > ap[1] + 1e-3
