"""The fine-tuning switches every task has: freeze_backbone_epochs, backbone_lr_mult, ema_decay."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
from lightning import Callback
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from cvtasks.backbone import Backbone
from cvtasks.data import ShapesDataModule
from cvtasks.data.detection import ShapesDetectionDataModule
from cvtasks.data.segmentation import ShapesSegmentationDataModule
from cvtasks.finetuning import FreezeBackbone
from cvtasks.tasks.base import BaseTask
from cvtasks.tasks.classification import ClassificationTask
from cvtasks.tasks.detection import DetectionTask
from cvtasks.tasks.segmentation import SemanticSegmentationTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _classification(**kw: Any) -> tuple[BaseTask, L.LightningDataModule]:
    dm = ShapesDataModule(num_samples=24, img_size=32, batch_size=8)
    return ClassificationTask(**{"num_classes": dm.num_classes, "backbone": "_tinynet", "optimizer": "adamw", "lr": 0.01, **kw}), dm


def _segmentation(**kw: Any) -> tuple[BaseTask, L.LightningDataModule]:
    dm = ShapesSegmentationDataModule(num_samples=24, img_size=32, batch_size=8, max_shapes=2)
    task = SemanticSegmentationTask(**{"num_classes": dm.num_classes, "backbone": "_tinynet", "head": "fcn8s",
                                       "head_kwargs": {"fc_channels": 16}, "optimizer": "adamw", "lr": 0.01, **kw})
    return task, dm


def _detection(**kw: Any) -> tuple[BaseTask, L.LightningDataModule]:
    dm = ShapesDetectionDataModule(num_samples=12, img_size=64, batch_size=4)
    task = DetectionTask(**{"num_classes": dm.num_classes, "backbone": "_tinynet", "detector": "yolo", "min_size": 64,
                            "max_size": 64, "neck_channels": 16, "optimizer": "adamw", "lr": 0.01, **kw})
    return task, dm


TASKS: dict[str, Callable[..., tuple[BaseTask, L.LightningDataModule]]] = {
    "classification": _classification, "segmentation": _segmentation, "detection": _detection,
}


def _trainer(tmp_path: Path, callbacks: list[Callback], **kw: Any) -> L.Trainer:
    args: dict[str, Any] = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    return L.Trainer(callbacks=callbacks, **{**args, **kw})


def _split(task: BaseTask) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Copies of the backbone's state (parameters and BatchNorm statistics) and of the other parameters."""
    body = {k: v.detach().clone() for k, v in task.backbone_module().state_dict().items()}
    in_body = {id(p) for p in task.backbone_module().parameters()}
    rest = {n: p.detach().clone() for n, p in task.named_parameters() if id(p) not in in_body}
    return body, rest


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]


class _Snapshots(Callback):
    """The split state at training start and after each epoch; checks the backbone's mode in frozen epochs."""

    def __init__(self, frozen_epochs: int) -> None:
        self.frozen_epochs = frozen_epochs
        self.states: list[tuple[dict, dict]] = []
        self.frozen_batches = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: BaseTask) -> None:
        self.states.append(_split(pl_module))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: BaseTask, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch < self.frozen_epochs:
            body = pl_module.backbone_module()
            assert not any(p.requires_grad for p in body.parameters())
            norms = [m for m in body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            assert norms and not any(m.training for m in norms), "frozen BatchNorm must run in eval mode"
            self.frozen_batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: BaseTask) -> None:
        self.states.append(_split(pl_module))


@pytest.mark.parametrize("name", list(TASKS))
def test_backbone_frozen_then_trained(name: str, tmp_path: Path) -> None:
    task, dm = TASKS[name](freeze_backbone_epochs=1, backbone_lr_mult=0.5, scheduler="none")
    snaps = _Snapshots(frozen_epochs=1)
    trainer = _trainer(tmp_path, [snaps], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, datamodule=dm)
    assert any(isinstance(c, FreezeBackbone) for c in trainer.callbacks)
    assert snaps.frozen_batches == 2
    (body0, rest0), (body1, rest1), (body2, rest2) = snaps.states
    assert _changed(body0, body1) == [], "the backbone (weights and BatchNorm statistics) moved while frozen"
    assert _changed(rest0, rest1) and _changed(rest1, rest2), "the head must train in every epoch"
    assert _changed(body1, body2), "the backbone must train once unfrozen"
    assert all(p.requires_grad for p in task.backbone_module().parameters())
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.01 * 0.5) and groups["head"]["lr"] == pytest.approx(0.01)
    in_body = {id(p) for p in task.backbone_module().parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == in_body


def test_unfrozen_backbone_follows_the_schedule_at_its_multiplier(tmp_path: Path) -> None:
    task, dm = _classification(freeze_backbone_epochs=1, backbone_lr_mult=0.1, warmup_epochs=1, scheduler="cosine")
    lrs: list[dict[str, float]] = []

    class LrRecorder(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: BaseTask, batch: Any, batch_idx: int) -> None:
            lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    _trainer(tmp_path, [LrRecorder()], max_epochs=3, limit_train_batches=2, limit_val_batches=0).fit(task, datamodule=dm)
    per_epoch = len(lrs) // 3
    assert all(set(step) == {"head"} for step in lrs[:per_epoch])
    later = lrs[per_epoch:]
    assert all(step["backbone"] == pytest.approx(0.1 * step["head"]) for step in later)
    assert later[-1]["backbone"] < later[0]["backbone"], "the backbone's lr must decay with the others'"


@pytest.mark.parametrize("name", list(TASKS))
def test_backbone_group_has_the_multiplied_lr(name: str) -> None:
    task, _ = TASKS[name](lr=0.02, backbone_lr_mult=0.25, scheduler="none")
    opt = task.configure_optimizers()
    groups = {g["name"]: g for g in opt.param_groups}
    body = task.backbone_module()
    assert isinstance(body, Backbone)
    assert groups["backbone"]["lr"] == pytest.approx(0.005) and groups["head"]["lr"] == pytest.approx(0.02)
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in body.parameters()}
    n_all = sum(1 for p in task.parameters() if p.requires_grad)  # FCN keeps its bilinear upsampling fixed
    assert len(groups["head"]["params"]) + len(groups["backbone"]["params"]) == n_all > len(groups["backbone"]["params"])


