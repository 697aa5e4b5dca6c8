"""Prediction writers: Lightning callbacks that turn predict's records into files, one writer per output format.

A task chooses its writer (``BaseTask.prediction_writer``), so the CLI adds it to predict's
Trainer without knowing the task. Every writer receives the records of the whole folder once, in
the folder's order: under DDP each process predicts its own share of the images (no padding) and
the shares are gathered once, at the end of the epoch.

    ClassificationWriter   predictions.csv and predictions.json: path, label, class, score
    SegmentationWriter     <stem>.png (index PNG, VOC palette) and <stem>_overlay.png per image
    DetectionWriter        <stem>.png with boxes (and masks) drawn per image, predictions.json in
                           COCO results format (the data's category ids, masks as RLE)

A new format is a new subclass with its own ``write``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torchvision.io import write_png

from .data.base import read_image
from .data.coco import predictions_to_coco
from .data.segmentation import save_index_png
from .visualize import colour_overlay, draw_detections

__all__ = ["ClassificationWriter", "DetectionWriter", "PredictionWriter", "SegmentationWriter"]


class PredictionWriter(BasePredictionWriter):
    """Gathers predict's records from every process, sorts them by path and hands them to ``write``."""

    def __init__(self, out_dir: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.out_dir = Path(out_dir)
        self.written: list[Path] = []

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Any) -> None:
        """Gather, sort and write once, on the first process."""
        records = [r for batch in predictions for r in batch]
        if trainer.world_size > 1:  # each rank predicted its own share of the images (no padding): gather them once
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if trainer.is_global_zero:
            # the folder's order, as one process would write it (ranks take every N-th image)
            records.sort(key=lambda r: str(r["path"]))
            self.written = self.write(records, getattr(trainer, "datamodule", None))
            print(f"wrote predictions for {len(records)} images to {self.out_dir}")

    def write(self, records: list[dict[str, Any]], datamodule: Any = None) -> list[Path]:
        """Write ``records`` (sorted by path) under ``out_dir``; returns the files written."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to write predictions")


class ClassificationWriter(PredictionWriter):
    """predictions.csv and predictions.json: image path, predicted label, class name and score."""

    FIELDS = ("path", "label", "class", "score")

    def write(self, records: list[dict[str, Any]], datamodule: Any = None) -> list[Path]:
        """Write predictions.csv and predictions.json."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = self.out_dir / "predictions.csv", self.out_dir / "predictions.json"
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(self.FIELDS))
            writer.writeheader()
            writer.writerows(records)
        json_path.write_text(json.dumps(records, indent=2))
        return [csv_path, json_path]


class SegmentationWriter(PredictionWriter):
    """``<stem>.png`` (index PNG, VOC palette) and ``<stem>_overlay.png`` per input image."""

    def write(self, records: list[dict[str, Any]], datamodule: Any = None) -> list[Path]:
        """Write each record's mask as an index PNG and, where the sizes agree, its overlay on the image."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for rec in records:
            stem = Path(rec["path"]).stem
            mask = rec["mask"]
            written.append(save_index_png(mask, self.out_dir / f"{stem}.png"))
            image = read_image(rec["path"])
            if image.shape[:2] == mask.shape:
                overlay = self.out_dir / f"{stem}_overlay.png"
                Image.fromarray(colour_overlay(image, mask)).save(overlay)
                written.append(overlay)
        return written


class DetectionWriter(PredictionWriter):
    """One drawn image per input (``<stem>.png``) and ``predictions.json`` in COCO results format.

    COCO results carry the dataset's category ids (the data module's ``category_ids``, else
    label + 1), boxes as xywh, ``image_id`` the image's position in the sorted list and
    ``file_name`` its path; masks as RLE ``segmentation`` for instance segmentation. Only
    detections scoring ``score_threshold`` or more are drawn; all are written to the JSON.
    """

    def __init__(self, out_dir: str | Path, class_names: Sequence[str], score_threshold: float = 0.5) -> None:
        super().__init__(out_dir)
        self.class_names = list(class_names)
        self.score_threshold = score_threshold

    def write(self, records: list[dict[str, Any]], datamodule: Any = None) -> list[Path]:
        """Write the drawn images and predictions.json; category ids come from ``datamodule`` when it has them."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ids = getattr(datamodule, "category_ids", None)
        category_ids = list(ids) if ids else [i + 1 for i in range(len(self.class_names))]
        results: list[dict[str, Any]] = []
        written: list[Path] = []
        used: set[str] = set()
        for image_id, rec in enumerate(records):
            image = torch.from_numpy(read_image(rec["path"]).copy()).permute(2, 0, 1)
            keep = rec["scores"] >= self.score_threshold
            masks = rec.get("masks")
            drawn = draw_detections(image, rec["boxes"][keep], rec["labels"][keep], self.class_names,
                                    rec["scores"][keep], None if masks is None else masks[keep])
            stem = Path(rec["path"]).stem
            name = stem if stem not in used else f"{stem}_{image_id}"  # two folders' img0.png stay two files
            used.add(name)
            target = self.out_dir / f"{name}.png"
            write_png(drawn, str(target))
            written.append(target)
            results += predictions_to_coco(image_id, rec["boxes"], rec["scores"], rec["labels"], category_ids,
                                           masks=masks, file_name=rec["path"])
        json_path = self.out_dir / "predictions.json"
        json_path.write_text(json.dumps(results))
        return [json_path, *written]
