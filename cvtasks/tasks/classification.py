"""Image classification: a registry backbone with its documented head, cross-entropy, top-1/top-5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ..backbone import create_classifier
from ..writers import ClassificationWriter
from .base import BaseTask

__all__ = ["ClassificationTask"]


class ClassificationTask(BaseTask):
    """Classify images with ``create_classifier(backbone, num_classes)``.

    ``head``: null for the net's own head (its classifier, or global average pooling and a linear
    layer), ``spp`` for SPP-net's spatial pyramid pooling and a linear layer, which takes images of
    any size (``head_kwargs: {bins: [1, 2, 4]}``, the default, sets the bins per side). Logs ``{train,val,test}/loss``, ``/acc`` (top-1) and
    ``/acc_top5`` (only with more than 5 classes).
    """

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(self, *, label_smoothing: float = 0.0, dropout: float | None = None, head: str | None = None,
                 head_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.model = create_classifier(
            self.backbone_name, self.num_classes, pretrained=self.pretrained, dropout=dropout, head=head,
            head_kwargs=head_kwargs, **self.backbone_kwargs
        )
        # one metric object per stage (ModuleDict keys may not shadow Module.train, hence the suffix)
        self.metrics = torch.nn.ModuleDict({f"{s}_metrics": self._make_metrics(s) for s in ("train", "val", "test")})

    def _make_metrics(self, stage: str) -> MetricCollection:
        metrics: dict[str, Any] = {"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics, prefix=f"{stage}/")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if stage == "train":
            self.check_finite(loss, [f"batch {batch_idx} of epoch {self.current_epoch}"])
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits.detach(), y)
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))
        else:
            self.log_eval_loss(stage, loss, len(y), prog_bar=True)
        self.log_dict(metrics, prog_bar=stage != "train", on_step=False, on_epoch=True)
        if stage == "val" and self.should_log_images(batch_idx):
            pred = logits.argmax(1)
            n = min(8, len(y))
            caps = [f"pred {self.class_names[p]} / true {self.class_names[t]}" for p, t in zip(pred[:n].tolist(), y[:n].tolist())]
            self.log_images("val/samples", x[:n], captions=caps)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        probs = self(batch["image"]).softmax(1)
        score, label = probs.max(1)
        return [
            {"path": p, "label": int(l), "class": self.class_names[int(l)], "score": float(s)}
            for p, l, s in zip(batch["path"], label.tolist(), score.tolist())
        ]

    def prediction_writer(self, out_dir: Path) -> ClassificationWriter:
        """predictions.csv and predictions.json: image path, predicted class and its score."""
        return ClassificationWriter(out_dir)