def test_no_switch_adds_no_callback() -> None:
    task, _ = _classification()
    assert task.configure_callbacks() == []


def test_ema_weights_are_validated_and_checkpointed(tmp_path: Path) -> None:
    decay = 0.8
    task, dm = _classification(ema_decay=decay, scheduler="none")
    names = [n for n, _ in task.named_parameters()]
    seen: dict[str, Any] = {"ema": None, "val": [], "raw": [], "test": []}

    class Recorder(Callback):
        """Our own EMA of the parameters after every step, and the weights validation and training end with."""

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: BaseTask, *args: Any) -> None:
            now = [p.detach().clone() for p in pl_module.parameters()]
            # AveragedModel copies the weights on its first update, then averages
            seen["ema"] = now if seen["ema"] is None else [decay * e + (1 - decay) * w for e, w in zip(seen["ema"], now)]

        def on_validation_batch_start(self, trainer: L.Trainer, pl_module: BaseTask, *args: Any) -> None:
            if not trainer.sanity_checking and args[-1] == 0:
                seen["val"].append(([p.detach().clone() for p in pl_module.parameters()], [e.clone() for e in seen["ema"]]))

        def on_test_batch_start(self, trainer: L.Trainer, pl_module: BaseTask, *args: Any) -> None:
            seen["test"] = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: BaseTask) -> None:
            seen["raw"].append([p.detach().clone() for p in pl_module.parameters()])

    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = _trainer(tmp_path, [Recorder(), ckpt], enable_checkpointing=True, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, datamodule=dm)
    assert any(isinstance(c, EMAWeightAveraging) for c in trainer.callbacks)
    assert len(seen["val"]) == 2
    for (validated, ours), raw in zip(seen["val"], seen["raw"]):
        for name, v, e, r in zip(names, validated, ours, raw):
            torch.testing.assert_close(v, e, rtol=1e-5, atol=1e-6, msg=f"{name}: validated weights are not the EMA")
        assert any(not torch.allclose(v, r) for v, r in zip(validated, raw)), "EMA and raw weights coincide"
    # Lightning's layout: state_dict holds the average, current_model_state the raw weights
    state = torch.load(tmp_path / "epoch=1.ckpt", map_location="cpu", weights_only=False)
    validated, _ = seen["val"][-1]
    for name, v, r in zip(names, validated, seen["raw"][-1]):
        torch.testing.assert_close(state["state_dict"][name], v, msg=f"{name}: checkpoint's state_dict is not the EMA")
        torch.testing.assert_close(state["current_model_state"][name], r)
    # after fit the module holds the average, which is what a later evaluation runs on
    for p, v in zip(task.parameters(), validated):
        assert torch.equal(p.detach(), v)
    # as the CLI does after fit: validate and test a checkpoint on the same Trainer, both on that checkpoint's average
    first = torch.load(tmp_path / "epoch=0.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    seen["val"], seen["ema"] = [], [torch.zeros(())]
    trainer.validate(task, datamodule=dm, ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
    trainer.test(task, datamodule=dm, ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
    for stage, weights in (("validate", seen["val"][-1][0]), ("test", seen["test"])):
        for name, w in zip(names, weights):
            torch.testing.assert_close(w, first[name], msg=f"{name}: {stage} did not run on the checkpoint's average")


def test_callbacks_only_while_fitting(tmp_path: Path) -> None:
    task, dm = _classification(ema_decay=0.99, freeze_backbone_epochs=1)
    trainer = _trainer(tmp_path, [], limit_val_batches=1)
    trainer.validate(task, datamodule=dm, verbose=False)
    assert not any(isinstance(c, (EMAWeightAveraging, FreezeBackbone)) for c in trainer.callbacks)
    assert all(p.requires_grad for p in task.backbone_module().parameters())


@pytest.mark.parametrize("kw,match", [
    ({"freeze_backbone_epochs": -1}, "freeze_backbone_epochs"), ({"freeze_backbone_epochs": 1.5}, "freeze_backbone_epochs"),
    ({"backbone_lr_mult": 0.0}, "backbone_lr_mult must be positive"), ({"backbone_lr_mult": -0.1}, "backbone_lr_mult"),
    ({"backbone_lr_mult": math.nan}, "backbone_lr_mult"),
    ({"ema_decay": 0.0}, "ema_decay must be in"), ({"ema_decay": 1.0}, "ema_decay must be in"), ({"ema_decay": 1.5}, "ema_decay"),
])
@pytest.mark.parametrize("name", list(TASKS))
def test_bad_fine_tuning_values(name: str, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TASKS[name](**kw)
