"""A Lightning training epoch over a plain PyTorch loop, same model, same data, same work per step."""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from lightning import Trainer
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from cvtasks.data import ShapesDataModule
from cvtasks.tasks.classification import ClassificationTask

from .timing import interleaved


def _data(n: int, size: int) -> TensorDataset:
    """Scenes rendered once into memory, so both loops time training rather than rendering."""
    dm = ShapesDataModule(num_samples=n, img_size=size, batch_size=n, split=(1.0, 0.0, 0.0), augment=False)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> float:
    """Print the seconds per epoch of each and the ratio Lightning / plain loop."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per timed run (spreads the Trainer's start-up as in real use)")
    ap.add_argument("--repeats", type=int, default=3)
    ns = ap.parse_args(argv)
    data = _data(ns.samples, ns.size)
    torch.manual_seed(0)
    task = ClassificationTask(num_classes=5, backbone=ns.backbone, optimizer="sgd", lr=0.01, scheduler="none")
    plain_model = copy.deepcopy(task.model)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    plain_acc = MulticlassAccuracy(5, average="micro")

    def plain_run() -> None:
        plain_model.train()
        for _ in range(ns.epochs):
            _plain_one_epoch()

    def _plain_one_epoch() -> None:
        for x, y in DataLoader(data, batch_size=ns.batch, shuffle=True):
            logits = plain_model(x)
            loss = F.cross_entropy(logits, y)
            plain_opt.zero_grad()
            loss.backward()
            plain_opt.step()
            plain_acc.update(logits.detach(), y)
        plain_acc.compute()
        plain_acc.reset()

    def lightning_run() -> None:
        trainer = Trainer(max_epochs=ns.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          num_sanity_val_steps=0)
        trainer.fit(task, train_dataloaders=DataLoader(data, batch_size=ns.batch, shuffle=True))

    t_lightning, t_plain = interleaved(lightning_run, plain_run, repeats=ns.repeats)
    t_lightning, t_plain = t_lightning / ns.epochs, t_plain / ns.epochs
    ratio = t_lightning / t_plain
    print(f"{ns.backbone}, {ns.samples} images of {ns.size}px, batch {ns.batch}: "
          f"Lightning {t_lightning:.2f} s/epoch, plain loop {t_plain:.2f} s/epoch, ratio {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
