"""A YOLOX-style anchor-free single-stage detector (Ge et al., YOLOX: Exceeding YOLO Series in 2021,
arXiv:2107.08430), written on torchvision's detection plumbing.

What it is:
- Head: YOLOX's decoupled head (a 1x1 stem, then a classification branch and a regression branch
  of ``num_convs`` 3x3 convolutions; the regression branch predicts the box and the objectness).
  Unlike YOLOX, one head is shared by all pyramid levels (as RetinaNet/FCOS do), which works
  because boxes are regressed in units of each level's stride; GroupNorm replaces BatchNorm so
  the shared statistics do not mix levels.
- Box coding: one point per location at the cell centre ``c = (j + 0.5) * stride``; the box is
  ``centre = c + d_xy * stride``, ``size = exp(d_wh) * stride`` (:func:`decode_boxes`,
  :func:`encode_boxes`).
- Target assignment: SimOTA-lite (YOLOX section 2.2): candidates are locations inside a box or
  within ``center_radius`` strides of its centre; each candidate-box pair costs
  ``cls_cost + 3 * -log(IoU) (+ a large penalty unless the location is both inside the box and
  near its centre)``; each box takes its ``k`` cheapest locations with ``k`` the sum of its top-10
  IoUs (at least 1), and a location claimed twice goes to the box where it is cheapest.
- Losses (normalised by the number of positives): GIoU loss (torchvision.ops) weighted 5,
  objectness BCE over all locations, classification BCE on positives with the IoU as soft target.
- Inference: score = sigmoid(cls) * sigmoid(obj), top candidates over a threshold, per-class
  ``torchvision.ops.batched_nms``.

Interface: the same as torchvision's detectors (``forward(images, targets)``: a dict of losses in
training, a list of dicts boxes/scores/labels in eval); labels are 0-based (no background class).
Images are normalised, resized and batched by torchvision's GeneralizedRCNNTransform.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import _topk_min
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, box_iou, generalized_box_iou_loss

from ..backbone import IMAGENET_MEAN, IMAGENET_STD
from ..layers import ConvNormAct

__all__ = [
    "YOLOHead",
    "YOLODetector",
    "make_priors",
    "encode_boxes",
    "decode_boxes",
    "simota_assign",
    "select_detections",
]

# exp() of the size deltas is clipped like torchvision's BoxCoder (bbox_xform_clip), so an early
# wild prediction cannot overflow
_MAX_LOG_SIZE = math.log(1000.0 / 16)


def make_priors(sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: Any = None) -> tuple[Tensor, Tensor]:
    """Cell centres (P, 2) in pixels (x, y) and their strides (P,) for feature maps of ``sizes``, fine to coarse."""
    centres, prior_strides = [], []
    for (h, w), s in zip(sizes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).float()
        centres.append((xy + 0.5) * s)
        prior_strides.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(centres), torch.cat(prior_strides)


def decode_boxes(deltas: Tensor, centres: Tensor, strides: Tensor) -> Tensor:
    """Regression outputs (..., 4) at priors -> boxes xyxy in pixels."""
    s = strides.unsqueeze(-1)
    cxcy = centres + deltas[..., :2] * s
    wh = torch.exp(deltas[..., 2:].clamp(max=_MAX_LOG_SIZE)) * s
    return torch.cat([cxcy - wh / 2, cxcy + wh / 2], dim=-1)


def encode_boxes(boxes: Tensor, centres: Tensor, strides: Tensor) -> Tensor:
    """Boxes xyxy (..., 4) -> the regression outputs that decode to them at the given priors."""
    s = strides.unsqueeze(-1)
    cxcy = (boxes[..., :2] + boxes[..., 2:]) / 2
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-6)
    return torch.cat([(cxcy - centres) / s, torch.log(wh / s)], dim=-1)


@torch.no_grad()
def simota_assign(
    pred_boxes: Tensor,
    cls_logits: Tensor,
    obj_logits: Tensor,
    centres: Tensor,
    strides: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    center_radius: float = 2.5,
    candidate_topk: int = 10,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimOTA-lite for one image: which priors are positive, for which box, at which IoU.

    Returns ``(fg (P,) bool, matched_gt (P,) long, -1 for background, matched_iou (P,))``.
    """
    num_priors = centres.shape[0]
    fg = torch.zeros(num_priors, dtype=torch.bool, device=centres.device)
    matched = torch.full((num_priors,), -1, dtype=torch.long, device=centres.device)
    matched_iou = torch.zeros(num_priors, device=centres.device)
    if gt_boxes.numel() == 0:
        return fg, matched, matched_iou
    cx, cy = centres[:, 0][None], centres[:, 1][None]  # (1, P)
    x1, y1, x2, y2 = (gt_boxes[:, i : i + 1] for i in range(4))  # (G, 1)
    in_box = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
    r = center_radius * strides[None]
    gcx, gcy = (x1 + x2) / 2, (y1 + y2) / 2
    in_ctr = ((cx - gcx).abs() < r) & ((cy - gcy).abs() < r)
    cand = (in_box | in_ctr).any(0)
    if not cand.any():
        return fg, matched, matched_iou
    cand_idx = cand.nonzero().squeeze(1)
    ious = box_iou(gt_boxes, pred_boxes[cand_idx])  # (G, C)
    num_classes = cls_logits.shape[-1]
    joint = (cls_logits[cand_idx].float().sigmoid() * obj_logits[cand_idx].float().sigmoid()[:, None]).sqrt()
    onehot = F.one_hot(gt_labels, num_classes).float()  # (G, K)
    g, c = ious.shape
    cls_cost = F.binary_cross_entropy(
        joint[None].expand(g, c, num_classes), onehot[:, None].expand(g, c, num_classes), reduction="none"
    ).sum(-1)
    cost = cls_cost + 3.0 * -torch.log(ious + 1e-8) + 1e5 * (~(in_box & in_ctr)[:, cand_idx]).float()
    # dynamic k: as many positives as the box's best predictions' IoUs add up to
    k = ious.topk(min(candidate_topk, c), dim=1).values.sum(1).int().clamp(min=1)
    rank = cost.argsort(dim=1).argsort(dim=1)
    matching = rank < k[:, None]
    shared = matching.sum(0) > 1
    if shared.any():
        best = cost[:, shared].argmin(0)
        matching[:, shared] = False
        matching[best, shared.nonzero().squeeze(1)] = True
    pos = matching.any(0)
    gt_of = matching.float().argmax(0)
    fg[cand_idx[pos]] = True
    matched[cand_idx[pos]] = gt_of[pos]
    matched_iou[cand_idx[pos]] = ious[gt_of[pos], pos.nonzero().squeeze(1)]
    return fg, matched, matched_iou


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    topk_candidates: int = 1000,
    detections_per_img: int = 100,
) -> dict[str, Tensor]:
    """Per-class NMS over one image's priors: boxes (P, 4), class scores (P, K) -> boxes/scores/labels."""
    num_classes = scores.shape[-1]
    flat = scores.reshape(-1)
    keep = flat > score_thresh
    idx = keep.nonzero().squeeze(1)
    vals = flat[idx]
    # the best topk_candidates, however many passed: torchvision's _topk_min keeps the count a
    # graph value when traced (ONNX, TorchScript), where a Python comparison would fix the trace's
    vals, order = vals.topk(_topk_min(vals, topk_candidates, 0))
    idx = idx[order]
    prior, labels = idx // num_classes, idx % num_classes
    cand = boxes[prior]
    kept = batched_nms(cand, vals, labels, nms_thresh)[:detections_per_img]
    return {"boxes": cand[kept], "scores": vals[kept], "labels": labels[kept]}


