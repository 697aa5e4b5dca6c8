"""What every data module shares: seeded ratio splits, k-fold, loaders and the predict folder."""

from __future__ import annotations

import functools
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Literal, Sequence, TypeVar

import cv2
import numpy as np
import torch
from lightning import LightningDataModule
from lightning.fabric.utilities.seed import pl_worker_init_function
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..backbone import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AUTO_SIZE",
    "IMAGE_EXTENSIONS",
    "auto_image_size",
    "check_img_size",
    "header_sizes",
    "SplitDataModule",
    "GeneratedScenes",
    "split_indices",
    "list_images",
    "read_image",
    "ImageFolderPredictDataset",
    "normalise",
    "UnpaddedDistributedSampler",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: the img_size that asks for a size chosen from the images themselves (their median longer side)
AUTO_SIZE = "auto"

#: img_size auto reads the headers of at most this many images, evenly spread over the data
SIZE_SAMPLE = 1000


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted); a missing folder or one without images is an error."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist; pass an existing folder of images")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(
            f"folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); "
            f"point it at a folder of image files"
        )
    return files


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 array (H, W, 3); an unreadable file raises naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {str(path)!r} ({exc}); remove or replace the file") from exc


@functools.lru_cache(maxsize=16)
def _normalising(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel scale and shift that take uint8 pixels to ``(x / 255 - mean) / std`` in one multiply-add."""
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return (1.0 / (255.0 * s)).float().view(-1, 1, 1), (-m / s).float().view(-1, 1, 1)


def normalise(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 HxWx3 -> float CxHxW normalised by mean/std.

    Called once per item by every loader: the constants are made once per (mean, std), and the
    arithmetic is one fused multiply-add (equal to ``(x / 255 - mean) / std`` within float rounding).
    """
    scale, shift = _normalising(tuple(map(float, mean)), tuple(map(float, std)))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).astype(np.float32, order="C")).permute(2, 0, 1)
    return torch.addcmul(shift, x, scale)


def check_img_size(img_size: Any) -> int | str:
    """``img_size`` if it is ``auto`` or a whole number of pixels >= 16, else a ValueError naming it and the fix."""
    if img_size == AUTO_SIZE or (isinstance(img_size, int) and not isinstance(img_size, bool) and img_size >= 16):
        return img_size
    raise ValueError(f"img_size must be a whole number of pixels >= 16, or 'auto' (the images' median longer side, "
                     f"for data read from files), got {img_size!r}")


