"""Anchors derived from a pyramid's strides, never typed per backbone.

An anchor's side is ``scale * stride`` of its level, with ``octaves`` sizes per level spaced by
``2**(1/octaves)`` as in RetinaNet (Lin et al., Focal Loss for Dense Object Detection, ICCV 2017);
the aspect ratios are shared by every level, as in Faster R-CNN (Ren et al., NeurIPS 2015).
"""

from __future__ import annotations

from typing import Sequence

from torchvision.models.detection.anchor_utils import AnchorGenerator

__all__ = ["anchor_generator", "anchor_sizes"]


def anchor_sizes(strides: Sequence[int], scale: float, octaves: int = 1) -> tuple[tuple[float, ...], ...]:
    """Anchor sizes per pyramid level, derived from its stride: ``scale * stride * 2**(i/octaves)``."""
    return tuple(tuple(float(scale * s * 2 ** (i / octaves)) for i in range(octaves)) for s in strides)


def anchor_generator(
    strides: Sequence[int], scale: float, aspect_ratios: Sequence[float], octaves: int = 1
) -> AnchorGenerator:
    """torchvision's AnchorGenerator with :func:`anchor_sizes` per level and the same ratios on each."""
    sizes = anchor_sizes(strides, scale, octaves)
    return AnchorGenerator(sizes, (tuple(float(r) for r in aspect_ratios),) * len(sizes))
