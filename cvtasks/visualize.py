"""Drawing in one place: palettes, boxes and masks drawn on images, and images sent to the loggers that show them.

Tasks and prediction writers call into this module; none of them draws or picks a logger itself.
Loggers are chosen by type (``isinstance``), never by class name, so W&B subclasses such as
``AutoWandbLogger`` (the default) get images like Lightning's own ``WandbLogger``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .backbone import IMAGENET_MEAN, IMAGENET_STD
from .data.segmentation import voc_palette

__all__ = [
    "BOX_PALETTE",
    "box_colour",
    "colour_overlay",
    "denormalise",
    "draw_detections",
    "draw_instance_masks",
    "log_images",
    "to_uint8",
    "wandb_boxes",
]

#: distinct colours per class for drawn boxes and instance masks (matplotlib's tab10)
BOX_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")
#: semantic masks are drawn in VOC's colours, the ones their index PNGs carry
_MASK_PALETTE = voc_palette()


# -- pixels --------------------------------------------------------------------------------------
def denormalise(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Normalised float images (B, 3, H, W) back to uint8 for display."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)


def to_uint8(image: Tensor) -> Tensor:
    """A [0, 1] float CxHxW image as uint8 RGB (grey images repeated to 3 channels)."""
    img = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]


# -- boxes and instance masks --------------------------------------------------------------------
def box_colour(label: int) -> str:
    """The colour class ``label`` is drawn in."""
    return BOX_PALETTE[int(label) % len(BOX_PALETTE)]


def draw_instance_masks(image: Tensor, masks: Tensor | None, labels: Tensor) -> Tensor:
    """uint8 CxHxW image with each instance's (N, H, W) mask blended in its class colour."""
    if masks is None or not len(masks):
        return image
    return draw_segmentation_masks(image, masks.bool().cpu(), alpha=0.45, colors=[box_colour(int(l)) for l in labels.cpu()])


def draw_detections(image: Tensor, boxes: Tensor, labels: Tensor, class_names: Sequence[str],
                    scores: Tensor | None = None, masks: Tensor | None = None) -> Tensor:
    """uint8 CxHxW image with (masks and) boxes drawn, captioned with class names (and scores)."""
    labels = labels.cpu()
    if masks is not None:
        image = draw_instance_masks(image, masks, labels)
    if len(boxes):
        names = [class_names[int(l)] if int(l) < len(class_names) else str(int(l)) for l in labels]
        if scores is not None:
            names = [f"{n} {float(s):.2f}" for n, s in zip(names, scores)]
        image = draw_bounding_boxes(image, boxes.detach().float().cpu(), labels=names,
                                    colors=[box_colour(int(l)) for l in labels], width=1)
    return image


# -- semantic masks ------------------------------------------------------------------------------
def colour_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (H, W, 3) uint8 with each labelled pixel blended with its class colour (background kept)."""
    colours = _MASK_PALETTE[np.asarray(mask, dtype=np.int64).clip(0, 255)].astype(np.float32)
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colours
    keep = (np.asarray(mask) == 0)[..., None]
    return np.where(keep, image, blend).round().clip(0, 255).astype(np.uint8)


# -- loggers -------------------------------------------------------------------------------------
def log_images(
    loggers: Sequence[Logger],
    key: str,
    images: Tensor | list[np.ndarray],
    *,
    step: int,
    class_names: Sequence[str],
    captions: list[str] | None = None,
    masks: list[dict[str, np.ndarray]] | None = None,
    boxes: list[dict[str, dict[str, Any]]] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> None:
    """Log images to W&B (with mask overlays and boxes) or TensorBoard; other loggers get nothing.

    ``images`` are uint8 (B, 3, H, W) tensors, or floats normalised with ``mean``/``std`` (undone
    here), or HxWx3 arrays.
    ``masks``: per image, a dict such as {"prediction": HxW ints, "ground_truth": HxW ints}.
    ``boxes``: per image, a dict such as {"prediction": {"boxes": Nx4 xyxy pixels, "labels": N,
    "scores": N}, "ground_truth": {...}}.
    """
    if isinstance(images, Tensor):
        if images.dtype != torch.uint8:
            images = denormalise(images, mean, std)
        arrays = [im.permute(1, 2, 0).cpu().numpy() for im in images]
    else:
        arrays = list(images)
    class_labels = {i: n for i, n in enumerate(class_names)}
    for logger in loggers:
        # by type: AutoWandbLogger (the default) and any other subclass are W&B loggers too
        if isinstance(logger, WandbLogger):
            import wandb

            items = []
            for i, arr in enumerate(arrays):
                kw: dict[str, Any] = {}
                if captions:
                    kw["caption"] = captions[i]
                if masks:
                    kw["masks"] = {
                        name: {"mask_data": np.asarray(m, dtype=np.int32), "class_labels": class_labels}
                        for name, m in masks[i].items()
                    }
                if boxes:
                    kw["boxes"] = {name: wandb_boxes(b, class_labels) for name, b in boxes[i].items()}
                items.append(wandb.Image(arr, **kw))
            logger.experiment.log({key: items, "trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            stack = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            logger.experiment.add_images(key, stack, step)


def wandb_boxes(b: dict[str, Any], class_labels: dict[int, str]) -> dict[str, Any]:
    """One image's boxes ({"boxes", "labels", optional "scores"}) in W&B's box_data format, captioned by class."""
    data = []
    scores = b.get("scores")
    for j, (box, label) in enumerate(zip(np.asarray(b["boxes"]).tolist(), np.asarray(b["labels"]).tolist())):
        item: dict[str, Any] = {
            "position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]},
            "domain": "pixel",
            "class_id": int(label),
            "box_caption": class_labels.get(int(label), str(label)),
        }
        if scores is not None:
            item["scores"] = {"score": float(np.asarray(scores)[j])}
            item["box_caption"] += f" {float(np.asarray(scores)[j]):.2f}"
        data.append(item)
    return {"box_data": data, "class_labels": class_labels}
