"""CornerNet (Law & Deng, CornerNet: Detecting Objects as Paired Keypoints, ECCV 2018), written here,
on one level of a registry backbone's feature pyramid.

What it is:
- Features: the finest level of the neck (an FPN without extra levels): stride 4 by default, the
  resolution of the paper's hourglass output, or stride 8 with ``min_stride: 8``. The paper's
  104-layer hourglass is not used; the FPN's top-down path brings the coarse context to the fine
  map instead.
- Corner pooling (section 3.4, :func:`corner_pool`): a top-left corner sees the running maximum of
  one feature map over everything below it plus that of another map over everything right of it;
  a bottom-right corner, over everything above and left. Written with ``torch.cummax`` (on flipped
  maps where the maximum runs backwards), so it runs on any device with autograd's own backward.
- Heads (Fig. 7), one per corner type: the corner pooling module (two 3x3 conv-BN-ReLU branches,
  pooled and summed, 3x3 conv-BN, plus a 1x1 conv-BN shortcut, ReLU, then a 3x3 conv-BN-ReLU),
  then three predictors of a 3x3 conv-ReLU and a 1x1 conv each: heatmaps (one channel per class,
  sigmoid, bias -2.19 as the official code), a 1-d embedding and a 2-d sub-pixel offset.
- Targets (section 3.2): each box's corners fall in cells ``floor(x / stride)`` with offsets
  ``x / stride - floor(x / stride)``; the heatmap holds 1 at the corner and an unnormalised
  Gaussian within :func:`gaussian_radius` around it (sigma = diameter / 6, as the official code).
- Losses: the penalty-reduced focal loss (Eq. 1, alpha 2, beta 4) over both heatmaps; the pull and
  push losses (Eqs. 4-5, Delta 1) on the embeddings, each weighted 0.1; smooth-L1 on the offsets
  (Eq. 3), weighted 1.
- Decoding (section 4.1): sigmoid heatmaps, a 3x3 max-pool keeps local maxima, the top ``topk``
  corners of each type over all classes and places, every top-left paired with every bottom-right
  of the same class that lies right of and below it and whose embedding is within
  ``embed_thresh`` (0.5) of it, scored by the mean of the two corners' scores; then per-class NMS
  (the paper uses soft-NMS; hard NMS here, as the other detectors).

Interface: the same as torchvision's detectors (``forward(images, targets)``: a dict of losses in
training, a list of dicts boxes/scores/labels in eval, in the input images' pixels); labels are
0-based (a sigmoid per class, no background class). Images are normalised, resized and batched by
torchvision's GeneralizedRCNNTransform.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import _topk_min
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import clip_boxes_to_image

from ..backbone import IMAGENET_MEAN, IMAGENET_STD
from ..layers import ConvNormAct, exporting
from .yolo import select_detections

__all__ = [
    "CORNERS",
    "CornerHead",
    "CornerNet",
    "CornerPooling",
    "corner_focal_loss",
    "corner_heatmaps",
    "corner_pool",
    "decode_corners",
    "gaussian_radius",
    "pull_push_loss",
]

#: the two corner types a CornerNet predicts
CORNERS = ("top_left", "bottom_right")

# the official code's heatmap bias (-2.19 = -log((1 - 0.1) / 0.1)): every corner starts at p = 0.1
_HEAT_PRIOR_BIAS = -2.19


#: the longest map side the running max of a traced (exported) CornerNet covers: 2**12 cells, 16384 px at stride 4
_EXPORT_DOUBLINGS = 12


def _running_max_by_doubling(x: Tensor, dim: int) -> Tensor:
    """``x.cummax(dim).values`` from maxima with shifted copies (1, 2, 4, ... places), which ONNX can express.

    After the step with shift ``s`` each place holds the max over the ``2*s`` places ending at it; the
    steps past the side's length shift in only -inf, so a traced model is right for any side up to
    ``2**_EXPORT_DOUBLINGS`` cells.
    """
    n = x.shape[dim]
    for k in range(_EXPORT_DOUBLINGS):
        pad = [0, 0] * (x.dim() - 1 - dim) + [2**k, 0]  # F.pad lists the last dim first
        x = torch.maximum(x, F.pad(x, pad, value=float("-inf")).narrow(dim, 0, n))
    return x


def _running_max(x: Tensor, dim: int, backwards: bool) -> Tensor:
    """Maximum of ``x`` along ``dim`` from each position to the end (``backwards``) or from the start."""
    if backwards:
        x = x.flip(dim)
    x = _running_max_by_doubling(x, dim) if exporting() else x.cummax(dim).values  # ONNX has no cummax
    return x.flip(dim) if backwards else x


def corner_pool(vertical: Tensor, horizontal: Tensor, corner: str) -> Tensor:
    """Corner pooling of two (B, C, H, W) maps: a running max of ``vertical`` down (or up) the columns
    plus a running max of ``horizontal`` along the rows.

    ``top_left``: each place gets the max of ``vertical`` at and below it plus the max of
    ``horizontal`` at and right of it; ``bottom_right``: at and above, at and left of it.
    """
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}; choose one of {CORNERS}")
    backwards = corner == "top_left"
    return _running_max(vertical, 2, backwards) + _running_max(horizontal, 3, backwards)


class CornerPooling(nn.Module):
    """The paper's corner pooling module (Fig. 7): two pooled branches, a shortcut, then a 3x3 conv."""

    def __init__(self, channels: int, corner: str, pool_channels: int = 128) -> None:
        super().__init__()
        if corner not in CORNERS:
            raise ValueError(f"unknown corner {corner!r}; choose one of {CORNERS}")
        self.corner = corner
        self.vertical = ConvNormAct(channels, pool_channels, 3)
        self.horizontal = ConvNormAct(channels, pool_channels, 3)
        self.merge = ConvNormAct(pool_channels, channels, 3, act=None)
        self.shortcut = ConvNormAct(channels, channels, 1, act=None)
        self.out = ConvNormAct(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = corner_pool(self.vertical(x), self.horizontal(x), self.corner)
        return self.out(F.relu(self.merge(pooled) + self.shortcut(x)))


def _predictor(channels: int, width: int, outputs: int) -> nn.Sequential:
    """A 3x3 conv-ReLU then a 1x1 conv: the official code's prediction layer (no normalisation)."""
    return nn.Sequential(ConvNormAct(channels, width, 3, norm=None), nn.Conv2d(width, outputs, 1))


class CornerHead(nn.Module):
    """One corner type: corner pooling, then heatmap logits (B, C, H, W), embeddings (B, H, W), offsets (B, 2, H, W)."""

    def __init__(self, channels: int, num_classes: int, corner: str, pool_channels: int = 128,
                 head_channels: int | None = None) -> None:
        super().__init__()
        width = head_channels or channels
        self.pool = CornerPooling(channels, corner, pool_channels)
        self.heat = _predictor(channels, width, num_classes)
        self.embed = _predictor(channels, width, 1)
        self.offset = _predictor(channels, width, 2)
        nn.init.constant_(self.heat[-1].bias, _HEAT_PRIOR_BIAS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y = self.pool(x)
        return self.heat(y), self.embed(y).squeeze(1), self.offset(y)


def gaussian_radius(width: Tensor, height: Tensor, min_iou: float = 0.3) -> Tensor:
    """How far each corner of a ``width`` x ``height`` box may move with the box keeping IoU >= ``min_iou``.

    CornerNet section 3.2 ("a pair of points within the radius would generate a bounding box with
    at least t IoU", t = 0.3 in the paper). With both corners moved by r along both axes the worst
    cases are three quadratics in r, and the radius is the smallest of their roots:
    both corners inward, (w - 2r)(h - 2r) = t wh; both outward, wh = t (w + 2r)(h + 2r); one in and
    one out (the box shifted), (w - r)(h - r) = t (2wh - (w - r)(h - r)). The official code
    (princeton-vl/CornerNet, sample/utils.py ``gaussian_radius``, with ``gaussian_iou`` 0.7) solves
    the same three but takes the other roots of the first two and halves ``-b + sqrt(b^2 - 4ac)``
    instead of dividing it by 2a; at 0.7 its radii come out near these at the paper's 0.3 (2.7
    against 2.3 cells for a 10-cell square).
    """
    w, h, t = width.float(), height.float(), float(min_iou)
    shifted = ((w + h) - torch.sqrt((w + h) ** 2 - 4 * w * h * (1 - t) / (1 + t))) / 2
    inward = (2 * (w + h) - torch.sqrt(4 * (w + h) ** 2 - 16 * (1 - t) * w * h)) / 8
    outward = (-2 * t * (w + h) + torch.sqrt(4 * t**2 * (w + h) ** 2 + 16 * t * (1 - t) * w * h)) / (8 * t)
    return torch.minimum(torch.minimum(shifted, inward), outward)


def corner_heatmaps(cells: Tensor, labels: Tensor, radii: Tensor, num_classes: int, size: tuple[int, int]) -> Tensor:
    """Target heatmaps (C, H, W): 1 at each corner ``cells`` (N, 2) long (x, y) of class ``labels``, and
    the unnormalised Gaussian ``exp(-d^2 / 2 sigma^2)``, sigma = (2r + 1) / 6, within ``radii`` (N,) cells
    of it (the maximum where two overlap)."""
    h, w = size
    heat = torch.zeros(num_classes, h * w, device=cells.device)
    if cells.numel() == 0:
        return heat.view(num_classes, h, w)
    ys = torch.arange(h, device=cells.device).view(1, h, 1)
    xs = torch.arange(w, device=cells.device).view(1, 1, w)
    dx = (xs - cells[:, 0].view(-1, 1, 1)).float()
    dy = (ys - cells[:, 1].view(-1, 1, 1)).float()
    r = radii.view(-1, 1, 1).float()
    sigma = (2 * r + 1) / 6
    bumps = torch.exp(-(dx**2 + dy**2) / (2 * sigma**2)) * ((dx.abs() <= r) & (dy.abs() <= r))
    for c in labels.unique().tolist():
        heat[c] = bumps[labels == c].reshape(-1, h * w).amax(0)
    return heat.view(num_classes, h, w)


def corner_focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CornerNet's penalty-reduced focal loss (Eq. 1) over heatmap ``logits`` and Gaussian ``target``s.

    Positives are the places where the target is 1: ``-(1 - p)^alpha log p``; everywhere else
    ``-(1 - y)^beta p^alpha log(1 - p)``; the sum is divided by the number of positives (at least 1).
    """
    p = logits.sigmoid()
    pos = target.eq(1)
    pos_loss = ((1 - p) ** alpha * F.logsigmoid(logits))[pos].sum()
    neg_loss = ((1 - target) ** beta * p**alpha * F.logsigmoid(-logits))[~pos].sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def pull_push_loss(top_left: Tensor, bottom_right: Tensor, margin: float = 1.0) -> tuple[Tensor, Tensor]:
    """The pull and push losses (Eqs. 4-5) for one image's N objects, given their corners' embeddings (N,).

    pull = 1/N sum_k (e_tk - e_k)^2 + (e_bk - e_k)^2, with e_k the mean of the object's two;
    push = 1/(N(N-1)) sum_k sum_{j != k} max(0, margin - |e_k - e_j|) (zero for fewer than two objects).
    """
    n = top_left.numel()
    if n == 0:
        zero = top_left.sum() + bottom_right.sum()  # keeps the graph (and the device) for a box-free image
        return zero, zero
    mean = (top_left + bottom_right) / 2
    pull = ((top_left - mean) ** 2 + (bottom_right - mean) ** 2).sum() / n
    if n < 2:
        return pull, mean.sum() * 0
    gaps = (margin - (mean[:, None] - mean[None, :]).abs()).clamp(min=0)
    others = ~torch.eye(n, dtype=torch.bool, device=mean.device)
    return pull, gaps[others].sum() / (n * (n - 1))


def _top_corners(heat: Tensor, k: int, kernel: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` best local maxima of (B, C, H, W) probabilities: scores (B, k), classes (B, k), flat places (B, k)."""
    peaks = F.max_pool2d(heat, kernel, stride=1, padding=(kernel - 1) // 2)
    flat = (heat * (peaks == heat)).flatten(1)
    scores, index = flat.topk(_topk_min(flat, k, 1))
    # the map's size as a tensor, not Python ints: a traced (exported) model then takes any image size
    size = torch._shape_as_tensor(heat).to(index.device)
    places = size[2] * size[3]
    return scores, index // places, index % places


def _gather(maps: Tensor, places: Tensor) -> Tensor:
    """Values of (B, D, H, W) ``maps`` at flat ``places`` (B, k): (B, k, D)."""
    flat = maps.flatten(2)
    return flat.gather(2, places[:, None].expand(-1, flat.shape[1], -1)).transpose(1, 2)


def decode_corners(
    heats: tuple[Tensor, Tensor],
    embeds: tuple[Tensor, Tensor],
    offsets: tuple[Tensor, Tensor],
    stride: int,
    topk: int = 100,
    embed_thresh: float = 0.5,
    kernel: int = 3,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Boxes from corner predictions: per image ``(boxes (M, 4) in pixels, scores (M,), labels (M,))``.

    ``heats``: top-left and bottom-right heatmap logits (B, C, H, W); ``embeds`` (B, H, W) and
    ``offsets`` (B, 2, H, W) likewise. Every pair of the ``topk`` corners of each type is a box
    where both are of one class, the bottom-right lies right of and below the top-left and their
    embeddings differ by less than ``embed_thresh``; its score is the two corners' mean.
    """
    corners = []
    for heat, embed, offset in zip(heats, embeds, offsets):
        scores, labels, places = _top_corners(heat.sigmoid(), topk, kernel)
        w = torch._shape_as_tensor(heat)[-1].to(places.device)
        xy = torch.stack([places % w, places // w], dim=-1).float() + _gather(offset, places)
        corners.append((scores, labels, xy * stride, _gather(embed[:, None], places)[..., 0]))
    (tl_score, tl_label, tl_xy, tl_embed), (br_score, br_label, br_xy, br_embed) = corners
    valid = ((tl_label[:, :, None] == br_label[:, None, :])
             & (br_xy[:, None, :, 0] > tl_xy[:, :, None, 0]) & (br_xy[:, None, :, 1] > tl_xy[:, :, None, 1])
             & ((tl_embed[:, :, None] - br_embed[:, None, :]).abs() < embed_thresh))
    out = []
    for i in range(len(valid)):
        t, b = valid[i].nonzero(as_tuple=True)
        boxes = torch.cat([tl_xy[i, t], br_xy[i, b]], dim=1)
        out.append((boxes, (tl_score[i, t] + br_score[i, b]) / 2, tl_label[i, t]))
    return out


class CornerNet(nn.Module):
    """CornerNet on the finest level of a feature-pyramid neck (with ``out_channels``, ``strides``, ``level_names``)."""

    def __init__(
        self,
        neck: nn.Module,
        num_classes: int,
        *,
        min_size: int = 128,
        max_size: int = 213,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        pool_channels: int = 64,
        head_channels: int | None = 64,
        gaussian_iou: float = 0.3,
        focal_alpha: float = 2.0,
        focal_beta: float = 4.0,
        pull_weight: float = 0.1,
        push_weight: float = 0.1,
        push_margin: float = 1.0,
        offset_weight: float = 1.0,
        topk: int = 100,
        embed_thresh: float = 0.5,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        if not 0 < gaussian_iou < 1:
            raise ValueError(f"CornerNet's gaussian_iou is the IoU a box within the radius keeps, in (0, 1); "
                             f"got {gaussian_iou}")
        counts = {"pool_channels": pool_channels, "topk": topk, "detections_per_img": detections_per_img}
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"CornerNet's {name} must be at least 1, got {value}")
        if embed_thresh <= 0 or push_margin <= 0:
            raise ValueError(f"CornerNet's embed_thresh and push_margin must be positive, "
                             f"got {embed_thresh}, {push_margin}")
        self.backbone = neck
        self.level = neck.level_names[0]
        self.stride = int(neck.strides[0])
        self.num_classes = num_classes
        self.heads = nn.ModuleDict({c: CornerHead(neck.out_channels, num_classes, c, pool_channels, head_channels)
                                    for c in CORNERS})
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, list(image_mean), list(image_std), size_divisible=max(neck.strides)
        )
        self.gaussian_iou = gaussian_iou
        self.focal_alpha, self.focal_beta = focal_alpha, focal_beta
        self.pull_weight, self.push_weight, self.push_margin = pull_weight, push_weight, push_margin
        self.offset_weight = offset_weight
        self.topk, self.embed_thresh = topk, embed_thresh
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    def _corner_cells(self, boxes: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Each box's corners on the map: cells (2, N, 2) long (x, y), sub-cell offsets (2, N, 2), radii (N,)."""
        h, w = size
        points = torch.stack([boxes[:, :2], boxes[:, 2:]]) / self.stride  # (2, N, 2): top-left, bottom-right
        cells = points.floor().long()
        # a corner on the map's far edge belongs to its last cell (offset 1)
        cells[..., 0] = cells[..., 0].clamp(0, w - 1)
        cells[..., 1] = cells[..., 1].clamp(0, h - 1)
        wh = (points[1] - points[0]).ceil()  # the official code's box size in output cells
        radii = gaussian_radius(wh[:, 0], wh[:, 1], self.gaussian_iou).floor().clamp(min=0).long()
        return cells, points - cells, radii

    def compute_loss(self, outputs: dict[str, tuple[Tensor, Tensor, Tensor]],
                     targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The focal, pull, push and offset losses for a batch of head outputs and (transformed) targets."""
        size = tuple(outputs[CORNERS[0]][0].shape[-2:])
        heat_targets: dict[str, list[Tensor]] = {c: [] for c in CORNERS}
        pull, push, offset = [], [], []
        for i, t in enumerate(targets):
            cells, offsets, radii = self._corner_cells(t["boxes"], size)
            embeddings = []
            for k, corner in enumerate(CORNERS):
                _, embed, predicted_offset = outputs[corner]
                heat_targets[corner].append(corner_heatmaps(cells[k], t["labels"], radii, self.num_classes, size))
                places = cells[k, :, 1] * size[1] + cells[k, :, 0]
                embeddings.append(embed[i].flatten()[places])
                at_corners = predicted_offset[i].flatten(1)[:, places].t()
                offset.append(F.smooth_l1_loss(at_corners, offsets[k], reduction="sum"))
            p, q = pull_push_loss(*embeddings, margin=self.push_margin)
            pull.append(p)
            push.append(q)
        focal = sum(corner_focal_loss(outputs[c][0], torch.stack(heat_targets[c]), self.focal_alpha, self.focal_beta)
                    for c in CORNERS)
        num_objects = max(sum(len(t["boxes"]) for t in targets), 1)
        return {
            "loss_heatmap": focal,
            "loss_pull": self.pull_weight * torch.stack(pull).mean(),
            "loss_push": self.push_weight * torch.stack(push).mean(),
            "loss_offset": self.offset_weight * torch.stack(offset).sum() / num_objects,
        }

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if self.training and targets is None:
            raise ValueError("CornerNet in training mode needs targets (list of dicts with boxes, labels)")
        original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]  # not int(): a traced model follows them
        batch, targets = self.transform(images, targets)
        feature = self.backbone(batch.tensors)[self.level]
        # fp32 from here under autocast: the losses' logs, and corner positions in pixels
        outputs = {c: tuple(o.float() for o in head(feature)) for c, head in self.heads.items()}
        if self.training:
            assert targets is not None
            return self.compute_loss(outputs, targets)
        pairs = decode_corners(*zip(*(outputs[c] for c in CORNERS)), stride=self.stride, topk=self.topk,
                               embed_thresh=self.embed_thresh)
        detections = []
        for (boxes, scores, labels), size in zip(pairs, batch.image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            # each pair's score in its class's column (no count-sized tensor: a traced model keeps any count)
            classes = torch.arange(self.num_classes, device=scores.device)
            per_class = scores[:, None] * (labels[:, None] == classes).to(scores.dtype)
            detections.append(select_detections(boxes, per_class, self.score_thresh, self.nms_thresh,
                                                self.topk**2, self.detections_per_img))
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)
