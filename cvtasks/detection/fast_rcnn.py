"""R-CNN and Fast R-CNN: detectors that classify (and refine) region proposals given from outside.

- R-CNN (Girshick et al., Rich feature hierarchies for accurate object detection and semantic
  segmentation, CVPR 2014): every proposal is cut out of the IMAGE, dilated by ``context`` (the
  paper's 16 px of context around a 227 px warp), warped to ``crop_size`` x ``crop_size``
  (``torchvision.ops.roi_align`` on the image: bilinear, so a warp, not a crop-and-pad) and run through
  the whole backbone on its own; the deepest level, averaged, feeds a linear classifier and a box
  regressor (:class:`CropFeatures`). All crops of a batch go through the backbone as one batch.
  The paper fine-tunes the CNN this way (positives at IoU >= 0.5, 32 of 128 windows per batch)
  and then trains one linear SVM per class on its features; we keep the fine-tuned softmax
  classifier instead, which the Fast R-CNN paper (its Table 8) shows to be as good. At test: per-class NMS.
- Fast R-CNN (Girshick, Fast R-CNN, ICCV 2015): the image goes through the backbone and its neck
  ONCE; each proposal is pooled from the shared feature map (RoIPool by default, as in the paper;
  ``roi=align`` for RoIAlign), two fully connected layers, then the class and box heads. 64 RoIs
  are sampled per image, a quarter of them foreground (IoU >= 0.5), as in the paper.

Both are torchvision's ``GeneralizedRCNNTransform`` (resize, normalise) and ``RoIHeads``
(sampling, losses, box coding, per-class NMS) around the given proposals: the only difference
between the two is where the CNN runs, which is the lecture's point. Fast R-CNN uses the same
feature pyramid as our Faster R-CNN (``fpn_neck("none")``, strides 4..32), so that the two differ
only in where the proposals come from; ``strides: [16]`` gives the paper's single stride-16 map.

Proposals come with the images: ``model(images, targets, proposals=[(P, 4) xyxy per image])``, in
the input images' pixels and ranked best first (the first ``max_proposals`` are used); the data
modules compute them with selective search (:mod:`.proposals`) when built with ``proposals=True``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import box_convert, clip_boxes_to_image, remove_small_boxes, roi_align

from ..backbone import Backbone
from .neck import FeaturePyramidNeck
from .poolers import roi_pooler

__all__ = ["CropFeatures", "FastRCNN", "ImageWarp", "ProposalRCNN", "RCNN", "crop_features", "fast_rcnn", "rcnn"]


class ProposalRCNN(nn.Module):
    """torchvision's transform and RoIHeads around proposals given with the images; subclasses say where the CNN runs.

    ``forward(images, targets=None, proposals=...)``: a dict of losses in training, else a list of
    ``{boxes, scores, labels}`` in the input images' pixels (labels with 0 = background, as
    torchvision's R-CNNs).
    """

    def __init__(self, transform: GeneralizedRCNNTransform, roi_heads: RoIHeads, max_proposals: int) -> None:
        super().__init__()
        if max_proposals < 1:
            raise ValueError(f"max_proposals must be at least 1, got {max_proposals}")
        self.transform = transform
        self.roi_heads = roi_heads
        self.max_proposals = max_proposals

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """What the RoI heads pool from, for the normalised, padded batch ``images``."""
        raise NotImplementedError

    def _scaled(self, proposals: Sequence[Tensor], original: list[tuple[int, int]], resized: list[tuple[int, int]],
                device: torch.device) -> list[Tensor]:
        """The first ``max_proposals`` of each image, moved by the transform's resize and clipped to the image."""
        out = []
        for p, old, new in zip(proposals, original, resized):
            p = resize_boxes(p[: self.max_proposals].to(device), list(old), list(new))
            p = clip_boxes_to_image(p, new)
            p = p[remove_small_boxes(p, 1.0)]
            if not len(p):  # nothing proposed: the whole image is the one region, so the image still gets scored
                p = torch.tensor([[0.0, 0.0, float(new[1]), float(new[0])]], device=device)
            out.append(p)
        return out

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                proposals: Sequence[Tensor] | None = None) -> Any:
        """Losses in training, detections in eval, for ``images`` and their ``proposals``."""
        if proposals is None:
            raise ValueError(f"{type(self).__name__} needs proposals=[(P, 4) xyxy boxes per image]")
        # the sizes as the shapes give them, not int(): a traced (exported) model then follows each image's size
        original = [(img.shape[-2], img.shape[-1]) for img in images]
        batch, targets = self.transform(images, targets)
        rois = self._scaled(proposals, original, batch.image_sizes, batch.tensors.device)
        detections, losses = self.roi_heads(self.features(batch.tensors), rois, batch.image_sizes, targets)
        if self.training:
            return losses
        return self.transform.postprocess(detections, batch.image_sizes, original)


