"""Exported models: a run's model written as ONNX, TorchScript or an ExportedProgram, checked against PyTorch, run back.

What is exported depends on the kind of task (``task_export(task)`` finds it by the task's type):

    classification         the classifier: normalised images (N, 3, S, S) -> logits (N, K)
    semantic segmentation  the segmentation model: normalised images (N, 3, H, W) -> logits (N, K, H, W)
    detection, instance    the whole detector for one image in [0, 1] (3, H, W), its resize, normalisation,
    segmentation           NMS and box rescaling included -> boxes, labels, scores (, masks)

What the data module does before (resize, mean/std) and the task after (softmax, argmax, a CRF,
drawing) stays outside the file; the sidecar ``model.json`` spells it out for whoever calls it.

Each format has exporters tried in order (``EXPORTERS``; a kind may rank them otherwise): ONNX by
``torch.export`` and the dynamo-based ONNX exporter, then by the TorchScript-based one
(``dynamo=False``, which takes torchvision's detectors and is tried first for them); TorchScript by
``torch.jit.trace``; an ExportedProgram by ``torch.export``, then, where it cannot take the model
(a detector's data-dependent shapes), a TorchScript file instead. An exporter's file counts only
when it reproduces PyTorch on a validation batch, and again at batch 1 and, for the tasks that
predict at the image's own size, at another size; a file that passes only at the training size is
kept as fixed-size (said in model.json, and refused for other sizes) when no exporter does better.
Every fallback and its reason goes to model.json and report.json.

``ExportedModel`` stands in for a task's ``model`` (the same call, the file's outputs), so the
task's own validation and predict steps measure and write the exported model unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision.ops import box_iou

if TYPE_CHECKING:
    from .runs import RunFolder
    from .tasks.base import BaseTask

__all__ = [
    "EXPORTERS",
    "FORMATS",
    "ExportError",
    "ExportedModel",
    "Tolerances",
    "Verdict",
    "build_datamodule",
    "check_parity",
    "export_model",
    "exported_model",
    "exporters",
    "load_exported",
    "match_detections",
    "read_sidecar",
    "standing_in",
    "task_export",
    "validation_loader",
    "validation_metrics",
]

#: format -> the suffix of its file (model.onnx, model.pt, model.pt2 in runs/<run>/export/)
FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt", "exported_program": ".pt2"}
SIDECAR = "model.json"
REPORT = "report.json"
ONNX_OPSET = 17


@dataclass(frozen=True)
class Tolerances:
    """How close the exported model's outputs must be to PyTorch's, per sample."""

    rtol: float = field(default=1e-3, metadata={
        "help": "classification: |exported - pytorch| <= atol + rtol x |pytorch| per logit"})
    atol: float = field(default=1e-5, metadata={"help": "classification: see rtol"})
    pixel_agreement: float = field(default=0.999, metadata={
        "help": "segmentation: share of each image's pixels with the same class"})
    box_iou: float = field(default=0.99, metadata={"help": "detection: IoU of each matched pair of boxes (same label)"})
    score_atol: float = field(default=1e-3, metadata={"help": "detection: |score difference| of each matched pair"})
    mask_iou: float = field(default=0.99, metadata={
        "help": "instance segmentation: IoU of each pair's masks binarised at 0.5"})
    mask_undecided: float = field(default=1e-3, metadata={
        "help": "instance segmentation: pixels PyTorch puts within this of 0.5 are left out of the mask IoU"})


@dataclass
class Verdict:
    """One sample's comparison: ``excess`` is the worst difference over its tolerance (<= 1 passes)."""

    excess: float
    detail: str
    stats: dict[str, float] = field(default_factory=dict)  # min_*, max_* and n_* figures, aggregated over the split

    @property
    def ok(self) -> bool:
        """Within every tolerance."""
        return self.excess <= 1.0


def _over(diff: float, allowed: float) -> float:
    """``diff / allowed``, with a zero tolerance meaning exact: 0 for no difference, infinity for any."""
    if allowed > 0:
        return diff / allowed
    return 0.0 if diff <= 0 else math.inf


# -- the task kinds ------------------------------------------------------------------------------

