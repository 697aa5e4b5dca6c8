"""Fetch published weights into the cache ahead of time (for machines without internet): backbones', task presets'."""

from __future__ import annotations

import argparse

from ..presets import TASK_PRESETS, preset_names
from ..registry import get_backbone_entry, list_backbones
from ..weights import PublishedWeights, backbone_imagenet, cache_dir


def published(name: str) -> PublishedWeights:
    """The published weights a name stands for: a backbone's ImageNet weights, or a task preset ``<model>:<preset>``.

    ``faster_rcnn:coco`` is torchvision's COCO Faster R-CNN that ``--model.pretrained coco`` loads
    into DETECTOR=faster_rcnn; an unknown name is an error naming the choices.
    """
    if ":" in name:
        model, _, preset = name.partition(":")
        found = TASK_PRESETS.get((model, preset))
        if found is None:
            raise ValueError(f"no task preset {name!r}; the task presets are: {' '.join(preset_names())}")
        return found.weights
    entry = get_backbone_entry(name)  # an unknown name raises with the closest registered ones
    weights = backbone_imagenet(entry)
    if weights is None:
        having = [n for n in list_backbones() if backbone_imagenet(get_backbone_entry(n)) is not None]
        raise ValueError(f"backbone {name!r} has no published ImageNet weights; these have: {' '.join(having)}"
                         f" (task presets: {' '.join(preset_names())})")
    return weights


def main(argv: list[str]) -> int:
    """``python -m cvtasks weights NAME [NAME ...]``: fetch each into the cache and check that it loads."""
    ap = argparse.ArgumentParser(prog="python -m cvtasks weights", description=__doc__)
    ap.add_argument("names", nargs="+",
                    help=f"backbone names (their ImageNet weights) or task presets: {' '.join(preset_names())}")
    ns = ap.parse_args(argv)
    for name in ns.names:
        weights = published(name)
        was_cached = weights.path.is_file()
        weights.load_reference()  # fetches when missing, and proves the file reads
        print(f"{name}: {'already cached' if was_cached else 'fetched'} {weights.path} ({weights.url})")
    print(f"cache: {cache_dir()} (copy this folder to a machine without internet; TORCH_HOME moves it)")
    return 0
