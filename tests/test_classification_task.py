"""The classification task: metrics, schedule, NaN guard, logging choice."""

from __future__ import annotations

import math

import pytest
import torch
from lightning import Callback, Trainer

from cvtasks.data import ShapesDataModule
from conftest import check_outcomes
from cvtasks.loggers import AutoWandbLogger, wandb_logged_in
from cvtasks.tasks.classification import ClassificationTask


def test_top5_only_with_more_than_five_classes():
    assert "acc_top5" not in ClassificationTask(num_classes=5, backbone="resnet18").metrics["val_metrics"]
    assert "acc_top5" in ClassificationTask(num_classes=10, backbone="resnet18").metrics["val_metrics"]


def test_nan_loss_stops_the_run_naming_the_batch():
    task = ClassificationTask(num_classes=3, backbone="resnet18")
    with pytest.raises(FloatingPointError, match="batch 4"):
        task.check_finite(torch.tensor(float("nan")), ["batch 4 of epoch 0"])


@pytest.mark.parametrize("kw,match", [({"optimizer": "lbfgs"}, "unknown optimizer"), ({"scheduler": "poly"}, "unknown scheduler"),
                                      ({"lr": 0.0}, "lr must be positive"), ({"label_smoothing": 1.5}, "label_smoothing")])
def test_bad_task_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        ClassificationTask(num_classes=3, backbone="resnet18", **kw)


def test_warmup_then_cosine_schedule(tmp_path):
    task = ClassificationTask(num_classes=5, backbone="resnet18", lr=0.1, warmup_epochs=1, scheduler="cosine")
    dm = ShapesDataModule(num_samples=40, img_size=32, batch_size=7)
    lrs: list[float] = []

    class LrRecorder(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[LrRecorder()], limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    per_epoch = 4  # 28 training scenes in batches of 7
    assert len(lrs) == 3 * per_epoch
    assert lrs[0] < lrs[1] < lrs[per_epoch - 1] <= 0.1  # warm-up rises
    tail = lrs[per_epoch:]
    assert all(a >= b for a, b in zip(tail, tail[1:]))  # then cosine decays
    assert tail[-1] < 0.1 * 0.5 * (1 + math.cos(math.pi * 0.7))


#: what overfitting one batch must reach (ratio of the last loss to the first)
OVERFIT_LIMITS = {"loss_ratio": ("<", 0.5)}


def overfit_one_batch(seed: int = 0) -> dict[str, float]:
    """15 AdamW steps on one fixed batch of 16 shapes: the last loss over the first."""
    torch.manual_seed(seed)
    dm = ShapesDataModule(num_samples=64, img_size=32, batch_size=16, augment=False, seed=seed)
    dm.setup("fit")
    task = ClassificationTask(num_classes=5, backbone="resnet18", optimizer="adamw", lr=1e-3)
    opt = task.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    x, y = next(iter(dm.train_dataloader()))
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(task(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"loss_ratio": losses[-1] / losses[0]}


def test_training_lowers_the_loss():
    check_outcomes(overfit_one_batch(0), OVERFIT_LIMITS)


def test_wandb_is_offline_without_login_and_never_prompts(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logged_in()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_logged_in()
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    logger = AutoWandbLogger(save_dir=str(tmp_path), name="t", id="t1")
    assert logger.mode == "offline"
    logger.log_metrics({"val/acc": 0.5}, step=0)
    logger.experiment.finish()
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_mode_is_checked():
    with pytest.raises(ValueError, match="auto, online or offline"):
        AutoWandbLogger(mode="cloud")
