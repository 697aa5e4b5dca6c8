"""Segmentation data: joint transforms stay aligned and invent no labels; shapes and VOC-folder modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvtasks.data.segmentation import (
    IGNORE_INDEX,
    VOC_CLASSES,
    ShapesSegmentationDataModule,
    VOCSegmentationDataModule,
    read_mask,
    save_index_png,
    segmentation_transforms,
    voc_palette,
)
from cvtasks.visualize import colour_overlay

# one distinct colour per label, far apart so that blending at edges cannot be mistaken for another
COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)


def _painted(h: int = 80, w: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A mask of random rectangles (labels 0..4) and an image painting each label in its colour."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), dtype=np.uint8)
    for label in range(1, 5):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        mask[y : y + rng.integers(12, 30), x : x + rng.integers(12, 30)] = label
    return COLOURS[mask], mask


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 5x5 neighbourhood has one label and lies inside the image: away from label edges
    and from the image border, where a rotation's linear interpolation blends in the black fill."""
    pad = np.pad(mask.astype(np.int32), 2, mode="constant", constant_values=-1)
    same = np.ones(mask.shape, dtype=bool)
    for dy in range(5):
        for dx in range(5):
            same &= pad[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] == mask
    return same


def test_train_transforms_keep_image_and_mask_aligned() -> None:
    t = segmentation_transforms(64, train=True, colour=False, normalize=False)
    checked = 0
    for seed in range(400):  # 400 draws: a misalignment in 1 of 100 random draws must show
        image, mask = _painted(seed=seed % 20)
        t.set_random_seed(seed)  # albumentations 2 draws from its own generator, not numpy's
        out = t(image=image, mask=mask)
        img, m = out["image"], out["mask"]
        assert img.shape == (64, 64, 3) and m.shape == (64, 64)
        inside = _interior(m) & (m != IGNORE_INDEX)
        diff = np.abs(img[inside].astype(int) - COLOURS[m[inside]].astype(int)).max(axis=1)
        assert (diff <= 10).mean() > 0.99, f"seed {seed}: image colours do not match mask labels"
        checked += int(inside.sum())
    assert checked > 400 * 1000


def test_interpolation_never_invents_labels_and_rotation_fills_ignore() -> None:
    t = segmentation_transforms(48, train=True, rotate=30)
    saw_ignore = False
    for seed in range(20):
        image, mask = _painted(seed=seed)
        out = t(image=image, mask=mask)
        labels = set(np.unique(out["mask"]).tolist())
        assert labels <= set(np.unique(mask).tolist()) | {IGNORE_INDEX}
        saw_ignore |= IGNORE_INDEX in labels
        assert out["image"].dtype == np.float32  # normalised
    assert saw_ignore, "rotations must fill the corners they bring in with the ignore label"
    ev = segmentation_transforms(37, train=False)(image=image, mask=mask)
    assert ev["mask"].shape == (37, 37) and set(np.unique(ev["mask"]).tolist()) <= set(np.unique(mask).tolist())


def test_shapes_segmentation_module() -> None:
    dm = ShapesSegmentationDataModule(num_samples=12, img_size=48, batch_size=4, split=(0.5, 0.25, 0.25))
    assert dm.num_classes == 6 and dm.class_names[0] == "background" and dm.class_names[1] == "circle"
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (3, 3, 48, 48) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (3, 48, 48) and batch["mask"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= set(range(6))
    assert (batch["mask"] > 0).any() and (batch["mask"] == 0).any()
    assert batch["id"][0].startswith("scene")
    # deterministic per index: the same module gives the same validation masks
    again = ShapesSegmentationDataModule(num_samples=12, img_size=48, batch_size=4, split=(0.5, 0.25, 0.25))
    again.setup("fit")
    assert torch.equal(next(iter(again.val_dataloader()))["mask"], batch["mask"])


def test_palette_png_round_trip(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 2], [20, 255, 0]], dtype=np.uint8)
    path = save_index_png(mask, tmp_path / "m.png")
    with Image.open(path) as im:
        assert im.mode == "P"
        assert tuple(im.getpalette()[3:6]) == (128, 0, 0)  # VOC's aeroplane red
    assert np.array_equal(read_mask(path), mask)
    Image.fromarray(voc_palette()[mask]).save(tmp_path / "rgb.png")  # a mask drawn in VOC's colours
    assert np.array_equal(read_mask(tmp_path / "rgb.png"), mask)
    Image.fromarray(mask).save(tmp_path / "grey.png")
    assert np.array_equal(read_mask(tmp_path / "grey.png"), mask)
    over = colour_overlay(np.full((2, 3, 3), 100, np.uint8), mask)
    assert (over[0, 0] == 100).all() and not (over[0, 1] == 100).all()