class YOLOHead(nn.Module):
    """YOLOX's decoupled head, shared over pyramid levels: (cls (B,P,K), box deltas (B,P,4), obj (B,P))."""

    def __init__(self, in_channels: int, num_classes: int, width: int | None = None, num_convs: int = 2,
                 prior_prob: float = 0.01) -> None:
        super().__init__()
        w = width or in_channels
        self.stem = ConvNormAct(in_channels, w, 1, norm="gn", act="silu")
        self.cls_convs = nn.Sequential(*[ConvNormAct(w, w, 3, norm="gn", act="silu") for _ in range(num_convs)])
        self.reg_convs = nn.Sequential(*[ConvNormAct(w, w, 3, norm="gn", act="silu") for _ in range(num_convs)])
        self.cls_pred = nn.Conv2d(w, num_classes, 1)
        self.reg_pred = nn.Conv2d(w, 4, 1)
        self.obj_pred = nn.Conv2d(w, 1, 1)
        # focal-loss style prior (Lin et al. 2017): start with every location saying "nothing here"
        bias = -math.log((1 - prior_prob) / prior_prob)
        for conv in (self.cls_pred, self.obj_pred):
            nn.init.constant_(conv.bias, bias)
        nn.init.normal_(self.reg_pred.weight, std=0.01)
        nn.init.zeros_(self.reg_pred.bias)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        cls_out, reg_out, obj_out = [], [], []
        for x in feats:
            x = self.stem(x)
            c = self.cls_convs(x)
            r = self.reg_convs(x)
            cls_out.append(self.cls_pred(c).flatten(2))
            reg_out.append(self.reg_pred(r).flatten(2))
            obj_out.append(self.obj_pred(r).flatten(2))
        cat = lambda xs: torch.cat(xs, dim=2).transpose(1, 2)  # noqa: E731  (B, P, C)
        return cat(cls_out), cat(reg_out), cat(obj_out).squeeze(-1)


