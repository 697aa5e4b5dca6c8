"""What a CNN on a user's folder must beat: classical classifiers on downscaled pixels, on the same split.

    python -m benchmarks baseline <folder> [--size 32] [--split 0.7 0.15 0.15] [--seed 0] [--num_folds K --fold i]
    python -m benchmarks digits-folder <out>      # scikit-learn's 1797 scanned digits as a class-per-folder of PNGs

The split is the data module's own (``ImageFolderDataModule.assign_splits`` with the same split, folds
and seed as ``make train DATA=<folder>``), so the baseline's test images are the CNN's test images.
Each image is resized to ``size`` x ``size`` (by default the images' median longer side, at most 32:
pixels beyond that only slow a kernel machine down), scaled to [0, 1] and standardised per feature.
Each model's hyper-parameter is chosen on the validation split, as the CNN's best checkpoint is; the
test accuracy of the one chosen is what is reported.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from cvtasks.data.base import header_sizes, read_image
from cvtasks.data.classification import ImageFolderDataModule

def _svm(c: float) -> Any:
    """Standardised pixels into an RBF support-vector machine with penalty ``c``."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(kernel="rbf", C=c, gamma="scale"))


def _logistic_regression(c: float) -> Any:
    """Standardised pixels into a multinomial logistic regression with inverse regularisation ``c``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))


#: the classical models: name -> (its pipeline for a value of C, the values of C tried on the validation split)
MODELS: dict[str, tuple[Callable[[float], Any], tuple[float, ...]]] = {
    "svm (rbf)": (_svm, (1.0, 10.0, 100.0)),
    "logistic regression": (_logistic_regression, (0.01, 0.1, 1.0)),
}

#: the largest side pixels are downscaled to by default
MAX_DEFAULT_SIZE = 32


def pixel_features(paths: list[Path], size: int) -> np.ndarray:
    """(N, size*size*3) floats in [0, 1]: each image resized to size x size (area-averaged when shrunk)."""
    rows = []
    for path in paths:
        image = Image.fromarray(read_image(path)).resize((size, size), Image.Resampling.BOX if size <= 64 else Image.Resampling.BILINEAR)
        rows.append(np.asarray(image, dtype=np.float32).ravel() / 255.0)
    return np.stack(rows)


def default_size(paths: list[Path]) -> int:
    """The images' median longer side (from the headers img_size auto reads too), at most MAX_DEFAULT_SIZE."""
    return int(min(MAX_DEFAULT_SIZE, statistics.median(max(h, w) for h, w in header_sizes(paths))))


def run_baseline(folder: str | Path, *, size: int | None = None, split: tuple[float, float, float] = (0.7, 0.15, 0.15),
                 seed: int = 0, num_folds: int | None = None, fold: int = 0,
                 models: dict[str, tuple[Callable[[float], Any], tuple[float, ...]]] = MODELS) -> dict[str, Any]:
    """Fit each model on the folder's train split, choose its hyper-parameter on val, score it on test.

    Returns the split sizes, the pixel size, and per model its chosen value, val and test accuracy.
    """
    dm = ImageFolderDataModule(root=str(folder), split=split, seed=seed, num_folds=num_folds, fold=fold)
    train, val, test = dm.assign_splits()
    if not (train and test):
        raise ValueError(f"the split {split} leaves {len(train)} training and {len(test)} test images of "
                         f"{folder}; a baseline needs both (give a split with non-zero train and test parts)")
    items = dm.items
    paths = [p for p, _ in items]
    labels = np.array([label for _, label in items])
    size = size or default_size(paths)
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    features = pixel_features(paths, size)
    results: dict[str, dict[str, float]] = {}
    for name, (make_model, values) in models.items():
        # without a validation split the first value is taken: there is nothing honest to choose it on
        fitted = [(value, make_model(value).fit(features[train], labels[train])) for value in (values if val else values[:1])]
        scored = [(float(model.score(features[val], labels[val])) if val else float("nan"), value, model)
                  for value, model in fitted]
        val_acc, value, model = max(scored, key=lambda row: row[0]) if val else scored[0]
        results[name] = {"C": value, "val_acc": val_acc, "test_acc": float(model.score(features[test], labels[test]))}
    return {"folder": str(folder), "classes": dm.class_names, "size": size,
            "train": len(train), "val": len(val), "test": len(test), "models": results}


def format_report(report: dict[str, Any]) -> str:
    """The baseline's figures as a table, with the test accuracy a CNN must beat."""
    lines = [f"baseline on {report['folder']}: {report['train']} train / {report['val']} val / {report['test']} test images, "
             f"{len(report['classes'])} classes, pixels at {report['size']}x{report['size']}",
             f"{'model':<34}{'val acc':>9}{'test acc':>10}"]
    for name, r in report["models"].items():
        label = f"{name}, C={r['C']:g}"
        lines.append(f"{label:<34}{r['val_acc']:>9.4f}{r['test_acc']:>10.4f}")
    best = max(r["test_acc"] for r in report["models"].values())
    lines.append(f"a CNN must beat test accuracy {best:.4f} (make train DATA=... prints test/acc among its final metrics)")
    return "\n".join(lines)


def write_digits_folder(out: str | Path) -> Path:
    """scikit-learn's digits (1797 8x8 greyscale scans, 10 classes) as ``out/<digit>/<index>.png``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(out).expanduser()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{str(root)!r} is not empty; give a new or empty folder for the digits")
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        # the scans' 17 grey levels (0..16) spread over 0..255
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{index:04d}.png")
    return root


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m benchmarks baseline <folder>`: print the classical baselines' table; returns the report."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks baseline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a folder with one sub-folder of images per class (what DATA= is given)")
    ap.add_argument("--size", type=int, default=None, help=f"pixels per side (default: median longer side, at most {MAX_DEFAULT_SIZE})")
    ap.add_argument("--split", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
                    help="the ratios of the run to compare with (default: the configs' 0.7 0.15 0.15)")
    ap.add_argument("--seed", type=int, default=0, help="the data seed of that run (--data.seed; default 0)")
    ap.add_argument("--num_folds", type=int, default=None, help="k-fold as in --data.num_folds")
    ap.add_argument("--fold", type=int, default=0, help="the test fold, as in --data.fold")
    ns = ap.parse_args(argv)
    report = run_baseline(ns.folder, size=ns.size, split=tuple(ns.split), seed=ns.seed, num_folds=ns.num_folds, fold=ns.fold)
    print(format_report(report))
    return report


def digits_main(argv: list[str] | None = None) -> Path:
    """`python -m benchmarks digits-folder <out>`: write scikit-learn's digits as a class-per-folder of PNGs."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks digits-folder", description=write_digits_folder.__doc__)
    ap.add_argument("out", help="a new or empty folder")
    root = write_digits_folder(ap.parse_args(argv).out)
    print(f"wrote 1797 digits into {root}/<0..9>/; train on them with make train DATA={root}")
    return root


COMMANDS: dict[str, Callable[[list[str]], Any]] = {"baseline": main, "digits-folder": digits_main}
