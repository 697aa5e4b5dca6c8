"""Training throughput on a GPU: ResNet-50 at 224 px with AMP and channels_last, fed by the real loader and by a fixed batch.

    python -m benchmarks throughput --device cuda [--batch 128] [--steps 50] [--workers auto]

The real loader is the classification folder pipeline over JPEGs written to a temporary folder
(decode, resize, flip, normalise in ``--workers`` processes, pinned memory); the fixed batch is one
of its batches, kept on the device. Images per second of each and their ratio say whether the
data path keeps the GPU busy. It runs on a CPU too (``--device cpu``, small sizes), as its test does.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cvtasks.backbone import create_classifier
from cvtasks.data.base import one_opencv_thread, resolve_num_workers

from .data import _OurFolder, write_jpeg_folder


def _images_per_second(step: Any, batches: Iterator[Any], steps: int, batch: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up: cudnn autotuning, allocator, first batches
        step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print and return images/s with the real loader, with a fixed batch, and their ratio."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=2048, help="JPEGs written for the real loader")
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "32"])
    ap.add_argument("--no-channels-last", action="store_true")
    ns = ap.parse_args(argv)
    device = torch.device(ns.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu for a (slow) smoke run")
    channels_last = not ns.no_channels_last
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "32": None}[ns.precision]
    model = create_classifier(ns.backbone, num_classes=1000).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    workers = resolve_num_workers(ns.workers if ns.workers == "auto" else int(ns.workers), training_on_cpu=device.type == "cpu")
    one_opencv_thread()  # as cvtasks' own loaders do
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpeg_folder(Path(tmp), ns.images, side=max(ns.size * 3 // 2, 64))
        loader = DataLoader(_OurFolder(root, ns.size), batch_size=ns.batch, shuffle=True, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True,
                            worker_init_fn=one_opencv_thread if workers > 0 else None)

        def forever() -> Iterator[Any]:
            while True:
                yield from loader

        fixed = next(iter(loader))
        fixed = (fixed[0].to(device), fixed[1].to(device))

        def same() -> Iterator[Any]:
            while True:
                yield fixed

        real = _images_per_second(step, forever(), ns.steps, ns.batch, device)
        kept = _images_per_second(step, same(), ns.steps, ns.batch, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{ns.backbone} {ns.size}px batch {ns.batch} on {name} ({ns.precision}, channels_last={channels_last}, "
          f"{workers} loader workers): real loader {real:.0f} images/s, fixed batch {kept:.0f} images/s, "
          f"ratio fixed/real {kept / real:.3f}")
    return {"real": real, "fixed": kept, "ratio": kept / real, "workers": workers, "device": name}


if __name__ == "__main__":
    main()