class YOLODetector(nn.Module):
    """YOLOX-style detector on a feature-pyramid neck (one with ``out_channels`` and ``strides``)."""

    def __init__(
        self,
        neck: nn.Module,
        num_classes: int,
        *,
        min_size: int = 128,
        max_size: int = 213,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        head_width: int | None = None,
        num_convs: int = 2,
        center_radius: float = 2.5,
        box_loss_weight: float = 5.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        topk_candidates: int = 1000,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        self.backbone = neck
        self.strides = list(neck.strides)
        self.num_classes = num_classes
        self.head = YOLOHead(neck.out_channels, num_classes, head_width, num_convs)
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, list(image_mean), list(image_std), size_divisible=max(self.strides)
        )
        self.center_radius = center_radius
        self.box_loss_weight = box_loss_weight
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.topk_candidates = topk_candidates
        self.detections_per_img = detections_per_img

    def compute_loss(self, cls: Tensor, box: Tensor, obj: Tensor, targets: list[dict[str, Tensor]],
                     centres: Tensor, strides: Tensor) -> dict[str, Tensor]:
        """The three YOLOX losses for a batch of head outputs and (transformed) targets."""
        fg_masks, gt_boxes, cls_targets = [], [], []
        for i, t in enumerate(targets):
            fg, matched, iou = simota_assign(box[i], cls[i], obj[i], centres, strides, t["boxes"], t["labels"],
                                             self.center_radius)
            fg_masks.append(fg)
            gt_boxes.append(t["boxes"][matched[fg]])
            cls_targets.append(F.one_hot(t["labels"][matched[fg]], self.num_classes).float() * iou[fg, None])
        fg_mask = torch.stack(fg_masks)
        num_fg = max(int(fg_mask.sum()), 1)
        pos_boxes = box[fg_mask]
        loss_box = generalized_box_iou_loss(pos_boxes, torch.cat(gt_boxes), reduction="sum") / num_fg
        loss_obj = F.binary_cross_entropy_with_logits(obj, fg_mask.float(), reduction="sum") / num_fg
        loss_cls = F.binary_cross_entropy_with_logits(cls[fg_mask], torch.cat(cls_targets), reduction="sum") / num_fg
        return {"loss_box_giou": self.box_loss_weight * loss_box, "loss_objectness": loss_obj,
                "loss_classifier": loss_cls}

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if self.training and targets is None:
            raise ValueError("YOLODetector in training mode needs targets (list of dicts with boxes, labels)")
        # shapes, not ints: a traced export (ONNX, TorchScript) then rescales boxes for any image size
        original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        batch, targets = self.transform(images, targets)
        feats = list(self.backbone(batch.tensors).values())
        cls, deltas, obj = self.head(feats)
        centres, strides = make_priors([f.shape[-2:] for f in feats], self.strides, device=cls.device)
        boxes = decode_boxes(deltas, centres, strides)
        if self.training:
            assert targets is not None
            return self.compute_loss(cls, boxes, obj, targets, centres, strides)
        scores = cls.sigmoid() * obj.sigmoid().unsqueeze(-1)
        detections = []
        for i, (h, w) in enumerate(batch.image_sizes):
            b = boxes[i].clone()
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            detections.append(select_detections(b, scores[i], self.score_thresh, self.nms_thresh,
                                                self.topk_candidates, self.detections_per_img))
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)