class TaskExport:
    """How one kind of task is exported, called back and compared with PyTorch (stateless; one per kind)."""

    kind = ""
    input_name = "image"
    #: the file's inputs, in order (detectors that classify given region proposals take them as a second)
    input_names: tuple[str, ...] = ("image",)
    #: the task passes the data's region proposals to its model (R-CNN, Fast R-CNN), and so to the file
    takes_proposals = False
    output_names: tuple[str, ...] = ()
    #: the input's dims that may change between calls (index -> name), and the outputs' that follow them
    input_dims: dict[int, str] = {}
    output_dims: dict[str, dict[int, str]] = {}
    #: predict feeds images at their own size, so a file fixed to one size is a limitation to state
    own_size: bool = False
    #: exporter key -> rank, where this kind tries exporters in another order than EXPORTERS (lower first)
    exporter_rank: dict[str, int] = {}
    #: format -> why this kind's exporters of it are ordered as they are (said in model.json and report.json)
    exporter_notes: dict[str, str] = {}
    #: what a failed check of this kind often means, said with the failure
    failure_hint: str = ""

    def network(self, task: BaseTask) -> nn.Module:
        """The module written to the file: tensors in, a tuple of tensors out."""
        return _Tupled(task.model)

    def inputs(self, batch: Any) -> Any:
        """What the task's model takes, from a validation batch."""
        raise NotImplementedError

    def reference(self, model: nn.Module, inputs: Any) -> Any:
        """The task's PyTorch model called on ``inputs`` as the task calls it."""
        return model(inputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Each input's and output's dims that may change between calls, by name."""
        return {self.input_name: dict(self.input_dims), **self.output_dims}

    def ids(self, batch: Any) -> list[Any]:
        """Each sample's own id in the data (a scene, an image id), or None."""
        return [None] * len(self.inputs(batch))

    def network_args(self, inputs: Any) -> tuple[Tensor, ...]:
        """The file's arguments for tracing, from the model's inputs."""
        return (inputs,)

    def other_shape(self, inputs: Any, size: tuple[int, int] | None) -> Any:
        """One sample of ``inputs``, at ``size`` (None: as it is): checks batch 1 and other sizes."""
        x = inputs[:1]
        return x if size is None else F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def call(self, run: Callable[..., tuple[Tensor, ...]], inputs: Any) -> Any:
        """The exported file called as the task calls its model."""
        return run(inputs)[0]

    def sizes(self, inputs: Any) -> list[tuple[int, int]]:
        """The (H, W) of each image in ``inputs``."""
        return [tuple(inputs.shape[-2:])] * inputs.shape[0]

    def per_sample(self, outputs: Any) -> list[Any]:
        """The model's outputs for a batch, one item per sample."""
        return list(outputs)

    def compare(self, ref: Any, got: Any, tol: Tolerances) -> Verdict:
        """One sample's exported output against PyTorch's."""
        raise NotImplementedError

    def describe(self, task: BaseTask, datamodule: Any) -> dict[str, Any]:
        """model.json's account of the input, the outputs and the steps around the file."""
        raise NotImplementedError

    def python_steps(self, task: BaseTask) -> list[str]:
        """Steps of the task's PyTorch prediction that the file does not hold (run in Python around it)."""
        return []


class _Tupled(nn.Module):
    """A model whose single tensor output is returned as a one-tuple (every file returns a tuple)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.model(x),)


def _normalisation(task: BaseTask) -> dict[str, Any]:
    mean, std = task.normalization
    return {"scale": "1/255 (uint8 -> [0, 1])", "mean": list(mean), "std": list(std),
            "formula": "(pixel / 255 - mean) / std, per RGB channel"}


class ClassificationExport(TaskExport):
    """Classifier: normalised (N, 3, S, S) -> logits (N, K)."""

    kind = "classification"
    output_names = ("logits",)
    input_dims = {0: "batch"}
    output_dims = {"logits": {0: "batch"}}

    def inputs(self, batch: Any) -> Tensor:
        return batch[0]

    def other_shape(self, inputs: Tensor, size: tuple[int, int] | None) -> Tensor:
        return inputs[:1]  # predict resizes every image to S x S: only the batch size changes

    def compare(self, ref: Tensor, got: Tensor, tol: Tolerances) -> Verdict:
        diff = (got.float() - ref.float()).abs()
        allowed = tol.atol + tol.rtol * ref.float().abs()
        # a zero tolerance means exact: any difference is infinitely over it
        ratio = torch.where(allowed > 0, diff / allowed.clamp(min=torch.finfo(allowed.dtype).tiny),
                            torch.where(diff > 0, math.inf, 0.0))
        excess = float(ratio.max()) if ratio.numel() else 0.0
        worst = float(diff.max()) if diff.numel() else 0.0
        return Verdict(excess, f"max |logit difference| {worst:.3g} (allowed: atol {tol.atol:g} + rtol {tol.rtol:g} x |logit|)",
                       {"max_abs_logit_diff": worst, "n_samples": 1})

    def describe(self, task: BaseTask, datamodule: Any) -> dict[str, Any]:
        size = int(datamodule.img_size)
        return {
            "input": {"name": self.input_name, "shape": ["batch", 3, size, size], "layout": "NCHW", "dtype": "float32",
                      "channels": "RGB", "normalisation": _normalisation(task)},
            "preprocess": ["read as RGB uint8", f"resize to {size}x{size} (bilinear)", "normalise: (pixel / 255 - mean) / std",
                           "HWC -> CHW, stack into a batch"],
            "outputs": {"logits": "(batch, num_classes) class scores before softmax, in class_names order"},
            "postprocess": ["softmax over classes", "label = argmax, score = its probability"],
        }


class SegmentationExport(TaskExport):
    """Segmentation model: normalised (N, 3, H, W) -> logits (N, K, H, W)."""

    kind = "semantic_segmentation"
    output_names = ("logits",)
    input_dims = {0: "batch", 2: "height", 3: "width"}
    output_dims = {"logits": {0: "batch", 2: "height", 3: "width"}}
    own_size = True

    def inputs(self, batch: Any) -> Tensor:
        return batch["image"]

    def ids(self, batch: Any) -> list[Any]:
        return list(batch.get("id") or [None] * len(batch["image"]))

    def compare(self, ref: Tensor, got: Tensor, tol: Tolerances) -> Verdict:
        agreement = float((got.argmax(0) == ref.argmax(0)).float().mean())
        worst = float((got.float() - ref.float()).abs().max())
        return Verdict(_over(1.0 - agreement, 1.0 - tol.pixel_agreement),
                       f"{agreement:.4%} of pixels with the same class (at least {tol.pixel_agreement:.2%} needed), "
                       f"max |logit difference| {worst:.3g}",
                       {"min_pixel_agreement": agreement, "max_abs_logit_diff": worst, "n_samples": 1})

    def describe(self, task: BaseTask, datamodule: Any) -> dict[str, Any]:
        min_side = task.min_input_size  # type: ignore[attr-defined]
        return {
            "input": {"name": self.input_name, "shape": ["batch", 3, "height", "width"], "layout": "NCHW", "dtype": "float32",
                      "channels": "RGB", "normalisation": _normalisation(task), "trained_at": [datamodule.img_size] * 2,
                      "min_size": min_side},
            "preprocess": ["read as RGB uint8, at its own size", "normalise: (pixel / 255 - mean) / std", "HWC -> CHW",
                           f"a side under {min_side} px: pad bottom/right to {min_side} by replicating the border"],
            "outputs": {"logits": "(batch, num_classes, height, width) class scores per pixel, in class_names order"},
            "postprocess": ["label per pixel = argmax over classes (crop off any padding)"],
        }

    def python_steps(self, task: BaseTask) -> list[str]:
        return ["dense CRF refinement of the logits (cvtasks.crf.DenseCRF)"] if getattr(task, "crf", None) is not None else []


class _OneImageDetector(nn.Module):
    """A detector called on one image, its detections as a tuple (what a traced file can return)."""

    def __init__(self, detector: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.detector = detector
        self.names = tuple(names)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        found = self.detector([image])[0]
        return tuple(found[name] for name in self.names)


class _OneImageProposalDetector(_OneImageDetector):
    """A detector that classifies given region proposals, called on one image and its (P, 4) xyxy proposals."""

    def forward(self, image: Tensor, proposals: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        found = self.detector([image], proposals=[proposals])[0]
        return tuple(found[name] for name in self.names)


@dataclass
class ImagesWithProposals:
    """A detection batch for R-CNN and Fast R-CNN: the images and each one's region proposals (P, 4) xyxy."""

    images: list[Tensor]
    proposals: list[Tensor]

    def __len__(self) -> int:
        return len(self.images)


class DetectionExport(TaskExport):
    """The whole detector, one image in [0, 1] (3, H, W) -> boxes, labels, scores (, masks)."""

    kind = "detection"
    output_names = ("boxes", "labels", "scores")
    input_dims = {1: "height", 2: "width"}
    output_dims = {"boxes": {0: "detections"}, "labels": {0: "detections"}, "scores": {0: "detections"}}
    own_size = True
    # torch.export cannot trace torchvision's detectors (top-k and NMS have data-dependent sizes) and can
    # take a minute to find out (FCOS: 44 s for a 64 px model), so the exporter that takes them comes first
    exporter_rank = {"onnx-dynamo": 1}
    exporter_notes = {"onnx": "the TorchScript-based exporter is tried first: torch.export cannot trace torchvision's "
                              "detectors (data-dependent sizes in top-k and NMS); --exporter onnx-dynamo tries it"}
    # measured on a 5-step SSD and RetinaNet: eager PyTorch with torchvision's traced NMS gave the file's detections exactly
    failure_hint = ("detections without a partner among near-equal overlaps often come from torchvision's batched_nms, "
                    "which eager PyTorch runs class by class above 1000 candidates and a traced file as one NMS over "
                    "class-offset boxes: the two can keep different boxes (a barely trained model, a low score threshold)")

    def __init__(self, score_cut: float | None = None) -> None:
        #: the detector's score threshold: a detection scored at it may fall either side in the file
        self.score_cut = score_cut

    def network(self, task: BaseTask) -> nn.Module:
        return _OneImageDetector(task.model, self.output_names)

    def inputs(self, batch: Any) -> list[Tensor]:
        return list(batch[0])

    def ids(self, batch: Any) -> list[Any]:
        return [t.get("image_id") for t in batch[1]]

    def network_args(self, inputs: list[Tensor]) -> tuple[Tensor, ...]:
        return (inputs[0],)

    def other_shape(self, inputs: list[Tensor], size: tuple[int, int] | None) -> list[Tensor]:
        x = inputs[0]
        return [x if size is None else F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]]

    def call(self, run: Callable[..., tuple[Tensor, ...]], inputs: list[Tensor]) -> list[dict[str, Tensor]]:
        return [dict(zip(self.output_names, run(image))) for image in inputs]

    def sizes(self, inputs: list[Tensor]) -> list[tuple[int, int]]:
        return [tuple(x.shape[-2:]) for x in inputs]

    def compare(self, ref: dict[str, Tensor], got: dict[str, Tensor], tol: Tolerances) -> Verdict:
        return match_detections(ref, got, tol, self.score_cut)

    def describe(self, task: BaseTask, datamodule: Any) -> dict[str, Any]:
        outputs = {
            "boxes": "(detections, 4) float32 x1, y1, x2, y2 in the input image's pixels",
            "labels": "(detections,) int64 0-based index into class_names",
            "scores": "(detections,) float32 confidence, highest first",
        }
        if "masks" in self.output_names:
            outputs["masks"] = "(detections, 1, height, width) float32 mask probability per pixel; binarise at 0.5"
        model = task.model
        return {
            "input": {"name": self.input_name, "shape": [3, "height", "width"], "layout": "CHW (one image per call)",
                      "dtype": "float32", "channels": "RGB", "range": "[0, 1] (pixel / 255); not normalised: the model does it",
                      "normalisation_inside": _normalisation(task), "trained_at": [datamodule.img_size] * 2,
                      "resized_inside_to": {"min_size": task.hparams.get("min_size"), "max_size": task.hparams.get("max_size")}},
            "preprocess": ["read as RGB uint8, at its own size", "pixel / 255", "HWC -> CHW"],
            "batching": ("one image per call, as PyTorch with batch size 1 (a PyTorch batch of images of different "
                         "sizes is padded to the largest, which moves detections near the padding a little)"),
            "outputs": outputs,
            "postprocess": [f"keep detections scoring at least score_threshold ({task.draw_score_threshold}) for display "
                            "(all are returned)"],
            "score_threshold": task.draw_score_threshold,
            "detector": getattr(model, "name", type(model).__name__),
        }


