"""SemanticSegmentationTask: metrics on a hand-computed case, losses, a short training run, predict."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import check_outcomes
from cvtasks.backbone import StagedBackbone
from cvtasks.data.base import ImageFolderPredictDataset, _predict_collate, normalise
from cvtasks.data.segmentation import ShapesSegmentationDataModule
from cvtasks.registry import register_backbone
from cvtasks.tasks.segmentation import SemanticSegmentationTask, _metrics, dice_loss


class _TaskTestNet(StagedBackbone):
    """A tiny conv-bn-relu + max-pool net (strides 2..32) so that the task tests run in seconds."""

    def __init__(self, *, in_chans: int = 3, out_features=None, width: int = 12) -> None:
        super().__init__()
        levels, c, stride = [], in_chans, 1
        for i in range(5):
            out = width * (1 + i)
            self.stages[f"s{i}"] = nn.Sequential(nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                                                 nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))
            c, stride = out, stride * 2
            levels.append((f"s{i}", f"f{i}", c, stride))
        self._finish(levels, out_features)


register_backbone("_segtest_task_net", family="_segtest", min_input_size=32)(_TaskTestNet)


def _task(**kw) -> SemanticSegmentationTask:
    args = dict(num_classes=3, backbone="_segtest_task_net", head="fcn8s", head_kwargs={"fc_channels": 32})
    args.update(kw)
    return SemanticSegmentationTask(**args)


def test_metrics_on_a_hand_computed_case() -> None:
    ig = 255
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, ig, ig], [2, 2, 2, ig]])
    preds = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [2, 0, 0, 2], [2, 2, 1, 1]])
    # over the 13 labelled pixels: class 0 TP 3 FP 1 FN 1; class 1 TP 4 FP 2 FN 0; class 2 TP 3 FP 0 FN 2
    m = _metrics(4)  # class 3 is absent from truth and prediction: it must not drag the mean down
    m.update(preds[None, :2], target[None, :2])  # accumulated over batches, like a validation epoch
    m.update(preds[None, 2:], target[None, 2:])
    res = m.compute()
    assert res["pixel_acc"].item() == pytest.approx(10 / 13)
    assert res["iou"][:3].tolist() == pytest.approx([3 / 5, 4 / 6, 3 / 5])
    assert res["miou"].item() == pytest.approx((3 / 5 + 4 / 6 + 3 / 5) / 3)


def test_loss_ignores_255_and_dice_and_weights() -> None:
    task = _task(dice_weight=0.5, class_weights=[1.0, 2.0, 1.0])
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :2] = 255
    logits = torch.randn(2, 3, 8, 8)
    loss = task.compute_loss(logits, target)
    changed = logits.clone()
    changed[:, :, :2] = 100 * torch.randn(2, 3, 2, 8)  # scores at ignored pixels
    assert task.compute_loss(changed, target).item() == pytest.approx(loss.item(), rel=1e-6)
    perfect = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target).item() < 1e-3
    assert task.compute_loss(logits, torch.full((2, 8, 8), 255)).item() == 0.0
    with pytest.raises(ValueError, match="class_weights"):
        _task(class_weights=[1.0])
    with pytest.raises(ValueError, match="unknown segmentation head"):
        _task(head="segnet")


def test_aux_loss_and_crf_paths() -> None:
    task = _task(aux_loss_weight=0.4, crf=True, crf_kwargs={"iterations": 2})
    assert task.model.aux_head is not None
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32)), "id": ["a", "b"]}
    logits, aux = task.model.forward_all(batch["image"])
    assert aux is not None and torch.isfinite(task.compute_loss(logits, batch["mask"], aux))
    assert task.predict_masks(batch["image"]).shape == (2, 32, 32)


def _fit(task: SemanticSegmentationTask, dm, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, max_epochs=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, check_val_every_n_epoch=1000)
    trainer.fit(task, dm)
    return trainer


@pytest.fixture
def one_thread():
    """Tiny convolutions on a shared machine run faster on one thread than on contended two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: what overfitting eight fixed scenes must reach: the loss ratio after/before, and mIoU on those
#: scenes (labelling every pixel background, the majority, scores about 0.15 here)
OVERFIT_LIMITS = {"loss_ratio": ("<", 0.25), "miou": (">", 0.45)}


def overfit_scenes(seed: int = 0) -> dict[str, float]:
    """FCN-8s on a tiny net, 120 AdamW steps on 8 fixed scenes, validated (through Lightning) on those scenes."""
    L.seed_everything(seed, verbose=False)
    dm = ShapesSegmentationDataModule(num_samples=9, img_size=48, batch_size=8, max_shapes=2, augment=False, seed=seed)
    dm.train_indices = dm.val_indices = list(range(8))
    dm.test_indices = [8]
    task = _task(num_classes=dm.num_classes, class_names=dm.class_names, optimizer="adamw", lr=1e-2, weight_decay=0.0,
                 scheduler="none", head_kwargs={"fc_channels": 64, "dropout": 0.0})
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    before = trainer.validate(task, dm, verbose=False)[0]
    _fit(task, dm, steps=120)
    res = trainer.validate(task, dm, verbose=False)[0]
    assert {"val/pixel_acc", "val/iou_background", "val/iou_circle"} <= set(res)
    return {"loss_ratio": res["val/loss"] / before["val/loss"], "miou": res["val/miou"]}


@pytest.mark.slow
def test_short_training_lowers_loss_and_beats_chance(one_thread) -> None:
    check_outcomes(overfit_scenes(0), OVERFIT_LIMITS)


def test_predict_writes_masks_of_the_input_size(tmp_path: Path) -> None:
    src, out = tmp_path / "images", tmp_path / "out"
    src.mkdir()
    sizes = {"a": (37, 45), "b": (64, 30)}  # 30 < the backbone's 32: padded for the net, cropped back
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{name}.jpg")
    task = _task().eval()
    ds = ImageFolderPredictDataset(src, normalise)
    records = []
    with torch.no_grad():
        for i in range(len(ds)):  # one image per batch; a batch of mixed sizes comes as a list
            records += task.predict_step(_predict_collate([ds[i]]), i)
        records += task.predict_step(_predict_collate([ds[0], ds[1]]), 2)
    written = task.prediction_writer(out).write(records)
    assert {p.name for p in written} == {"a.png", "a_overlay.png", "b.png", "b_overlay.png"}
    for name, (h, w) in sizes.items():
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            assert np.asarray(im).max() < 3
        with Image.open(out / f"{name}_overlay.png") as im:
            assert im.size == (w, h) and im.mode == "RGB"
