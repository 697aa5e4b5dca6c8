"""The data path, measured: loader images per second per CPU core, the step ratio, our folder pipeline beside torchvision's.

    python -m benchmarks data [--tasks classification segmentation detection] [--steps 10] [--repeats 5]

1. Per default data module (the task config's data section, at its image size): images per second
   of the training loader in one process on one core (``num_workers=0``, one thread), in the epoch
   that draws the scenes and in the next, which takes them from the cache; and what the per-core
   rate feeds across the 15 loader workers of a 16-core GPU host.
2. Per task: a training step of the default model on batches from its real training loader (the
   default ``num_workers: auto``, which training on a CPU resolves to the CPUs beyond torch's threads,
   usually 0; after one full pass over the split that fills the caches) over
   the same step on one batch drawn beforehand. 1.00 means the data path costs the step nothing.
3. A folder of JPEGs: our folder pipeline (PIL decode, albumentations resize and flip, normalise)
   over a plain ``torchvision.datasets.ImageFolder`` with ``transforms.v2`` doing the same, per image.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import albumentations as A
import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cvtasks.data.base import normalise, one_opencv_thread, read_image
from cvtasks.data.shapes import render_scene

from .timing import interleaved

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TASKS = ("classification", "segmentation", "detection")
WORKERS_OF_A_16_CORE_HOST = 15  # num_workers auto on one device: every CPU but the training process's


def _build(spec: dict[str, Any], **overrides: Any) -> Any:
    """An object from a config's ``class_path``/``init_args`` section, ``overrides`` on top."""
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**{**spec.get("init_args", {}), **overrides})


def default_data(task: str, **overrides: Any) -> Any:
    """The task's default data module (configs/<task>.yaml), set up for fitting."""
    config = yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())
    dm = _build(config["data"], **overrides)
    dm.setup("fit")
    return dm


def default_task(task: str, dm: Any) -> Any:
    """The task's default model (configs/<task>.yaml) for ``dm``'s classes."""
    config = yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())
    args = config["model"].get("init_args", {})
    # what the CLI fills from the data: a detector's null resize bounds are the data's image size
    sizes = {k: dm.img_size for k in ("min_size", "max_size") if k in args and args[k] is None}
    return _build(config["model"], num_classes=dm.num_classes, **sizes)


def _images(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch["image"]
    return len(first)


def loader_rate(task: str, samples: int) -> tuple[float, float, int]:
    """Training-loader images per second on one core: the epoch that draws, the next (cached); and the image size."""
    dm = default_data(task, num_workers=0, num_samples=samples)
    loader = dm.train_dataloader()
    rates = []
    for _ in range(2):
        n, t0 = 0, time.perf_counter()
        for batch in loader:
            n += _images(batch)
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1], dm.img_size


def _train_step(task: Any, opt: torch.optim.Optimizer) -> Callable[[Any], None]:
    def step(batch: Any) -> None:
        loss = task.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def step_ratio(task_name: str, steps: int, repeats: int) -> tuple[float, float, int]:
    """Seconds per step with the real loader and with one fixed batch, and the loader's worker count."""
    torch.manual_seed(0)
    dm = default_data(task_name)
    task = default_task(task_name, dm)
    task.train()
    opt = torch.optim.SGD(task.parameters(), lr=1e-4)
    step = _train_step(task, opt)
    loader = dm.train_dataloader()
    for _ in loader:  # one full pass: every scene drawn into the (persistent) workers' caches
        pass
    fixed = next(iter(loader))

    def forever() -> Iterator[Any]:
        while True:  # a new pass over the loader each time (itertools.cycle would replay kept batches)
            yield from loader

    batches = forever()
    seconds = interleaved(lambda: [step(next(batches)) for _ in range(steps)],
                          lambda: [step(fixed) for _ in range(steps)], repeats=repeats)
    return seconds[0] / steps, seconds[1] / steps, loader.num_workers


class _TorchvisionFolder(Dataset):
    """torchvision's ImageFolder with transforms.v2: decode, resize, flip, to float, normalise."""

    def __init__(self, root: Path, size: int) -> None:
        from torchvision import datasets
        from torchvision.transforms import v2

        pipeline = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True), v2.RandomHorizontalFlip(),
                               v2.ToDtype(torch.float32, scale=True),
                               v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        self.inner = datasets.ImageFolder(str(root), transform=pipeline)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.inner[i]