class InstanceSegmentationExport(DetectionExport):
    """Mask R-CNN: as detection, plus each detection's mask probabilities (N, 1, H, W)."""

    kind = "instance_segmentation"
    output_names = ("boxes", "labels", "scores", "masks")
    output_dims = {**DetectionExport.output_dims, "masks": {0: "detections", 2: "height", 3: "width"}}


class ProposalDetectionExport(DetectionExport):
    """R-CNN and Fast R-CNN: one image and its region proposals (P, 4) xyxy in -> boxes, labels, scores.

    Selective search is not in the file: it runs in Python before it (as the data module runs it for
    PyTorch), and its proposals are the file's second input.
    """

    input_names = ("image", "proposals")
    takes_proposals = True

    def network(self, task: BaseTask) -> nn.Module:
        return _OneImageProposalDetector(task.model, self.output_names)

    def inputs(self, batch: Any) -> ImagesWithProposals:
        images, targets = batch[0], batch[1]
        return ImagesWithProposals(list(images), [torch.as_tensor(t["proposals"], dtype=torch.float32).reshape(-1, 4)
                                                  for t in targets])

    def reference(self, model: nn.Module, inputs: ImagesWithProposals) -> Any:
        return model(inputs.images, proposals=inputs.proposals)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {**super().dynamic_axes(), "proposals": {0: "proposals"}}

    def network_args(self, inputs: ImagesWithProposals) -> tuple[Tensor, ...]:
        return (inputs.images[0], inputs.proposals[0])

    def other_shape(self, inputs: ImagesWithProposals, size: tuple[int, int] | None) -> ImagesWithProposals:
        x, p = inputs.images[0], inputs.proposals[0]
        if size is None:
            return ImagesWithProposals([x], [p])
        (h, w), (nh, nw) = x.shape[-2:], size
        scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=p.dtype)
        return ImagesWithProposals([F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]], [p * scale])

    def call(self, run: Callable[..., tuple[Tensor, ...]], inputs: ImagesWithProposals) -> list[dict[str, Tensor]]:
        return [dict(zip(self.output_names, run(x, p))) for x, p in zip(inputs.images, inputs.proposals)]

    def sizes(self, inputs: ImagesWithProposals) -> list[tuple[int, int]]:
        return [tuple(x.shape[-2:]) for x in inputs.images]

    def describe(self, task: BaseTask, datamodule: Any) -> dict[str, Any]:
        described = super().describe(task, datamodule)
        described["inputs"] = {"proposals": {
            "shape": ["proposals", 4], "dtype": "float32",
            "boxes": "x1, y1, x2, y2 in the input image's pixels, best ranked first",
            "from": "selective search (cvtasks.detection.proposals.selective_search, the settings of the run's data)",
            "used": f"the first {getattr(task.model.model, 'max_proposals', '?')}"}}
        return described

    def python_steps(self, task: BaseTask) -> list[str]:
        return ["region proposals by selective search on the image (cvtasks.detection.proposals), given as 'proposals'"]


