"""Metrics that stay exact when processes evaluate different numbers of images."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torchmetrics.detection import MeanAveragePrecision

__all__ = ["UnevenMeanAveragePrecision"]


def _move(obj: Any, device: torch.device) -> Any:
    """Tensors inside lists/tuples moved to ``device``; anything else (RLE masks) as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device) for o in obj)
    return obj


class UnevenMeanAveragePrecision(MeanAveragePrecision):
    """torchmetrics' MeanAveragePrecision whose per-image states synchronise across uneven ranks.

    Its states are lists with one entry per image, and torchmetrics gathers them entry by entry,
    which assumes every rank holds as many images: with 5 on one rank and 4 on the other the
    gather fails (or, for masks, drops images). Here each rank's lists travel whole, once per
    compute, and are laid out in the order one process would have seen the images: the evaluation
    sampler gives rank r the items r, r + N, r + 2N, ..., so item i of rank r was image i*N + r.
    """

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        group = process_group or self.process_group
        world = dist.get_world_size(group)
        names = list(self._defaults)
        # objects are pickled; CPU tensors keep NCCL groups out of it and unpickle on any rank
        local = {n: _move(getattr(self, n), torch.device("cpu")) for n in names}
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, local, group=group)
        for n in names:
            lists = [p[n] for p in parts]
            longest = max(len(items) for items in lists)
            merged = [items[i] for i in range(longest) for items in lists if i < len(items)]
            setattr(self, n, _move(merged, self.device))