def _voc_folder(root: Path, n: int = 6, num_classes: int = 3, sizes=None) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = sizes[i] if sizes else (30 + 3 * i, 40 + i)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"img{i}.jpg")
        mask = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
        mask[0, :] = 255  # VOC's object borders
        save_index_png(mask, root / "SegmentationClass" / f"img{i}.png")
    return root


def test_voc_folder_module(tmp_path: Path) -> None:
    root = _voc_folder(tmp_path / "voc")
    dm = VOCSegmentationDataModule(root=str(root), num_classes=3, img_size=32, batch_size=2, split=(0.5, 0.25, 0.25))
    assert dm.class_names == ["class_0", "class_1", "class_2"]
    dm.setup("fit")
    assert len(dm.train_indices) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 255}
    assert VOCSegmentationDataModule(root=str(root)).class_names == list(VOC_CLASSES)  # 21 classes by default


def test_voc_image_sets_and_labels_file(tmp_path: Path) -> None:
    root = _voc_folder(tmp_path / "voc")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("img0\nimg1\nimg2\nimg3\n")
    (sets / "val.txt").write_text("img4\nimg5\n")
    (root / "labels.txt").write_text("sky\nroad\ncar\n")
    dm = VOCSegmentationDataModule(root=str(root), img_size=32)
    assert dm.num_classes == 3 and dm.class_names == ["sky", "road", "car"]
    dm.setup("fit")
    ids = [p[0].stem for p in dm._pairs]
    assert [ids[i] for i in dm.train_indices] == ["img0", "img1", "img2", "img3"]
    assert [ids[i] for i in dm.val_indices] == ["img4", "img5"]
    with pytest.raises(ValueError, match="labels.txt"):
        VOCSegmentationDataModule(root=str(root), num_classes=5)


def test_voc_mask_size_mismatch_names_the_file(tmp_path: Path) -> None:
    root = _voc_folder(tmp_path / "voc", num_classes=3)
    save_index_png(np.zeros((10, 10), np.uint8), root / "SegmentationClass" / "img3.png")
    dm = VOCSegmentationDataModule(root=str(root), num_classes=3, img_size=32)
    with pytest.raises(ValueError, match=r"img3\.png.*img3\.jpg"):
        dm.setup("fit")


def test_voc_label_out_of_range_names_the_file(tmp_path: Path) -> None:
    root = _voc_folder(tmp_path / "voc", num_classes=3)
    mask = read_mask(root / "SegmentationClass" / "img2.png")
    mask[5, 5] = 7
    save_index_png(mask, root / "SegmentationClass" / "img2.png")
    dm = VOCSegmentationDataModule(root=str(root), num_classes=3, img_size=32)
    with pytest.raises(ValueError, match=r"img2\.png.*\[7\].*0\.\.2"):
        dm.setup("fit")
    # without the up-front check, reading the sample fails the same way
    lazy = VOCSegmentationDataModule(root=str(root), num_classes=3, img_size=32, validate=False, split=(1.0, 0.0, 0.0))
    lazy.setup("fit")
    with pytest.raises(ValueError, match=r"img2\.png"):
        [lazy._datasets["fit"][i] for i in range(6)]


def test_voc_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        VOCSegmentationDataModule(root=str(tmp_path))