def score_threshold(model: nn.Module) -> float | None:
    """The score below which ``model`` (a detector, or its torchvision model or RoI heads) drops detections."""
    inner = getattr(model, "model", model)
    for part in (inner, getattr(inner, "roi_heads", None)):
        cut = getattr(part, "score_thresh", None)
        if isinstance(cut, (int, float)) and not isinstance(cut, bool):
            return float(cut)
    return None


def task_export(task: BaseTask) -> TaskExport:
    """The export recipe for ``task``'s kind, found by its type (a subclass takes its parent's)."""
    from .tasks.classification import ClassificationTask
    from .tasks.detection import DetectionTask, InstanceSegmentationTask
    from .tasks.segmentation import SemanticSegmentationTask

    cut = score_threshold(task.model)
    recipes: list[tuple[type, TaskExport]] = [
        (InstanceSegmentationTask, InstanceSegmentationExport(cut)),  # before its parent, DetectionTask
        (DetectionTask, DetectionExport(cut)),
        (SemanticSegmentationTask, SegmentationExport()),
        (ClassificationTask, ClassificationExport()),
    ]
    for cls, recipe in recipes:
        if isinstance(task, cls):
            if isinstance(recipe, DetectionExport) and getattr(task.model, "proposals", False):
                return ProposalDetectionExport(cut)
            return recipe
    raise ValueError(f"no export recipe for {type(task).__name__}; cvtasks exports "
                     f"{', '.join(c.__name__ for c, _ in recipes)} (add one in cvtasks/export.py)")


# -- detections, matched one to one -------------------------------------------------------------

