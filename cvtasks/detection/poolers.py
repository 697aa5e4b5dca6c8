"""RoI poolers for the two-stage detectors: RoIAlign or RoIPool over a feature pyramid, chosen by name.

- RoIAlign (He et al., Mask R-CNN, ICCV 2017): torchvision's ``MultiScaleRoIAlign``, bilinear
  sampling with no quantisation.
- RoIPool (Girshick, Fast R-CNN, ICCV 2015): :class:`MultiScaleRoIPool`, quantised max pooling
  (``torchvision.ops.roi_pool``) from the level the FPN paper's Eqn. 1 assigns each box to
  (Lin et al., Feature Pyramid Networks for Object Detection, CVPR 2017).

``roi="align"|"pool"`` in ``build_detector`` and the tasks names one of :data:`ROI_POOLERS`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_pool
from torchvision.ops.poolers import LevelMapper

__all__ = ["ROI_POOLERS", "MultiScaleRoIPool", "check_roi", "pyramid_scale", "roi_pooler"]


def pyramid_scale(feature_height: int, image_height: int) -> float:
    """A feature map's scale (1 / its stride, a power of two) from its height and the batch's tallest image.

    The batch is padded below the tallest image (to a multiple of the largest stride), so the map
    covers at least ``image_height`` pixels and less than twice as many: the stride is the smallest
    power of two with ``feature_height * stride >= image_height``. Rounding the ratio instead (as
    torchvision's pooler does, once, on its first batch) takes stride 2 for stride 4 when the
    padding is over a third of the image, as with a 38 px tall image padded to 64.
    """
    return 2.0 ** -math.ceil(math.log2(image_height / feature_height) - 1e-6)


class MultiScaleRoIPool(MultiScaleRoIAlign):
    """RoIPool (Girshick, Fast R-CNN, ICCV 2015) over a pyramid, with MultiScaleRoIAlign's interface.

    Each box is pooled from the level torchvision's ``LevelMapper`` assigns it to (Eqn. 1 of the
    FPN paper), with ``torchvision.ops.roi_pool`` instead of RoIAlign's bilinear sampling. It
    subclasses MultiScaleRoIAlign only because torchvision's R-CNNs check for that type.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int],
        sampling_ratio: int = 0,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio,
                         canonical_scale=canonical_scale, canonical_level=canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pooled features (sum of boxes, C, *output_size), in the order of ``boxes``."""
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if not feats:
            raise ValueError(f"MultiScaleRoIPool found none of {self.featmap_names} among the features {list(x)}")
        max_h = max(int(s[0]) for s in image_shapes)
        scales = [pyramid_scale(f.shape[-2], max_h) for f in feats]
        k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        mapper = LevelMapper(k_min, k_max, self.canonical_scale, self.canonical_level)
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0
        )
        if len(feats) == 1:
            return roi_pool(feats[0], rois, self.output_size, scales[0])
        levels = mapper(boxes)
        out = rois.new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size), dtype=feats[0].dtype)
        for lvl, (feat, scale) in enumerate(zip(feats, scales)):
            idx = torch.where(levels == lvl)[0]
            out[idx] = roi_pool(feat, rois[idx], self.output_size, scale).to(out.dtype)
        return out


#: the ``roi`` names: RoIAlign with torchvision's usual sampling ratio of 2, or RoIPool
ROI_POOLERS: dict[str, Callable[..., MultiScaleRoIAlign]] = {
    "align": partial(MultiScaleRoIAlign, sampling_ratio=2),
    "pool": MultiScaleRoIPool,
}


def check_roi(roi: str) -> None:
    """Raise a ValueError naming the choices unless ``roi`` is one of ROI_POOLERS."""
    if roi not in ROI_POOLERS:
        raise ValueError(f"unknown roi {roi!r}; choose 'align' (RoIAlign) or 'pool' (RoIPool)")


def roi_pooler(roi: str, featmap_names: list[str], output_size: int, canonical_scale: int = 224) -> MultiScaleRoIAlign:
    """The pooler ``roi`` (align | pool) over the pyramid levels ``featmap_names``."""
    check_roi(roi)
    return ROI_POOLERS[roi](featmap_names=list(featmap_names), output_size=output_size, canonical_scale=canonical_scale)
