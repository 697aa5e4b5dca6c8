"""The switches a GPU run wants, tested on the CPU for every task: bf16-mixed precision, channels_last, compile."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
from lightning import Callback

from cvtasks.data import ShapesDataModule
from cvtasks.data.detection import ShapesDetectionDataModule
from cvtasks.data.segmentation import ShapesSegmentationDataModule
from cvtasks.tasks.base import BaseTask
from cvtasks.tasks.classification import ClassificationTask
from cvtasks.tasks.detection import DetectionTask, InstanceSegmentationTask
from cvtasks.tasks.segmentation import SemanticSegmentationTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _classification(**kw: Any) -> tuple[BaseTask, L.LightningDataModule]:
    dm = ShapesDataModule(num_samples=16, img_size=32, batch_size=8, num_workers=0)
    return ClassificationTask(num_classes=dm.num_classes, backbone="_tinynet", optimizer="adamw", lr=0.01, **kw), dm


def _segmentation(**kw: Any) -> tuple[BaseTask, L.LightningDataModule]:
    dm = ShapesSegmentationDataModule(num_samples=16, img_size=32, batch_size=8, max_shapes=2, num_workers=0)
    return SemanticSegmentationTask(num_classes=dm.num_classes, backbone="_tinynet", head="fcn8s",
                                    head_kwargs={"fc_channels": 16}, optimizer="adamw", lr=0.01, **kw), dm


def _detection(**kw: Any) -> tuple[BaseTask, L.LightningDataModule]:
    dm = ShapesDetectionDataModule(num_samples=8, img_size=64, batch_size=4, num_workers=0)
    return DetectionTask(num_classes=dm.num_classes, backbone="_tinynet", detector="fcos", min_size=64, max_size=64,
                         neck_channels=16, optimizer="adamw", lr=0.01, **kw), dm


def _instances(**kw: Any) -> tuple[BaseTask, L.LightningDataModule]:
    dm = ShapesDetectionDataModule(num_samples=8, img_size=64, batch_size=4, num_workers=0, with_masks=True)
    return InstanceSegmentationTask(num_classes=dm.num_classes, backbone="_tinynet", min_size=64, max_size=64,
                                    neck_channels=16, optimizer="adamw", lr=0.01, **kw), dm


TASKS: dict[str, Callable[..., tuple[BaseTask, L.LightningDataModule]]] = {
    "classification": _classification, "segmentation": _segmentation, "detection": _detection,
    "instance_segmentation": _instances,
}


class _Watch(Callback):
    """Training losses, the dtype the backbone computed in, and the memory format of its weights and inputs."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.feature_dtypes: set[torch.dtype] = set()
        self.weights_channels_last: list[bool] = []
        self.inputs_channels_last: list[bool] = []

    def on_train_batch_start(self, trainer: L.Trainer, task: BaseTask, batch: Any, batch_idx: int) -> None:
        body = task.backbone_module()
        convs = [m.weight for m in body.modules() if isinstance(m, torch.nn.Conv2d)]
        self.weights_channels_last.append(all(w.is_contiguous(memory_format=torch.channels_last) for w in convs))
        if not hasattr(self, "_hooked"):
            def seen(module: Any, args: Any, out: Any) -> None:
                self.feature_dtypes.update(v.dtype for v in out.values())
                self.inputs_channels_last.append(args[0].is_contiguous(memory_format=torch.channels_last))

            body.register_forward_hook(seen)
            self._hooked = True

    def on_train_batch_end(self, trainer: L.Trainer, task: BaseTask, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(task: BaseTask, dm: L.LightningDataModule, tmp_path: Path, **trainer: Any) -> _Watch:
    watch = _Watch()
    L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu", default_root_dir=tmp_path,
              callbacks=[watch], **trainer).fit(task, dm)
    return watch


@pytest.mark.parametrize("task_name", TASKS)
def test_bf16_mixed_trains_every_task(task_name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task, dm = TASKS[task_name]()
    before = {k: v.clone() for k, v in task.state_dict().items() if v.is_floating_point()}
    watch = _fit(task, dm, tmp_path, precision="bf16-mixed")
    assert len(watch.losses) == 3 and all(torch.isfinite(torch.tensor(watch.losses)))
    assert torch.bfloat16 in watch.feature_dtypes  # autocast ran the backbone in bf16
    after = task.state_dict()
    assert all(after[k].dtype == torch.float32 for k in before)  # the weights stay float32 (mixed, not pure)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("task_name", TASKS)
def test_channels_last_and_compile_train_every_task_and_keep_the_checkpoint_keys(task_name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task, dm = TASKS[task_name](channels_last=True, compile="aot_eager")  # inductor's C++ build is minutes on a CPU
    keys = set(task.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    watch = _fit(task, dm, tmp_path)
    assert all(watch.weights_channels_last) and all(watch.inputs_channels_last) and len(watch.losses) == 3
    assert all(torch.isfinite(torch.tensor(watch.losses)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the backbone ran through torch.compile
    assert set(task.state_dict()) == keys  # a compiled run's checkpoint loads without the switch


def test_compiled_backbone_computes_what_the_plain_one_does(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task, dm = _classification(channels_last=True, compile="aot_eager")
    plain = ClassificationTask(num_classes=task.num_classes, backbone="_tinynet")
    plain.load_state_dict(task.state_dict())
    task.setup("fit")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task.eval()(x.contiguous(memory_format=torch.channels_last)), plain.eval()(x))


def test_bad_compile_values_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown torch.compile backend 'fast'; use true \(inductor\) or one of"):
        ClassificationTask(num_classes=3, backbone="_tinynet", compile="fast")
    assert ClassificationTask(num_classes=3, backbone="_tinynet", compile=True).compile_backend == "inductor"
    assert ClassificationTask(num_classes=3, backbone="_tinynet").compile_backend is None