def _mask_iou(ref: Tensor, got: Tensor, undecided: float) -> float:
    """IoU of two masks binarised at 0.5, over the pixels whose PyTorch probability is not within ``undecided`` of 0.5.

    A pixel PyTorch itself puts at 0.4999996 (a barely trained mask head has many) goes to either side
    by float noise: it says nothing about the export, and in a 15-pixel mask one such pixel is 6% IoU.
    """
    decided = (ref - 0.5).abs() > undecided
    a, b = (ref > 0.5) & decided, (got > 0.5) & decided
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _pairwise_iou(a: Tensor, b: Tensor, same_px: float = 1e-2) -> Tensor:
    """Box IoU, where boxes without area (clipped flat at the image's edge) count as one when they coincide."""
    if not (len(a) and len(b)):
        return torch.zeros(len(a), len(b))
    iou = box_iou(a, b)  # 0 / 0 for two flat boxes
    coincide = (a[:, None] - b[None]).abs().amax(-1) <= same_px
    return torch.where(torch.isnan(iou), coincide.float(), iou)


def match_detections(ref: dict[str, Tensor], got: dict[str, Tensor], tol: Tolerances,
                     score_cut: float | None = None) -> Verdict:
    """Pair each PyTorch detection with the exported one of the same label it overlaps most, best scores first.

    Pairs must overlap with IoU >= ``box_iou`` and score within ``score_atol`` (masks: IoU >=
    ``mask_iou``). Detections left without a partner pass only as swaps at the bottom of both
    lists (a top-k or threshold cut between two nearly equal scores): as many on each side, each
    within ``score_atol`` of its counterpart and of its own list's lowest score; or, given the
    detector's score threshold ``score_cut``, as detections scored within ``score_atol`` of it,
    which float noise puts on either side of the cut.
    """
    rb, gb = ref["boxes"].float().reshape(-1, 4), got["boxes"].float().reshape(-1, 4)
    rl, gl = ref["labels"].reshape(-1), got["labels"].reshape(-1).to(ref["labels"].dtype)
    rs, gs = ref["scores"].float().reshape(-1), got["scores"].float().reshape(-1)
    iou = _pairwise_iou(rb, gb)
    iou = torch.where(rl[:, None] == gl[None], iou, torch.full_like(iou, -1.0))
    # the same object (IoU > 0.5, however badly placed) is a candidate; among candidates the closest in
    # place and score, so that duplicates of one box with different scores pair with their own
    affinity = torch.where(iou > 0.5, iou - (rs[:, None] - gs[None]).abs(), torch.full_like(iou, -math.inf))
    free = torch.ones(len(gb), dtype=torch.bool)
    pairs: list[tuple[int, int]] = []
    for i in rs.argsort(descending=True).tolist():
        row = torch.where(free, affinity[i], torch.full_like(affinity[i], -math.inf))
        if not bool(torch.isfinite(row).any()):
            continue
        j = int(row.argmax())
        pairs.append((i, j))
        free[j] = False
    min_iou = min((float(iou[i, j]) for i, j in pairs), default=1.0)
    max_score = max((abs(float(rs[i] - gs[j])) for i, j in pairs), default=0.0)
    stats: dict[str, float] = {"n_detections": float(len(rb)), "min_box_iou": min_iou, "max_score_diff": max_score}
    excess = max(_over(1.0 - min_iou, 1.0 - tol.box_iou), _over(max_score, tol.score_atol))
    detail = f"{len(rb)} detections in PyTorch, {len(gb)} exported; lowest box IoU {min_iou:.4f}, max |score difference| {max_score:.2g}"
    if "masks" in ref and pairs:
        min_mask = min(_mask_iou(ref["masks"][i], got["masks"][j], tol.mask_undecided) for i, j in pairs)
        prob = max(float((ref["masks"][i] - got["masks"][j]).abs().max()) for i, j in pairs)
        stats.update(min_mask_iou=min_mask, max_mask_prob_diff=prob)
        excess = max(excess, _over(1.0 - min_mask, 1.0 - tol.mask_iou))
        detail += f", lowest mask IoU {min_mask:.4f} (max |mask probability difference| {prob:.2g})"
    lone_r = sorted((float(rs[i]) for i in set(range(len(rb))) - {i for i, _ in pairs}), reverse=True)
    lone_g = sorted((float(gs[j]) for j in free.nonzero().reshape(-1).tolist()), reverse=True)
    if lone_r or lone_g:
        at_bottom = (len(lone_r) == len(lone_g)
                     and all(abs(a - b) <= tol.score_atol for a, b in zip(lone_r, lone_g))
                     and all(a <= float(rs.min()) + tol.score_atol for a in lone_r)
                     and all(b <= float(gs.min()) + tol.score_atol for b in lone_g))
        at_cut = score_cut is not None and all(abs(x - score_cut) <= tol.score_atol for x in lone_r + lone_g)
        if at_bottom:
            detail += f"; {len(lone_r)} swapped at the bottom of the list"
        elif at_cut:
            detail += f"; {len(lone_r) + len(lone_g)} on either side of the score threshold {score_cut:g}"
        else:
            excess = math.inf
            side, scores = ("PyTorch", lone_r) if lone_r else ("the export", lone_g)
            detail += f"; {len(lone_r) + len(lone_g)} without a partner (best: score {scores[0]:.3f} in {side})"
    return Verdict(excess, detail, stats)


# -- loading an exported file --------------------------------------------------------------------