def auto_image_size(longer_sides: Sequence[int], step: int, minimum: int, maximum: int) -> int:
    """The median of ``longer_sides`` rounded to a multiple of ``step``, kept within [minimum, maximum].

    The bounds are moved onto the multiples of ``step`` too (minimum up, maximum down, never below
    one step), so the result always is one: a net whose coarsest stride is ``step`` then sees no
    partial cells, and a detector pads nothing.
    """
    if not longer_sides:
        raise ValueError("img_size auto found no image to measure; give img_size in pixels (IMG=...)")
    if step < 1 or minimum < 1 or maximum < 1:
        raise ValueError(f"img_size_step, img_size_min and img_size_max must be positive, got {step}, {minimum}, {maximum}")
    low = -(-minimum // step) * step
    high = max(step, maximum // step * step)
    rounded = int(statistics.median(longer_sides) / step + 0.5) * step
    return max(low, min(high, rounded))  # the backbone's smallest input wins over the cap


def header_sizes(paths: Sequence[str | Path], limit: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
    """(height, width) of up to ``limit`` of ``paths``, evenly spread, from their headers (no pixel is decoded)."""
    chosen = [paths[round(i * (len(paths) - 1) / max(1, limit - 1))] for i in range(limit)] if len(paths) > limit else list(paths)
    sizes = []
    for path in chosen:
        try:
            with Image.open(path) as im:
                sizes.append((im.height, im.width))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"cannot read image {str(path)!r} ({exc}); remove or replace the file") from exc
    return sizes


def _channel_values(name: str, values: Sequence[float], positive: bool) -> tuple[float, ...]:
    """Three per-channel floats (RGB), checked now: a bad ``mean``/``std`` names itself and the fix."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or (positive and any(v <= 0 for v in out)):
        raise ValueError(
            f"{name} must be three {'positive ' if positive else ''}numbers (R, G, B, for pixels in [0, 1]), "
            f"got {values!r}; leave it unset for ImageNet's, or use backbone_normalization(<backbone>)"
        )
    return out


def split_indices(
    n: int,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    num_folds: int | None = None,
    fold: int = 0,
    seed: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Train/val/test indices: by ratio, or with fold ``fold`` of ``num_folds`` as the test set.

    With k-fold, the remaining items are split into train and val in the ratio of split[0]:split[1].
    """
    if len(split) != 3 or any(r < 0 for r in split) or sum(split) <= 0:
        raise ValueError(f"split must be three non-negative ratios (train, val, test), got {tuple(split)}")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    if num_folds is not None:
        if num_folds < 2 or not 0 <= fold < num_folds:
            raise ValueError(f"need num_folds >= 2 and 0 <= fold < num_folds, got fold={fold}, num_folds={num_folds}")
        bounds = np.linspace(0, n, num_folds + 1).astype(int)
        test = perm[bounds[fold] : bounds[fold + 1]]
        rest = perm[: bounds[fold]] + perm[bounds[fold + 1] :]
        tv = split[0] + split[1]
        n_train = int(round(len(rest) * (split[0] / tv if tv else 1.0)))
        return rest[:n_train], rest[n_train:], test
    total = sum(split)
    n_train = int(round(n * split[0] / total))
    n_val = int(round(n * split[1] / total))
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


class ImageFolderPredictDataset(Dataset):
    """Every image in a folder, for predict: {"image", "path", "orig_size"}, transformed by ``transform``."""

    def __init__(self, folder: str | Path, transform: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.files = list_images(folder)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = read_image(self.files[i])
        return {"image": self.transform(img), "path": str(self.files[i]), "orig_size": img.shape[:2]}


def _predict_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    shapes = {tuple(it["image"].shape) for it in items}
    images: Any = torch.stack([it["image"] for it in items]) if len(shapes) == 1 else [it["image"] for it in items]
    return {"image": images, "path": [it["path"] for it in items], "orig_size": [it["orig_size"] for it in items]}


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, e.g. under SLURM or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_workers(num_workers: int | str, processes_per_machine: int = 1, training_on_cpu: bool = False) -> int:
    """Loader worker processes: a number as given, or ``auto``: the CPUs that training leaves free.

    On a GPU a training process needs one CPU of its own, so ``auto`` is the CPUs per device minus
    one (Lightning's suggestion, ``suggested_max_num_workers``; 0 where a device has one CPU). On a
    CPU the training process also computes the model, on torch's intra-op threads (one per core by
    default); a worker beside them takes a core from them in the middle of a step, which costs the
    step more than the batch costs to draw in the training process (docs/benchmarks.md, "The data
    path"). There ``auto`` is the CPUs beyond those threads: usually none.
    """
    if num_workers == "auto":
        busy = torch.get_num_threads() if training_on_cpu else 1
        return max(0, available_cpus() // max(1, processes_per_machine) - busy)
    return int(num_workers)


def one_opencv_thread(worker_id: int | None = None) -> None:
    """Run OpenCV (under albumentations) on one thread in this process; as a loader's ``worker_init_fn``, in a worker.

    A loader draws one image at a time, in the training process or in a worker that has one core.
    OpenCV's own thread pool would only contend there: with torch's intra-op threads in the training
    process (on 2 cores the classification default's step with its loader took 1.116 times a fixed
    batch's with OpenCV's pool, 1.042 times with one thread; docs/benchmarks.md), with the other
    workers in a worker. As a worker_init_fn it also
    seeds the worker as Lightning does when ``seed_everything(workers=True)`` asked it to (Lightning
    adds its own seeding only to a loader that has no worker_init_fn).
    """
    cv2.setNumThreads(1)
    if worker_id is not None and int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id)


def check_num_workers(num_workers: int | str) -> int | str:
    """``num_workers`` if it is ``auto`` or a whole number >= 0, else a ValueError naming it."""
    if num_workers == "auto" or (isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0):
        return num_workers
    raise ValueError(f"num_workers must be 'auto' or a whole number >= 0 (0: batches drawn in the training process), got {num_workers!r}")


class SplitDataModule(LightningDataModule):
    """Base of cvtasks' data modules: subclasses say how many items there are and build datasets.

    ``mean``/``std`` normalise the images every split (and predict) gives the model: None is
    ImageNet's; a backbone's own are ``backbone_normalization(name)`` (its spec). Detection modules
    keep images in [0, 1], as their models normalise inside, and leave them unused.

    ``img_size`` is pixels per side, or ``auto`` for modules that read image files: their median
    longer side on a multiple of ``img_size_step``, within ``img_size_min``..``img_size_max``
    (see ``auto_image_size``; the CLI links the step and the minimum from the backbone's spec).
    """

    collate_fn: Callable[[list[Any]], Any] | None = None

    def __init__(
        self,
        *,
        batch_size: int = 16,
        num_workers: int | str = "auto",
        img_size: int | Literal["auto"] = 128,
        img_size_step: int = 32,
        img_size_min: int = 32,
        img_size_max: int = 512,
        split: tuple[float, float, float] = (0.7, 0.15, 0.15),
        num_folds: int | None = None,
        fold: int = 0,
        seed: int = 0,
        augment: bool = True,
        predict_dir: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.mean = _channel_values("mean", IMAGENET_MEAN if mean is None else mean, positive=False)
        self.std = _channel_values("std", IMAGENET_STD if std is None else std, positive=True)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if check_img_size(img_size) == AUTO_SIZE and type(self).image_sizes is SplitDataModule.image_sizes:
            raise ValueError(f"img_size auto measures image files, and {type(self).__name__} reads none; "
                             f"give img_size in pixels (IMG=...)")
        self.batch_size = batch_size
        #: loader worker processes: a number or ``auto`` (resolved per loader: CPUs per device minus one)
        self.num_workers = check_num_workers(num_workers)
        #: pixels per side; ``auto`` until the subclass has listed its files and calls resolve_img_size()
        self.img_size: Any = img_size
        # img_size auto: a multiple of the backbone's coarsest stride, at least its smallest input (both
        # linked from the backbone by the CLI), at most img_size_max
        self.img_size_step, self.img_size_min, self.img_size_max = img_size_step, img_size_min, img_size_max
        #: how img_size was chosen, in words (printed when a fit starts)
        self.img_size_note = "given"
        self.split = tuple(split)
        self.num_folds = num_folds
        self.fold = fold
        self.seed = seed
        self.augment = augment
        self.predict_dir = predict_dir
        split_indices(10, self.split, num_folds, fold, seed)  # validate the arguments now, not after setup
        self.train_indices: list[int] = []
        self.val_indices: list[int] = []
        self.test_indices: list[int] = []
        self._datasets: dict[str, Dataset] = {}

    # -- what subclasses provide -------------------------------------------------------------
    def num_items(self) -> int:
        """How many samples there are in all."""
        raise NotImplementedError

    def make_dataset(self, indices: list[int], stage: str) -> Dataset:
        """The dataset of the given items for ``stage`` (fit, val or test)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes (known right after __init__, so it can be linked into the model)."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        return [f"class_{i}" for i in range(self.num_classes)]

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of the data's images, or of an even sample of them: what img_size auto measures."""
        raise NotImplementedError  # data modules that read files override it; the others refuse auto in __init__

    def resolve_img_size(self) -> int:
        """Replace img_size ``auto`` by the images' median longer side on the stride's multiples (see auto_image_size).

        Subclasses that read files call it once they have listed them.
        """
        if self.img_size == AUTO_SIZE:
            sides = [max(h, w) for h, w in self.image_sizes()]
            self.img_size = auto_image_size(sides, self.img_size_step, self.img_size_min, self.img_size_max)
            self.img_size_note = (
                f"auto: median longer side {statistics.median(sides):g} px over {len(sides)} images, on a multiple of "
                f"{self.img_size_step} (the backbone's stride), within {self.img_size_min}..{self.img_size_max}"
            )
        return self.img_size

    def augmentation_summary(self) -> str:
        """What training does to the images, in one line (printed when a fit starts)."""
        return "on" if self.augment else "off"

    def predict_transform(self, image: np.ndarray) -> torch.Tensor:
        """How predict prepares an image: normalised, at its own size unless a subclass resizes."""
        return normalise(image, self.mean, self.std)

    def make_predict_dataset(self, folder: str) -> Dataset:
        """The images of ``folder`` for predict."""
        return ImageFolderPredictDataset(folder, self.predict_transform)

    # -- Lightning hooks ---------------------------------------------------------------------
    def presplit(self) -> tuple[list[int], list[int], list[int]] | None:
        """A split fixed by the data itself (e.g. VOC's ImageSets); None means split by ratio."""
        return None

    def assign_splits(self) -> tuple[list[int], list[int], list[int]]:
        """The train/val/test item indices (the data's own split, else by ratio or fold), fixed on first call."""
        if not (self.train_indices or self.val_indices or self.test_indices):
            fixed = self.presplit()
            if fixed is not None:
                self.train_indices, self.val_indices, self.test_indices = fixed
            else:
                self.train_indices, self.val_indices, self.test_indices = split_indices(
                    self.num_items(), self.split, self.num_folds, self.fold, self.seed
                )
        return self.train_indices, self.val_indices, self.test_indices

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return
        self.assign_splits()
        for name, idx in (("fit", self.train_indices), ("val", self.val_indices), ("test", self.test_indices)):
            if name not in self._datasets:
                self._datasets[name] = self.make_dataset(idx, name)

    def _loader(self, dataset: Dataset, shuffle: bool, collate: Callable | None = None, evaluation: bool = False) -> DataLoader:
        sampler = self._evaluation_sampler(dataset) if evaluation else None
        trainer = getattr(self, "trainer", None)
        workers, _ = self.loader_workers(trainer)
        one_opencv_thread()  # the training process, and the workers it forks (spawned ones: worker_init_fn)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate or self.collate_fn,
            worker_init_fn=one_opencv_thread if workers > 0 else None,
            # workers live as long as the loader: drawn scenes cached in them are reused by later epochs
            persistent_workers=workers > 0,
            # page-locked batches copy to a GPU asynchronously; on a CPU they would only cost memory
            pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
            drop_last=False,
        )

    def loader_workers(self, trainer: Any = None) -> tuple[int, str]:
        """The loaders' worker processes under ``trainer`` (None: one process, on a GPU if one is there), and why, in words."""
        if trainer is not None:
            processes, on_cpu = trainer.num_devices, trainer.strategy.root_device.type == "cpu"
        else:
            processes, on_cpu = 1, not torch.cuda.is_available()
        workers = resolve_num_workers(self.num_workers, processes, on_cpu)
        if self.num_workers != "auto":
            return workers, "given"
        per_process = f"{available_cpus()} CPUs" + (f" / {processes} processes" if processes > 1 else "")
        if on_cpu:
            return workers, f"auto: {per_process}, less the {torch.get_num_threads()} threads that train on them"
        return workers, f"auto: {per_process}, less one for the training process"

    def _evaluation_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under N processes, each item on exactly one rank (ranks may differ by one); None on one process.

        Lightning would give validate/test a DistributedSampler, which pads the split with repeated
        items so that every rank has as many: a metric then counts those items twice. A sampler of
        the DistributedSampler type is left as it is by Lightning.
        """
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        if world <= 1:
            return None
        n = len(dataset)  # type: ignore[arg-type]
        if n < world:
            raise ValueError(
                f"the evaluation split has {n} items for {world} processes; every process needs at least one: "
                f"use fewer devices or a larger split (--data.split)"
            )
        return UnpaddedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._datasets["fit"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._datasets["val"], shuffle=False, evaluation=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._datasets["test"], shuffle=False, evaluation=True)

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_dir:
            raise ValueError("predict needs a folder of images: pass --data.predict_dir <folder>")
        return self._loader(self.make_predict_dataset(self.predict_dir), shuffle=False, collate=_predict_collate,
                            evaluation=True)


class UnpaddedDistributedSampler(DistributedSampler):
    """Items ``rank, rank + N, rank + 2N, ...`` of the dataset, in order: no padding, no repeats.

    Ranks get ``ceil`` or ``floor`` of ``len / N`` items; evaluation tolerates that because
    torchmetrics synchronises states (sums, or lists of any length) once, at compute time, and
    Lightning's epoch means are weighted by each rank's batch sizes.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)  # type: ignore[arg-type]
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


T = TypeVar("T")


class DrawnOnce(Generic[T]):
    """Items made by ``draw(i)`` on first use and kept: a generated scene is a pure function of its index and seed.

    So the first epoch draws, and later ones (augmentation still varies, applied after) cost a
    dictionary lookup. Each loader worker keeps what it drew; persistent workers keep it across
    epochs. Callers must not modify what they get.
    """

    def __init__(self, draw: Callable[[int], T]) -> None:
        self._draw = draw
        self._kept: dict[int, T] = {}

    def __call__(self, i: int) -> T:
        """Item ``i``, drawn now if it never was."""
        item = self._kept.get(i)
        if item is None:
            item = self._kept[i] = self._draw(i)
        return item

    def __len__(self) -> int:
        """How many items are kept."""
        return len(self._kept)


class GeneratedScenes:
    """Mixin of the shapes data modules: ``num_samples`` scenes, each rendered from its index (no files).

    ``scene_args`` are render_scene's keywords of the view (min_shapes, max_shapes, shape_scale),
    checked when the module is built, not when the first batch is drawn.
    """

    img_size: int

    def init_scenes(self, num_samples: int, render_size: int | None, **scene_args: Any) -> None:
        """Keep and check the scene settings (call after SplitDataModule.__init__)."""
        from .shapes import render_scene

        if num_samples < 3:
            raise ValueError(f"num_samples must be at least 3 (one per split), got {num_samples}")
        self.num_samples = num_samples
        self.render_size = render_size or self.img_size
        if "shape_scale" in scene_args:
            scene_args["shape_scale"] = tuple(scene_args["shape_scale"])
        self.scene_args = scene_args
        render_scene(0, 16, **scene_args)  # raises on bad min_shapes / max_shapes / shape_scale

    def num_items(self) -> int:
        """Number of scenes."""
        return self.num_samples
