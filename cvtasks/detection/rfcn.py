"""R-FCN (Dai et al., R-FCN: Object Detection via Region-based Fully Convolutional Networks, NeurIPS 2016).

Faster R-CNN's two stages, with the per-RoI box head replaced by convolutions over the whole image:

- proposals from torchvision's RPN over the feature pyramid, exactly as our Faster R-CNN makes
  them (:mod:`.rcnn`: anchors ``anchor_scale * stride`` per level, the small-image sampling sizes);
- on one pyramid level, the one at ``score_stride``, a 1x1 convolution to ``score_channels`` with
  a ReLU, then two sibling 1x1 convolutions: ``k*k*(C+1)`` position-sensitive class score maps and
  ``4*k*k`` class-agnostic box maps, as in the paper. The paper reads a stride-16 map (dilated
  conv5) of 600 px images; the default here is FPN's stride-8 P3, which carries the top-down
  semantics of P4 and P5: the shapes' 15-50 px objects at 128 px are 1-3 cells at stride 16, where
  a 7x7 grid of position-sensitive bins has little to tell apart (``score_stride=16`` trained to
  about half of stride 8's mAP@0.5 after two epochs, docs/detection.md);
- position-sensitive RoI pooling, ``torchvision.ops.ps_roi_align`` with a ``k x k`` output: bin
  ``(i, j)`` of output channel ``c`` reads input channel ``c*k*k + i*k + j`` only (torchvision's
  layout), so each bin of a RoI sees the maps made for that relative position;
- average voting: the mean over the ``k*k`` bins gives ``C+1`` class logits and 4 box deltas per RoI.

Training, sampling and postprocessing are torchvision's RoIHeads' (as FasterRCNN builds them from
the ``box_*`` keywords): 64 RoIs per image, a quarter positive, cross-entropy and smooth-L1 on the
deltas (``fastrcnn_loss``), softmax scores, per-class NMS. The class-agnostic deltas are repeated
for every class, which is what those functions expect and changes neither loss nor boxes. The
paper's OHEM is not used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import ps_roi_align, roi_align

from ..layers import exporting
from .anchors import anchor_generator
from .neck import FeaturePyramidNeck
from .rcnn import RCNN_SMALL_IMAGE_DEFAULTS

__all__ = ["PositionSensitiveHead", "PositionSensitiveRoIHeads", "average_vote", "ps_roi_align_by_roi_align", "rfcn"]


def average_vote(pooled: Tensor) -> Tensor:
    """R-FCN's voting: (RoIs, channels, k, k) position-sensitive scores -> (RoIs, channels), the mean over the bins."""
    return pooled.mean(dim=(2, 3))


def ps_roi_align_by_roi_align(maps: Tensor, boxes: list[Tensor], k: int, spatial_scale: float,
                              sampling_ratio: int) -> Tensor:
    """``torchvision.ops.ps_roi_align`` written with ``roi_align``, which ONNX has (RoiAlign) and ps_roi_align has not.

    RoIAlign (``aligned=True``: ps_roi_align's sampling, half-cell offset included) of every channel
    into the ``k x k`` grid, then bin ``(i, j)`` of output channel ``c`` taken from channel
    ``c*k*k + i*k + j``: equal to ps_roi_align (a test checks it). It computes ``k*k`` times the bins
    that are kept, so it is used only where a model is traced or exported.
    """
    n = maps.shape[1] // (k * k)
    grid = roi_align(maps, boxes, k, spatial_scale, sampling_ratio, aligned=True)  # (R, n*k*k, k, k)
    grid = grid.reshape(grid.shape[0], n, k * k, k * k)  # (R, n, the channel's bin, the output bin)
    return torch.diagonal(grid, dim1=2, dim2=3).reshape(grid.shape[0], n, k, k)