def load_exported(path: Path, fmt: str) -> Callable[..., tuple[Tensor, ...]]:
    """A function running the exported file: tensors in, a tuple of tensors out (onnxruntime for ONNX)."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failed run raises with the message; the C++ log would print it again
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run_onnx(*args: Tensor) -> tuple[Tensor, ...]:
            feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
            return tuple(torch.from_numpy(o) for o in session.run(None, feed))

        return run_onnx
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: the format is what was asked for
            module: Any = torch.jit.load(str(path), map_location="cpu")
    elif fmt == "exported_program":
        module = torch.export.load(str(path)).module()
    else:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")

    def run_torch(*args: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            out = module(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run_torch


class ExportedModel(nn.Module):
    """An exported file standing in for a task's ``model``: called as the task calls it, answering with the file.

    ``fixed_size`` (H, W): the file takes only that size; other images are refused, naming the fix.
    """

    def __init__(self, recipe: TaskExport, run: Callable[..., tuple[Tensor, ...]], source: str,
                 fixed_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.run = run
        self.source = source
        self.fixed_size = fixed_size

    @property
    def proposals(self) -> bool:
        """The task must pass the data's region proposals (the detector module's flag of the same name)."""
        return self.recipe.takes_proposals

    @property
    def name(self) -> str:
        """What the task's messages call the model."""
        return self.source

    def forward(self, inputs: Any, targets: Any = None, proposals: Any = None) -> Any:
        """The file's outputs for ``inputs``, shaped as the PyTorch model's (eval mode only)."""
        if targets is not None:
            raise ValueError(f"{self.source} is an exported model for inference; it cannot train")
        if proposals is not None:  # called by the task, as it calls a detector of proposals
            inputs = ImagesWithProposals(list(inputs), [torch.as_tensor(p, dtype=torch.float32).reshape(-1, 4)
                                                        for p in proposals])
        if self.fixed_size is not None:
            other = [s for s in self.recipe.sizes(inputs) if tuple(s) != tuple(self.fixed_size)]
            if other:
                h, w = self.fixed_size
                raise ValueError(
                    f"{self.source} takes only {h}x{w} images (its exporter fixed the size; model.json says why), "
                    f"got {other[0][0]}x{other[0][1]}; resize the images to {h}x{w} or predict with --backend pytorch")
        with torch.no_grad():
            return self.recipe.call(self.run, inputs)


# -- exporters -----------------------------------------------------------------------------------

class ExportError(RuntimeError):
    """No exporter of the format wrote a file that reproduces PyTorch (the message holds each one's reason)."""


@dataclass(frozen=True)
class Exporter:
    """One way to write a format: its key (``--exporter``), its name in reports, the format of its file, and how."""

    key: str
    name: str
    writes: str
    save: Callable[[nn.Module, tuple[Tensor, ...], Path, TaskExport], None]


def _exported_program(net: nn.Module, args: tuple[Tensor, ...], recipe: TaskExport) -> torch.export.ExportedProgram:
    axes = recipe.dynamic_axes()
    dims = tuple({d: torch.export.Dim.AUTO for d in axes.get(name, {})} for name in recipe.input_names)
    return torch.export.export(net, args, dynamic_shapes=dims, strict=False)


def _onnx_dynamo(net: nn.Module, args: tuple[Tensor, ...], path: Path, recipe: TaskExport) -> None:
    # torch.export first, then the ExportedProgram to ONNX: given the module, torch.onnx retries other
    # tracing modes for minutes (a torchvision detector: 106 s) before failing as torch.export did in 1.4 s
    program = _exported_program(net, args, recipe)
    torch.onnx.export(program, args, str(path), dynamo=True, external_data=False, input_names=list(recipe.input_names),
                      output_names=list(recipe.output_names))


def _onnx_torchscript(net: nn.Module, args: tuple[Tensor, ...], path: Path, recipe: TaskExport) -> None:
    torch.onnx.export(net, args, str(path), dynamo=False, opset_version=ONNX_OPSET, input_names=list(recipe.input_names),
                      output_names=list(recipe.output_names), dynamic_axes=recipe.dynamic_axes())


def _jit_trace(net: nn.Module, args: tuple[Tensor, ...], path: Path, recipe: TaskExport) -> None:
    torch.jit.trace(net, args, check_trace=False).save(str(path))


def _torch_export(net: nn.Module, args: tuple[Tensor, ...], path: Path, recipe: TaskExport) -> None:
    torch.export.save(_exported_program(net, args, recipe), str(path))


_JIT = Exporter("jit-trace", "torch.jit.trace", "torchscript", _jit_trace)

#: format -> its exporters, in the order they are tried
EXPORTERS: dict[str, tuple[Exporter, ...]] = {
    "onnx": (Exporter("onnx-dynamo", "torch.export.export + torch.onnx.export(dynamo=True)", "onnx", _onnx_dynamo),
             Exporter("onnx-torchscript", f"torch.onnx.export(dynamo=False, opset {ONNX_OPSET}), TorchScript-based", "onnx",
                      _onnx_torchscript)),
    "torchscript": (_JIT,),
    "exported_program": (Exporter("torch-export", "torch.export.export", "exported_program", _torch_export), _JIT),
}


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporters' progress lines, tracer warnings and failed graphs kept off the command's output."""
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        # torch.export prints the partial graph of a model it cannot take to stderr: the reason is reported instead
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)


def _first_line(exc: BaseException) -> str:
    """The root cause of ``exc`` in one line: the exporters wrap the error that says what went wrong."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line if len(line) <= 200 else line[:200] + '...'}"


def _worst(pairs: Sequence[tuple[Any, Any]], recipe: TaskExport, tol: Tolerances) -> Verdict:
    return max((recipe.compare(r, g, tol) for r, g in pairs), key=lambda v: v.excess)


@dataclass
class ExportResult:
    """What ``export_model`` wrote: the file, its format, the exporter, the fallbacks and the size it takes."""

    path: Path
    format: str
    exporter: str
    fallbacks: list[dict[str, str]]
    fixed_size: tuple[int, int] | None
    seconds: float
    fixed_reason: str | None = None  # why the file takes only fixed_size


