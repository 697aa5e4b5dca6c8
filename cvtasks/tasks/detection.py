"""Object detection and instance segmentation: torchvision's detectors (and our YOLO) on registry backbones.

Batches are ``(images, targets)``: images a list of float CxHxW tensors in [0, 1] (unnormalised:
the detectors normalise inside), targets a list of dicts with ``boxes`` (xyxy, absolute pixels),
``labels`` (0-based), ``image_id`` and, for instance segmentation, ``masks`` (uint8 NxHxW);
``iscrowd``/``area`` when the data has them (COCO's evaluation uses both), and ``proposals`` (one
(P, 4) xyxy tensor per image) for the detectors that classify region proposals (R-CNN, Fast R-CNN):
the task hands them to the model in training, evaluation and predict alike.

Both tasks log ``train/loss`` (and each detector loss), and at the end of each validation/test
epoch COCO's box figures from torchmetrics' MeanAveragePrecision (faster_coco_eval backend):
``map``, ``map_50``, ``map_75``, ``map_small/medium/large``, ``mar_1/10/100``,
``mar_small/medium/large`` and ``ap_<class>``. Instance segmentation adds the same figures for
masks with a ``segm_`` prefix (``segm_map``, ``segm_map_50``, ..., ``segm_ap_<class>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..detection.models import DETECTORS, build_detector, detector_names
from ..metrics import UnevenMeanAveragePrecision
from ..presets import task_preset
from ..weights import weights_from_checkpoint
from ..visualize import draw_instance_masks, to_uint8
from ..writers import DetectionWriter
from .base import BaseTask

__all__ = ["DetectionTask", "InstanceSegmentationTask"]

_SUMMARY_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
                 "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")

Batch = tuple[Sequence[Tensor], Sequence[dict[str, Any]]]


class DetectionTask(BaseTask):
    """Detect objects with ``build_detector(detector, backbone, num_classes)`` behind a feature pyramid.

    ``detector``: a name from the detector table (``cvtasks.detection.DETECTORS``, ``make help``
    lists them); this task takes those without masks. ``roi``: align (RoIAlign), pool (RoIPool)
    or spp (SPP-net's pyramid, not for masks) for the two-stage detectors; None leaves the detector's own (RoIPool for Fast R-CNN, else RoIAlign). ``min_size``/``max_size``: the detector's resize bounds (set to the
    data's image size so nothing is resized; the CLI does so where the config leaves them null).
    ``neck_channels``: width of the feature pyramid (None: 128, or what a pretrained preset needs).
    ``detector_kwargs``: the detector's own keywords (``detector_keywords(detector)`` lists them:
    its neck's, its builder's, its torchvision class's); any other is a ValueError naming those.
    ``pretrained``: ``coco`` loads torchvision's COCO detector of the same kind into the whole model
    (``cvtasks.presets``: it fills the settings the weights need, and names any given otherwise);
    anything else (``imagenet``, a URL, a file) goes to the backbone.
    ``draw_score_threshold``: the lowest score drawn on logged and predicted images.
    """

    monitor = "val/map"
    monitor_mode = "max"
    #: detectors this task accepts (read from the table), and the IoU types it evaluates
    detectors: tuple[str, ...] = detector_names(masks=False)
    iou_types: tuple[str, ...] = ("bbox",)

    def __init__(
        self,
        *,
        detector: str = "faster_rcnn",
        roi: str | None = None,
        min_size: int | None = 128,
        max_size: int | None = None,
        neck_channels: int | None = None,
        detector_kwargs: dict[str, Any] | None = None,
        draw_score_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if detector not in self.detectors:
            other = ""
            if detector in DETECTORS:
                other = " (instance masks need InstanceSegmentationTask)" if DETECTORS[detector].masks else " (boxes only: DetectionTask)"
            raise ValueError(
                f"{type(self).__name__} does not take detector {detector!r}{other}; choose one of {list(self.detectors)}"
            )
        if min_size is None:  # the CLI fills it from data.img_size; built by hand it must be given
            raise ValueError(f"{type(self).__name__} needs min_size: the data's image size in pixels")
        self.draw_score_threshold = draw_score_threshold
        self.with_masks = "segm" in self.iou_types
        preset = task_preset(self.pretrained, detector)
        if preset is not None:
            preset.check_backbone(self.backbone_name)
            own = {"neck_channels": neck_channels, "roi": roi, "min_size": min_size}
            settings = preset.configure({**own, **(detector_kwargs or {})}, own=list(own),
                                        kwargs_flag="--model.detector_kwargs")
            neck_channels, roi, min_size = (settings.pop(k, None) for k in own)
            detector_kwargs = settings
            # what was built, for a reload from a checkpoint (with pretrained=None: nothing fetched again)
            self.hparams.update(neck_channels=neck_channels, detector_kwargs=detector_kwargs)
            # read before the build, so that a missing or corrupt file fails first; not at all where a
            # checkpoint supplies the weights (evaluate, predict, resume)
            reference = None if weights_from_checkpoint() else preset.weights.state_dict()
        self.model = build_detector(
            detector, self.backbone_name, self.num_classes, roi=roi, min_size=min_size, max_size=max_size,
            backbone_kwargs=self.backbone_kwargs, pretrained=None if preset else self.pretrained,
            neck_channels=128 if neck_channels is None else neck_channels, **(detector_kwargs or {}),
        )
        if preset is not None and reference is not None:
            preset.load_into(self.model.model, self.num_classes, reference)
        iou_type: Any = self.iou_types[0] if len(self.iou_types) == 1 else self.iou_types
        # one metric object per evaluated stage (training mode yields losses, not detections)
        self.metrics = torch.nn.ModuleDict({
            f"{s}_map": UnevenMeanAveragePrecision(iou_type=iou_type, class_metrics=True, backend="faster_coco_eval")
            for s in ("val", "test")
        })

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Any]] | None = None,
                proposals: Sequence[Tensor] | None = None) -> Any:
        return self.model(list(images), None if targets is None else list(targets),
                          None if proposals is None else list(proposals))

    def _proposals(self, targets: Sequence[dict[str, Any]]) -> dict[str, list[Tensor]]:
        """``{"proposals": the targets'}`` for a detector that reads them, nothing for the others; missing ones name the fix."""
        if not self.model.proposals:
            return {}
        missing = [t.get("image_id") for t in targets if "proposals" not in t]
        if missing:
            raise ValueError(
                f"detector {self.model.name!r} classifies region proposals, but the targets of images {missing} have "
                f"none: build the data module with proposals=True (--data.proposals true; the CLI sets it for this "
                f"detector when the config leaves it null)"
            )
        return {"proposals": [t["proposals"] for t in targets]}

    # -- steps ---------------------------------------------------------------------------------
    def _train_targets(self, targets: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Targets without COCO crowd regions (never training targets)."""
        out = []
        for t in targets:
            crowd = t.get("iscrowd")
            if crowd is not None and bool(torch.as_tensor(crowd).any()):
                keep = torch.as_tensor(crowd) == 0
                t = {k: (v[keep] if k in ("boxes", "labels", "masks", "area", "iscrowd") else v) for k, v in t.items()}
            out.append(t)
        return out

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(list(images), self._train_targets(targets), **self._proposals(targets))
        loss = torch.stack(list(losses.values())).sum()
        self.check_finite(loss, [t.get("image_id") for t in targets])
        bs = len(images)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def _metric_inputs(self, preds: list[dict[str, Tensor]], targets: Sequence[dict[str, Any]]) -> tuple[list, list]:
        p_out, t_out = [], []
        for p, t in zip(preds, targets):
            item = {"boxes": p["boxes"], "scores": p["scores"], "labels": p["labels"]}
            tgt: dict[str, Tensor] = {"boxes": torch.as_tensor(t["boxes"]).reshape(-1, 4),
                                      "labels": torch.as_tensor(t["labels"]).reshape(-1)}
            for key in ("iscrowd", "area"):
                if key in t:
                    tgt[key] = torch.as_tensor(t[key])
            if self.with_masks:
                item["masks"] = p["masks"][:, 0] > 0.5
                tgt["masks"] = torch.as_tensor(t["masks"]).bool()
            p_out.append(item)
            t_out.append(tgt)
        return p_out, t_out

    def _eval_step(self, batch: Batch, batch_idx: int, stage: str) -> None:
        images, targets = batch
        preds = self.model(list(images), **self._proposals(targets))
        self.metrics[f"{stage}_map"].update(*self._metric_inputs(preds, targets))
        if stage == "val" and self.should_log_images(batch_idx):
            self._log_samples(images, preds, targets)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        metric = self.metrics[f"{stage}_map"]
        result = metric.compute()
        metric.reset()
        self.log_dict(self.flatten_map(result, stage), sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def flatten_map(self, result: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        """MeanAveragePrecision's output as scalars: ``<stage>/map``..., ``<stage>/ap_<class>``, ``segm_`` for masks."""
        out: dict[str, Tensor] = {}
        classes = torch.as_tensor(result.get("classes", torch.tensor([]))).reshape(-1).tolist()
        for iou in self.iou_types:
            src = "" if len(self.iou_types) == 1 else f"{iou}_"
            dst = "" if iou == "bbox" else f"{iou}_"
            for key in _SUMMARY_KEYS:
                if src + key in result:
                    out[f"{stage}/{dst}{key}"] = result[src + key].float()
            per_class = torch.as_tensor(result.get(src + "map_per_class", torch.tensor([]))).reshape(-1)
            if len(per_class) == len(classes):
                for c, ap in zip(classes, per_class):
                    name = self.class_names[int(c)] if 0 <= int(c) < len(self.class_names) else f"class_{int(c)}"
                    out[f"{stage}/{dst}ap_{name}"] = ap.float()
        return out

    # -- images ----------------------------------------------------------------------------------
    def _log_samples(self, images: Sequence[Tensor], preds: list[dict[str, Tensor]],
                     targets: Sequence[dict[str, Any]], n: int = 4) -> None:
        pictures, boxes = [], []
        for img, p, t in list(zip(images, preds, targets))[:n]:
            keep = p["scores"] >= self.draw_score_threshold
            canvas = to_uint8(img)
            if self.with_masks and bool(keep.any()):  # drawn into the picture: log_images' overlay is semantic
                canvas = draw_instance_masks(canvas, p["masks"][keep, 0] > 0.5, p["labels"][keep])
            pictures.append(canvas.permute(1, 2, 0).numpy())
            boxes.append({
                "prediction": {"boxes": p["boxes"][keep].cpu().numpy(), "labels": p["labels"][keep].cpu().numpy(),
                               "scores": p["scores"][keep].cpu().numpy()},
                "ground_truth": {"boxes": torch.as_tensor(t["boxes"]).cpu().numpy(),
                                 "labels": torch.as_tensor(t["labels"]).cpu().numpy()},
            })
        self.log_images("val/detections", pictures, boxes=boxes)

    # -- predict ---------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        images = batch["image"]
        if self.model.proposals and "proposals" not in batch:
            raise ValueError(f"detector {self.model.name!r} classifies region proposals, but the predict batch has none: "
                             f"build the data module with proposals=True (--data.proposals true)")
        preds = self.model(list(images), **({"proposals": batch["proposals"]} if self.model.proposals else {}))
        records = []
        for path, p in zip(batch["path"], preds):
            rec: dict[str, Any] = {"path": path, "boxes": p["boxes"].cpu(), "scores": p["scores"].cpu(),
                                   "labels": p["labels"].cpu()}
            if self.with_masks:
                rec["masks"] = (p["masks"][:, 0] > 0.5).cpu()
            records.append(rec)
        return records

    def prediction_writer(self, out_dir: Path) -> DetectionWriter:
        """Drawn images (detections scoring ``draw_score_threshold`` or more) and COCO results JSON."""
        return DetectionWriter(out_dir, self.class_names, self.draw_score_threshold)


class InstanceSegmentationTask(DetectionTask):
    """Detect and segment objects with Mask R-CNN; logs box figures and mask figures (``segm_``)."""

    detectors = detector_names(masks=True)
    iou_types = ("bbox", "segm")

    def __init__(self, *, detector: str = "mask_rcnn", **kwargs: Any) -> None:
        super().__init__(detector=detector, **kwargs)