class PositionSensitiveHead(nn.Module):
    """R-FCN's fully convolutional head: score maps for the whole image, then one pooling and one vote per RoI.

    ``forward(feature, proposals)`` takes the level's (B, C, H, W) map and one (L, 4) tensor of
    boxes (input image pixels) per image; it returns class logits (sum L, num_classes) and box
    deltas (sum L, 4), in the order of the proposals.
    """

    def __init__(self, in_channels: int, num_classes: int, k: int, stride: int, channels: int = 256,
                 sampling_ratio: int = 2) -> None:
        super().__init__()
        self.num_classes, self.k, self.stride, self.sampling_ratio = num_classes, k, stride, sampling_ratio
        # the paper's new 1x1 layer that reduces conv5 (2048 -> 1024) before the score maps
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
        self.class_maps = nn.Conv2d(channels, k * k * num_classes, 1)
        self.box_maps = nn.Conv2d(channels, k * k * 4, 1)
        for conv in (self.class_maps, self.box_maps):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def pool(self, maps: Tensor, proposals: list[Tensor]) -> Tensor:
        """Position-sensitive RoI pooling of ``maps`` (B, k*k*n, H, W): (sum L, n, k, k)."""
        if exporting():  # a traced or ONNX model: the same bins from an operator the formats have
            return ps_roi_align_by_roi_align(maps, proposals, self.k, 1.0 / self.stride, self.sampling_ratio)
        return ps_roi_align(maps, proposals, self.k, 1.0 / self.stride, self.sampling_ratio)

    def forward(self, feature: Tensor, proposals: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = self.reduce(feature)
        return average_vote(self.pool(self.class_maps(x), proposals)), average_vote(self.pool(self.box_maps(x), proposals))


class PositionSensitiveRoIHeads(RoIHeads):
    """torchvision's RoIHeads (sampling, losses, postprocessing) around R-FCN's :class:`PositionSensitiveHead`.

    ``like`` is the RoIHeads that FasterRCNN built from its ``box_*`` keywords: its matching
    thresholds, sampling sizes, box coder and inference thresholds are taken over unchanged.
    ``level`` names the feature map the head reads.
    """

    def __init__(self, head: PositionSensitiveHead, level: str, like: RoIHeads) -> None:
        super().__init__(
            None, None, None,
            fg_iou_thresh=like.proposal_matcher.high_threshold, bg_iou_thresh=like.proposal_matcher.low_threshold,
            batch_size_per_image=like.fg_bg_sampler.batch_size_per_image,
            positive_fraction=like.fg_bg_sampler.positive_fraction, bbox_reg_weights=like.box_coder.weights,
            score_thresh=like.score_thresh, nms_thresh=like.nms_thresh, detections_per_img=like.detections_per_img,
        )
        self.head = head
        self.level = level

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """RoIHeads' contract: (detections, {}) in eval, ([], losses) in training."""
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, deltas = self.head(features[self.level], proposals)
        # class-agnostic boxes: the same deltas under every class, the layout fastrcnn_loss and the decoder read
        box_regression = deltas.repeat(1, class_logits.shape[1])
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": l, "scores": s} for b, s, l in zip(boxes, scores, labels)], {}


def _score_level(neck: FeaturePyramidNeck, score_stride: int) -> str:
    """The name of the neck level at ``score_stride``, or a ValueError naming the strides it has."""
    levels = dict(zip(neck.strides, neck.level_names))
    usable = [s for s, n in levels.items() if n in neck.feature_levels]
    if score_stride not in usable:
        raise ValueError(
            f"rfcn reads its score maps at score_stride {score_stride}, but the neck's levels have strides {usable}; "
            f"pick score_stride among those (the neck starts at min_stride, ends at the backbone's coarsest level)"
        )
    return levels[score_stride]


def rfcn(
    neck: FeaturePyramidNeck,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    k: int = 7,
    score_stride: int = 8,
    score_channels: int = 256,
    anchor_scale: float = 4.0,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    **kwargs: Any,
) -> FasterRCNN:
    """R-FCN on ``neck``: torchvision's FasterRCNN (transform, RPN) with position-sensitive RoI heads.

    ``k``: bins per side of the position-sensitive pooling (the paper's 7; 3 gives a lighter head,
    any positive integer is valid). ``score_stride``: the neck level the score maps are made on (16 is the paper's).
    ``score_channels``: width of the 1x1 layer before them. ``anchor_scale``/``aspect_ratios``: the
    RPN's anchors, as Faster R-CNN's. ``kwargs`` override torchvision's FasterRCNN keywords
    (``rpn_*``, ``box_score_thresh``, ``box_batch_size_per_image``, ...).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"rfcn's k (position-sensitive bins per side) must be a positive integer, e.g. 7 (the paper's) "
                         f"or 3; got {k!r}")
    level = _score_level(neck, score_stride)
    # the RoI head and predictor are placeholders (nothing is built for them): the RoI heads are replaced below
    model = FasterRCNN(
        neck, None, min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
        box_head=nn.Identity(), box_predictor=nn.Identity(),
        **{**RCNN_SMALL_IMAGE_DEFAULTS, "rpn_anchor_generator": anchor_generator(neck.strides, anchor_scale, aspect_ratios),
           **kwargs},
    )
    head = PositionSensitiveHead(neck.out_channels, num_classes + 1, k, score_stride, score_channels)
    model.roi_heads = PositionSensitiveRoIHeads(head, level, like=model.roi_heads)
    return model