@dataclass(frozen=True)
class _Check:
    """An input the file must answer as PyTorch does; ``size`` marks the check of another image size."""

    what: str
    inputs: Any
    size: bool = False


def _verify(model: ExportedModel, checks: Sequence[_Check], wanted: Sequence[list[Any]], recipe: TaskExport,
            tol: Tolerances) -> tuple[str | None, _Check | None]:
    """The first check the file fails (why, and which), or (None, None)."""
    for check, ref in zip(checks, wanted):
        try:
            verdict = _worst(list(zip(ref, recipe.per_sample(model(check.inputs)))), recipe, tol)
            if not verdict.ok:
                return f"differs from PyTorch on {check.what}: {verdict.detail}", check
        except Exception as exc:  # noqa: BLE001  (a file that cannot run an input failed that check)
            return f"fails on {check.what}: {_first_line(exc)}", check
    return None, None


def exporters(recipe: TaskExport, fmt: str, only: str | None = None) -> tuple[Exporter, ...]:
    """The exporters tried for ``fmt``, in the recipe's order, or only the one keyed ``only``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    order = tuple(sorted(EXPORTERS[fmt], key=lambda e: recipe.exporter_rank.get(e.key, 0)))
    if only is None:
        return order
    picked = tuple(e for e in order if e.key == only)
    if not picked:
        raise ValueError(f"no exporter {only!r} for {fmt}; choose one of {', '.join(e.key for e in order)}")
    return picked


def export_model(task: BaseTask, example: Any, fmt: str, out_dir: Path, tol: Tolerances = Tolerances(),
                 only: str | None = None) -> ExportResult:
    """Write ``task``'s model as ``fmt`` under ``out_dir`` with the first exporter whose file reproduces PyTorch.

    ``example``: the model's inputs for one validation batch (at least two samples where batched).
    Each exporter's file is loaded back and compared on ``example``, on one sample, and (tasks that
    predict at the image's own size) on one sample at another size; see the module docstring.
    ``only``: the key of the one exporter to try (``EXPORTERS``), instead of all in the recipe's order.
    """
    recipe = task_export(task)
    tried = exporters(recipe, fmt, only)
    net = recipe.network(task).eval()
    if isinstance(example, Tensor) and example.shape[0] < 2:  # a batch of one would fix the batch size at 1
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    h, w = recipe.sizes(example)[0]
    checks = [_Check("a validation batch", example), _Check("one sample", recipe.other_shape(example, None))]
    if recipe.own_size:
        checks.append(_Check(f"a {h + 32}x{w + 64} image", recipe.other_shape(example, (h + 32, w + 64)), size=True))
    with torch.no_grad():
        wanted = [recipe.per_sample(recipe.reference(task.model, c.inputs)) for c in checks]
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fallbacks: list[dict[str, str]] = []
    fixed: ExportResult | None = None  # the first file right at the training size only, kept in case none does better
    for exporter in tried:
        final = out_dir / f"model{FORMATS[exporter.writes]}"
        tmp = final.with_name(f".candidate-{final.name}")
        try:
            with _quiet(), torch.no_grad():
                exporter.save(net, recipe.network_args(example), tmp, recipe)
            failed, check = _verify(ExportedModel(recipe, load_exported(tmp, exporter.writes), str(tmp)),
                                    checks, wanted, recipe, tol)
        except Exception as exc:  # noqa: BLE001  (any exporter error means: try the next one, and say why)
            failed, check = _first_line(exc), None
        if failed is None:
            os.replace(tmp, final)
            if fixed is not None:
                fixed.path.with_name(f".fixed-{fixed.path.name}").unlink(missing_ok=True)
            return ExportResult(final, exporter.writes, exporter.name, fallbacks, None, time.perf_counter() - start)
        reason = failed if check is None else f"its file {failed}"
        if check is not None and check.size and fixed is None:
            os.replace(tmp, tmp.with_name(f".fixed-{final.name}"))
            fixed = ExportResult(final, exporter.writes, exporter.name, list(fallbacks), (h, w), 0.0, reason)
        else:
            fallbacks.append({"exporter": exporter.name, "reason": reason})
        tmp.unlink(missing_ok=True)
    if fixed is None:
        reasons = "; ".join(f"{f['exporter']}: {f['reason']}" for f in fallbacks)
        raise ExportError(f"no exporter could write {type(task).__name__} as {fmt} ({reasons})")
    os.replace(fixed.path.with_name(f".fixed-{fixed.path.name}"), fixed.path)
    # the exporters tried after the kept one did no better
    fixed.fallbacks = fixed.fallbacks + fallbacks[len(fixed.fallbacks):]
    fixed.seconds = time.perf_counter() - start
    return fixed


# -- the parity check and the metrics ------------------------------------------------------------

@dataclass
class Parity:
    """The parity check over a split: how many samples, the worst one, and the figures over all of them."""

    samples: int
    worst: Verdict | None
    worst_sample: str
    stats: dict[str, float]

    @property
    def ok(self) -> bool:
        """Every sample within every tolerance."""
        return self.worst is None or self.worst.ok


def _merge(stats: dict[str, float], more: dict[str, float]) -> None:
    """Aggregate a sample's figures into the split's: min_* by min, max_* by max, n_* by sum."""
    for key, value in more.items():
        if key not in stats:
            stats[key] = value
        elif key.startswith("min_"):
            stats[key] = min(stats[key], value)
        elif key.startswith("max_"):
            stats[key] = max(stats[key], value)
        else:
            stats[key] += value


def check_parity(task: BaseTask, exported: ExportedModel, loader: DataLoader, tol: Tolerances = Tolerances(),
                 indices: Sequence[int] | None = None) -> Parity:
    """Compare ``exported`` with the task's PyTorch model on every sample of ``loader``; names the worst one.

    ``indices``: the data module's item index of each sample of the loader, for the name of the worst.
    """
    recipe = exported.recipe
    worst: Verdict | None = None
    worst_name, stats, position = "", {}, 0
    with torch.no_grad():
        for batch in loader:
            inputs = recipe.inputs(batch)
            refs, gots = recipe.per_sample(recipe.reference(task.model, inputs)), recipe.per_sample(exported(inputs))
            for ref, got, sample_id in zip(refs, gots, recipe.ids(batch)):
                verdict = recipe.compare(ref, got, tol)
                _merge(stats, verdict.stats)
                if worst is None or verdict.excess > worst.excess:
                    worst = verdict
                    item = f", data item {indices[position]}" if indices is not None and position < len(indices) else ""
                    own = f", id {sample_id}" if sample_id is not None else ""
                    worst_name = f"validation sample {position}{item}{own}"
                position += 1
    return Parity(position, worst, worst_name, stats)


def validation_metrics(task: BaseTask, loader: DataLoader) -> dict[str, float]:
    """The task's own validation figures on ``loader`` (one CPU process, no logger, nothing written)."""
    from lightning import Trainer

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # no "GPU available" lines around the command's own table
    try:
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's notes on worker counts and batch sizes
            results = trainer.validate(task, dataloaders=loader, verbose=False)
    finally:
        lightning_log.setLevel(level)
    return {k: float(v) for res in results for k, v in res.items()}


