"""The mIoU ceiling of a head whose scores live at stride S, on the generated shapes scenes.

    python -m benchmarks.segmentation_ceiling [--size 64] [--stride 8] [--shape-scale 0.15 0.3] [--max-shapes 3]

A perfect net at stride S can do no better than the true one-hot masks averaged over S x S cells
and upsampled bilinearly (what FCN-8s's last, fixed x8 upsampling does to its stride-8 scores).
That bound is what chose the default scenes of configs/segmentation.yaml: see docs/segmentation.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex

from cvtasks.data.shapes import SHAPE_NAMES, render_scene


def ceiling(size: int, stride: int, scenes: int = 200, **scene_args) -> tuple[float, list[float]]:
    """mIoU and per-class IoU (background first) of the stride-``stride`` oracle over ``scenes`` scenes."""
    num_classes = len(SHAPE_NAMES) + 1
    metric = MulticlassJaccardIndex(num_classes, average="none")
    for i in range(scenes):
        target = torch.from_numpy(render_scene(i, size, **scene_args).semantic_mask())[None]
        one_hot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()
        coarse = F.avg_pool2d(one_hot, stride, ceil_mode=True)
        scores = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        metric.update(scores.argmax(1), target)
    iou = metric.compute()
    return iou.mean().item(), iou.tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--shape-scale", type=float, nargs=2, default=(0.15, 0.3))
    ap.add_argument("--max-shapes", type=int, default=3)
    ns = ap.parse_args(argv)
    miou, per_class = ceiling(ns.size, ns.stride, ns.scenes, shape_scale=tuple(ns.shape_scale), max_shapes=ns.max_shapes)
    names = ["background", *SHAPE_NAMES]
    print(f"{ns.size} px, stride {ns.stride}, shape_scale {tuple(ns.shape_scale)}, max_shapes {ns.max_shapes}: "
          f"mIoU ceiling {miou:.3f} (" + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, per_class)) + ")")


if __name__ == "__main__":
    main()