class _OurFolder(Dataset):
    """Our folder path doing the same: read_image (PIL), albumentations resize and flip, normalise."""

    def __init__(self, root: Path, size: int) -> None:
        self.items = sorted((p, i) for i, d in enumerate(sorted(root.iterdir())) for p in d.iterdir())
        self.pipeline = A.Compose([A.Resize(size, size), A.HorizontalFlip(p=0.5)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return normalise(self.pipeline(image=read_image(path))["image"]), label


def write_jpeg_folder(root: Path, images: int, side: int) -> Path:
    """``images`` JPEGs of generated scenes (``side`` px), in two class sub-folders."""
    for i in range(images):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_scene(i, side).image).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def folder_ratio(images: int, side: int, size: int, repeats: int) -> tuple[float, float]:
    """Seconds per image of our folder pipeline and of torchvision's, one process, one core."""
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpeg_folder(Path(tmp), images, side)
        ours, theirs = _OurFolder(root, size), _TorchvisionFolder(root, size)
        one_opencv_thread()  # as cvtasks' loaders run it

        def epoch(ds: Dataset) -> Callable[[], None]:
            return lambda: [None for _ in DataLoader(ds, batch_size=32, shuffle=True, num_workers=0)]

        a, b = interleaved(epoch(ours), epoch(theirs), repeats=repeats)
    return a / images, b / images


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the three tables; return their figures."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--samples", type=int, default=512, help="scenes per data module for the loader rates")
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed run of the step ratio")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-steps", action="store_true", help="skip the step ratio (it builds and trains the default models)")
    ap.add_argument("--folder-images", type=int, default=256)
    ap.add_argument("--folder-side", type=int, default=375, help="side of the JPEGs written (a typical photo's scale)")
    ap.add_argument("--folder-size", type=int, default=224, help="the size both pipelines resize to")
    ns = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*self.trainer.*")  # training_step's self.log outside a Trainer
    threads = torch.get_num_threads()
    out: dict[str, Any] = {"loaders": {}, "steps": {}}
    torch.set_num_threads(1)  # one core: what a loader worker has
    print("training loader, one process on one core (images/s)")
    print(f"{'task':<16}{'px':>5}{'draws':>10}{'cached':>10}{'x15 workers':>14}")
    for task in ns.tasks:
        first, later, px = loader_rate(task, ns.samples)
        out["loaders"][task] = {"img_size": px, "first_epoch": first, "later_epochs": later,
                                "host_16_cores": later * WORKERS_OF_A_16_CORE_HOST}
        print(f"{task:<16}{px:>5}{first:>10.0f}{later:>10.0f}{later * WORKERS_OF_A_16_CORE_HOST:>14.0f}")
    a, b = folder_ratio(ns.folder_images, ns.folder_side, ns.folder_size, ns.repeats)
    out["folder"] = {"ours_ms": a * 1e3, "torchvision_ms": b * 1e3, "ratio": a / b, "images_per_s_per_core": 1 / a,
                     "host_16_cores": WORKERS_OF_A_16_CORE_HOST / a}
    print(f"\nfolder of {ns.folder_images} JPEGs ({ns.folder_side} px -> {ns.folder_size} px, decode/resize/flip/normalise), "
          f"ms per image on one core: ours {a * 1e3:.2f}, torchvision ImageFolder + v2 {b * 1e3:.2f}, ratio {a / b:.3f} "
          f"({1 / a:.0f} images/s per core; x15 workers: {WORKERS_OF_A_16_CORE_HOST / a:.0f})")
    torch.set_num_threads(threads)
    if not ns.no_steps:
        print("\ntraining step, default model: real loader (after one full pass) over one fixed batch")
        print(f"{'task':<16}{'workers':>8}{'loader (ms)':>13}{'fixed (ms)':>12}{'ratio':>8}")
        for task in ns.tasks:
            real, fixed, workers = step_ratio(task, ns.steps, ns.repeats)
            out["steps"][task] = {"loader_ms": real * 1e3, "fixed_ms": fixed * 1e3, "ratio": real / fixed, "workers": workers}
            print(f"{task:<16}{workers:>8}{real * 1e3:>13.1f}{fixed * 1e3:>12.1f}{real / fixed:>8.3f}")
    return out


if __name__ == "__main__":
    main()