@contextlib.contextmanager
def standing_in(task: BaseTask, model: nn.Module) -> Any:
    """``task`` with ``model`` in place of its own for the duration (the task's steps then run the export)."""
    own = task.model
    task.model = model
    try:
        yield task
    finally:
        task.model = own


# -- the run's data, the sidecar ------------------------------------------------------------------

def build_datamodule(run: RunFolder, task: BaseTask, **overrides: Any) -> Any:
    """The run's data module as its config builds it, normalising as the task's backbone expects (the CLI's link)."""
    from lightning.pytorch.cli import instantiate_class

    data = run.config().get("data") or {}
    if not data.get("class_path"):
        raise ValueError(f"{run.config_path} has no data.class_path; it was not written by cvtasks' fit")
    mean, std = task.normalization
    init = {**(data.get("init_args") or {}), **overrides, "mean": list(mean), "std": list(std)}
    return instantiate_class((), {"class_path": data["class_path"], "init_args": init})


def validation_loader(datamodule: Any, limit: int | None = None) -> tuple[DataLoader, list[int] | None]:
    """The data module's validation loader (its first ``limit`` samples) and their item indices in the data."""
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    indices = list(getattr(datamodule, "val_indices", []) or []) or None
    if limit is not None and limit < len(loader.dataset):
        loader = DataLoader(Subset(loader.dataset, range(limit)), batch_size=loader.batch_size,
                            collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                            worker_init_fn=loader.worker_init_fn)
        indices = indices[:limit] if indices else None
    if len(loader.dataset) == 0:
        raise ValueError("the run's validation split is empty; nothing to check the export on (give --data.split a val share)")
    return loader, indices


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (which checkpoint an export was made from)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def update_json(path: Path, common: dict[str, Any], fmt: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Write ``common`` and ``entry`` under ``formats.<fmt>`` into ``path``, keeping the other formats' entries."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    formats = {**(old.get("formats") or {}), fmt: entry}
    doc = {**common, "formats": dict(sorted(formats.items()))}
    path.write_text(json.dumps(doc, indent=2, default=_jsonable))
    return doc


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_sidecar(run: RunFolder, fmt: str, checked: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """model.json and its entry for ``fmt`` (with ``checked``, one that passed its parity check); errors name the fix."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fix = f"export it with make export RUN={run.name} FORMAT={fmt}"
    doc = json.loads(run.require(run.export_dir / SIDECAR, fix).read_text())
    entry = (doc.get("formats") or {}).get(fmt)
    if entry is None:
        raise FileNotFoundError(f"run {run.name!r} has no {fmt} export (model.json lists {', '.join(doc.get('formats') or []) or 'none'}); {fix}")
    if checked and not entry.get("parity_passed"):
        raise ValueError(f"the {fmt} export of run {run.name!r} failed its parity check ({run.export_dir / REPORT}); "
                         f"it is not used for predictions: {fix} again")
    run.require(run.export_dir / entry["file"], fix)
    return doc, entry


def exported_model(run: RunFolder, task: BaseTask, fmt: str) -> ExportedModel:
    """The run's checked ``fmt`` export, ready to stand in for ``task.model``."""
    doc, entry = read_sidecar(run, fmt)
    path = run.export_dir / entry["file"]
    if run.best_checkpoint.is_file() and entry.get("checkpoint_sha256") not in (None, file_sha256(run.best_checkpoint)):
        warnings.warn(f"{path} was exported from an earlier best.ckpt of run {run.name!r}; "
                      f"export it again with make export RUN={run.name} FORMAT={fmt}", stacklevel=2)
    fixed = entry.get("fixed_size")
    return ExportedModel(task_export(task), load_exported(path, entry["format"]), str(path),
                         tuple(fixed) if fixed else None)
