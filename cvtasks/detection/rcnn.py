"""The R-CNN family on a feature-pyramid neck: torchvision's Faster R-CNN and Mask R-CNN, sized for small images.

- Faster R-CNN (Ren et al., Faster R-CNN: Towards Real-Time Object Detection with Region Proposal
  Networks, NeurIPS 2015) with an FPN (Lin et al., CVPR 2017): RPN anchors of one size per level,
  ``anchor_scale * stride``, RoI pooling from the pyramid (:mod:`.poolers`: RoIAlign, RoIPool or
  SPP-net's spatial pyramid), a two-layer box head whose input follows the pooler.
- Mask R-CNN (He et al., Mask R-CNN, ICCV 2017): the same plus a mask head of ``mask_layers``
  3x3 convolutions on 14x14 pooled features.

Both classify with a softmax whose class 0 is background (``num_classes + 1`` outputs). Each
builder takes the neck built by ``build_detector`` and its own keywords; the rest go to
torchvision's class unchanged (``rpn_*``, ``box_*``, ...).
"""

from __future__ import annotations

from typing import Any, Sequence

from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor

from .anchors import anchor_generator
from .neck import FeaturePyramidNeck
from .poolers import SPP_DETECTION_BINS, pooled_features, roi_pooler

__all__ = ["RCNN_SMALL_IMAGE_DEFAULTS", "faster_rcnn", "mask_rcnn"]

# torchvision's R-CNN sampling sizes are made for 800-1333 px COCO images with dozens of objects;
# small images with a handful of objects need far fewer proposals and sampled RoIs (and a CPU
# thanks us for it). Any of these can be overridden through build_detector's keywords.
RCNN_SMALL_IMAGE_DEFAULTS: dict[str, Any] = {
    "rpn_pre_nms_top_n_train": 1000,
    "rpn_post_nms_top_n_train": 500,
    "rpn_pre_nms_top_n_test": 500,
    "rpn_post_nms_top_n_test": 300,
    "rpn_batch_size_per_image": 128,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 100,
}


def _rcnn_kwargs(
    neck: FeaturePyramidNeck, num_classes: int, roi: str, anchor_scale: float, aspect_ratios: Sequence[float],
    canonical_scale: int, representation_size: int, spp_bins: Sequence[int] = SPP_DETECTION_BINS,
) -> dict[str, Any]:
    """What Faster and Mask R-CNN share: small-image sampling, RPN anchors, the box pooler, head and predictor."""
    pooler = roi_pooler(roi, neck.feature_levels, 7, canonical_scale, spp_bins)
    return {
        **RCNN_SMALL_IMAGE_DEFAULTS,
        # FPN's RPN: one anchor size per level (octaves=1)
        "rpn_anchor_generator": anchor_generator(neck.strides, anchor_scale, aspect_ratios),
        "box_roi_pool": pooler,
        # head and predictor given together: torchvision's default predictor assumes 1024 features
        "box_head": TwoMLPHead(pooled_features(pooler, neck.out_channels), representation_size),
        "box_predictor": FastRCNNPredictor(representation_size, num_classes + 1),
    }


def faster_rcnn(
    neck: FeaturePyramidNeck,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    roi: str = "align",
    anchor_scale: float = 4.0,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    canonical_scale: int = 224,
    representation_size: int = 256,
    spp_bins: Sequence[int] = SPP_DETECTION_BINS,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN with FPN on ``neck``; ``kwargs`` override torchvision's FasterRCNN keywords.

    ``anchor_scale`` 4: FPN's one size per level, 4x the stride from stride 4 (32 px at P3), for
    small objects. ``representation_size``: the box head's width (torchvision's 1024 is for 91
    COCO classes; a few classes need far less). ``canonical_scale``: the box side that Eqn. 1 of
    the FPN paper maps to level 4. ``spp_bins``: the pyramid of ``roi="spp"`` (SPP-net's detection
    bins 1, 2, 3, 6 per side); the other poolers ignore it.
    """
    own = _rcnn_kwargs(neck, num_classes, roi, anchor_scale, aspect_ratios, canonical_scale, representation_size,
                       spp_bins)
    return FasterRCNN(neck, None, min_size=min_size, max_size=max_size, image_mean=list(image_mean),
                      image_std=list(image_std), **{**own, **kwargs})


def mask_rcnn(
    neck: FeaturePyramidNeck,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    roi: str = "align",
    anchor_scale: float = 4.0,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    canonical_scale: int = 224,
    representation_size: int = 256,
    mask_layers: int = 4,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN with FPN on ``neck``: Faster R-CNN's keywords plus ``mask_layers`` (the paper's 4)."""
    if roi == "spp":
        raise ValueError("roi 'spp' pools each RoI to a vector, and Mask R-CNN's mask head needs a grid: "
                         "use roi 'align' or 'pool' for mask_rcnn")
    own = _rcnn_kwargs(neck, num_classes, roi, anchor_scale, aspect_ratios, canonical_scale, representation_size)
    c = neck.out_channels
    # likewise torchvision's default mask predictor assumes a 256-wide mask head
    own["mask_roi_pool"] = roi_pooler(roi, neck.feature_levels, 14, canonical_scale)
    own["mask_head"] = MaskRCNNHeads(c, [c] * mask_layers, 1)
    own["mask_predictor"] = MaskRCNNPredictor(c, c, num_classes + 1)
    return MaskRCNN(neck, None, min_size=min_size, max_size=max_size, image_mean=list(image_mean),
                    image_std=list(image_std), **{**own, **kwargs})
