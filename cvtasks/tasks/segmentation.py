"""Semantic segmentation: a registry backbone, a segmentation head, per-pixel cross-entropy, IoU metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..crf import DenseCRF
from ..data.segmentation import IGNORE_INDEX
from ..heads.segmentation import build_segmentation_model, segmentation_head_spec
from ..presets import task_preset
from ..weights import weights_from_checkpoint
from ..visualize import denormalise
from ..writers import SegmentationWriter
from .base import BaseTask

__all__ = ["SemanticSegmentationTask", "dice_loss"]


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1.0) -> Tensor:
    """1 - mean soft Dice over classes (Milletari et al., V-Net, 2016), ignored pixels left out."""
    c = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(target.masked_fill(~valid.squeeze(1), 0), c).permute(0, 3, 1, 2) * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def _metrics(num_classes: int) -> MetricCollection:
    """Pixel accuracy, mean IoU (classes present in truth or prediction) and per-class IoU over a whole stage."""
    return MetricCollection(
        {
            "pixel_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX),
            "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE_INDEX),
            "iou": MulticlassJaccardIndex(num_classes, average="none", ignore_index=IGNORE_INDEX),
        }
    )


class SemanticSegmentationTask(BaseTask):
    """Per-pixel classification with a head chosen by name on any registry backbone.

    Loss: cross-entropy (ignore label 255, optional class weights), plus optionally a soft Dice
    term and an auxiliary cross-entropy on the level before the coarsest. Metrics, accumulated
    over the whole stage: ``<stage>/pixel_acc``, ``<stage>/miou``, ``<stage>/iou_<class>``.
    """

    monitor = "val/miou"
    monitor_mode = "max"

    def __init__(
        self,
        *,
        head: str = "fcn8s",
        head_kwargs: dict[str, Any] | None = None,
        class_weights: list[float] | None = None,
        dice_weight: float = 0.0,
        aux_loss_weight: float = 0.0,
        crf: bool = False,
        crf_kwargs: dict[str, Any] | None = None,
        num_log_images: int = 4,
        **kwargs: Any,
    ) -> None:
        """``head``: fcn32s, fcn16s, fcn8s, fcn, deeplabv3 or unpool; ``crf`` refines predictions (val, test, predict).

        ``pretrained``: ``coco_voc`` loads torchvision's FCN or DeepLabV3 on ResNet-50 trained on COCO
        with the 21 VOC labels into the whole model (heads fcn, deeplabv3; ``cvtasks.presets``);
        anything else (``imagenet``, a URL, a file) goes to the backbone.
        """
        super().__init__(**kwargs)
        self.save_hyperparameters()
        segmentation_head_spec(head)  # an unknown name fails before the class weights are looked at
        if class_weights is not None and len(class_weights) != self.num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} values for {self.num_classes} classes")
        if dice_weight < 0 or aux_loss_weight < 0:
            raise ValueError("dice_weight and aux_loss_weight must be non-negative")
        self.head_name = head.lower()
        preset = task_preset(self.pretrained, self.head_name)
        if preset is not None:
            preset.check_backbone(self.backbone_name)
            head_kwargs = preset.configure(dict(head_kwargs or {}), kwargs_flag="--model.head_kwargs")
            # what was built, for a reload from a checkpoint (with pretrained=None: nothing fetched again)
            self.hparams.update(head_kwargs=head_kwargs)
            # read before the build, so that a missing or corrupt file fails first; not at all where a
            # checkpoint supplies the weights (evaluate, predict, resume)
            reference = None if weights_from_checkpoint() else preset.weights.state_dict()
        self.model = build_segmentation_model(
            self.head_name,
            self.backbone_name,
            self.num_classes,
            backbone_kwargs=self.backbone_kwargs,
            pretrained=None if preset else self.pretrained,
            head_kwargs=head_kwargs,
            aux_head=aux_loss_weight > 0,
        )
        if preset is not None and reference is not None:
            preset.load_into(self.model, self.num_classes, reference)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weight", weight, persistent=False)
        self.dice_weight = dice_weight
        self.aux_loss_weight = aux_loss_weight
        self.crf = DenseCRF(**(crf_kwargs or {})) if crf else None
        self.num_log_images = num_log_images
        # kept here, not read from the model when predicting: an exported model standing in for it has no backbone
        self.min_input_size = self.model.backbone.spec.min_input_size
        self.val_metrics = _metrics(self.num_classes)
        self.test_metrics = _metrics(self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores (B, num_classes, H, W) at the input's size."""
        return self.model(x)

    # -- loss ----------------------------------------------------------------------------------
    def compute_loss(self, logits: Tensor, target: Tensor, aux: Tensor | None = None) -> Tensor:
        """Cross-entropy (+ Dice, + weighted auxiliary cross-entropy) over the non-ignored pixels."""
        if not (target != IGNORE_INDEX).any():
            return logits.sum() * 0.0  # a crop of ignore pixels only: nothing to learn, and no NaN
        loss = F.cross_entropy(logits, target, weight=self.class_weight, ignore_index=IGNORE_INDEX)
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * dice_loss(logits, target)
        if aux is not None and self.aux_loss_weight > 0:
            loss = loss + self.aux_loss_weight * F.cross_entropy(aux, target, weight=self.class_weight, ignore_index=IGNORE_INDEX)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits, aux = self.model.forward_all(batch["image"])
        loss = self.compute_loss(logits, batch["mask"], aux)
        self.check_finite(loss, batch.get("id"))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["image"].shape[0])
        return loss

    # -- evaluation ----------------------------------------------------------------------------
    def predict_masks(self, images: Tensor, logits: Tensor | None = None) -> Tensor:
        """Labels (B, H, W): argmax of the scores, refined by the dense CRF when enabled."""
        if logits is None:
            logits = self.model(images)
        if self.crf is not None:
            return self.crf(logits, denormalise(images, *self.normalization).float()).argmax(dim=1)
        return logits.argmax(dim=1)

    def _eval_step(self, batch: dict[str, Any], stage: str, batch_idx: int) -> None:
        images, target = batch["image"], batch["mask"]
        logits = self.model(images)
        # the mean of per-image losses: the Dice term of a batch is not a sum over its images, so a
        # batch-level loss would change with how the images are batched (and split over processes)
        losses = [self.compute_loss(logits[i : i + 1], target[i : i + 1]) for i in range(images.shape[0])]
        self.log_eval_loss(stage, torch.stack(losses))
        preds = self.predict_masks(images, logits)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(preds, target)
        if stage == "val" and self.should_log_images(batch_idx):
            n = min(self.num_log_images, images.shape[0])
            self.log_images(
                "val/predictions",
                images[:n],
                masks=[{"prediction": preds[i].cpu().numpy(), "ground_truth": target[i].cpu().numpy()} for i in range(n)],
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def _log_metrics(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        res = metrics.compute()
        self.log(f"{stage}/pixel_acc", res["pixel_acc"])
        self.log(f"{stage}/miou", res["miou"], prog_bar=stage == "val")
        for name, iou in zip(self.class_names, res["iou"]):
            self.log(f"{stage}/iou_{name}", iou)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # -- predict -------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One record per image: its path and predicted mask (H, W) uint8 at the image's original size."""
        images = batch["image"]
        items: Sequence[Tensor] = images if isinstance(images, list) else list(images)
        records = []
        min_side = self.min_input_size
        for img, path, size in zip(items, batch["path"], batch["orig_size"]):
            h0, w0 = img.shape[-2:]
            # an image smaller than the backbone's smallest input is padded, and the padding cropped off again
            ph, pw = max(0, min_side - h0), max(0, min_side - w0)
            x = F.pad(img.unsqueeze(0), (0, pw, 0, ph), mode="replicate") if ph or pw else img.unsqueeze(0)
            pred = self.predict_masks(x)[..., :h0, :w0]
            h, w = int(size[0]), int(size[1])
            if tuple(pred.shape[-2:]) != (h, w):
                pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
            records.append({"path": str(path), "mask": pred[0].cpu().numpy().astype(np.uint8)})
        return records

    def prediction_writer(self, out_dir: Path) -> SegmentationWriter:
        """An index PNG and an overlay PNG per image."""
        return SegmentationWriter(out_dir)