class FastRCNN(ProposalRCNN):
    """Fast R-CNN: the backbone and neck run once per image; RoI heads pool the proposals from the shared maps."""

    def __init__(self, backbone: nn.Module, transform: GeneralizedRCNNTransform, roi_heads: RoIHeads,
                 max_proposals: int) -> None:
        super().__init__(transform, roi_heads, max_proposals)
        self.backbone = backbone

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """The neck's feature maps of the whole batch."""
        return self.backbone(images)


class RCNN(ProposalRCNN):
    """R-CNN: the RoI heads warp each proposal out of the image itself; the backbone runs on every warp."""

    @property
    def backbone(self) -> nn.Module:
        """The CNN (:class:`CropFeatures`), which runs inside the box head, on the warped proposals."""
        return self.roi_heads.box_head

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """The normalised images themselves: the proposals are warped out of the pixels."""
        return {"image": images}


class ImageWarp(nn.Module):
    """R-CNN's warp: each box, dilated by ``context`` of the output on every side, resampled to ``size`` x ``size``.

    It takes the place of the RoI pooler in torchvision's RoIHeads (same call), reading ``features["image"]``.
    """

    def __init__(self, size: int, context: float) -> None:
        super().__init__()
        if size < 8:
            raise ValueError(f"crop_size must be at least 8 pixels, got {size}")
        if not 0.0 <= context < 0.5:
            raise ValueError(f"context must be in [0, 0.5) (a share of the warped crop per side), got {context}")
        self.size, self.context = size, context

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """(sum of boxes, C, size, size) warped crops, in the order of ``boxes``."""
        grow = 1.0 / (1.0 - 2.0 * self.context)  # the box fills the middle 1 - 2 * context of the crop
        dilated = []
        for b in boxes:
            cxcywh = box_convert(b, "xyxy", "cxcywh")
            dilated.append(box_convert(torch.cat([cxcywh[:, :2], cxcywh[:, 2:] * grow], 1), "cxcywh", "xyxy"))
        # outside the image roi_align reads zeros: the padded mean pixel, as the paper pads with the mean
        return roi_align(features["image"], dilated, self.size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


class CropFeatures(nn.Module):
    """A backbone applied to warped crops: its deepest level, averaged over space, one vector per crop."""

    def __init__(self, backbone: Backbone, chunk: int = 512) -> None:
        super().__init__()
        self.body = backbone
        self.out_channels = backbone.feature_info[-1].channels
        self.chunk = chunk

    def _pooled(self, crops: Tensor) -> Tensor:
        deepest = list(self.body(crops).values())[-1]
        return deepest.flatten(2).mean(2) if deepest.dim() == 4 else deepest.mean(1)  # (B, C, H, W) or tokens (B, N, C)

    def forward(self, crops: Tensor) -> Tensor:
        """(R, out_channels) for R crops; at eval in chunks of ``chunk`` to bound the memory of thousands of crops."""
        if self.training or len(crops) <= self.chunk:
            return self._pooled(crops)
        return torch.cat([self._pooled(c) for c in crops.split(self.chunk)])


def crop_features(backbone: Backbone, *, out_channels: int, strides: Sequence[int] | None, min_stride: int) -> CropFeatures:
    """R-CNN's "neck": the backbone on each crop, pooled (the pyramid's width and strides do not apply)."""
    return CropFeatures(backbone)


def _roi_heads(pool: nn.Module, head: nn.Module, width: int, num_classes: int, sampling: dict[str, Any]) -> RoIHeads:
    """torchvision's RoIHeads with a ``num_classes + 1``-way classifier and box regressor on ``width`` features."""
    return RoIHeads(pool, head, FastRCNNPredictor(width, num_classes + 1), **sampling)


def _sampling(batch_size_per_image: int, positive_fraction: float, fg_iou_thresh: float, bg_iou_thresh: float,
              score_thresh: float, nms_thresh: float, detections_per_img: int) -> dict[str, Any]:
    """RoIHeads' sampling and post-processing keywords."""
    return {"fg_iou_thresh": fg_iou_thresh, "bg_iou_thresh": bg_iou_thresh, "batch_size_per_image": batch_size_per_image,
            "positive_fraction": positive_fraction, "bbox_reg_weights": None, "score_thresh": score_thresh,
            "nms_thresh": nms_thresh, "detections_per_img": detections_per_img}


def fast_rcnn(
    neck: FeaturePyramidNeck,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    roi: str = "pool",
    canonical_scale: int = 224,
    representation_size: int = 256,
    max_proposals: int = 2000,
    box_batch_size_per_image: int = 64,
    box_positive_fraction: float = 0.25,
    box_fg_iou_thresh: float = 0.5,
    box_bg_iou_thresh: float = 0.5,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
) -> FastRCNN:
    """Fast R-CNN on ``neck``: RoIPool (``roi``) 7x7 from the pyramid, two FC layers of ``representation_size``, class and box heads.

    ``max_proposals``: the first (best ranked) proposals used per image (the paper's 2000).
    ``box_*``: torchvision's names for RoIHeads' sampling (64 RoIs per image, a quarter foreground
    at IoU >= 0.5, the rest background, as in the paper) and post-processing.
    """
    pool = roi_pooler(roi, neck.feature_levels, 7, canonical_scale)
    head = TwoMLPHead(neck.out_channels * 7 * 7, representation_size)
    sampling = _sampling(box_batch_size_per_image, box_positive_fraction, box_fg_iou_thresh, box_bg_iou_thresh,
                         box_score_thresh, box_nms_thresh, box_detections_per_img)
    transform = GeneralizedRCNNTransform(min_size, max_size, list(image_mean), list(image_std))
    return FastRCNN(neck, transform, _roi_heads(pool, head, representation_size, num_classes, sampling), max_proposals)


def rcnn(
    neck: CropFeatures,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    crop_size: int = 32,
    context: float = 16 / 227,
    max_proposals: int = 2000,
    box_batch_size_per_image: int = 16,
    box_positive_fraction: float = 0.25,
    box_fg_iou_thresh: float = 0.5,
    box_bg_iou_thresh: float = 0.5,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
) -> RCNN:
    """R-CNN: each proposal warped to ``crop_size`` (with ``context``) and classified by the backbone on its own.

    ``crop_size`` 32: the shapes are 15-50 px, and the backbone's cost grows with its square (the
    paper's 227 suits ImageNet-sized objects). 16 RoIs per image (8 images: the paper's 128 windows
    per batch, 32 of them foreground). The other keywords are Fast R-CNN's.
    """
    sampling = _sampling(box_batch_size_per_image, box_positive_fraction, box_fg_iou_thresh, box_bg_iou_thresh,
                         box_score_thresh, box_nms_thresh, box_detections_per_img)
    transform = GeneralizedRCNNTransform(min_size, max_size, list(image_mean), list(image_std))
    heads = _roi_heads(ImageWarp(crop_size, context), neck, neck.out_channels, num_classes, sampling)
    return RCNN(transform, heads, max_proposals)
