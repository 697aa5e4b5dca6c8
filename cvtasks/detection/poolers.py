"""RoI poolers for the two-stage detectors: RoIAlign, RoIPool or SPP over a feature pyramid, chosen by name.

- RoIAlign (He et al., Mask R-CNN, ICCV 2017): torchvision's ``MultiScaleRoIAlign``, bilinear
  sampling with no quantisation.
- RoIPool (Girshick, Fast R-CNN, ICCV 2015): :class:`MultiScaleRoIPool`, quantised max pooling
  (``torchvision.ops.roi_pool``) from the level the FPN paper's Eqn. 1 assigns each box to
  (Lin et al., Feature Pyramid Networks for Object Detection, CVPR 2017).
- SPP (He et al., Spatial Pyramid Pooling in Deep Convolutional Networks, ECCV 2014):
  :class:`MultiScaleSpatialPyramidPool`, each RoI max-pooled into 1x1, 2x2, 3x3 and 6x6 bins (the
  paper's detection pyramid; ``bins`` changes it) and concatenated, from the same level RoIPool
  picks. Its output is a vector of ``C * sum(b**2)`` features per RoI, not a grid, so it feeds a
  box head (:func:`pooled_features` gives the head's input size) but not a mask head.

``roi="align"|"pool"|"spp"`` in ``build_detector`` and the tasks names one of :data:`ROI_POOLERS`.
"""

from __future__ import annotations

import math
from functools import partial, reduce
from typing import Callable, Sequence

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_pool
from torchvision.ops.poolers import LevelMapper

from ..layers import SpatialPyramidPooling

__all__ = ["ROI_POOLERS", "SPP_DETECTION_BINS", "MultiScaleRoIPool", "MultiScaleSpatialPyramidPool", "check_roi",
           "pooled_features", "pyramid_scale", "roi_pooler"]

#: SPP-net's detection pyramid: 1x1, 2x2, 3x3 and 6x6 bins (50 per channel, against RoIAlign's 7x7 = 49)
SPP_DETECTION_BINS: tuple[int, ...] = (1, 2, 3, 6)
# the pyramid is read off one RoIPool grid of lcm(bins) per side (below); bounding it bounds that grid's memory
_MAX_SPP_GRID = 12


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


class MultiScaleSpatialPyramidPool(MultiScaleRoIPool):
    """SPP-net's RoI pooling (He et al., ECCV 2014) over a pyramid: a spatial pyramid of max-pooled bins per RoI.

    Each RoI is pooled from the level RoIPool assigns it to (Eqn. 1 of the FPN paper) into one
    ``L x L`` grid with ``L = lcm(bins)``, and :class:`~cvtasks.layers.SpatialPyramidPooling` reads
    the ``b x b`` levels off that grid. That is RoIPool at each bin count, not an approximation:
    RoIPool's bin ``i`` of ``n`` spans ``floor(i*h/n)`` to ``ceil((i+1)*h/n)``, so the union of
    ``L/b`` neighbouring grid bins is RoIPool's bin of ``b``, and the max over the union is the max
    over that bin. (Only a RoI reaching past the map's last cell can differ: RoIPool fills a grid
    bin that falls wholly outside with 0.) Output: ``(number of boxes, C * sum(b**2))``.
    """

    def __init__(
        self,
        featmap_names: list[str],
        bins: Sequence[int] = SPP_DETECTION_BINS,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        spp = SpatialPyramidPooling(bins)
        grid = reduce(math.lcm, spp.bins)
        if grid > _MAX_SPP_GRID:
            raise ValueError(
                f"spp_bins {spp.bins} need a {grid}x{grid} RoI grid (their least common multiple); choose bins "
                f"whose least common multiple is at most {_MAX_SPP_GRID}, e.g. (1, 2, 3, 6) or (1, 2, 4)"
            )
        super().__init__(featmap_names, grid, canonical_scale=canonical_scale, canonical_level=canonical_level)
        self.spp = spp

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pyramid features (sum of boxes, C * sum(b**2)), in the order of ``boxes``."""
        return self.spp(super().forward(x, boxes, image_shapes))


#: the ``roi`` names: RoIAlign with torchvision's usual sampling ratio of 2, RoIPool, or SPP-net's pyramid
ROI_POOLERS: dict[str, Callable[..., MultiScaleRoIAlign]] = {
    "align": partial(MultiScaleRoIAlign, sampling_ratio=2),
    "pool": MultiScaleRoIPool,
    "spp": MultiScaleSpatialPyramidPool,
}


def check_roi(roi: str) -> None:
    """Raise a ValueError naming the choices unless ``roi`` is one of ROI_POOLERS."""
    if roi not in ROI_POOLERS:
        raise ValueError(f"unknown roi {roi!r}; choose 'align' (RoIAlign), 'pool' (RoIPool) or 'spp' (SPP-net's pyramid)")


def roi_pooler(
    roi: str, featmap_names: list[str], output_size: int, canonical_scale: int = 224,
    spp_bins: Sequence[int] = SPP_DETECTION_BINS,
) -> MultiScaleRoIAlign:
    """The pooler ``roi`` over the pyramid levels ``featmap_names``: align/pool to an ``output_size`` grid, spp to ``spp_bins``."""
    check_roi(roi)
    if roi == "spp":
        return MultiScaleSpatialPyramidPool(list(featmap_names), spp_bins, canonical_scale=canonical_scale)
    return ROI_POOLERS[roi](featmap_names=list(featmap_names), output_size=output_size, canonical_scale=canonical_scale)


def pooled_features(pooler: MultiScaleRoIAlign, channels: int) -> int:
    """Features per RoI that ``pooler`` gives from ``channels``-wide maps: the box head's input size."""
    if isinstance(pooler, MultiScaleSpatialPyramidPool):
        return pooler.spp.out_features(channels)
    h, w = pooler.output_size
    return channels * h * w
